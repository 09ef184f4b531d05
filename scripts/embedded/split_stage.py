"""Split .stage/ (pack_inputs.py) over two device calls: each call carries at most 64 MiB, tracked files
included, and the repository's own files (the shipped model) already take ~25 MiB.

    python scripts/embedded/split_stage.py            # .stage/ -> .stage_a/ + .stage_b/

.stage_a/: MiniLM's word-embedding table (23 MB), carried by a first call; the device keeps ignored paths
that a later call does not carry, so the second call, made within the machine's warm window, finds it.
.stage_b/: the rest of MiniLM, the images, the captions (xz) and the configs.
join_stage.py puts .stage/ back together on the device.
"""

import lzma
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

EMBEDDINGS = "embeddings.word_embeddings.weight"
src, a, b = Path(".stage"), Path(".stage_a"), Path(".stage_b")
for d in (a, b):
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
state = load_file(src / "minilm" / "model.safetensors")
save_file({EMBEDDINGS: state.pop(EMBEDDINGS)}, a / "minilm_part1.safetensors", metadata={"format": "pt"})
(b / "minilm").mkdir()
save_file(state, b / "minilm" / "part2.safetensors", metadata={"format": "pt"})
for f in (src / "minilm").iterdir():
    if f.name != "model.safetensors":
        shutil.copy(f, b / "minilm" / f.name)
for f in src.iterdir():
    if f.suffix == ".jsonl":
        with lzma.open(b / (f.name + ".xz"), "wb") as out:
            out.write(f.read_bytes())
    elif f.is_file():
        shutil.copy(f, b / f.name)
for d in (a, b):
    print(d, f"{sum(p.stat().st_size for p in d.rglob('*') if p.is_file()) / 2**20:.1f} MiB")
