"""Resumable training checkpoints that appear atomically, keeping the last N.

A checkpoint is `accelerator.save_state` (model, prepared optimizers, RNG states of every process, and the
objects registered with `register_for_checkpointing`: LR scheduler, EMA, per-parameter optimizers) plus
`training_state.json` (optimizer step, epoch, micro-batch position in the epoch, seed). It is written to
`.tmp-checkpoint-N/`, its files flushed to disk, then renamed to `checkpoint-N/` in one `os.replace`: a
`checkpoint-N` directory that exists is complete, whenever the process was killed. Old checkpoints are renamed
to `.trash-...` before they are deleted, for the same reason. Leftover `.tmp-*` / `.trash-*` directories are
removed when training starts.

The pickled pieces (optimizer, scheduler, RNG) are loaded with `weights_only=False` by accelerate: resume only
from checkpoints you wrote.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"


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
                    total_limit: int | None = None) -> Path:
    """Write `output_dir/checkpoint-{step}` atomically; every process must call this.

    Args:
        accelerator: the run's accelerator (its prepared and registered objects are saved).
        output_dir: the run's output folder.
        step: optimizer steps done (names the directory).
        training_state: JSON-able position of the run (step, epoch, batch_in_epoch, ...).
        total_limit: keep at most this many checkpoints (oldest removed first).

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


def truncate_log(path: str | Path, step: int) -> None:
    """Drop JSON-lines records past `step` (written by the killed run after its last checkpoint)."""
    path = Path(path)
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept))


def resume_state(accelerator, out: Path, resume_from: str | None, main: bool) -> dict:
    """The training position to start from: fresh, or restored from a checkpoint. When resuming, logs are cut
    back to the position's step (0 when a killed run left no checkpoint yet), so lost steps are not logged twice."""
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    resume = resolve_resume(out, resume_from)
    if resume is not None:
        state.update(load_checkpoint(accelerator, resume))
        accelerator.print(f"resumed from {resume} at step {state['step']}")
    if resume_from and main:
        for log_file in (out / "logs").glob("*.jsonl"):
            truncate_log(log_file, state["step"])
    return state
