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
    (["img2img", "{img}", "x", "--height", "100000", "--width", "100000"], "--width/--height 100000x100000"),
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


def test_sizes_past_the_models_token_limit_are_one_line_errors(ref_dir, tmp_path, capsys):
    assert main(["generate", "x", "--model", str(ref_dir), "--device", "cpu", "--height", "65536", "--width", "65536",
                 "--out", str(tmp_path / "o.png")]) == 2  # it used to try to allocate 8 GiB and print a traceback
    err = capsys.readouterr().err.strip()
    assert "at most 512 pixels a side for this model" in err and len(err.splitlines()) == 1


class _Bomb(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, index):
        from amused.images import ImageError

        raise ImageError("training image a.png: image is 9000x9000")


def test_errors_from_data_loader_workers_print_as_the_original_one_line():
    from amused.cli import error_line

    with pytest.raises(ValueError) as e:
        next(iter(torch.utils.data.DataLoader(_Bomb(), num_workers=1)))
    assert "Original Traceback" in str(e.value)  # what `--dataloader_num_workers 1` used to print, many lines
    assert error_line(e.value) == "training image a.png: image is 9000x9000"


def test_a_training_error_is_the_last_line_not_under_a_progress_bar(ref_dir, tmp_path, capsys):
    from test_untrusted_files import bomb

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.png").write_bytes(bomb(9000, 9000))
    assert main(["finetune", "--model", str(ref_dir), "--train_data_dir", str(tmp_path / "data"), "--instance_prompt",
                 "x", "--resolution", "8", "--max_train_steps", "1", "--train_batch_size", "1", "--output_dir",
                 str(tmp_path / "run")]) == 2
    lines = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    assert lines[-1].startswith("amused finetune: error: training image") and "9000x9000" in lines[-1]


@pytest.mark.parametrize("argv,message", [
    (["--output_dir", "{file}"], "is a file, not a folder"),
    (["--output_dir", "{file}/run"], "is a file, not a folder"),
    (["--resolution", "6", "--output_dir", "{tmp}/run"], "--resolution 6 must be a positive multiple of 4"),
])
def test_finetune_output_folder_and_resolution_are_checked_before_training(ref_dir, tmp_path, capsys, argv, message):
    (tmp_path / "a_file").write_text("x")
    argv = [a.format(file=tmp_path / "a_file", tmp=tmp_path) for a in argv]
    base = ["finetune", "--model", str(ref_dir), "--instance_data_image", str(tmp_path / "a_file"), "--instance_prompt",
            "x", "--max_train_steps", "1"]
    try:
        assert main([*base, "--resolution", "8", *argv] if "--resolution" not in argv else [*base, *argv]) == 2
    except SystemExit as e:  # argparse refuses --output_dir itself
        assert e.code == 2
    assert message in capsys.readouterr().err
