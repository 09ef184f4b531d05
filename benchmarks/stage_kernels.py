"""Kernel by kernel: the fast path's stages (per-call conditioning, one decoding step, the VQ decode), each
captured as its own CUDA graph, timed, and profiled replay by replay; published shapes, random weights, fp16.

    python benchmarks/stage_kernels.py --preset amused-256 --batch 1 --sdpa default cudnn flash --out k.json

--sdpa picks the attention backend (torch.nn.attention.sdpa_kernel) for everything compiled and captured;
each choice builds its own pipeline, so each row is the whole fast path under that backend. CUDA only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from amused.bench import PROMPTS, graph_ms, random_pipeline, stages, timed

BACKENDS = ("default", "cudnn", "flash", "efficient", "math")


def kernels_of(fn, replays: int = 5, top: int = 15) -> dict:
    """Capture `fn`, replay it under the profiler; GPU time per kernel name per replay, largest first."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        fn()
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    per_name: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start:
            per_name[e.name][0] += (e.time_range.end - e.time_range.start) / 1000 / replays
            per_name[e.name][1] += 1
    rows = sorted(per_name.items(), key=lambda kv: -kv[1][0])
    return {"kernels_per_replay": sum(c for _, c in per_name.values()) // replays,
            "kernel_ms": round(sum(ms for ms, _ in per_name.values()), 3),
            "top": [{"kernel": name[:100], "ms": round(ms, 4), "calls": count // replays}
                    for name, (ms, count) in rows[:top]]}


def sdpa_backend(name: str):
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel([backend, SDPBackend.MATH])  # math: for the shapes the backend refuses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="amused-256")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sdpa", nargs="+", default=["default"], choices=BACKENDS)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default="stage_kernels.json")
    args = p.parse_args()
    prompts = (PROMPTS * args.batch)[:args.batch]
    # The backend is chosen when a graph is traced; compile caches are keyed on the graph before that choice,
    # so with them on, every row after the first would replay the first one's kernels.
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    rows = []
    for backend in args.sdpa:
        torch._dynamo.reset()
        pipe = random_pipeline(args.preset, "cuda", torch.float16)
        with sdpa_backend(backend):
            pipe.enable_fast()
            call = timed(lambda: pipe(prompts, output_type="np"), args.repeats, torch.device("cuda"))
            parts = stages(pipe, len(prompts))
            row = {"sdpa": backend, "preset": args.preset, "batch": args.batch, "call_ms": call["ms_median"]}
            for name in ("condition", "step", "vq_decode"):
                row[name] = {"graph_ms": round(graph_ms(parts[name]), 4), **kernels_of(parts[name])}
        rows.append(row)
        print(json.dumps({k: (v if not isinstance(v, dict) else {"graph_ms": v["graph_ms"],
                                                                 "kernels": v["kernels_per_replay"]})
                          for k, v in row.items()}), flush=True)
        pipe = None
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for row in rows:
        print(f"\nsdpa {row['sdpa']}: call {row['call_ms']:.2f} ms")
        for name in ("condition", "step", "vq_decode"):
            r = row[name]
            print(f"  {name}: {r['graph_ms']:.3f} ms a replay, {r['kernels_per_replay']} kernels "
                  f"({r['kernel_ms']:.3f} ms busy)")
            for k in r["top"][:8]:
                print(f"    {k['ms']:8.4f} ms  x{k['calls']:<4} {k['kernel']}")


if __name__ == "__main__":
    main()
