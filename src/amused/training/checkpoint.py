"""Resumable training checkpoints that appear atomically, keeping the last N.

A checkpoint is `accelerator.save_state` (model, prepared optimizers, RNG states of every process, and the
objects registered with `register_for_checkpointing`: LR scheduler, EMA, per-parameter optimizers) plus
`training_state.json` (optimizer step, epoch, micro-batch position in the epoch, seed). It is written to
`.tmp-checkpoint-N/`, its files flushed to disk, then renamed to `checkpoint-N/` in one `os.replace`: a
`checkpoint-N` directory that exists is complete, whenever the process was killed. Old checkpoints are renamed
to `.trash-...` before they are deleted, for the same reason. Leftover `.tmp-*` / `.trash-*` directories are
removed when training starts.

`run_args.json` records the command-line arguments of the run that wrote the checkpoint. Resuming compares them
with the new ones (`compare_run_args`): flags that change what the checkpoint holds (LoRA on/off and its shape,
EMA, ...) are refused in one line; the optimizer's hyper-parameters (learning rate, betas, ...), which the
checkpoint would otherwise silently restore, are re-applied; every difference is printed. A checkpoint whose
files fail to read back (`verify_checkpoint`: safetensors headers and sizes, CRCs of the torch zip files) is
moved aside as `checkpoint-N.corrupt` and `latest` falls back to the previous one.

The pickled pieces (optimizer, scheduler, RNG) are loaded with `weights_only=False` by accelerate: resume only
from checkpoints you wrote.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"
ARGS_FILE = "run_args.json"

# Flags that change what a checkpoint holds (which tensors, their shapes, the optimizer's layout), or what the
# trained adapter means: a resumed run cannot take a new value.
FIXED_ARGS = ("use_lora", "lora_r", "lora_alpha", "lora_target_modules", "text_encoder_use_lora",
              "text_encoder_lora_r", "text_encoder_lora_alpha", "text_encoder_lora_target_modules",
              "train_text_encoder", "use_ema", "fused_optimizer_step", "use_8bit_adam", "weights_dtype")
# Settings of an option that only matter while the option is on in both runs.
DEPENDS_ON = {"lora_r": "use_lora", "lora_alpha": "use_lora", "lora_target_modules": "use_lora",
              "text_encoder_lora_r": "text_encoder_use_lora", "text_encoder_lora_alpha": "text_encoder_use_lora",
              "text_encoder_lora_target_modules": "text_encoder_use_lora", "ema_decay": "use_ema",
              "ema_update_after_step": "use_ema"}
# Hyper-parameters stored in the optimizer's param_groups: loading the checkpoint would restore the old values,
# so a changed one is re-applied after loading (train.apply_optimizer_args).
OPTIMIZER_ARGS = ("learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon")
# Not compared: where the run is, how it was invoked, test hooks.
UNCOMPARED_ARGS = ("output_dir", "resume_from_checkpoint", "func", "command", "debug_sleep_per_step",
                   "debug_log_batches")


def check_world(accelerator: Accelerator) -> None:
    """Refuse a launcher's several processes that accelerate did not join (each would think it is alone and
    they would overwrite each other's checkpoints)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes != world:
        raise RuntimeError(f"WORLD_SIZE is {world} but accelerate runs {accelerator.num_processes} process(es); launch "
                           f"with `accelerate launch`, or set ACCELERATE_USE_CPU=1 for CPU (gloo) runs")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """`--resume_from_checkpoint`: None, "latest" (None when the run has none yet), or a checkpoint path."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        path = Path(output_dir) / resume
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"--resume_from_checkpoint {resume}: {path} is not a checkpoint directory (no {STATE_FILE})")
    return path


def clean_stale(output_dir: str | Path) -> None:
    """Remove half-written or half-deleted checkpoint directories left by a killed run."""
    root = Path(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith((".tmp-checkpoint-", ".trash-checkpoint-")):
                shutil.rmtree(p, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, training_state: dict,
                    total_limit: int | None = None, run_args: dict | None = None) -> Path:
    """Write `output_dir/checkpoint-{step}` atomically; every process must call this.

    Args:
        accelerator: the run's accelerator (its prepared and registered objects are saved).
        output_dir: the run's output folder.
        step: optimizer steps done (names the directory).
        training_state: JSON-able position of the run (step, epoch, batch_in_epoch, ...).
        total_limit: keep at most this many checkpoints (oldest removed first).
        run_args: the run's arguments (`args_to_record`), saved as run_args.json for the resume checks.

    Returns:
        The checkpoint directory.
    """
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(training_state, indent=2, sort_keys=True) + "\n")
        if run_args is not None:
            (tmp / ARGS_FILE).write_text(json.dumps(run_args, indent=2, sort_keys=True) + "\n")
        _fsync_tree(tmp)
        if final.exists():  # a re-run reaching the same step: retire the old one first
            trash = root / f".trash-checkpoint-{step}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        prune(root, total_limit)
    accelerator.wait_for_everyone()
    return final


def prune(output_dir: str | Path, total_limit: int | None) -> None:
    """Delete the oldest checkpoints beyond `total_limit` (rename first, so none is ever half there)."""
    if not total_limit or total_limit < 1:
        return
    found = list_checkpoints(output_dir)
    for path in found[:max(0, len(found) - total_limit)]:
        trash = path.with_name(".trash-" + path.name)
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the training state."""
    path = Path(path)
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())


def verify_checkpoint(path: str | Path) -> str | None:
    """Why the checkpoint's files would not load (None when they read back): every safetensors header must parse
    and cover its file, every torch zip file (optimizer, scheduler, RNG states, EMA) must pass its CRC-32 check.
    Catches truncated and overwritten files; a bit flip inside safetensors data (no checksum there) loads."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        return f"{STATE_FILE}: {e}"
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt"):
                    pass
            elif file.suffix in (".bin", ".pkl", ".pt"):
                with zipfile.ZipFile(file) as z:
                    bad = z.testzip()
                if bad is not None:
                    return f"{file.name}: member {bad} fails its CRC check"
        except (SafetensorError, zipfile.BadZipFile, OSError, ValueError) as e:
            return f"{file.name}: {e}"
    return None


def args_to_record(args) -> dict:
    """The JSON-able arguments of a run, as run_args.json stores them."""
    return {k: v for k, v in sorted(vars(args).items())
            if k not in UNCOMPARED_ARGS and (v is None or isinstance(v, (bool, int, float, str, list, tuple)))}


@dataclass
class ArgChanges:
    """How a resumed run's arguments differ from those saved with its checkpoint: name -> (saved, new)."""

    changed: dict = field(default_factory=dict)

    @property
    def fixed(self) -> list[str]:
        return [name for name in self.changed if name in FIXED_ARGS]

    @property
    def optimizer(self) -> list[str]:
        return [name for name in self.changed if name in OPTIMIZER_ARGS]

    def describe(self) -> str:
        return ", ".join(f"--{name} {_show(old)} -> {_show(new)}" for name, (old, new) in self.changed.items())


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return "(unset)" if value is None else str(value)


def compare_run_args(checkpoint: str | Path, new: dict) -> ArgChanges:
    """The differences between a checkpoint's run_args.json and `new` (none when the file is absent: written
    before the arguments were recorded).

    Raises:
        ValueError: one line naming every changed flag of FIXED_ARGS.
    """
    path = Path(checkpoint) / ARGS_FILE
    if not path.is_file():
        return ArgChanges()
    saved = json.loads(path.read_text())
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731 - JSON turned tuples into lists

    def on_in_both(name: str) -> bool:
        parent = DEPENDS_ON.get(name)
        return parent is None or bool(saved.get(parent) and new.get(parent))

    changes = ArgChanges({name: (saved.get(name), new.get(name)) for name in sorted(set(saved) | set(new))
                          if name not in UNCOMPARED_ARGS and norm(saved.get(name)) != norm(new.get(name))
                          and on_in_both(name)})
    if changes.fixed:
        what = ", ".join(f"--{n} {_show(changes.changed[n][0])} -> {_show(changes.changed[n][1])}"
                         for n in changes.fixed)
        raise ValueError(f"cannot resume {Path(checkpoint).name} with changed {what}: these flags decide what the "
                         f"checkpoint holds; resume with the values it was saved with, or start a new --output_dir")
    return changes


def resume_candidates(output_dir: str | Path, resume: str | None) -> list[Path]:
    """Checkpoints to try, in order: for "latest", newest first (a corrupt one falls back to the one before);
    a named checkpoint alone; none for a fresh run (or "latest" before any checkpoint)."""
    if resume == "latest":
        return list(reversed(list_checkpoints(output_dir)))
    path = resolve_resume(output_dir, resume)
    return [path] if path is not None else []


def resume_state(accelerator, out: Path, resume_from: str | None, main: bool,
                 run_args: dict | None = None) -> tuple[dict, ArgChanges]:
    """The training position to start from (fresh, or restored from a checkpoint) and how the arguments differ
    from the checkpoint's. A "latest" checkpoint that fails `verify_checkpoint` is moved aside (renamed
    `checkpoint-N.corrupt`) with a warning and the previous one is tried. When resuming, logs are cut back to
    the position's step (0 when a killed run left no checkpoint yet), so lost steps are not logged twice.

    Raises:
        ValueError: a changed fixed flag (`compare_run_args`); a named checkpoint, or every checkpoint, corrupt.
    """
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    changes = ArgChanges()
    corrupt = []
    for path in resume_candidates(out, resume_from):
        problem = verify_checkpoint(path)
        if problem is not None:
            if resume_from != "latest":
                raise ValueError(f"--resume_from_checkpoint {resume_from}: {path} is corrupt ({problem})")
            accelerator.wait_for_everyone()  # every process has read it before it is moved
            aside = path.with_name(path.name + ".corrupt")
            corrupt.append(path.name)
            if main:
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(path, aside)
            accelerator.print(f"warning: {path.name} is corrupt ({problem}); moved to {aside.name}, trying the "
                              f"checkpoint before it")
            accelerator.wait_for_everyone()
            continue
        if run_args is not None:
            changes = compare_run_args(path, run_args)
        state.update(load_checkpoint(accelerator, path))
        accelerator.print(f"resumed from {path} at step {state['step']}")
        if changes.changed:
            accelerator.print(f"changed since {path.name}: {changes.describe()}")
        break
    else:
        if corrupt:  # starting from step 0 would silently throw the run away
            raise ValueError(f"--resume_from_checkpoint latest: every checkpoint in {out} is corrupt "
                             f"({', '.join(corrupt)}, moved to *.corrupt); retrain without --resume_from_checkpoint")
    if resume_from and main:
        for log_file in (out / "logs").glob("*.jsonl"):
            truncate_log(log_file, state["step"])
    return state, changes


def truncate_log(path: str | Path, step: int) -> None:
    """Drop JSON-lines records past `step` (written by the killed run after its last checkpoint)."""
    path = Path(path)
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept))
