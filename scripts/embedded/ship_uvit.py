"""The trained U-ViT of an `amused train` output folder as the embedded model ships it: fp16 weights (the size
budget), its config and training log, copied into OUT (what comes back from the device).

    python scripts/embedded/ship_uvit.py RUN_DIR OUT
"""

import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

run, out = Path(sys.argv[1]), Path(sys.argv[2])
state = load_file(run / "transformer" / "diffusion_pytorch_model.safetensors")
save_file({k: v.half().contiguous() for k, v in state.items()}, out / "transformer.fp16.safetensors")
shutil.copy(run / "transformer" / "config.json", out / "transformer.config.json")
shutil.copy(run / "logs" / "train_log.jsonl", out / "uvit_log.jsonl")
print("shipped", out / "transformer.fp16.safetensors")
