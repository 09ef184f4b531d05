"""Crashes: real subprocesses killed with SIGKILL lose nothing and leave nothing half-written.

- `amused generate` killed mid-batch: every PNG on disk is complete (writes are temp file + rename); the temp
  file a kill can strand is named after its writer's pid and removed by the next run into that folder.
- A training run killed three times at seeded random moments, resumed each time, ends with the weights of an
  uninterrupted run (tests/test_training_loop.py kills once, right after a checkpoint; this kills anywhere,
  including mid-checkpoint).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from amused.cli import main as cli_main
from amused.loading import atomic_write, clean_stale_temps

TESTS = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def assert_complete_pngs(folder: Path) -> int:
    pngs = sorted(folder.glob("*.png"))
    for p in pngs:
        with PIL.Image.open(p) as image:
            image.load()  # raises on a truncated file
            assert "amused" in image.info, p  # metadata chunk written with the pixels
    return len(pngs)


# ----------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------


def test_generate_killed_mid_batch_leaves_only_complete_images(ref_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(400)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "amused.cli", "generate", "--prompts-file", str(prompts), "--batch-size", "3",
           "--model", str(ref_dir), "--out-dir", str(out), "--height", "32", "--width", "32", "--steps", "1",
           "--device", "cpu", "--quiet"]
    rng = random.Random(7)
    seen = []
    for _ in range(3):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        deadline = time.time() + 60
        target = len(seen) and seen[-1]  # images already there from the last run
        while len(list(out.glob("*.png"))) <= target + rng.randint(1, 20):
            assert proc.poll() is None and time.time() < deadline, "generate ended before it was killed"
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.05))
        kill(proc)
        seen.append(assert_complete_pngs(out))
    assert seen[-1] < 400  # really killed mid-run, several batches in
    # Whatever temp files the kills stranded belong to dead pids: the next run into the folder removes them.
    assert cli_main(["generate", "one more", "--model", str(ref_dir), "--out-dir", str(out), "--height", "8",
                     "--width", "8", "--steps", "1", "--device", "cpu", "--quiet"]) == 0
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp"))
    assert_complete_pngs(out)


def test_stale_temp_files_of_dead_writers_are_removed_live_ones_kept(ref_dir, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".0000_x.png.amused-{dead.pid}-0123456789abcdef.tmp"
    live = tmp_path / f".0001_y.png.amused-{os.getpid()}-0123456789abcdef.tmp"
    unrelated = tmp_path / ".notes.tmp"
    for p in (stale, live, unrelated):
        p.write_bytes(b"\x89PNG partial")
    assert clean_stale_temps(tmp_path) == [stale]
    assert live.exists() and unrelated.exists() and not stale.exists()

    seen = []
    atomic_write(tmp_path / "z.png", lambda tmp: seen.append(tmp.name) or tmp.write_bytes(b"x"))
    assert seen[0].startswith(f".z.png.amused-{os.getpid()}-") and seen[0].endswith(".tmp")
    assert not list(tmp_path.glob(".z.png.*"))

    stale.write_bytes(b"\x89PNG partial")  # and the CLI cleans its output folder at start
    assert cli_main(["generate", "a", "--model", str(ref_dir), "--out", str(tmp_path / "a.png"), "--height", "8",
                     "--width", "8", "--steps", "1", "--device", "cpu", "--quiet"]) == 0
    assert not stale.exists() and live.exists()


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from train_tiny import make_image_folder, make_pipeline

    root = tmp_path_factory.mktemp("crash")
    return make_pipeline(root / "pipe"), make_image_folder(root / "imgs", n=4, size=8)


FLAGS = ["--resolution", "8", "--train_batch_size", "2", "--max_train_steps", "24", "--learning_rate", "3e-3",
         "--logging_steps", "1", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2",
         "--cond_dropout_prob", "0.3", "--use_ema", "--ema_decay", "0.9", "--random_flip", "--lr_scheduler",
         "cosine", "--lr_warmup_steps", "3"]


def finetune(pipe, images, out, *extra):
    return ["finetune", "--pretrained_model_name_or_path", str(pipe), "--train_data_dir", str(images),
            "--output_dir", str(out), *FLAGS, *extra]


def logged_steps(out: Path) -> int:
    log = out / "logs" / "train_log.jsonl"
    return len(log.read_text().splitlines()) if log.is_file() else 0


def test_training_killed_three_times_at_random_moments_ends_like_an_uninterrupted_run(setup, tmp_path):
    from amused.training.cli import main as train_main

    pipe, images = setup
    train_main(finetune(pipe, images, tmp_path / "straight"))
    out = tmp_path / "killed"
    rng = random.Random(1234)
    kills = []
    for attempt in range(3):
        cmd = [sys.executable, "-m", "amused.training.cli",
               *finetune(pipe, images, out, "--resume_from_checkpoint", "latest", "--debug_sleep_per_step", "0.1")]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        before = logged_steps(out) if attempt else 0
        deadline = time.time() + 60
        while logged_steps(out) <= before:  # wait until this run is training (past its slow start-up)
            assert proc.poll() is None and time.time() < deadline, "the run ended before it was killed"
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.4))  # anywhere: mid-step, mid-checkpoint, mid-rotation
        kill(proc)
        kills.append(logged_steps(out))
        assert not (out / "model_index.json").exists(), "killed too late: the run had finished"
        for folder in out.glob("checkpoint-*"):  # every visible checkpoint is complete
            assert (folder / "training_state.json").is_file() and (folder / "model.safetensors").is_file()
    train_main(finetune(pipe, images, out, "--resume_from_checkpoint", "latest"))
    straight = load_file(str(tmp_path / "straight" / "transformer" / "diffusion_pytorch_model.safetensors"))
    resumed = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    steps = [json.loads(line)["step"] for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25)), kills
