"""On the device: the chunks .stage_a/, .stage_b/, ... (split_stage.py) -> .stage/ as pack_inputs.py wrote it."""

import io
import lzma
import sys
import tarfile
from pathlib import Path

chunks = sorted(Path(".").glob(".stage_?/stage.tar.xz.?"))
letters = "".join(c.suffix[1:] for c in chunks)
if not letters or letters != "abcdefghijklmnopqrstuvwxyz"[:len(letters)]:
    sys.exit(f"stage chunks found: {letters or 'none'}; an earlier call's chunk is gone (machine not warm?)")
try:
    data = lzma.decompress(b"".join(c.read_bytes() for c in chunks))
except lzma.LZMAError:
    sys.exit(f"stage chunks {letters} do not make a whole archive: a later chunk is missing")
with tarfile.open(fileobj=io.BytesIO(data)) as tar:
    tar.extractall(".", filter="data")
print("joined .stage from", letters, sorted(p.name for p in Path(".stage").rglob("*"))[:12])
