import warnings
from pathlib import Path

import pytest
import torch

from tiny import load_reference, save_reference_checkpoint

warnings.filterwarnings("ignore", message=".*deprecated.*")


@pytest.fixture(scope="session")
def ref_dir(tmp_path_factory) -> Path:
    """A tiny random aMUSEd checkpoint written by diffusers in the published layout."""
    return save_reference_checkpoint(tmp_path_factory.mktemp("ref"))


@pytest.fixture(scope="session")
def ref_pipes(ref_dir):
    """diffusers' three pipelines, each loaded fresh (the inpaint one mutates its scheduler)."""
    return {name: load_reference(ref_dir, name)
            for name in ("AmusedPipeline", "AmusedImg2ImgPipeline", "AmusedInpaintPipeline")}


@pytest.fixture()
def ours(ref_dir):
    from amused import AmusedPipeline

    return AmusedPipeline.from_pretrained(ref_dir)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)
