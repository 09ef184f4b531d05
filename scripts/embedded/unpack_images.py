"""On the GPU machine: images.npy.xz + *.jsonl -> imagefolder layout (PNG + metadata.jsonl) per split."""

import json
import lzma
import sys
from pathlib import Path

import numpy as np
from PIL import Image

stage, out = Path(sys.argv[1]), Path(sys.argv[2])
with lzma.open(stage / "images.npy.xz") as f:
    images = np.load(f)
i = 0
for split in ("train", "heldout"):
    rows = [json.loads(line) for line in open(stage / f"{split}.jsonl")]
    (out / split).mkdir(parents=True, exist_ok=True)
    for r in rows:
        Image.fromarray(images[i]).save(out / split / r["file_name"])
        i += 1
    (out / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(split, len(rows))
