"""The trained U-ViT of an `amused train` output folder as the embedded model ships it: fp16 weights (the size
budget), its config and training log, copied into OUT (what comes back from the device).

The weights are written in parts of at most 15 MiB (`transformer.fp16.part0.safetensors`, ...): a file over
16 MiB does not come back from the device, and a 4096-code U-ViT is 17.8 MB or more in fp16.
`join_parts.py` puts them back together.

    python scripts/embedded/ship_uvit.py RUN_DIR OUT
"""

import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from amused.loading import atomic_write

PART_BYTES = 15 * 2**20

run, out = Path(sys.argv[1]), Path(sys.argv[2])
state = load_file(run / "transformer" / "diffusion_pytorch_model.safetensors")
parts, size = [{}], 0
for name, value in state.items():
    value = value.half().contiguous()
    nbytes = value.numel() * value.element_size()
    if parts[-1] and size + nbytes > PART_BYTES:
        parts.append({})
        size = 0
    parts[-1][name] = value
    size += nbytes
for i, part in enumerate(parts):  # atomic, with the permissions of any new file (save_file alone gives 0600)
    atomic_write(out / f"transformer.fp16.part{i}.safetensors",
                 lambda tmp, part=part: save_file(part, str(tmp), metadata={"format": "pt"}))
shutil.copy(run / "transformer" / "config.json", out / "transformer.config.json")
shutil.copy(run / "logs" / "train_log.jsonl", out / "uvit_log.jsonl")
print("shipped", len(parts), "parts of", out / "transformer.fp16.safetensors")
