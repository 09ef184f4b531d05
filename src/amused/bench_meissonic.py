"""`amused bench --preset meissonic ...`: Meissonic / Monetico inference time, ours against the reference pipeline
(viiika/Meissonic `src/pipeline.py`) on the same random weights, in the same run.

The reference is not on PyPI: `--reference-path` names a checkout, whose `src/` is imported from there (nothing of
it is copied here). Its transformer, diffusers `VQModel` and transformers' text model load our state dicts (the
parameter names are the same). Both get the same prompts, sizes, steps and guidance; each row times one call (prompt
encoding, every step, VQ decode, images to the host) as `amused bench` does for aMUSEd.

Published shapes: Meissonic 1024 px (64x64 tokens, 32x32 in the blocks), Monetico 512 px (32x32 tokens); CLIP-ViT-H
text tower; 48 steps (the pipeline's default) and 64 (its inference scripts'); batch 1 and 4; fp16 and bf16.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

from .bench import PROMPTS, held_bytes, matmul_tflops, reference_text, timed

# name: (transformer preset, VQ config factory, text tower, side in pixels)
PRESETS = {
    "meissonic": ("meissonic", "amused", "CLIP_H", 1024),
    "monetico": ("monetico", "amused", "CLIP_H", 512),
    # Meissonic's layout, at 1024 px as the reference needs; 32 px a token: 32x32 tokens (16x16 in the blocks)
    "meissonic-tiny": ("tiny", "tiny32", "CLIP_TINY_MEISSONIC", 1024),
    "monetico-tiny": ("tiny-monetico", "tiny", "CLIP_TINY_MEISSONIC", 32),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _vq_config(name: str):
    from .models.vqgan import VQGANConfig
    from .presets import VQ_PRESETS

    tiny = dict(latent_channels=4, layers_per_block=1, norm_num_groups=4, num_vq_embeddings=16, sample_size=8)
    return {"amused": VQ_PRESETS["amused"],
            "tiny": lambda: VQGANConfig(block_out_channels=[8, 8], **tiny),  # 2 px a token
            # 32 px a token (the reference's inpainting mask resize needs the grid side a multiple of it)
            "tiny32": lambda: VQGANConfig(block_out_channels=[8] * 6, **tiny)}[name]()


def random_pipeline(preset: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                    vq: str | None = None):
    """A `MeissonicPipeline` of a named architecture (`PRESETS`) with seeded random weights (the transformer's
    matrices normal with std 0.02, as transformers are initialised: tame activations in fp16; norms at 1; the VQ
    and text encoder as PyTorch initialises them) and a character-level CLIP tokenizer of 77 tokens. `vq`: another
    VQ ("tiny": 2 px a token, for CPU tests at small sizes)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from . import presets
    from .components import SchedulerConfig
    from .models.meissonic import MeissonicTransformer, meissonic_config
    from .models.vqgan import VQGAN
    from .pipeline_meissonic import MeissonicPipeline

    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is not a Meissonic architecture; choose one of {', '.join(PRESETS)}")
    model, preset_vq, text, _ = PRESETS[preset]
    vq = vq or preset_vq
    config = (meissonic_config("tiny", downsample=False, upsample=False) if model == "tiny-monetico"
              else meissonic_config(model))
    torch.manual_seed(seed)
    tokenizer = presets.write_clip_tokenizer(Path(tempfile.mkdtemp()), max_length=77)
    with torch.device(device):
        transformer = MeissonicTransformer(config).eval()
        vqvae = VQGAN(_vq_config(vq)).eval()
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**getattr(presets, text))).eval()
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in transformer.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=generator, device=device) * 0.02)
    pipe = MeissonicPipeline(vqvae, tokenizer, text_encoder, transformer, SchedulerConfig(config.mask_token_id))
    return pipe.to(device, dtype)


# ----------------------------------------------------------------------------------------------------------
# The reference, imported from a checkout


def import_reference(path: str | Path) -> SimpleNamespace:
    """The reference's classes from a checkout of viiika/Meissonic (or collovlabs/Monetico): its `src/` package
    imported from `path` (put first on sys.path)."""
    path = Path(path).resolve()
    if not (path / "src" / "pipeline.py").is_file() or not (path / "src" / "transformer.py").is_file():
        raise ValueError(f"--reference-path {path} holds no src/pipeline.py and src/transformer.py; give a checkout "
                         f"of viiika/Meissonic")
    sys.path.insert(0, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from src.pipeline import Pipeline  # noqa: the checkout's own package
        from src.pipeline_img2img import Img2ImgPipeline
        from src.pipeline_inpaint import InpaintPipeline
        from src.scheduler import Scheduler
        from src.transformer import Transformer2DModel
    return SimpleNamespace(Pipeline=Pipeline, Img2ImgPipeline=Img2ImgPipeline, InpaintPipeline=InpaintPipeline,
                           Scheduler=Scheduler, Transformer2DModel=Transformer2DModel, path=path)


def patch_head_dim(model: torch.nn.Module) -> int:
    """Give diffusers `Attention` modules the `head_dim` that current diffusers' FluxAttnProcessor reads.

    The reference builds `Attention(processor=FluxAttnProcessor2_0())`; since diffusers 0.35 that name is an
    alias of `FluxAttnProcessor`, written for `FluxAttention`, which reads `attn.head_dim` (the generic
    `Attention` has none), so the reference fails at its first forward. This sets `head_dim = inner_dim // heads`
    (what FluxAttention holds) and changes nothing else; with diffusers 0.31 (the reference's era) nothing is
    patched. Returns the number of modules patched."""
    from diffusers.models.attention_processor import Attention

    patched = 0
    for module in model.modules():
        if (isinstance(module, Attention) and not hasattr(module, "head_dim")
                and type(module.processor).__name__ == "FluxAttnProcessor"):
            module.head_dim = module.inner_dim // module.heads
            patched += 1
    return patched


def reference_pipeline(pipe, ref: SimpleNamespace, task: str = "text"):
    """The reference pipeline of `task` ("text", "img2img", "inpaint") over `pipe`'s weights, on its device and
    dtype (the VQ as ours: float32 when ours is)."""
    import diffusers

    transformer = ref.Transformer2DModel(**dataclasses.asdict(pipe.transformer.config))
    transformer.load_state_dict(pipe.transformer.state_dict())
    patch_head_dim(transformer)
    vq_config = {k: v for k, v in dataclasses.asdict(pipe.vqvae.config).items() if v is not None}
    vqvae = diffusers.VQModel(**vq_config)
    vqvae.load_state_dict(pipe.vqvae.state_dict())
    cls = {"text": ref.Pipeline, "img2img": ref.Img2ImgPipeline, "inpaint": ref.InpaintPipeline}[task]
    tokenizer, text_encoder = reference_text(pipe)
    out = cls(vqvae=vqvae, tokenizer=tokenizer, text_encoder=text_encoder,
              transformer=transformer, scheduler=ref.Scheduler(mask_token_id=pipe.scheduler.mask_token_id))
    out.set_progress_bar_config(disable=True)
    out.transformer.to(pipe.device, pipe.dtype)
    out.text_encoder.to(pipe.device, pipe.dtype)
    out.vqvae.to(pipe.device, pipe.vqvae.dtype)
    return out


# ----------------------------------------------------------------------------------------------------------
# The benchmark


def step_flops(pipe, batch: int, side: int) -> int:
    """FLOPs of one guided transformer forward (batch 2 x `batch`) at `side` pixels."""
    from torch.utils.flop_counter import FlopCounterMode

    h = side // pipe.vae_scale_factor
    n = 2 * batch
    hidden, pooled = pipe.prompt_encoder([""] * n)
    micro = torch.tensor([[side, side, 0, 0, 6.0]], device=pipe.device, dtype=pipe.dtype).expand(n, -1)
    ids = torch.full((n, h, h), pipe.scheduler.mask_token_id, device=pipe.device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        ctx = pipe.transformer.condition(hidden.to(pipe.dtype), pooled.to(pipe.dtype), micro, grid=(h, h))
        pipe.transformer.forward_tokens(ids, ctx, torch.tensor(1.0, device=pipe.device))
    return counter.get_total_flops()


def _graph_matches_plain(pipe, steps: int, side: int) -> dict:
    """The graph (eager kernels) against the plain loop, same CUDA seed: the same tokens?"""
    def tokens():
        return pipe(PROMPTS[:2], num_inference_steps=steps, height=side, width=side, output_type="latent",
                    generator=torch.Generator(pipe.device).manual_seed(123)).images

    plain = tokens()
    pipe.enable_fast(compile=False)
    graphed = tokens()
    pipe._fast = None
    return {"equal": bool(torch.equal(plain, graphed)), "fraction_equal": float((plain == graphed).float().mean())}


def run(presets=("meissonic",), steps=(48, 64), batches=(1, 4), dtypes=("fp16", "bf16"), repeats: int = 3,
        device: str = "cuda", reference_path: str | None = None, compile: bool | str = True,
        guidance_scale: float = 9.0, out: str | None = None) -> list[dict]:
    """Time ours (the fast path on CUDA, the plain loop on the CPU) and the reference for every preset x dtype x
    steps x batch; print a table, write JSON to `out`, return the rows. A preset that is not in `PRESETS` is a
    Meissonic checkpoint (folder or hub id), run at its native size."""
    from .pipeline_meissonic import MeissonicPipeline

    dev = torch.device(device)
    ref_module = import_reference(reference_path) if reference_path else None
    rows = []
    for preset in presets:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            if preset in PRESETS:
                pipe, side = random_pipeline(preset, dev, dtype), PRESETS[preset][3]
            else:
                pipe = MeissonicPipeline.from_pretrained(preset, torch_dtype=dtype, device=dev).to(dev, dtype)
                side = pipe.transformer.config.sample_size * pipe.vae_scale_factor
            ref = reference_pipeline(pipe, ref_module) if ref_module else None
            check = None
            if dev.type == "cuda":
                try:
                    check = _graph_matches_plain(pipe, 4, side)
                except Exception as e:  # report it, time the rest
                    check = {"error": f"{type(e).__name__}: {e}"}
                pipe.enable_fast(compile=compile)
            flops = {b: step_flops(pipe, b, side) for b in batches}
            tflops = matmul_tflops(dev, dtype) if dev.type == "cuda" else None
            for n_steps in steps:
                for batch in batches:
                    prompts = (PROMPTS * batch)[:batch]
                    kwargs = dict(num_inference_steps=n_steps, guidance_scale=guidance_scale, height=side,
                                  width=side, output_type="np")
                    started = time.perf_counter()
                    pipe(prompts, **kwargs)  # capture / compile
                    row = {"model": preset, "dtype": dtype_name, "steps": n_steps, "batch": batch, "side_px": side,
                           "ours_warmup_s": round(time.perf_counter() - started, 2),
                           "ours": timed(lambda: pipe(prompts, **kwargs), repeats, dev),
                           "fast": "off" if pipe._fast is None else f"compile={compile}",
                           "graph_vs_plain_tokens": check, "step_gflops": flops[batch] / 1e9}
                    if tflops:
                        row["floor_ms"] = n_steps * flops[batch] / (tflops * 1e12) * 1000
                    if ref is not None:
                        ours_held = held_bytes(pipe.transformer, pipe.vqvae, pipe.text_encoder)
                        row["reference"] = timed(lambda: ref(prompts, **kwargs), repeats, dev)
                        if row["reference"]["peak_gib"] is not None:  # each pipeline's own peak
                            row["reference"]["peak_gib"] -= ours_held / 2**30
                        row["speedup"] = row["reference"]["ms_median"] / row["ours"]["ms_median"]
                    if row["ours"]["peak_gib"] is not None and ref is not None:
                        row["ours"]["peak_gib"] -= held_bytes(ref.transformer, ref.vqvae, ref.text_encoder) / 2**30
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            pipe = ref = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "compile": compile,
            "guidance_scale": guidance_scale, "repeats": repeats,
            "reference": str(ref_module.path) if ref_module else None,
            "reference_commit": _git_commit(ref_module.path) if ref_module else None}
    try:
        import diffusers

        meta["diffusers"] = diffusers.__version__
    except ImportError:
        meta["diffusers"] = None
    print_table(rows, meta)
    if out:
        Path(out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return rows


def _git_commit(path: Path) -> str | None:
    """The reference checkout's commit: its own git repository's HEAD, else a COMMIT file beside src/ (an exported
    tree: `git archive` writes none); never the HEAD of a repository that merely contains the folder."""
    import subprocess

    try:
        top = subprocess.run(["git", "-C", str(path), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.split()
        if Path(top[0]).resolve() == Path(path).resolve():
            return top[1]
    except (OSError, subprocess.CalledProcessError, IndexError):
        pass
    stamp = Path(path) / "COMMIT"
    return stamp.read_text().strip() if stamp.is_file() else None


def print_table(rows: list[dict], meta: dict) -> None:
    print(f"\ndevice: {meta['device']}  torch {meta['torch']}  diffusers {meta['diffusers']}  reference "
          f"{meta['reference_commit'] or meta['reference']}")
    print(f"{'model':<15} {'dtype':<5} {'steps':>5} {'batch':>5} {'ours ms':>9} {'ms/img':>8} {'ref ms':>9} "
          f"{'speed-up':>8} {'floor ms':>9} {'peak GiB':>8} {'ref GiB':>8}")
    for r in rows:
        ref = r.get("reference", {})
        cell = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
        print(f"{r['model']:<15} {r['dtype']:<5} {r['steps']:>5} {r['batch']:>5} {r['ours']['ms_median']:>9.1f} "
              f"{r['ours']['ms_median'] / r['batch']:>8.1f} {cell(ref.get('ms_median'), '9.1f'):>9} "
              f"{cell(r.get('speedup'), '8.2f'):>8} {cell(r.get('floor_ms'), '9.1f'):>9} "
              f"{cell(r['ours']['peak_gib'], '8.2f'):>8} {cell(ref.get('peak_gib'), '8.2f'):>8}")
