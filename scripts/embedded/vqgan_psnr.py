"""VQGAN reconstruction PSNR exactly as `amused eval` measures it (held-out images, and the same seeded sample of
200 training images), for one or more VQGAN folders (diffusers `vqvae/` layout, or a file + config pair), without
the U-ViT: to compare a VQGAN that is not shipped with the shipped one.

    python scripts/embedded/vqgan_psnr.py --data data/emoji --out vq.json shipped=src/amused/assets/amused-emoji-64/vqvae \\
        long4096=/work/data/run5/vq4096_long
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from amused.evaluate import load_images, load_rows, psnr, sample_rows
from amused.loading import load_model
from amused.models.vqgan import VQGAN, VQGANConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vqgans", nargs="+", metavar="NAME=FOLDER")
    parser.add_argument("--data", type=Path, default=Path("data/emoji"))
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = load_rows(args.data)
    images = load_images(args.data, rows)
    train = [i for i, r in enumerate(rows) if r["split"] == "train"]
    sets = {"train": [train[k] for k in sample_rows([rows[i] for i in train], args.num_train, args.seed)],
            "heldout": [i for i, r in enumerate(rows) if r["split"] == "heldout"]}
    result = {}
    for spec in args.vqgans:
        name, folder = spec.split("=", 1)
        vq = load_model(VQGAN, VQGANConfig, Path(folder)).eval()
        result[name] = {"folder": folder, "num_vq_embeddings": vq.config.num_vq_embeddings}
        with torch.no_grad():
            for split, idx in sets.items():
                x = images[idx]
                rec = torch.cat([vq.decode(vq.encode(x[i:i + 64])).float() for i in range(0, len(x), 64)])
                result[name][split] = {"n": len(idx), "psnr_db": round(float(psnr(rec, x).mean()), 2)}
        print(name, result[name], flush=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
