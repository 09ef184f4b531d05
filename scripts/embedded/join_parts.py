"""Join the weight parts ship_uvit.py wrote (PREFIX.part0.safetensors, PREFIX.part1.safetensors, ...) into one
safetensors file.

    python scripts/embedded/join_parts.py DIR/uvit_l6.fp16 OUT.safetensors
"""

import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

prefix, out = Path(sys.argv[1]), Path(sys.argv[2])
parts = sorted(prefix.parent.glob(prefix.name + ".part*.safetensors"),
               key=lambda p: int(p.name.rsplit(".part", 1)[1].split(".")[0]))
if not parts:
    sys.exit(f"no parts {prefix}.part*.safetensors")
state = {}
for p in parts:
    state.update(load_file(p))
save_file(state, out, metadata={"format": "pt"})
print("joined", len(parts), "parts,", len(state), "tensors ->", out)
