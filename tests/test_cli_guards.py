"""Command-line input that must fail cleanly, in one line naming the flag, before any model is loaded: devices this
machine lacks, unusable output paths, seeds out of range, and the settings a PNG records (`--from-image`), which
anyone may have written."""

import json

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from amused.cli import main


@pytest.mark.parametrize("device,message", [
    ("bogus", "--device 'bogus' is not a device"),
    ("cuda", "no CUDA device" if not torch.cuda.is_available() else None),
])
def test_devices_this_machine_lacks(ref_dir, tmp_path, capsys, device, message):
    if message is None:
        pytest.skip("this machine has CUDA")
    assert main(["generate", "x", "--model", str(ref_dir), "--device", device, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,message", [
    (["generate", "x", "--out", "/dev/null/x.png"], "--out"),
    (["generate", "x", "--out", "{tmp}"], "--out"),  # a folder
    (["generate", "x", "--grid", "{tmp}/g.jpg", "--num-images", "2"], "--grid"),
    (["generate", "x", "--seed", str(2**64)], "--seed must be a whole number in [0, 2**64)"),
    (["img2img", "{img}", "x", "--num-images", "0"], "--num-images must be >= 1"),
    (["variations", "{img}", "--num-images", "0", "--grid", "{tmp}/g.png"], "--num-images must be >= 1"),
])
def test_bad_outputs_and_counts_fail_before_loading(ref_dir, tmp_path, capsys, monkeypatch, argv, message):
    import amused.runtime

    monkeypatch.setattr(amused.runtime, "load_engine", lambda *a, **k: pytest.fail("the model was loaded"))
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    argv = [a.format(tmp=tmp_path, img=tmp_path / "in.png") for a in argv]
    assert main([*argv, "--model", str(ref_dir), "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err


def _png_with(tmp_path, record) -> str:
    info = PngInfo()
    info.add_text("amused", record if isinstance(record, str) else json.dumps(record))
    path = tmp_path / "recorded.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return str(path)


GOOD = {"prompt": "a cat", "seed": 3, "batch_prompts": ["a cat"], "batch_index": 0, "steps": 2, "model": "embedded"}


@pytest.mark.parametrize("change,message", [
    ({"seed": None}, "recorded seed must be a whole number"),
    ({"seed": "3"}, "recorded seed must be a whole number"),
    ({"batch_index": 99}, "recorded batch_index must be a whole number in [0, 0]"),
    ({"height": 4096, "width": 4096}, "recorded height must be a whole number in [1, 1024]"),
    ({"steps": 10**6}, "recorded steps"),
    ({"temperature": [1, 2, 3]}, "recorded temperature"),
    ({"model": "someone/else"}, "--use-recorded-model"),
    ({"lora": "/tmp/evil.safetensors"}, "--use-recorded-model"),
])
def test_from_image_checks_every_recorded_field(ref_dir, tmp_path, capsys, change, message):
    record = {**GOOD, **change}
    record = {k: v for k, v in record.items() if v is not None}
    argv = ["generate", "--from-image", _png_with(tmp_path, record), "--out", str(tmp_path / "o.png"), "--device",
            "cpu"]
    if "model" not in change:
        argv += ["--model", str(ref_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("text,message", [("[1, 2]", "must be a JSON object"), ("{not json", "not valid JSON")])
def test_from_image_that_is_not_a_record(ref_dir, tmp_path, capsys, text, message):
    assert main(["generate", "--from-image", _png_with(tmp_path, text), "--model", str(ref_dir), "--out",
                 str(tmp_path / "o.png"), "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err


def test_inpaint_rect_too_small_names_the_models_token_size(ref_dir, tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    assert main(["inpaint", str(tmp_path / "in.png"), "x", "--rect", "0", "0", "1", "1", "--model", str(ref_dir),
                 "--device", "cpu", "--out", str(tmp_path / "o.png")]) == 2
    assert "2x2 px per token" in capsys.readouterr().err  # the tiny model's VQ factor, not the published 16
