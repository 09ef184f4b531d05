"""One CPU image, side by side in one run: diffusers' stream (`torch.multinomial`: one exponential per codebook entry
and token, `--reference-stream`) against the fast inverse-CDF draws (one uniform per token, what every face uses on
the CPU by default), for one or more models and weight dtypes (`--dtype`: fp32, bf16; `auto` is what the faces pick
here) loaded at once, calls alternated (so a shared, noisy CPU slows every row alike). One call: batch 1, the
model's default settings (steps, guidance), whole image out; median of N after one warm-up each.

    python benchmarks/cpu_draws.py --out docs/results/cpu_draws_embedded.json [--model DIR ...] [--repeats 20] \
        [--dtype fp32 bf16] [--draws both|fast|reference]
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
    ap.add_argument("--model", nargs="+", default=["embedded"], help="checkpoint folders (default: the embedded model)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", nargs="+", default=["red apple"],
                    help="prompts, each a row (a styled one runs the model's composed guidance, if it has one)")
    ap.add_argument("--dtype", nargs="+", default=["fp32"], choices=["auto", "fp32", "bf16"],
                    help="weight dtypes, each model loaded once per dtype (default fp32)")
    ap.add_argument("--draws", default="both", choices=["both", "fast", "reference"])
    ap.add_argument("--out", default=None, help="JSON results")
    args = ap.parse_args()

    pipes = {(m, t): load_engine(m, device="cpu", dtype=t, fast="off").pipe for m in args.model for t in args.dtype}
    modes = {"reference (diffusers' stream)": True, "fast (inverse CDF)": False}
    modes = {k: v for k, v in modes.items() if args.draws == "both" or v == (args.draws == "reference")}
    cases = [(m, t, d, p) for (m, t) in pipes for d in modes for p in args.prompt]
    times: dict[tuple[str, str, str, str], list[float]] = {c: [] for c in cases}
    for m, t, d, p in cases:  # warm-up
        pipes[m, t].reference_stream = modes[d]
        pipes[m, t]([p] * args.batch, generator=torch.Generator().manual_seed(0))
    for i in range(args.repeats):
        for m, t, d, p in cases:
            pipes[m, t].reference_stream = modes[d]
            started = time.perf_counter()
            pipes[m, t]([p] * args.batch, generator=torch.Generator().manual_seed(i))
            times[m, t, d, p].append((time.perf_counter() - started) * 1e3)

    rows = [{"model": m, "dtype": str(pipes[m, t].transformer.dtype).removeprefix("torch."),
             "codebook": pipes[m, t].transformer.config.codebook_size, "draws": d, "prompt": p,
             "composed_guidance": pipes[m, t].composed_guidance is not None
             and pipes[m, t].composed_guidance.split(p) is not None,
             "ms_median": statistics.median(times[m, t, d, p]), "ms_min": min(times[m, t, d, p]),
             "ms_per_image": statistics.median(times[m, t, d, p]) / args.batch} for m, t, d, p in cases]
    print(f"batch {args.batch}  threads {torch.get_num_threads()}  repeats {args.repeats}")
    print(f"{'model':30} {'dtype':>8} {'codes':>5} {'draws':30} {'prompt':26} {'median ms':>10} {'min ms':>8}")
    for r in rows:
        print(f"{r['model'][-30:]:30} {r['dtype']:>8} {r['codebook']:5d} {r['draws']:30} {r['prompt'][:26]:26} "
              f"{r['ms_median']:10.1f} {r['ms_min']:8.1f}")
    if args.out:
        from amused.runtime import native_cpu_bf16

        result = {"meta": {"batch": args.batch, "repeats": args.repeats, "threads": torch.get_num_threads(),
                           "cpus": os.cpu_count(), "torch": torch.__version__, "machine": platform.machine(),
                           "native_cpu_bf16": native_cpu_bf16(), "prompts": args.prompt}, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
