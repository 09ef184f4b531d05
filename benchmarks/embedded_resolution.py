"""64 px or 128 px for the embedded model: what a CPU image would cost at each, before any training.

The embedded model draws 64x64 px (a VQGAN of factor 4: 16x16 tokens). A 128 px model could keep factor 4 (32x32
tokens: the U-ViT's convolution stages, its 8x8 -> 16x16 transformer grid and the 4096-way head all see 4x the
positions) or add a VQGAN stage (factor 8: the same 16x16 tokens, only the VQGAN's decoder sees 4x the pixels).
Both need a VQGAN and a U-ViT trained from scratch; this measures the price first: the shipped architecture with
random weights at each size, on this machine's CPU, batch 1, the shipped sampling (guidance 2: two rows a
forward; the model's default steps), the pieces interleaved round by round so that a noisy CPU slows each alike.
The text encoder (the same at every size, run once a prompt) is left out.

    python benchmarks/embedded_resolution.py --out docs/results/embedded_resolution_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from amused import embedded_model_path  # noqa: E402
from amused.loading import config_from_dict, read_json  # noqa: E402
from amused.models.uvit import UViT, UViTConfig  # noqa: E402
from amused.models.vqgan import VQGAN, VQGANConfig  # noqa: E402


def variants(uvit: UViTConfig, vq: VQGANConfig) -> dict[str, tuple[UViTConfig, VQGANConfig, int]]:
    """name -> (U-ViT config, VQGAN config, image side in px)."""
    deeper = dataclasses.replace(vq, block_out_channels=[*vq.block_out_channels, vq.block_out_channels[-1]],
                                 down_block_types=None, up_block_types=None)
    return {
        "64 px, factor 4, 16x16 tokens (shipped)": (uvit, vq, 64),
        "128 px, factor 4, 32x32 tokens": (dataclasses.replace(uvit, sample_size=32), vq, 128),
        "128 px, factor 8, 16x16 tokens": (uvit, deeper, 128),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", help="JSON results")
    args = ap.parse_args()
    folder = embedded_model_path()
    uvit_cfg = config_from_dict(UViTConfig, read_json(folder / "transformer/config.json"), folder / "transformer")
    vq_cfg = config_from_dict(VQGANConfig, read_json(folder / "vqvae/config.json"), folder / "vqvae")
    gen = read_json(folder / "generation_config.json")
    steps, rows = gen["num_inference_steps"], 2 if gen["guidance_scale"] > 1 else 1
    torch.manual_seed(0)
    built = {}
    for name, (u, v, px) in variants(uvit_cfg, vq_cfg).items():
        uvit, vq = UViT(u).eval(), VQGAN(v).eval()
        side = px // 2 ** (len(v.block_out_channels) - 1)
        ids = torch.randint(0, u.codebook_size, (rows, side, side))
        text = torch.randn(rows, 24, u.encoder_hidden_size)
        pooled = torch.randn(rows, u.cond_embed_dim)
        micro = torch.tensor([[px, px, 0, 0, 6]] * rows, dtype=torch.float)
        built[name] = (uvit, vq, ids, text, pooled, micro, side,
                       sum(p.numel() for p in uvit.parameters()), sum(p.numel() for p in vq.parameters()))
    times = {name: {"uvit": [], "decode": []} for name in built}
    with torch.inference_mode():
        for i in range(args.repeats + 1):
            for name, (uvit, vq, ids, text, pooled, micro, *_rest) in built.items():
                t = time.perf_counter()
                uvit(ids, text, pooled, micro)
                t1 = time.perf_counter()
                vq.decode(ids[:1])
                t2 = time.perf_counter()
                if i:  # the first round warms up
                    times[name]["uvit"].append(t1 - t)
                    times[name]["decode"].append(t2 - t1)
    results = []
    print(f"threads {torch.get_num_threads()}  repeats {args.repeats}  steps {steps}  rows a forward {rows}")
    print(f"{'variant':42s} {'tokens':>7s} {'U-ViT M':>8s} {'forward ms':>11s} {'decode ms':>10s} {'image ms':>9s}")
    for name, (*_m, side, n_uvit, n_vq) in built.items():
        fwd = statistics.median(times[name]["uvit"]) * 1000
        dec = statistics.median(times[name]["decode"]) * 1000
        total = steps * fwd + dec
        results.append({"variant": name, "tokens": f"{side}x{side}", "uvit_params": n_uvit, "vqgan_params": n_vq,
                        "forward_ms_median": fwd, "decode_ms_median": dec, "image_ms": total})
        print(f"{name:42s} {side}x{side:<4d} {n_uvit / 1e6:8.2f} {fwd:11.1f} {dec:10.1f} {total:9.0f}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "what": "U-ViT forward (rows a forward = 2 with guidance) and VQGAN decode, random weights, medians; "
                    "image_ms = steps x forward + decode (text encoder excluded)",
            "steps": steps, "rows": rows, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
