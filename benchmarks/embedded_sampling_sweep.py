"""Sampling settings of the embedded model against prompt adherence (the top-1 retrieval of `amused eval`).

    python benchmarks/embedded_sampling_sweep.py --num-train 100 --out sweep.json

For each (guidance scale, temperature ramp) setting: one image per caption (a seeded sample of training
captions and every held-out pair; seed 0, 12 steps, CPU), the emoji and style accuracy of its nearest real
image in the feature space of `amused.evaluate`. The real and random baselines do not depend on the
settings: `amused eval` reports them. Prints a table and writes JSON; the best setting is a candidate for the
model's generation_config.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path


from amused import evaluate as ev


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    p.add_argument("--data", type=Path, default=Path("data/emoji"))
    p.add_argument("--num-train", type=int, default=100)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 5.0])
    p.add_argument("--temperature", nargs="+", default=["1,0", "0.5,0"], help="start,end pairs")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default="sampling_sweep.json")
    args = p.parse_args()

    from amused.cli import load_pipeline

    pipe = load_pipeline(args.model, "cpu", "auto")
    rows = ev.load_rows(args.data)
    db = ev.features(ev.load_images(args.data, rows))
    train_idx = [i for i, r in enumerate(rows) if r["split"] == "train"]
    train_idx = [train_idx[k] for k in ev.sample_rows([rows[i] for i in train_idx], args.num_train, 0)]
    held_idx = [i for i, r in enumerate(rows) if r["split"] == "heldout"]
    results = []
    for guidance, temp in itertools.product(args.guidance, args.temperature):
        temperature = tuple(float(t) for t in temp.split(","))
        row = {"guidance_scale": guidance, "temperature": list(temperature)}
        start = time.perf_counter()
        for name, idx in (("train", train_idx), ("heldout", held_idx)):
            images = ev.generate(pipe, [rows[i]["text"] for i in idx], 0, guidance, temperature, args.steps,
                                 args.batch_size)
            scores = ev.retrieval_scores(ev.nearest(ev.features(images), db), [rows[i] for i in idx], rows)
            row[name] = {k: scores[k] for k in ("n", "emoji_accuracy", "style_accuracy")}
        row["seconds"] = round(time.perf_counter() - start, 1)
        results.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps({"model": args.model or "embedded", "steps": args.steps, "seed": 0,
                                              "rows": results}, indent=1))
    print(f"\n{'guidance':>8} {'temperature':>12} {'train emoji':>12} {'held-out emoji':>15} {'train style':>12} "
          f"{'held-out style':>15}")
    for r in results:
        print(f"{r['guidance_scale']:>8} {str(tuple(r['temperature'])):>12} {r['train']['emoji_accuracy']:>12.1%} "
              f"{r['heldout']['emoji_accuracy']:>15.1%} {r['train']['style_accuracy']:>12.1%} "
              f"{r['heldout']['style_accuracy']:>15.1%}")


if __name__ == "__main__":
    main()
