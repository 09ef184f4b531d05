"""Where the last milliseconds go: the VQ decode and one guided U-ViT step under variants, each timed as a
replayed CUDA graph (launch costs excluded, as in `amused.fast`), plus a per-kernel breakdown.

    python benchmarks/fast_variants.py --out variants.json            # CUDA only; ~4 min on one H100

Variants run in their own subprocess with a time limit (a max-autotune compile can take minutes), so one
slow or failing variant only loses its own row. Published amused-256/512 shapes, random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from amused.bench import graph_ms

VQ_SHAPES = [(256, 1), (512, 1), (512, 8)]
VQ_VARIANTS = {  # name: (dtype, torch.compile mode or None, cudnn.benchmark[, layout, group norm])
    "compiled bf16 +cudnn.benchmark": ("bf16", "default", True),
    "compiled bf16 chunked GN": ("bf16", "default", True, "channels_last", "chunked"),
    "compiled bf16 NCHW": ("bf16", "default", True, "contiguous", "native"),
    "compiled bf16 NCHW chunked GN": ("bf16", "default", True, "contiguous", "chunked"),
    "compiled bf16 (shipped before)": ("bf16", "default", False),
    "eager bf16 +cudnn.benchmark": ("bf16", None, True),
    "eager bf16": ("bf16", None, False),
    "compiled fp16 +cudnn.benchmark": ("fp16", "default", True),
    "max-autotune-no-cudagraphs bf16": ("bf16", "max-autotune-no-cudagraphs", True),
}
UVIT_CASES = [("amused-256", 2), ("amused-512", 2), ("amused-256", 16), ("amused-512", 16)]
CASES = os.environ.get("FAST_VARIANTS_UVIT_CASES", "").split()  # --uvit-cases, passed on to the children
UVIT_VARIANTS = {  # name: how the U-ViT is compiled
    "per-block default (shipped)": "blocks",
    "whole model default": "whole",
    "eager": "eager",
    "per-block max-autotune-no-cudagraphs": "blocks-autotune",
    "per-block coordinate-descent tuning": "blocks-coordesc",
    "per-block max-autotune + coordinate descent": "blocks-autotune-coordesc",
}


def top_kernels(fn, n: int = 12) -> list[dict]:
    """GPU time per kernel name over one eager call (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 1000, e.count) for e in prof.key_averages()
            if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    return [{"kernel": k[:90], "ms": round(ms, 3), "calls": c} for k, ms, c in rows[:n]] + [
        {"kernel": "TOTAL kernel time", "ms": round(total, 3), "calls": sum(r[2] for r in rows)}]


def run_vq(name: str) -> list[dict]:
    from amused.models.vqgan import VQGAN
    from amused.presets import VQ_PRESETS

    dtype_name, mode, bench, layout, norm = (*VQ_VARIANTS[name], "channels_last", "native")[:5]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    torch.backends.cudnn.benchmark = bench
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    vq = VQGAN(VQ_PRESETS["amused"]()).eval().to("cuda", torch.float16).to(memory_format=fmt)
    if norm == "chunked":
        from amused.group_norm import use_chunked_group_norm

        use_chunked_group_norm(vq.decoder)
    if mode:
        vq.decoder.compile(mode=mode, dynamic=False)
    rows = []
    for side, batch in VQ_SHAPES:
        ids = torch.randint(0, vq.config.num_vq_embeddings, (batch, side // 16, side // 16), device="cuda")

        def decode():
            with torch.autocast("cuda", dtype=dtype):
                q = vq.quantize.lookup(ids).contiguous(memory_format=fmt)
                return vq.decode_latents(q).float().clamp(0, 1)

        start = time.perf_counter()
        ms = graph_ms(decode)
        row = {"part": "vq_decode", "variant": name, "side": side, "batch": batch, "graph_ms": round(ms, 3),
               "setup_s": round(time.perf_counter() - start, 1)}
        if name in ("compiled bf16 chunked GN", "compiled bf16 NCHW") and (side, batch) == (512, 8):
            row["top_kernels"] = top_kernels(decode)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def run_uvit(name: str) -> list[dict]:
    from amused.models.uvit import UViT
    from amused.presets import uvit_config

    how = UVIT_VARIANTS[name]
    torch.backends.cudnn.benchmark = True
    rows = []
    cases = [(p, n) for p, n in UVIT_CASES if not CASES or f"{p}:{n}" in CASES]
    for preset in sorted({p for p, _ in cases}):
        torch.manual_seed(0)
        model = UViT(uvit_config(preset)).eval().to("cuda", torch.float16)
        for m in model.modules():
            if hasattr(m, "fuse_projections"):
                m.fuse_projections()
        if "coordesc" in how:  # inductor tunes its own Triton kernels' launch configs, too
            torch._inductor.config.coordinate_descent_tuning = True
        if how.startswith("blocks"):
            mode = "max-autotune-no-cudagraphs" if "autotune" in how else None
            for block in [*model.transformer_layers, model.down_block, model.up_block, model.mlm_layer, model.embed]:
                block.compile(dynamic=False, mode=mode)
        forward = torch.compile(model.forward_tokens, dynamic=False) if how == "whole" else model.forward_tokens
        cfg = model.config
        for p, n in cases:
            if p != preset:
                continue
            ids = torch.full((n, cfg.sample_size, cfg.sample_size), cfg.mask_token_id, device="cuda")
            hidden = torch.randn(n, 77, cfg.encoder_hidden_size, device="cuda", dtype=torch.float16)
            pooled = torch.randn(n, cfg.cond_embed_dim, device="cuda", dtype=torch.float16)
            micro = torch.tensor([[1024.0, 1024, 0, 0, 6]] * n, device="cuda", dtype=torch.float16)
            with torch.inference_mode():
                ctx = model.condition(hidden, pooled, micro)
            start = time.perf_counter()
            ms = graph_ms(lambda: forward(ids, ctx))
            row = {"part": "uvit_forward", "variant": name, "model": preset, "batch": n, "graph_ms": round(ms, 3),
                   "setup_s": round(time.perf_counter() - start, 1)}
            if n == 2:
                row["top_kernels"] = top_kernels(lambda: forward(ids, ctx))
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="fast_variants.json")
    p.add_argument("--timeout", type=int, default=240, help="seconds per variant")
    p.add_argument("--only", nargs="*", help="variant names to run (default all)")
    p.add_argument("--uvit-cases", nargs="*", default=[], help="U-ViT cases as MODEL:BATCH, e.g. amused-256:2 "
                   "(default all)")
    p.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.uvit_cases:
        os.environ["FAST_VARIANTS_UVIT_CASES"] = " ".join(args.uvit_cases)
        CASES[:] = args.uvit_cases
    if args._child:
        part, name = args._child
        (run_vq if part == "vq" else run_uvit)(name)
        return
    rows = []
    vq, uvit = [("vq", n) for n in VQ_VARIANTS], [("uvit", n) for n in UVIT_VARIANTS]
    jobs = vq[:3] + uvit[:3] + vq[3:] + uvit[3:]  # the telling ones first, the slow autotune ones last
    for part, name in jobs:
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, __file__, "--_child", part, name], capture_output=True, text=True,
                                  timeout=args.timeout)
            got = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode:
                got.append({"part": part, "variant": name, "error": done.stderr[-1500:]})
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            got = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            got.append({"part": part, "variant": name, "error": f"over {args.timeout} s"})
        rows += got
        print(f"{part:5} {name:40} {time.perf_counter() - start:6.0f} s  " +
              "  ".join(f"{r.get('model', r.get('side'))}x{r.get('batch')}: {r.get('graph_ms', r.get('error', ''))!s:.40}"
                        for r in got), flush=True)
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
