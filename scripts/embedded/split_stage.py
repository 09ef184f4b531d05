"""Split .stage/ (pack_inputs.py) over two device calls: each call carries at most 64 MiB, tracked files
included, and the repository's own files (the shipped model) already take ~25 MiB.

    python scripts/embedded/split_stage.py            # .stage/ -> .stage_a/ + .stage_b/

.stage_a/: MiniLM's word-embedding table (23 MB), carried by a first call; the device keeps ignored paths
that a later call does not carry, so the second call, made within the machine's warm window, finds it.
.stage_b/: the rest of MiniLM, the images and the configs.
The captions (xz), MiniLM's tokenizer and the head of the images file also go in .stage_a/ (under extra/), to keep .stage_b/ plus the
repository's own files under 64 MiB; so does a VQGAN given with --vq FOLDER (as .stage_a/vqvae/, for a U-ViT
trained on another VQGAN's tokens: retrain_uvit.sh's VQ=.stage/vqvae).
join_stage.py puts .stage/ back together on the device.
"""

import lzma
import shutil
import sys
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
(a / "extra" / "minilm").mkdir(parents=True)
shutil.move(b / "minilm" / "tokenizer.json", a / "extra" / "minilm" / "tokenizer.json")
for f in src.iterdir():
    if f.suffix == ".jsonl":
        with lzma.open(a / "extra" / (f.name + ".xz"), "wb") as out:
            out.write(f.read_bytes())
    elif f.is_file():
        shutil.copy(f, b / f.name)
# the first 3 MiB of the packed images ride with .stage_a/ too: both calls then keep ~3 MiB of headroom
images = (b / "images.npy.xz").read_bytes()
(a / "extra" / "images.npy.xz.head").write_bytes(images[:3 * 2**20])
(b / "images.npy.xz").write_bytes(images[3 * 2**20:])
if "--vq" in sys.argv:
    shutil.copytree(Path(sys.argv[sys.argv.index("--vq") + 1]), a / "vqvae")
for d in (a, b):
    print(d, f"{sum(p.stat().st_size for p in d.rglob('*') if p.is_file()) / 2**20:.1f} MiB")
