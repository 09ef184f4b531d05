"""fp16 weights of a training run: its saved model when it finished, else its last checkpoint (compiled blocks'
`_orig_mod.` keys dropped, and only the keys under `prefix`, e.g. "vq." for a VQGAN checkpoint).

    python scripts/embedded/export_fp16.py RUN_DIR PART PREFIX OUT_FILE     # prints where the weights came from
"""

import sys
from pathlib import Path

from safetensors.torch import load_file, save_file


def export(run: Path, part: str, prefix: str, out: Path) -> str | None:
    """Write `out`; returns "final", the checkpoint's name, or None when the run saved nothing."""
    final = run / part / "diffusion_pytorch_model.safetensors"
    ckpts = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if final.is_file():
        state, source = load_file(final), "final"
    elif ckpts:
        state, source = load_file(ckpts[-1] / "model.safetensors"), ckpts[-1].name
        state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if prefix else state
    else:
        return None
    save_file({k: v.half().contiguous() for k, v in state.items()}, out)
    return source


if __name__ == "__main__":
    source = export(Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4]))
    print(source or "nothing saved")
    sys.exit(0 if source else 1)
