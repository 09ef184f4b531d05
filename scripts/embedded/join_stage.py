"""On the device: .stage_a/ + .stage_b/ (split_stage.py) -> .stage/ as pack_inputs.py wrote it."""

import lzma
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

a, b, dst = Path(".stage_a"), Path(".stage_b"), Path(".stage")
if not (a / "minilm_part1.safetensors").is_file():
    sys.exit(".stage_a/minilm_part1.safetensors is missing: the first call's files are gone (machine not warm?)")
shutil.rmtree(dst, ignore_errors=True)
shutil.copytree(b, dst)
if (a / "extra").is_dir():  # the captions, the tokenizer, the images' head (split_stage.py keeps .stage_b/ small)
    shutil.copytree(a / "extra", dst, dirs_exist_ok=True)
    head = dst / "images.npy.xz.head"
    if head.is_file():
        (dst / "images.npy.xz").write_bytes(head.read_bytes() + (dst / "images.npy.xz").read_bytes())
        head.unlink()
if (a / "vqvae").is_dir():
    shutil.copytree(a / "vqvae", dst / "vqvae")
state = load_file(b / "minilm" / "part2.safetensors")
state.update(load_file(a / "minilm_part1.safetensors"))
save_file(state, dst / "minilm" / "model.safetensors", metadata={"format": "pt"})
(dst / "minilm" / "part2.safetensors").unlink()
for f in list(dst.glob("*.jsonl.xz")):
    f.with_suffix("").write_bytes(lzma.open(f).read())
    f.unlink()
print("joined", dst, sorted(p.name for p in dst.rglob("*")))
