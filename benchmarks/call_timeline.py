"""Where one fast call's wall time goes outside GPU kernels: idle GPU before the first kernel, between kernels
(gaps over --gap_us) and after the last, from a torch.profiler trace of one warmed-up call (CUDA only).

    python benchmarks/call_timeline.py --preset amused-256 --batch 1 --out timeline.json

The profiler slows the host a little, so the idle figures are upper bounds; kernel times are the GPU's own.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from amused.bench import PROMPTS, random_pipeline


def busy_intervals(events) -> list[tuple[float, float, str]]:
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                     if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    merged: list[list] = []
    for start, end, name in kernels:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
            merged[-1][3] = name
        else:
            merged.append([start, end, name, name])  # start, end, first kernel, last kernel
    return [tuple(m) for m in merged]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="amused-256")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--compile", default="full", choices=["blocks", "full"])
    p.add_argument("--gap_us", type=float, default=10.0)
    p.add_argument("--out", default="timeline.json")
    args = p.parse_args()
    pipe = random_pipeline(args.preset, "cuda", torch.float16)
    pipe.enable_fast(compile=args.compile)
    prompts = (PROMPTS * args.batch)[:args.batch]
    for _ in range(3):
        pipe(prompts, output_type="np")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("amused_call"):
            pipe(prompts, output_type="np")
        torch.cuda.synchronize()
    events = prof.events()
    call = next(e for e in events if e.name == "amused_call")
    t0, t1 = call.time_range.start, call.time_range.end
    busy = [b for b in busy_intervals(events) if b[1] > t0 and b[0] < t1]
    gaps = [{"after_us": round(a[1] - t0, 1), "idle_us": round(b[0] - a[1], 1), "before": a[3][:80],
             "next": b[2][:80]} for a, b in zip(busy, busy[1:]) if b[0] - a[1] > args.gap_us]
    result = {"preset": args.preset, "batch": args.batch, "compile": args.compile,
              "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "call_us": round(t1 - t0, 1), "kernel_busy_us": round(sum(e - s for s, e, *_ in busy), 1),
              "idle_before_first_kernel_us": round(busy[0][0] - t0, 1) if busy else None,
              "idle_after_last_kernel_us": round(t1 - busy[-1][1], 1) if busy else None,
              "gaps_over_threshold_us": round(sum(g["idle_us"] for g in gaps), 1), "gaps": gaps,
              "cpu_ops_by_self_time": [{"op": e.key[:80], "self_cpu_us": round(e.self_cpu_time_total, 1),
                                        "calls": e.count}
                                       for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]]}
    print(json.dumps({k: v for k, v in result.items() if k not in ("gaps", "cpu_ops_by_self_time")}))
    for g in gaps[:20]:
        print(g)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
