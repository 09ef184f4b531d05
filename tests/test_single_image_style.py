"""scripts/single_image_style.py's feedback round (StyleDrop's iterative training): which generated images are kept,
and that the folder they are written to is the image folder `amused finetune --train_data_dir` reads."""

import importlib.util
import sys
from pathlib import Path

import torch
from PIL import Image

from amused.training.data import ImageFolder

ROOT = Path(__file__).resolve().parents[1]


def script():
    spec = importlib.util.spec_from_file_location("single_image_style", ROOT / "scripts" / "single_image_style.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["single_image_style"] = module
    spec.loader.exec_module(module)
    return module


def test_feedback_keeps_recognised_images_with_the_most_ink():
    sis = script()
    ink = [0.9, 0.2, 0.5, 0.7, 0.4]
    recognised = [False, True, True, True, True]  # the inkiest image lost its content: not kept
    assert sis.pick_feedback(ink, recognised, keep=3) == [3, 2, 4]
    assert sis.pick_feedback(ink, recognised, keep=10) == [3, 2, 4, 1]  # fewer recognised than keep: all of them
    assert sis.pick_feedback(ink, [False] * 5, keep=3) == []


def test_ink_shares_score_each_image_alone():
    sis = script()
    paper = torch.tensor(sis.PAPER / 255.0).float()[:, None, None].expand(3, 8, 8)
    inked = paper.clone()
    inked[:, :4] = torch.tensor(sis.INK[0] / 255.0).float()[:, None, None]  # top half dark ink
    red = paper.clone()
    red[:, :4] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    assert sis.ink_shares(torch.stack([inked, red])) == [1.0, 0.0]


def test_feedback_folder_is_a_train_data_dir(tmp_path):
    sis = script()
    images = [Image.new("RGB", (8, 8), (k * 40, 0, 0)) for k in range(3)]
    captions = ["grinning face, ink style", "giraffe, ink style", "lobster, ink style"]
    sis.write_image_folder(tmp_path / "feedback_1", images, captions)
    folder = ImageFolder(tmp_path / "feedback_1")
    assert len(folder) == 3
    assert [folder[k]["caption"] for k in range(3)] == captions
    assert folder[2]["image"].getpixel((0, 0)) == (80, 0, 0)
    assert sis.to_pil(torch.ones(3, 4, 4)).getpixel((0, 0)) == (255, 255, 255)
