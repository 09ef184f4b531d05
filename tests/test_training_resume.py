"""Resuming: changed arguments are compared with the checkpoint's (refused, applied or reported), a corrupt latest
checkpoint falls back to the one before, and a --train_shards run resumed mid-epoch sees exactly the samples of an
uninterrupted one. Also the throughput and memory fields of train_log.jsonl."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from amused.training import checkpoint as ckpt
from amused.training.cli import main
from train_tiny import make_image_folder, make_pipeline, make_tar_shards, one_torch_thread  # noqa: F401


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return SimpleNamespace(root=root, pipe=make_pipeline(root / "pipe"),
                           images=make_image_folder(root / "imgs", n=4, size=8))


def finetune(setup, out, steps, *extra, data=None):
    data = data or ["--train_data_dir", str(setup.images)]
    main(["finetune", "--pretrained_model_name_or_path", str(setup.pipe), *data, "--resolution", "8",
          "--train_batch_size", "2", "--max_train_steps", str(steps), "--learning_rate", "3e-3", "--logging_steps",
          "1", "--output_dir", str(out), *extra])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(out: Path) -> dict:
    return load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))


LORA = ["--use_lora", "--lora_r", "2", "--lora_alpha", "2"]


@pytest.fixture(scope="module")
def lora_run(setup):
    """A LoRA run checkpointed at step 2, 0.1 s of sleep a step."""
    out = setup.root / "lora"
    finetune(setup, out, 2, *LORA, "--checkpointing_steps", "2", "--max_grad_norm", "100", "--debug_sleep_per_step",
             "0.1")
    return out


def test_log_has_throughput_peak_memory_and_gradient_norm(lora_run):
    rows = read_jsonl(lora_run / "logs" / "train_log.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["max_memory_allocated_gib"] is None  # torch.cuda.max_memory_allocated: no CUDA here
        assert r["images_per_s"] > 0 and 0 < r["grad_norm"] < 100  # the norm before clipping (none at 100)
    # 2 images a step; the 0.1 s sleep comes after a step's log line, so the second window holds step 1's sleep:
    # the rate is images over wall time, not over compute time
    assert rows[1]["images_per_s"] < 2 / 0.1


@pytest.mark.parametrize("flags, named", [
    (["--use_lora", "--lora_r", "4", "--lora_alpha", "2"], "--lora_r 2 -> 4"),
    ([*LORA, "--use_ema"], "--use_ema False -> True"),
    ([], "--use_lora True -> False"),
])
def test_resume_refuses_flags_that_change_what_the_checkpoint_holds(setup, lora_run, flags, named):
    with pytest.raises(ValueError) as err:  # raised before the model is built, instead of accelerate's traceback
        finetune(setup, lora_run, 4, *flags, "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")
    message = str(err.value)
    assert named in message and "cannot resume checkpoint-2" in message and "\n" not in message
    assert not (lora_run / "checkpoint-4").exists()


def test_resume_applies_a_changed_learning_rate_and_says_so(setup, lora_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(lora_run, out)
    capsys.readouterr()
    finetune(setup, out, 4, *LORA, "--checkpointing_steps", "2", "--max_grad_norm", "100", "--learning_rate", "1e-3",
             "--resume_from_checkpoint", "latest")
    printed = capsys.readouterr().out
    assert "changed since checkpoint-2: --debug_sleep_per_step" not in printed  # test hooks are not compared
    assert "changed since checkpoint-2: --learning_rate 0.003 -> 0.001, --max_train_steps 2 -> 4" in printed
    assert "note: applied --learning_rate to the resumed optimizer" in printed
    assert [r["lr"] for r in read_jsonl(out / "logs" / "train_log.jsonl")] == [3e-3, 3e-3, 1e-3, 1e-3]
    saved = json.loads((out / "checkpoint-4" / "run_args.json").read_text())
    assert saved["learning_rate"] == 1e-3 and saved["use_lora"] is True


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(setup, tmp_path, capsys):
    flags = ["--checkpointing_steps", "2", "--cond_dropout_prob", "0.3", "--random_flip"]
    finetune(setup, tmp_path / "straight", 6, *flags)
    out = tmp_path / "run"
    finetune(setup, out, 4, *flags)
    model = out / "checkpoint-4" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-100])  # cut short, as a full disk would leave it
    capsys.readouterr()
    finetune(setup, out, 6, *flags, "--resume_from_checkpoint", "latest")
    printed = capsys.readouterr().out
    assert "warning: checkpoint-4 is corrupt (model.safetensors: " in printed
    assert "resumed from" in printed and "checkpoint-2 at step 2" in printed
    assert (out / "checkpoint-4.corrupt").is_dir()  # kept for inspection, never resumed from again
    straight, resumed = weights(tmp_path / "straight"), weights(out)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert [r["step"] for r in read_jsonl(out / "logs" / "train_log.jsonl")] == list(range(1, 7))

    optimizer = out / "checkpoint-6" / "optimizer.bin"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the zip: its CRC-32 no longer matches
    optimizer.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"checkpoint-6 is corrupt \(optimizer.bin: member .* fails its CRC"):
        finetune(setup, out, 8, *flags, "--resume_from_checkpoint", "checkpoint-6")  # named: no fallback


def test_every_checkpoint_corrupt_is_an_error_not_a_fresh_start(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / ckpt.STATE_FILE).write_text("{not json")
    accelerator = SimpleNamespace(wait_for_everyone=lambda: None, print=lambda *a: None)
    with pytest.raises(ValueError, match="every checkpoint .* is corrupt"):
        ckpt.resume_state(accelerator, tmp_path, "latest", True)
    assert (tmp_path / "checkpoint-2.corrupt").is_dir()


@pytest.mark.parametrize("workers", [0, 2])
def test_train_shards_resumed_mid_epoch_see_each_sample_once_in_the_uninterrupted_order(setup, tmp_path, workers):
    """2 shards x 5 samples, batch 2. One worker: 5 batches an epoch; two: each streams one shard, 2 batches
    each (its fifth sample is a partial batch, dropped). 8 steps cross an epoch; the split run stops at step 3
    (mid-epoch, checkpointed) and resumes."""
    shards = make_tar_shards(tmp_path / "shards", shards=2, per_shard=5)
    data = ["--train_shards", shards, "--dataloader_num_workers", str(workers)]
    flags = ["--debug_log_batches", "--checkpointing_steps", "3", "--random_flip"]
    finetune(setup, tmp_path / "straight", 8, *flags, data=data)
    finetune(setup, tmp_path / "split", 3, *flags, data=data)
    finetune(setup, tmp_path / "split", 8, *flags, "--resume_from_checkpoint", "latest", data=data)

    straight = read_jsonl(tmp_path / "straight" / "logs" / "batches_rank0.jsonl")
    split = read_jsonl(tmp_path / "split" / "logs" / "batches_rank0.jsonl")
    assert split == straight and [b["step"] for b in split] == list(range(1, 9))
    per_epoch = 5 if workers == 0 else 4
    first_epoch = [c for b in straight[:per_epoch] for c in b["captions"]]
    assert len(set(first_epoch)) == len(first_epoch) == 2 * per_epoch  # no sample twice in an epoch
    if workers == 0:
        assert {c.split(" ")[1] for c in first_epoch} == {f"{s}-{i}" for s in range(2) for i in range(5)}
    second_epoch = [c for b in straight[per_epoch:] for c in b["captions"]]
    assert set(second_epoch) <= set(first_epoch) and len(set(second_epoch)) == len(second_epoch)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    for key in a:
        assert torch.equal(a[key], b[key]), key
