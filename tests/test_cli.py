"""The `amused` command line, run in-process on the tiny checkpoint (and once on the embedded model)."""

import json

import numpy as np
import PIL.Image
import pytest

from amused.cli import main
from amused.embedded import embedded_model_path


def test_generate_single_image_with_metadata_and_replay(ref_dir, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["generate", "a cat", "--model", str(ref_dir), "--out", str(out), "--seed", "4", "--height", "8",
                 "--width", "8", "--device", "cpu", "--quiet"]) == 0
    meta = json.loads(PIL.Image.open(out).info["amused"])
    assert meta["prompt"] == "a cat" and meta["seed"] == 4 and meta["steps"] == 12 and meta["guidance_scale"] == 10
    again = tmp_path / "b.png"
    assert main(["generate", "--from-image", str(out), "--model", str(ref_dir), "--out", str(again), "--device",
                 "cpu", "--quiet"]) == 0
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(PIL.Image.open(again)))


def test_prompts_file_batches_grid_and_replay_of_a_batched_image(ref_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n\na dog\na fish\n")
    out_dir = tmp_path / "out"
    assert main(["generate", "--prompts-file", str(prompts), "--num-images", "2", "--batch-size", "4", "--model",
                 str(ref_dir), "--out-dir", str(out_dir), "--grid", str(tmp_path / "grid.png"), "--height", "8",
                 "--width", "8", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(result["images"]) == 6 and result["prompts"] == ["a cat", "a dog", "a fish"]
    assert result["grid"] == str(tmp_path / "grid.png") and result["fast"] == "off"
    assert len(list(out_dir.glob("*.png"))) == 6  # the grid goes where --grid says, not into --out-dir
    files = sorted(out_dir.glob("*.png"))
    assert [f.name for f in files][:2] == ["0000_a-cat.png", "0001_a-cat.png"]
    assert PIL.Image.open(tmp_path / "grid.png").size == (16, 24)  # 2 columns x 3 rows of 8x8
    fifth = json.loads(PIL.Image.open(files[4]).info["amused"])
    assert fifth["batch_index"] == 0 and fifth["seed"] == 1 and fifth["prompt"] == "a fish"
    replay = tmp_path / "r.png"
    assert main(["generate", "--from-image", str(files[5]), "--model", str(ref_dir), "--out", str(replay),
                 "--device", "cpu", "--quiet"]) == 0
    assert np.array_equal(np.asarray(PIL.Image.open(files[5])), np.asarray(PIL.Image.open(replay)))


@pytest.mark.parametrize("argv,message", [
    (["generate", "x", "--height", "7"], "positive multiple of 4 for this model; nearest for 7: 4 or 8"),
    (["generate", "x", "--steps", "0"], "num_inference_steps"),
    (["generate", "--prompts-file", "/nonexistent.txt"], "--prompts-file /nonexistent.txt does not exist"),
    (["generate", "x", "--out", "a.jpg"], "only .png"),
    (["generate"], "give a PROMPT"),
])
def test_bad_input_exits_2_with_the_argument_named(ref_dir, tmp_path, capsys, argv, message):
    argv = argv + ["--model", str(ref_dir), "--device", "cpu"]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "x.png")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_option_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "x", "--guidance", "3"])
    assert e.value.code == 2
    assert "unrecognized arguments: --guidance" in capsys.readouterr().err


def test_embedded_model_is_the_default(tmp_path):
    out = tmp_path / "apple.png"
    assert main(["generate", "red apple, openmoji style", "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    image = PIL.Image.open(out)
    assert image.size == (64, 64)
    meta = json.loads(image.info["amused"])
    defaults = json.loads((embedded_model_path() / "generation_config.json").read_text())
    assert meta["model"] == "embedded" and meta["guidance_scale"] == defaults["guidance_scale"] != 10.0  # not diffusers'
    assert defaults["guidance_scale"] == 1.5  # chosen by measurement (docs/embedded_model.md, Session 10)
    assert meta["temperature"] == [0.5, 0]
    named = tmp_path / "named.png"  # `--model embedded` names the same model, as in every other command
    assert main(["generate", "red apple, openmoji style", "--model", "embedded", "--out", str(named), "--device",
                 "cpu", "--quiet"]) == 0
    assert np.array_equal(np.asarray(PIL.Image.open(named)), np.asarray(image))


def test_img2img_inpaint_and_variations_commands(ref_dir, tmp_path, capsys):
    src = tmp_path / "src.png"
    assert main(["generate", "a cat", "--model", str(ref_dir), "--out", str(src), "--height", "16", "--width", "16",
                 "--device", "cpu", "--quiet"]) == 0
    common = ["--model", str(ref_dir), "--device", "cpu", "--quiet"]
    assert main(["inpaint", str(src), "a dog", "--rect", "0", "0", "8", "8", "--out", str(tmp_path / "i.png")] + common) == 0
    before, after = np.asarray(PIL.Image.open(src)), np.asarray(PIL.Image.open(tmp_path / "i.png"))
    assert before.shape == after.shape == (16, 16, 3)
    assert main(["variations", str(src), "--num-images", "2", "--out", str(tmp_path / "v.png"), "--grid",
                 str(tmp_path / "g.png")] + common) == 0
    assert json.loads(PIL.Image.open(tmp_path / "v_1.png").info["amused"])["prompt"] == "a cat"  # recorded prompt
    assert main(["img2img", str(src), "a fish", "--strength", "1.5", "--out", str(tmp_path / "x.png")] + common) == 2
    assert "strength" in capsys.readouterr().err
    assert main(["inpaint", str(src), "a dog", "--rect", "0", "0", "99", "8", "--out", str(tmp_path / "y.png")]
                + common) == 2
    assert "--rect 0 0 99 8" in capsys.readouterr().err
