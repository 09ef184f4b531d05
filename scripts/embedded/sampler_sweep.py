"""Confidence against Halton order on the embedded model: `amused eval --steps N --sampler S` for each step count
and sampler, then a timing pass, combined into one JSON (docs/results/embedded_sampler_halton_cpu.json).

    python scripts/embedded/sampler_sweep.py --data data/emoji --steps 4 6 8 12 \
        --out docs/results/embedded_sampler_halton_cpu.json [--evals-dir DIR]   # DIR: reuse eval JSONs there

Retrieval figures are deterministic (seed 0, CPU generator). The eval's own generation time is measured while
it runs and is only as quiet as the machine; the timing pass times the same batch (32 training captions) for
both samplers in alternation, several times, and keeps the median.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SAMPLERS = ("confidence", "halton")


def run_eval(steps: int, sampler: str, data: Path, out: Path) -> dict:
    if not out.is_file():
        subprocess.run([sys.executable, "-m", "amused.cli", "eval", "--steps", str(steps), "--sampler", sampler,
                        "--data", str(data), "--device", "cpu", "--out", str(out), "--quiet"], check=True)
    return json.loads(out.read_text())


def summary(result: dict) -> dict:
    r = result["retrieval"]
    return {"top1_train": r["generated_train"]["emoji_accuracy"],
            "top1_heldout": r["generated_heldout"]["emoji_accuracy"],
            "style_train": r["generated_train"]["style_accuracy"],
            "style_heldout": r["generated_heldout"]["style_accuracy"],
            "eval_generation_ms_per_image": result["generation"]["ms_per_image"]}


def timing(steps_list: list[int], repeats: int, data: Path) -> dict:
    """Median ms per image of one 32-caption batch, both samplers alternating (the same prompts and seed)."""
    import torch

    from amused.evaluate import load_rows
    from amused.runtime import load_engine

    pipe = load_engine("embedded", device="cpu").pipe
    prompts = [r["text"] for r in load_rows(data)[:32]]
    out = {}
    for steps in steps_list:
        times = {s: [] for s in SAMPLERS}
        for _ in range(repeats):
            for sampler in SAMPLERS:
                start = time.perf_counter()
                pipe(prompts, num_inference_steps=steps, sampler=sampler, output_type="np",
                     generator=torch.Generator().manual_seed(0))
                times[sampler].append((time.perf_counter() - start) * 1000 / len(prompts))
        out[str(steps)] = {s: round(statistics.median(t), 2) for s, t in times.items()}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/emoji"))
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 6, 8, 12])
    parser.add_argument("--evals-dir", type=Path, default=Path("eval_sweep"), help="eval JSONs (reused if there)")
    parser.add_argument("--repeats", type=int, default=5, help="timing pass: calls per sampler and step count")
    parser.add_argument("--out", type=Path, default=Path("docs/results/embedded_sampler_halton_cpu.json"))
    args = parser.parse_args(argv)
    args.evals_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for steps in args.steps:
        for sampler in SAMPLERS:
            result = run_eval(steps, sampler, args.data, args.evals_dir / f"eval_{sampler}_{steps}.json")
            rows.append({"steps": steps, "sampler": sampler, **summary(result), "settings": result["settings"]})
            print(json.dumps(rows[-1]), flush=True)
    timed = timing(args.steps, args.repeats, args.data)
    for row in rows:
        row["timed_ms_per_image"] = timed[str(row["steps"])][row["sampler"]]
    report = {"model": "embedded (amused-emoji-64)", "data": str(args.data), "device": "cpu",
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "threads": os.environ.get("AMUSED_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default",
              "command": "amused eval --steps N --sampler S --device cpu (200 train + 171 held-out captions, seed 0)",
              "timing": f"median of {args.repeats} calls of 32 training captions per sampler, alternating",
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'steps':>5} {'sampler':<11} {'top-1 train':>11} {'held-out':>9} {'ms/img':>7}")
    for r in rows:
        print(f"{r['steps']:>5} {r['sampler']:<11} {r['top1_train']:>11.1%} {r['top1_heldout']:>9.1%} "
              f"{r['timed_ms_per_image']:>7.1f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
