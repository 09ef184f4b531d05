"""The CPU's random draws, side by side in one run: diffusers' stream (`torch.multinomial`: one exponential per
codebook entry and token, `--reference-stream`) against the fast inverse-CDF draws (one uniform per token, what
every face uses on the CPU by default), on the same loaded model, calls alternated. One call: batch 1, the
model's default settings (steps, guidance), whole image out; median of N after one warm-up each.

    python benchmarks/cpu_draws.py --out docs/results/cpu_draws_embedded.json [--model DIR] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from amused.runtime import load_engine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", default="red apple")
    ap.add_argument("--out", default=None, help="JSON results")
    args = ap.parse_args()

    pipe = load_engine(args.model, device="cpu", fast="off").pipe
    prompts = [args.prompt] * args.batch
    modes = {"reference (diffusers' stream)": True, "fast (inverse CDF)": False}
    times: dict[str, list[float]] = {name: [] for name in modes}
    for name, ref in modes.items():  # warm-up
        pipe.reference_stream = ref
        pipe(prompts, generator=torch.Generator().manual_seed(0))
    for i in range(args.repeats):
        for name, ref in modes.items():
            pipe.reference_stream = ref
            started = time.perf_counter()
            pipe(prompts, generator=torch.Generator().manual_seed(i))
            times[name].append((time.perf_counter() - started) * 1e3)

    rows = {name: {"ms_median": statistics.median(t), "ms_min": min(t), "ms_per_image": statistics.median(t) / args.batch}
            for name, t in times.items()}
    print(f"model {args.model or 'embedded'}  codebook {pipe.transformer.config.codebook_size}  batch {args.batch}  "
          f"threads {torch.get_num_threads()}  repeats {args.repeats}")
    print(f"{'draws':32} {'median ms':>10} {'min ms':>8} {'ms/image':>9}")
    for name, r in rows.items():
        print(f"{name:32} {r['ms_median']:10.1f} {r['ms_min']:8.1f} {r['ms_per_image']:9.1f}")
    ref, fast = (rows[n]["ms_median"] for n in modes)
    print(f"fast draws: {ref / fast:.2f}x the reference's speed")
    if args.out:
        result = {"meta": {"model": args.model or "embedded", "codebook": pipe.transformer.config.codebook_size,
                           "batch": args.batch, "repeats": args.repeats, "threads": torch.get_num_threads(),
                           "cpus": os.cpu_count(), "torch": torch.__version__, "machine": platform.machine()},
                  "rows": rows, "speedup": ref / fast}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
