"""Two CPU processes through `accelerate launch` (gloo): DDP and FSDP.

- DDP: `amused finetune` on 2 processes checkpoints, is SIGKILLed (launcher and workers), resumes, and ends with
  the weights of an uninterrupted 2-process run, bit for bit.
- `amused train` (a U-ViT from scratch, with EMA) runs on 2 processes and saves one loadable pipeline.
- FSDP (FSDP2, sharded checkpoints): the same run under FSDP logs the gradient norms of the DDP run and ends
  with its weights (to float rounding: FSDP reduce-scatters where DDP all-reduces), which it can only do if
  `--max_grad_norm` clips with the global norm over the shards; it resumes from its sharded checkpoint to its
  own weights exactly. accelerate 1.15 does not turn FSDP on for CPU processes (see `train_tiny.fsdp_on_cpu`,
  which the FSDP runs are launched through); without that, amused refuses the run instead of silently training
  unsharded (tested here too).

Every run clips (`--max_grad_norm 0.5`, below every step's norm), so the clipping is in every compared weight.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from amused.pipeline import AmusedPipeline
from amused.training import checkpoint as ckpt
from train_tiny import TRAIN_UVIT, accelerate_config, kill_after_checkpoint, make_image_folder, make_pipeline

TESTS = Path(__file__).parent
FLAGS = ["--resolution", "8", "--train_batch_size", "1", "--learning_rate", "3e-3", "--logging_steps", "1",
         "--max_grad_norm", "0.5", "--max_train_steps", "6", "--checkpointing_steps", "3", "--cond_dropout_prob",
         "0.3", "--random_flip", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return SimpleNamespace(root=root, pipe=make_pipeline(root / "pipe"),
                           images=make_image_folder(root / "imgs", n=4, size=8),
                           ddp=accelerate_config(root, fsdp=False), fsdp=accelerate_config(root, fsdp=True))


def launch(setup, out: Path, fsdp: bool, *extra: str, command: str = "finetune") -> list[str]:
    """`accelerate launch` of `amused finetune` (or `command`) on 2 CPU processes; FSDP through train_tiny's shim."""
    entry = [str(TESTS / "train_tiny.py"), "--fsdp_on_cpu"] if fsdp else ["-m", "amused.training.cli"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(setup.fsdp if fsdp else setup.ddp),
            *entry, command, "--pretrained_model_name_or_path", str(setup.pipe), "--train_data_dir",
            str(setup.images), "--output_dir", str(out), *FLAGS, *extra]


def env() -> dict:
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


NATIVE_ABORT = "terminate called without an active exception"


def run(cmd: list[str]) -> None:
    for attempt in range(2):
        result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
        if result.returncode == 0 or NATIVE_ABORT not in result.stderr or attempt:
            break
        # A worker aborted inside the C++ runtime mid-training (gloo on 2 shared CPU cores: seen once in six full
        # runs of this suite, never in a rerun); run the same command once more, from scratch unless it resumes.
        if "--resume_from_checkpoint" not in cmd:
            shutil.rmtree(cmd[cmd.index("--output_dir") + 1], ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict:
    return load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def ddp_run(setup):
    """The uninterrupted 2-process DDP run that the others are compared with."""
    out = setup.root / "ddp"
    run(launch(setup, out, False))
    return out


def test_ddp_run_killed_and_resumed_ends_with_the_uninterrupted_weights(setup, ddp_run):
    out = setup.root / "ddp_killed"
    cmd = launch(setup, out, False, "--debug_sleep_per_step", "0.5")
    assert kill_after_checkpoint(cmd, out / "checkpoint-3", 0.2, env=env()) == -signal.SIGKILL
    assert not (out / "model_index.json").exists() and not (out / "checkpoint-6").exists()  # really cut short
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in (out / "checkpoint-3").iterdir()}
    run(launch(setup, out, False, "--resume_from_checkpoint", "latest"))
    straight, resumed = weights(ddp_run), weights(out)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert [r["step"] for r in read_log(out)] == list(range(1, 7))  # one writer, killed steps not twice
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]  # noqa: E731
    assert strip(read_log(out)) == strip(read_log(ddp_run))
    AmusedPipeline.from_pretrained(out)


def test_train_from_scratch_on_two_processes_saves_one_pipeline(setup):
    config = setup.root / "uvit.json"
    config.write_text(json.dumps(TRAIN_UVIT))
    out = setup.root / "train"
    run(launch(setup, out, False, "--transformer_config", str(config), "--use_ema", "--max_train_steps", "2",
               "--checkpointing_steps", "0", "--default_guidance_scale", "4", command="train"))
    assert [r["step"] for r in read_log(out)] == [1, 2]
    pipe = AmusedPipeline.from_pretrained(out)
    assert pipe.generation_defaults == {"guidance_scale": 4.0}
    assert pipe("a", num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 3)


def test_fsdp_clips_with_the_global_norm_like_ddp_and_resumes_from_sharded_checkpoints(setup, ddp_run):
    out = setup.root / "fsdp"
    run(launch(setup, out, True))
    shards = {p.name for p in (out / "checkpoint-3" / "pytorch_model_fsdp_0").iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp"} <= shards  # each process saved its own shard: really FSDP
    ddp_log, fsdp_log = read_log(ddp_run), read_log(out)
    assert all(r["grad_norm"] > 0.5 for r in ddp_log)  # every step was clipped
    for d, f in zip(ddp_log, fsdp_log, strict=True):
        assert f["grad_norm"] == pytest.approx(d["grad_norm"], rel=1e-5), (d, f)
        assert f["loss"] == pytest.approx(d["loss"], rel=1e-5), (d, f)
    ddp_w, fsdp_w = weights(ddp_run), weights(out)
    moved = max((ddp_w[k] - load_file(str(setup.pipe / "transformer" / "diffusion_pytorch_model.safetensors"))[k])
                .abs().max() for k in ddp_w)
    assert moved > 1e-3  # the weights trained, so agreeing below is not trivial
    for key in ddp_w:
        torch.testing.assert_close(fsdp_w[key], ddp_w[key], rtol=1e-5, atol=1e-6)

    resumed = setup.root / "fsdp_resumed"  # a run that stopped at checkpoint-3 (kill and resume: see DDP above)
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-3", resumed / "checkpoint-3")
    run(launch(setup, resumed, True, "--resume_from_checkpoint", "latest"))
    for key, value in weights(resumed).items():
        assert torch.equal(value, fsdp_w[key]), key
    assert [r["grad_norm"] for r in read_log(resumed)] == [r["grad_norm"] for r in fsdp_log[3:]]


def test_fsdp_that_accelerate_did_not_enable_is_refused(monkeypatch):
    """accelerate 1.15 leaves CPU processes MULTI_CPU under an FSDP config: refuse rather than train unsharded."""
    from accelerate.utils import DistributedType

    from amused.training.train import check_args

    parser_args = finetune_args()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="configured for FSDP but runs MULTI_CPU"):
        check_args(parser_args, SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
    with pytest.raises(ValueError, match="--train_text_encoder"):
        check_args(finetune_args("--train_text_encoder"), SimpleNamespace(distributed_type=DistributedType.FSDP))
    monkeypatch.setenv("WORLD_SIZE", "2")  # processes started by a launcher that accelerate did not join
    with pytest.raises(RuntimeError, match="ACCELERATE_USE_CPU"):
        ckpt.check_world(SimpleNamespace(num_processes=1))


def finetune_args(*extra: str):
    """finetune's arguments as the command line parses them."""
    import argparse

    from amused.training.cli import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(["finetune", "--pretrained_model_name_or_path", ".", "--max_train_steps", "1",
                              "--output_dir", ".", *extra])
