"""The training loop: a tiny model overfits, a SIGKILLed run resumes to the same weights, checkpoints appear
atomically and only the last N stay, LoRA and from-scratch runs save what the pipeline loads, the saved pipeline
carries the base model's generation settings, and 'embedded' names the shipped model. (Several processes:
test_training_distributed.py; resume checks and shards: test_training_resume.py.)"""

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from amused import lora
from amused.pipeline import AmusedPipeline
from amused.training import checkpoint as ckpt
from amused.training.cli import main
from train_tiny import (TRAIN_UVIT, kill_after_checkpoint, make_image_folder, make_pipeline,  # noqa: F401
                        one_torch_thread)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    return make_pipeline(root / "pipe"), make_image_folder(root / "imgs", n=4, size=8)


def finetune_args(pipe, images, out, steps, *extra):
    return ["finetune", "--pretrained_model_name_or_path", str(pipe), "--train_data_dir", str(images),
            "--resolution", "8", "--train_batch_size", "2", "--max_train_steps", str(steps), "--learning_rate", "3e-3",
            "--logging_steps", "1", "--output_dir", str(out), *extra]


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "logs" / "train_log.jsonl").read_text().splitlines()]


def weights(folder):
    return load_file(str(Path(folder) / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_tiny_model_overfits_captioned_images(setup, tmp_path):
    pipe, images = setup
    main(finetune_args(pipe, images, tmp_path / "run", 80, "--train_batch_size", "4", "--checkpointing_steps", "0",
                       "--validation_prompts", "red pattern 0", "--validation_steps", "40"))
    assert (tmp_path / "run" / "validation" / "step-80" / "00.png").is_file()
    log = read_log(tmp_path / "run")
    first, last = log[:5], log[-5:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(first, "loss") > 2.3 and mean(last, "loss") < 1.3  # log(16) = 2.77 -> near the smoothing floor
    assert mean(first, "masked_accuracy") < 0.3 and mean(last, "masked_accuracy") > 0.8
    loaded = AmusedPipeline.from_pretrained(tmp_path / "run")  # the published layout, loadable
    assert loaded("red pattern 0", num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 3)


RESUME_FLAGS = ["--checkpointing_steps", "4", "--checkpoints_total_limit", "2", "--cond_dropout_prob", "0.3",
                "--use_ema", "--ema_decay", "0.9", "--random_flip", "--lr_scheduler", "cosine", "--lr_warmup_steps",
                "3", "--gradient_accumulation_steps", "2"]


def test_sigkilled_run_resumes_to_the_same_weights(setup, tmp_path):
    pipe, images = setup
    main(finetune_args(pipe, images, tmp_path / "straight", 20, *RESUME_FLAGS))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "amused.training.cli",
           *finetune_args(pipe, images, out, 20, *RESUME_FLAGS, "--debug_sleep_per_step", "0.25")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # computes as this process does (one_torch_thread)
    assert kill_after_checkpoint(cmd, out / "checkpoint-8", 0.3, env=env) == -signal.SIGKILL
    assert not (out / "model_index.json").exists()
    for folder in ckpt.list_checkpoints(out):  # whatever survived the kill is complete
        assert {"training_state.json", "model.safetensors", "optimizer.bin", "random_states_0.pkl"} <= {
            p.name for p in folder.iterdir()}
    main(finetune_args(pipe, images, out, 20, *RESUME_FLAGS, "--resume_from_checkpoint", "latest"))
    a, b = weights(tmp_path / "straight"), weights(out)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["step"] for r in read_log(out)] == list(range(1, 21))  # the killed run's extra lines were dropped
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]  # noqa: E731
    assert strip(read_log(out)) == strip(read_log(tmp_path / "straight"))
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-16", "checkpoint-20"]  # keep-last-2


def test_checkpoint_directory_appears_atomically(setup, tmp_path, monkeypatch):
    from accelerate import Accelerator

    pipe, images = setup
    real = Accelerator.save_state

    def dies_half_way(self, output_dir=None, **kwargs):
        Path(output_dir, "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(Accelerator, "save_state", dies_half_way)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        main(finetune_args(pipe, images, out, 6, "--checkpointing_steps", "3"))
    assert ckpt.list_checkpoints(out) == [] and not (out / "checkpoint-3").exists()
    assert (out / ".tmp-checkpoint-3").is_dir()  # the partial write is only ever under a temporary name
    monkeypatch.setattr(Accelerator, "save_state", real)
    assert ckpt.resolve_resume(out, "latest") is None
    main(finetune_args(pipe, images, out, 6, "--checkpointing_steps", "3", "--resume_from_checkpoint", "latest"))
    assert not (out / ".tmp-checkpoint-3").exists()  # cleaned at start
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-3", "checkpoint-6"]


def test_keep_last_n(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / f"checkpoint-{step}").mkdir()
    ckpt.prune(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6", "checkpoint-8"]
    with pytest.raises(ValueError, match="not a checkpoint"):
        ckpt.resolve_resume(tmp_path, "checkpoint-6")  # no training_state.json: incomplete


def test_resume_latest_before_any_checkpoint_starts_the_logs_over(tmp_path):
    """A run killed before its first checkpoint restarts from step 0: its logged steps must not appear twice."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "train_log.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    assert ckpt.resume_state(None, tmp_path, "latest", True)[0]["step"] == 0
    assert (tmp_path / "logs" / "train_log.jsonl").read_text() == ""


def test_lora_finetune_with_text_encoder_saves_a_loadable_file(setup, tmp_path):
    pipe, images = setup
    out = tmp_path / "lora"
    main(finetune_args(pipe, images, out, 40, "--use_lora", "--lora_r", "4", "--lora_alpha", "4",
                       "--text_encoder_use_lora", "--text_encoder_lora_r", "2", "--learning_rate", "1e-2",
                       "--checkpointing_steps", "0", "--train_batch_size", "4"))
    log = read_log(out)
    assert log[-1]["loss"] < log[0]["loss"]
    state = load_file(str(out / lora.LORA_FILE))
    assert any(k.startswith("text_encoder.") for k in state) and any(k.startswith("transformer.") for k in state)
    assert not (out / "transformer").exists()  # only the adapter is saved
    p = AmusedPipeline.from_pretrained(pipe)
    lora.load_lora_weights(p, out)
    assert p("red pattern 0", num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 3)


def test_train_from_scratch_low_memory_options_and_ema(setup, tmp_path):
    pipe, images = setup
    config = tmp_path / "uvit.json"
    config.write_text(json.dumps(TRAIN_UVIT))
    out = tmp_path / "scratch"
    main(["train", "--pretrained_model_name_or_path", str(pipe), "--transformer_config", str(config),
          "--train_data_dir", str(images), "--resolution", "8", "--train_batch_size", "2", "--max_train_steps", "12",
          "--weights_dtype", "bf16", "--fused_optimizer_step", "--gradient_checkpointing", "--use_ema",
          "--ema_decay", "0.5", "--checkpointing_steps", "6", "--output_dir", str(out), "--logging_steps", "1"])
    from safetensors.torch import load_file

    saved = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in saved.values())  # written in the training dtype
    loaded = AmusedPipeline.from_pretrained(out, torch_dtype=torch.bfloat16)
    assert loaded.transformer.dtype == torch.bfloat16
    ema_state = torch.load(out / "checkpoint-12" / "custom_checkpoint_2.pkl", weights_only=False)
    for name, value in ema_state["shadow"].items():  # the saved model holds the EMA weights
        assert torch.equal(loaded.transformer.state_dict()[name], value.to(torch.bfloat16)), name


def test_clear_errors_for_unavailable_options(setup, tmp_path):
    pipe, images = setup
    with pytest.raises(RuntimeError, match="--use_8bit_adam"):
        main(finetune_args(pipe, images, tmp_path / "a", 2, "--use_8bit_adam"))
    with pytest.raises(ValueError, match="--max_grad_norm"):
        main(finetune_args(pipe, images, tmp_path / "b", 2, "--fused_optimizer_step", "--max_grad_norm", "1"))
    with pytest.raises(ValueError, match="--default_guidance_scale set the saved pipeline's generation_config"):
        main(finetune_args(pipe, images, tmp_path / "d", 2, "--use_lora", "--default_guidance_scale", "3"))
    with pytest.raises(ValueError, match="--random_resized_crop .* in \\[0.05, 1\\]; got 0.0"):
        main(finetune_args(pipe, images, tmp_path / "e", 2, "--random_resized_crop", "0"))
    with pytest.raises(ValueError, match="--random_resized_crop .* in \\[0.05, 1\\]; got 1.5"):
        main(["train-vqgan", "--train_data_dir", str(images), "--resolution", "16", "--random_resized_crop", "1.5",
              "--max_train_steps", "1", "--output_dir", str(tmp_path / "v")])
    with pytest.raises(ValueError, match="--random_resized_crop cannot change --preencoded_data_dir"):
        main(["finetune", "--pretrained_model_name_or_path", str(pipe), "--preencoded_data_dir", str(tmp_path / "enc"),
              "--random_resized_crop", "0.5", "--max_train_steps", "1", "--output_dir", str(tmp_path / "f")])
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ImportError, match="tensorboard"):
            main(finetune_args(pipe, images, tmp_path / "c", 2, "--report_to", "tensorboard"))


def test_single_image_style_recipe_learns(setup, tmp_path):
    """docs/training.md's StyleDrop-like recipe (LoRA on one image + caption, lr 1e-3) on the tiny model."""
    pipe, images = setup
    out = tmp_path / "style"
    main(["finetune", "--pretrained_model_name_or_path", str(pipe), "--instance_data_image",
          str(images / "img_0.png"), "--instance_prompt", "a pattern in sks style", "--resolution", "8",
          "--use_lora", "--lora_r", "8", "--lora_alpha", "8", "--lora_target_modules", "to_q", "to_k", "to_v",
          "to_out.0", "ff.net.0.proj", "ff.net.2", "--learning_rate", "1e-3", "--train_batch_size", "4",
          "--max_train_steps", "120", "--logging_steps", "1", "--checkpointing_steps", "0", "--output_dir", str(out)])
    log = read_log(out)
    first, last = log[:15], log[-15:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "loss") < mean(first, "loss") - 0.3
    assert mean(last, "masked_accuracy") > mean(first, "masked_accuracy") + 0.15
    p = AmusedPipeline.from_pretrained(pipe)
    lora.load_lora_weights(p, out / lora.LORA_FILE, adapter_scale=0.8)
    assert p("a cat in sks style", num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 3)


def test_random_resized_crop_gives_the_one_image_other_views_each_epoch(setup, tmp_path):
    """`--random_resized_crop` reaches the single-image dataset `amused finetune` trains on, and trains."""
    import argparse

    from amused.training.cli import add_commands
    from amused.training.data import make_dataset

    pipe, images = setup
    argv = ["finetune", "--pretrained_model_name_or_path", str(pipe), "--instance_data_image", str(images / "img_0.png"),
            "--instance_prompt", "a pattern in sks style", "--resolution", "8", "--random_resized_crop", "0.4",
            "--use_lora", "--train_batch_size", "2", "--max_train_steps", "3", "--logging_steps", "1",
            "--checkpointing_steps", "0", "--output_dir", str(tmp_path / "out")]
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    dataset = make_dataset(parser.parse_args(argv))
    views = [dataset[(epoch, 0)] for epoch in range(6)]
    assert len({tuple(v["micro_conds"][2:4].tolist()) for v in views}) > 1  # crops move
    assert any(not torch.equal(v["pixels"], views[0]["pixels"]) for v in views[1:])
    main(argv)
    assert [r["step"] for r in read_log(tmp_path / "out")] == [1, 2, 3]


def test_presets_adapt_to_the_given_vqgan_and_text_encoder(tmp_path):
    from types import SimpleNamespace

    from amused.models.vqgan import VQGANConfig
    from amused.training.train import transformer_config
    from tiny import VQ_KWARGS

    text = SimpleNamespace(hidden_size=384, pooled_size=384)  # e.g. all-MiniLM-L6-v2
    cfg = transformer_config("amused-512", VQGANConfig(**VQ_KWARGS), text, resolution=64)
    assert (cfg.codebook_size, cfg.vocab_size, cfg.mask_token_id) == (16, 17, 16)
    assert (cfg.encoder_hidden_size, cfg.cond_embed_dim, cfg.sample_size, cfg.downsample) == (384, 384, 32, True)
    published = transformer_config("amused-256", VQGANConfig(), SimpleNamespace(hidden_size=768, pooled_size=768), 256)
    assert (published.vocab_size, published.mask_token_id, published.sample_size) == (8256, 8255, 16)
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps(TRAIN_UVIT))
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        transformer_config(str(bad), VQGANConfig(**VQ_KWARGS), text, 8)


def test_compiled_blocks_train_like_eager_and_save_the_same_keys(setup, tmp_path):
    """--compile compiles the U-ViT's blocks in place: the run trains like the eager one (same seed, same
    batches; aot_eager here, the same graph without code generation) and saves plain state-dict keys."""
    pipe, images = setup
    main(finetune_args(pipe, images, tmp_path / "eager", 6, "--checkpointing_steps", "0"))
    from torch._dynamo.utils import counters

    counters.clear()
    main(finetune_args(pipe, images, tmp_path / "compiled", 6, "--checkpointing_steps", "0", "--compile",
                       "--compile_backend", "aot_eager"))
    assert counters["stats"]["unique_graphs"] > 0  # dynamo really compiled something
    eager, compiled = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert eager.keys() == compiled.keys() and not any("_orig_mod" in k for k in compiled)
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5)
    losses = [r["loss"] for r in read_log(tmp_path / "compiled")]
    torch.testing.assert_close(losses, [r["loss"] for r in read_log(tmp_path / "eager")], rtol=1e-4, atol=1e-5)


def test_finetune_of_the_embedded_model_keeps_its_generation_settings(tmp_path):
    """`--pretrained_model_name_or_path embedded` fine-tunes the shipped model; the saved pipeline carries its
    generation_config.json (guidance 1.5, temperature 0.5 -> 0), with --default_* flags overriding single values."""
    from amused.embedded import embedded_model_path

    base = json.loads((embedded_model_path() / "generation_config.json").read_text())
    images = make_image_folder(tmp_path / "imgs", n=2, size=64)
    out = tmp_path / "run"
    main(["finetune", "--pretrained_model_name_or_path", "embedded", "--train_data_dir", str(images), "--resolution",
          "64", "--train_batch_size", "1", "--max_train_steps", "1", "--checkpointing_steps", "0", "--output_dir",
          str(out), "--default_guidance_scale", "3.5"])
    assert json.loads((out / "generation_config.json").read_text()) == {**base, "guidance_scale": 3.5}
    pipe = AmusedPipeline.from_pretrained(out)
    assert pipe.resolve_defaults(None, None, None) == (base["num_inference_steps"], 3.5, tuple(base["temperature"]))
    assert (out / "text_encoder" / "packaged.json").is_file()  # still the packaged MiniLM, not a copy of it


def test_every_training_command_takes_embedded_as_the_model():
    import argparse

    from amused.embedded import embedded_model_path
    from amused.training.cli import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    for command in ("finetune", "train", "train-vqgan", "preencode"):
        for flag in ("--pretrained_model_name_or_path", "--model"):  # --model as `amused generate` names it
            argv = [command, flag, "embedded", "--output_dir", "x"]
            argv += ["--max_train_steps", "1"] if command != "preencode" else []
            assert parser.parse_args(argv).pretrained_model_name_or_path == str(embedded_model_path()), command
    assert parser.parse_args(["finetune", "--pretrained_model_name_or_path", "amused/amused-256", "--output_dir",
                              "x", "--max_train_steps", "1"]).pretrained_model_name_or_path == "amused/amused-256"


def prior_args(pipe, images, out, class_dir, *extra, steps=2):
    """The single-image recipe with prior preservation, on the tiny model."""
    return ["finetune", "--pretrained_model_name_or_path", str(pipe), "--instance_data_image",
            str(images / "img_0.png"), "--instance_prompt", "a pattern in sks style", "--resolution", "8",
            "--use_lora", "--lora_r", "4", "--lora_alpha", "4", "--learning_rate", "1e-2", "--train_batch_size", "2",
            "--max_train_steps", str(steps), "--logging_steps", "1", "--checkpointing_steps", "0",
            "--output_dir", str(out), "--with_prior_preservation", "--class_data_dir", str(class_dir), *extra]


def test_prior_preservation_draws_class_images_once_and_reuses_them(setup, tmp_path, monkeypatch):
    import amused.runtime

    pipe, images = setup
    (tmp_path / "prompts.txt").write_text("red pattern\n\nblue pattern\n")
    loads = []
    real_load = amused.runtime.load_engine
    monkeypatch.setattr(amused.runtime, "load_engine", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    classes = tmp_path / "classes"
    flags = ["--class_prompts_file", str(tmp_path / "prompts.txt"), "--sample_batch_size", "2", "--debug_log_batches"]
    main(prior_args(pipe, images, tmp_path / "a", classes, *flags, "--num_class_images", "3"))
    assert len(loads) == 1 and loads[0]["expected_images"] == 3
    rows = [json.loads(line) for line in (classes / "metadata.jsonl").read_text().splitlines()]
    assert rows == [{"file_name": f"class_{i:05d}.png", "text": t}
                    for i, t in enumerate(["red pattern", "blue pattern", "red pattern"])]
    assert sorted(p.name for p in classes.iterdir()) == ["class_00000.png", "class_00001.png", "class_00002.png",
                                                         "metadata.jsonl"]  # no temporary file left
    batches = [json.loads(line) for line in (tmp_path / "a" / "logs" / "batches_rank0.jsonl").read_text().splitlines()]
    for batch in batches:  # each batch: the instance twice, then two class images with their own prompts
        assert batch["captions"][:2] == ["a pattern in sks style"] * 2
        assert set(batch["captions"][2:]) <= {"red pattern", "blue pattern"}
    stamps = {p.name: p.stat().st_mtime_ns for p in classes.iterdir()}

    main(prior_args(pipe, images, tmp_path / "b", classes, *flags, "--num_class_images", "3"))  # all there: reused
    assert len(loads) == 1 and {p.name: p.stat().st_mtime_ns for p in classes.iterdir()} == stamps
    main(prior_args(pipe, images, tmp_path / "c", classes, *flags, "--num_class_images", "4"))  # one more drawn
    assert len(loads) == 2 and loads[1]["expected_images"] == 1
    assert all(classes.joinpath(name).stat().st_mtime_ns == t for name, t in stamps.items() if name.endswith(".png"))
    assert json.loads((classes / "metadata.jsonl").read_text().splitlines()[3]) == {"file_name": "class_00003.png",
                                                                                   "text": "blue pattern"}


def test_prior_loss_weight_adds_the_class_loss(setup, tmp_path):
    """Same seed, same first batch and masks: the instance loss of step 1 is the same, the logged loss is the
    instance loss plus prior_loss_weight x the class loss, and the class term changes what is learnt."""
    pipe, images = setup
    classes = tmp_path / "classes"
    logs = {}
    for weight in ("0", "1"):
        out = tmp_path / f"w{weight}"
        main(prior_args(pipe, images, out, classes, "--class_prompt", "a pattern", "--num_class_images", "2",
                        "--prior_loss_weight", weight, steps=3))
        logs[weight] = read_log(out)
    for weight, log in logs.items():
        for row in log:
            assert row["prior_loss"] > 1.0  # the class images' masked-token loss, logged in both runs
            assert row["loss"] == pytest.approx(row["instance_loss"] + float(weight) * row["prior_loss"], rel=1e-5)
    assert logs["0"][0]["instance_loss"] == pytest.approx(logs["1"][0]["instance_loss"], rel=1e-6)
    assert logs["0"][0]["prior_loss"] == pytest.approx(logs["1"][0]["prior_loss"], rel=1e-6)
    a, b = (load_file(str(tmp_path / f"w{w}" / lora.LORA_FILE)) for w in ("0", "1"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the class loss's gradient moved the adapter


@pytest.mark.parametrize("extra, match", [
    ([], "needs --class_data_dir"),
    (["--class_data_dir", "{tmp}/c"], "exactly one of --class_prompt .* and --class_prompts_file"),
    (["--class_data_dir", "{tmp}/c", "--class_prompt", "x", "--class_prompts_file", "{tmp}/p.txt"], "exactly one"),
    (["--class_data_dir", "{tmp}/c", "--class_prompts_file", "{tmp}/missing.txt"],
     "--class_prompts_file .*missing.txt does not exist"),
    (["--class_data_dir", "{tmp}/c", "--class_prompts_file", "{tmp}/empty.txt"], "--class_prompts_file .* no prompt"),
    (["--class_data_dir", "{tmp}/c", "--class_prompt", "x", "--num_class_images", "0"], "--num_class_images must"),
    (["--class_data_dir", "{tmp}/c", "--class_prompt", "x", "--prior_loss_weight", "-1"], "--prior_loss_weight must"),
    (["--class_data_dir", "{tmp}/p.txt", "--class_prompt", "x"], "--class_data_dir .* is a file"),
    (["--class_data_dir", "{tmp}/loose", "--class_prompt", "x", "--num_class_images", "5"],
     "holds 1 images without metadata.jsonl, fewer than --num_class_images 5"),
    (["--class_data_dir", "{tmp}/loose", "--class_prompts_file", "{tmp}/p.txt", "--num_class_images", "1"],
     "caption them with --class_prompt"),
])
def test_prior_preservation_argument_errors(setup, tmp_path, extra, match):
    pipe, images = setup
    (tmp_path / "p.txt").write_text("a pattern\n")
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "mine.png").write_bytes((images / "img_1.png").read_bytes())  # a person's class image
    argv = prior_args(pipe, images, tmp_path / "out", "x")
    argv = argv[:argv.index("--class_data_dir")] + [a.replace("{tmp}", str(tmp_path)) for a in extra]
    with pytest.raises(ValueError, match=match):
        main(argv)


def test_class_flags_without_prior_preservation_are_refused(setup, tmp_path):
    pipe, images = setup
    with pytest.raises(ValueError, match="--class_data_dir, --class_prompt given without --with_prior_preservation"):
        main(finetune_args(pipe, images, tmp_path / "out", 1, "--class_data_dir", str(tmp_path / "c"),
                           "--class_prompt", "x"))
    argv = prior_args(pipe, images, tmp_path / "out", tmp_path / "c", "--class_prompt", "x")
    at = argv.index("--instance_data_image")
    argv[at:at + 4] = ["--train_shards", str(tmp_path / "x.tar")]  # instead of the image and its prompt
    with pytest.raises(ValueError, match="--with_prior_preservation needs images .* not --train_shards"):
        main(argv)
