"""`amused bench`: inference time of ours against diffusers' AmusedPipeline, side by side on one device.

For each model (a checkpoint, or the published amused-256 / amused-512 architectures with random weights)
and batch size: ms per call and per image (median of N calls after warm-up; prompt encoding, every step,
VQ decode and the copy of the images to the host included), peak GPU memory, the speed-up, and the
arithmetic floor (FLOPs counted by torch's FlopCounterMode / measured fp16 matmul rate). The reference gets
the same weights (its modules load our state dict: the parameter names are the same). Prints a table and
writes JSON.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = ["a photo of a red apple on a wooden table", "an astronaut riding a horse", "a watercolor fox",
           "a bowl of ramen, studio light", "a lighthouse at dusk", "a cat wearing sunglasses",
           "a snowy mountain village", "a robot reading a book"]


def random_pipeline(preset: str, device: str, dtype: torch.dtype):
    """Published architecture, random weights, CLIP-L-shaped text encoder with a character-level vocab."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from .models.uvit import UViT
    from .models.vqgan import VQGAN
    from .pipeline import AmusedPipeline, SchedulerConfig
    from .presets import CLIP_L, VQ_PRESETS, uvit_config, write_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = write_clip_tokenizer(Path(tempfile.mkdtemp()), max_length=77)
    with torch.device(device):
        text = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)).eval()
        transformer = UViT(uvit_config(preset)).eval()
        vqvae = VQGAN(VQ_PRESETS["amused"]()).eval()
    pipe = AmusedPipeline(vqvae, tokenizer, text, transformer, SchedulerConfig())
    return pipe.to(device, dtype)


def reference_pipeline(pipe):
    """diffusers' AmusedPipeline over the same weights (None when diffusers is not installed)."""
    try:
        import diffusers
    except ImportError:
        return None
    import dataclasses

    t_cfg = dataclasses.asdict(pipe.transformer.config)
    v_cfg = {k: v for k, v in dataclasses.asdict(pipe.vqvae.config).items() if v is not None}
    transformer = diffusers.UVit2DModel(**t_cfg)
    transformer.load_state_dict(pipe.transformer.state_dict())
    vqvae = diffusers.VQModel(**v_cfg)
    vqvae.load_state_dict(pipe.vqvae.state_dict())
    tokenizer, text_encoder = reference_text(pipe)
    ref = diffusers.AmusedPipeline(vqvae=vqvae, tokenizer=tokenizer, text_encoder=text_encoder,
                                   transformer=transformer,
                                   scheduler=diffusers.AmusedScheduler(mask_token_id=pipe.scheduler.mask_token_id))
    ref.set_progress_bar_config(disable=True)
    return ref.to(pipe.device, pipe.dtype)


def reference_text(pipe):
    """transformers' tokenizer and text model over `pipe`'s (the reference's own copies: compiling ours does not
    speed it up). amused's own CLIP classes have transformers' key names, so the weights load as they are."""
    import copy

    if type(pipe.text_encoder).__module__.startswith("transformers"):
        return pipe.tokenizer, copy.deepcopy(pipe.text_encoder)
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        pipe.tokenizer.save_pretrained(Path(tmp) / "tokenizer")
        tokenizer = transformers.CLIPTokenizer.from_pretrained(Path(tmp) / "tokenizer")
        pipe.text_encoder.save_pretrained(Path(tmp) / "text_encoder")
        model_cls = getattr(transformers, type(pipe.text_encoder).__name__)
        text_encoder = model_cls.from_pretrained(Path(tmp) / "text_encoder", dtype=pipe.text_encoder.dtype)
    return tokenizer, text_encoder.to(next(pipe.text_encoder.parameters()).device).eval()


def held_bytes(*modules) -> int:
    """Memory the modules' parameters and buffers hold (each storage counted once)."""
    storages = {}
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def timed(fn, repeats: int, device: torch.device) -> dict:
    """Median / min ms of `repeats` calls after one warm-up, and the peak memory over them."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"ms_median": statistics.median(times), "ms_min": min(times), "peak_gib": peak}


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda":
        return None
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * 10 / (time.perf_counter() - start) / 1e12


def count_flops(pipe, batch: int, guided: bool = True) -> dict:
    """FLOPs of one U-ViT forward (guided batch), one VQ decode and one text encoding."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = pipe.transformer.config
    side = cfg.sample_size
    n = batch * (2 if guided else 1)
    ids = torch.full((n, side, side), cfg.mask_token_id, device=pipe.device)
    hidden = torch.zeros(n, pipe.prompt_encoder.max_length, cfg.encoder_hidden_size, device=pipe.device, dtype=pipe.dtype)
    pooled = torch.zeros(n, cfg.cond_embed_dim, device=pipe.device, dtype=pipe.dtype)
    micro = torch.zeros(n, 5, device=pipe.device, dtype=pipe.dtype)
    out = {}
    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            pipe.transformer(ids, hidden, pooled, micro)
        out["uvit_forward"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            pipe.vqvae.decode(ids[:batch].clamp(max=cfg.codebook_size - 1))
        out["vq_decode"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            pipe.prompt_encoder([""] * batch)
        out["text_encode"] = fc.get_total_flops()
    return out


def run(presets=("amused-256", "amused-512"), batches=(1, 8), steps: int = 12, repeats: int = 30,
        device: str = "cuda", dtype: str = "fp16", model: str | None = None, reference: bool = True,
        reference_compile: bool = False, compile: bool | str = True, out: str | None = None,
        fast_options: dict | None = None) -> list[dict]:
    from .runtime import load_engine

    dev = torch.device(device)
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    tflops = matmul_tflops(dev, torch_dtype)
    rows = []
    for preset in ([model] if model else presets):
        if model:
            pipe = load_engine(model, device=device, dtype=dtype, fast="off").pipe
        else:
            pipe = random_pipeline(preset, device, torch_dtype)
        ref = reference_pipeline(pipe) if reference and pipe.prompt_encoder.is_clip else None
        if ref is not None and reference_compile:
            ref.transformer = torch.compile(ref.transformer)
        flops = {batch: count_flops(pipe, batch) for batch in batches}  # before compiling
        plain_check = None
        if dev.type == "cuda":
            try:
                plain_check = _graph_matches_plain(pipe, steps)
            except Exception as e:  # report, and still time the rest
                plain_check = {"error": f"{type(e).__name__}: {e}"}
            pipe.enable_fast(compile=compile, **(fast_options or {}))
        side = pipe.transformer.config.sample_size * pipe.vae_scale_factor
        for batch in batches:
            prompts = PROMPTS[:batch] if batch <= len(PROMPTS) else (PROMPTS * batch)[:batch]
            gen = torch.Generator(dev).manual_seed(0) if dev.type == "cuda" else torch.Generator().manual_seed(0)
            start = time.perf_counter()
            pipe(prompts, num_inference_steps=steps, output_type="np", generator=gen)  # capture / compile
            warmup_s = time.perf_counter() - start
            ours = timed(lambda: pipe(prompts, num_inference_steps=steps, output_type="np"), repeats, dev)
            row = {"model": preset, "batch": batch, "steps": steps, "ours": ours, "ours_warmup_s": warmup_s,
                   "side_px": side}
            ref_held = held_bytes(ref.transformer, ref.vqvae, ref.text_encoder) if ref is not None else 0
            if ours["peak_gib"] is not None:  # each pipeline's own peak: the other one's resident memory out
                ours["peak_gib"] -= ref_held / 2**30
            if ref is not None:
                ours_held = torch.cuda.memory_allocated(dev) - ref_held if dev.type == "cuda" else 0
                row["reference"] = timed(lambda: ref(prompts, num_inference_steps=steps, output_type="np"),
                                         repeats, dev)
                if row["reference"]["peak_gib"] is not None:
                    row["reference"]["peak_gib"] -= ours_held / 2**30
                row["speedup"] = row["reference"]["ms_median"] / ours["ms_median"]
            row["flops"] = flops[batch]
            if tflops:
                f = flops[batch]
                total = steps * f["uvit_forward"] + f["vq_decode"] + f["text_encode"]
                row["floor_ms"] = total / (tflops * 1e12) * 1000
            if dev.type == "cuda":
                row["host_syncs"] = _host_syncs(lambda: pipe(prompts, num_inference_steps=steps, output_type="np"))
                try:
                    row["breakdown_ms"] = _breakdown(pipe, prompts, steps, ours["ms_median"])
                except Exception as e:
                    row["breakdown_ms"] = {"error": f"{type(e).__name__}: {e}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
        info = {"plain_vs_graph_tokens_equal": plain_check}
        rows.append({"model": preset, "checks": info})
        pipe = ref = None  # free the GPU memory before the next model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "dtype": dtype, "matmul_tflops": tflops,
            "threads": torch.get_num_threads(), "fast_options": fast_options or {}, "compile": compile}
    try:
        import diffusers

        meta["diffusers"] = diffusers.__version__
    except ImportError:
        meta["diffusers"] = None
    print_table(rows, meta)
    if out:
        Path(out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return rows


def _graph_matches_plain(pipe, steps: int) -> dict:
    """Graph replay (no compile) vs the plain eager loop, same seed: the same tokens?"""
    prompts = PROMPTS[:2]
    plain = pipe(prompts, num_inference_steps=steps, output_type="latent",
                 generator=torch.Generator(pipe.device).manual_seed(123)).images
    pipe.enable_fast(compile=False, fuse=False)
    graphed = pipe(prompts, num_inference_steps=steps, output_type="latent",
                   generator=torch.Generator(pipe.device).manual_seed(123)).images
    pipe._fast = None
    return {"equal": bool(torch.equal(plain, graphed)), "fraction_equal": float((plain == graphed).float().mean())}


def _host_syncs(fn) -> list[str]:
    """Where one call makes the host wait for the GPU (torch's sync debug mode; file:line of each). The fast
    path should show only one, at the end: the images and their finiteness flag coming to the host."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int = 20) -> float:
    """Mean GPU ms of a captured graph's replay, timed with CUDA events (no host time)."""
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def graph_ms(fn, replays: int = 20) -> float:
    """Warm `fn` up on a side stream, capture it as a CUDA graph, return `replay_ms` of it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        fn()
    return replay_ms(graph, replays)


def stages(pipe, batch: int) -> dict:
    """The fast path's stages for a captured batch size, each as a function to capture and replay on its own:
    "condition" (once a call), "step" (one decoding step: U-ViT, guidance, sampling), "step_draws" (its
    random draws), "vq_decode"; and the call's own graphs: "text_graph", "graph" (all steps + VQ decode)."""
    from . import sampling

    fast = pipe._fast
    text = next(e for k, e in fast.text_graphs.items() if k[0] == batch)
    key, entry = next((k, g) for k, g in fast.graphs.items() if k[0][0] == batch)
    model, mask_id, guidance = pipe.transformer, pipe.scheduler.mask_token_id, key[6]
    bufs = entry.inputs
    dev = bufs["tokens"].device
    B, H, W = shape = tuple(bufs["tokens"].shape)
    draw_shape = (B, H * W, model.config.codebook_size)
    with torch.inference_mode():
        grid = bufs["tokens"].reshape(B, H * W)
        total = bufs["total"] if "total" in bufs else (grid == mask_id).sum(dim=-1)
        ctx = model.condition(bufs["hidden"], bufs["pooled"], bufs["micro"])
        draws = sampling.gumbel_draws(draw_shape, None, dev)
        ratio, temp = torch.tensor(0.5, device=dev), torch.tensor(1.0, device=dev)
        last = torch.tensor(False, device=dev)
    return {"condition": lambda: model.condition(bufs["hidden"], bufs["pooled"], bufs["micro"]),
            "step": lambda: fast.step(model, grid, ctx, draws, total, ratio, temp, last, guidance, mask_id, shape),
            "step_draws": lambda: sampling.gumbel_draws(draw_shape, None, dev),
            "vq_decode": lambda: fast._vq_decode(entry.tokens),
            "text_graph": text.graph, "graph": entry.graph}


def _breakdown(pipe, prompts, steps: int, call_ms: float) -> dict:
    """Where one call's time goes: each stage captured and replayed as its own CUDA graph and timed on the GPU,
    and the rest of the call (host work: checks, tokenising, launches, the copy to the host)."""
    parts = stages(pipe, len(prompts))
    out = {"text_encode": replay_ms(parts["text_graph"]) if parts["text_graph"] is not None else None,
           **{name: graph_ms(parts[name]) for name in ("condition", "step", "step_draws", "vq_decode")},
           "graph_total": replay_ms(parts["graph"])}
    out["steps_total"] = steps * (out["step"] + out["step_draws"])
    out["gpu_total"] = out["graph_total"] + (out["text_encode"] or 0)
    out["host_and_rest"] = call_ms - out["gpu_total"]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def print_table(rows, meta) -> None:
    print(f"\ndevice: {meta['device']}  torch {meta['torch']}  diffusers {meta['diffusers']}  {meta['dtype']}  "
          f"matmul {meta['matmul_tflops'] and round(meta['matmul_tflops'])} TFLOP/s")
    print(f"{'model':<12} {'batch':>5} {'ours ms':>9} {'ms/img':>8} {'ref ms':>9} {'speed-up':>9} {'floor ms':>9} "
          f"{'peak GiB':>9}")
    for r in rows:
        if "checks" in r:
            print(f"{r['model']:<12} checks: {r['checks']}")
            continue
        ref = r.get("reference", {}).get("ms_median")
        print(f"{r['model']:<12} {r['batch']:>5} {r['ours']['ms_median']:>9.1f} {r['ours']['ms_median'] / r['batch']:>8.1f} "
              f"{ref if ref is None else round(ref, 1)!s:>9} {r.get('speedup', float('nan')):>9.1f} "
              f"{r.get('floor_ms', float('nan')):>9.1f} {r['ours']['peak_gib'] or float('nan'):>9.2f}")
        if "breakdown_ms" in r:
            print(f"{'':<12} breakdown ms: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                        for k, v in r["breakdown_ms"].items()))


def add_command(subparsers) -> None:
    import argparse

    from .bench_meissonic import PRESETS as MEISSONIC_PRESETS

    p = subparsers.add_parser("bench", help="time ours against the reference side by side",
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""examples:
  amused bench                                   # amused-256/512 random weights, batch 1 and 8, vs diffusers
  amused bench --model path/to/ckpt --batch 1    # a real checkpoint
  amused bench --device cpu --model embedded --batch 1 --no-reference
  amused bench --preset meissonic --reference-path ~/Meissonic     # 1024 px, 48 and 64 steps, batch 1 and 4,
                                                                   # fp16 and bf16, vs viiika/Meissonic's pipeline
  amused bench --preset monetico-tiny --device cpu --steps 4 --batch 1 --reference-path ~/Meissonic
""")
    p.add_argument("--model", default=None, help="checkpoint folder/hub id, or 'embedded' (default: random presets)")
    p.add_argument("--preset", nargs="+", default=["amused-256", "amused-512"],
                   choices=["amused-256", "amused-512", *MEISSONIC_PRESETS],
                   help="random-weight architectures (aMUSEd or Meissonic ones, not both in one run)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default: 1 8; Meissonic 1 4)")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="decoding steps (default: 12; Meissonic 48 64; aMUSEd takes one value)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row (default: 30; Meissonic 3)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="+", default=None, choices=["fp16", "bf16", "fp32"],
                   help="weights dtype (default: fp16; Meissonic fp16 bf16; fp32 on the CPU; aMUSEd takes one)")
    p.add_argument("--no-reference", action="store_true", help="skip the reference")
    p.add_argument("--reference-path", default=None,
                   help="Meissonic presets: a checkout of viiika/Meissonic whose src/ pipeline is timed on the same "
                        "weights (it is not on PyPI); without it, ours alone")
    p.add_argument("--reference-compile", action="store_true", help="also torch.compile diffusers' transformer")
    p.add_argument("--no-compile", action="store_true", help="CUDA graphs without torch.compile")
    p.add_argument("--compile", default="full", choices=["blocks", "full"],
                   help="what of ours is compiled (enable_fast's compile): blocks one by one, or 'full': the "
                        "transformer step as one graph plus the text encoder (longer warm-up)")
    p.add_argument("--out", default="bench.json", help="JSON results (default bench.json)")

    def handler(args):
        compile = False if args.no_compile else args.compile
        meissonic = [preset for preset in args.preset if preset in MEISSONIC_PRESETS]
        if args.model not in (None, "embedded"):
            from .components import MEISSONIC, family_of
            from .embedded import resolve_model_name

            meissonic = [args.model] if family_of(resolve_model_name(args.model)) is MEISSONIC else []
        elif meissonic and len(meissonic) != len(args.preset):
            raise ValueError("--preset: give aMUSEd or Meissonic presets, not both in one run")
        if meissonic:
            from . import bench_meissonic

            dtypes = args.dtype or (["fp16", "bf16"] if args.device != "cpu" else ["fp32"])
            bench_meissonic.run(meissonic, steps=args.steps or [48, 64], batches=args.batch or [1, 4],
                                dtypes=dtypes, repeats=args.repeats or 3, device=args.device,
                                reference_path=None if args.no_reference else args.reference_path, compile=compile,
                                out=args.out)
            return 0
        for flag, values in (("--steps", args.steps), ("--dtype", args.dtype)):
            if values and len(values) > 1:
                raise ValueError(f"{flag} takes one value for aMUSEd presets and checkpoints")
        dtype = args.dtype[0] if args.dtype and args.device != "cpu" else ("fp16" if args.device != "cpu" else "fp32")
        run(args.preset, args.batch or [1, 8], args.steps[0] if args.steps else 12, args.repeats or 30, args.device,
            dtype, args.model, not args.no_reference, args.reference_compile, compile, args.out)
        return 0

    p.set_defaults(func=handler)
