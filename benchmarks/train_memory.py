"""Training memory and speed of the published amused-512 U-ViT (random init) at 512 px, batch 1, one GPU.

For each setting: peak `torch.cuda.max_memory_allocated` over whole training steps (reset after 3 warm-up steps,
so weights, optimizer states, gradients and activations of complete steps are all in it) and images/s.

    ours-full        bf16 weights, bitsandbytes AdamW8bit, optimizer step fused into backward (gradients freed as
                     they are consumed, stochastic rounding), gradient checkpointing
    ours-lora16      LoRA r16 on to_q/to_k/to_v/to_out.0, bf16 base weights, AdamW, gradient checkpointing
    ...-pre          pre-encoded data: token ids + text embeddings come from memory, no VQGAN/text encoder
    ...-enc          the VQGAN encoder (published config, bf16) and a CLIP-L-sized text encoder (bf16) run in
                     every step, as `amused finetune` on images does (tokenization excluded)
    ours-full-fp16amp   our U-ViT in the reference's setting (fp32 weights, fp16 autocast, AdamW8bit, no
                     checkpointing): isolates the model from the training recipe
    ref-full / ref-lora16   diffusers' UVit2DModel as diffusers' train_amused.py steps it (fp32 weights, fp16
                     autocast + GradScaler, AdamW8bit / LoRA r16, no checkpointing: its checkpointing crashes)

`--loss_curves` trains ~200 steps on synthetic token data with a learnable pattern (16 prompts, each a fixed
32x32 arrangement of 64 codes) and prints the loss of fp32 master weights (bf16 autocast, AdamW8bit) beside
bf16 weights + 8-bit states with and without stochastic rounding.

    python benchmarks/train_memory.py --out $OUT/train_mem.json
    python benchmarks/train_memory.py --loss_curves --out $OUT/train_curves.json
    python benchmarks/train_memory.py --tiny --out /tmp/t.json          # CPU smoke test, tiny configs

`--make_synthetic DIR` writes DIR/pipe (a random amused-512 pipeline with a CLIP-L-sized text encoder and a
character-level tokenizer) and DIR/enc (random pre-encoded samples) for timing `amused finetune` itself, e.g.
DDP scaling: `accelerate launch --num_processes 2 -m amused.training.cli finetune --pretrained_model_name_or_path
DIR/pipe --preencoded_data_dir DIR/enc ...` (images/s is in <output_dir>/logs/train_log.jsonl).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from amused import lora
from amused.models.uvit import UViT, UViTConfig
from amused.models.vqgan import VQGAN, VQGANConfig
from amused.presets import CLIP_L, VQ_PRESETS, uvit_config
from amused.training.masking import mask_tokens, masked_loss
from amused.training.optim import FusedStepOptimizer, make_lr_scheduler

TINY_UVIT = dict(hidden_size=32, cond_embed_dim=16, micro_cond_encode_dim=2, micro_cond_embed_dim=10,
                 encoder_hidden_size=16, vocab_size=72, codebook_size=64, in_channels=32, block_out_channels=32,
                 num_res_blocks=1, downsample=True, upsample=True, block_num_heads=2, num_hidden_layers=2,
                 num_attention_heads=2, intermediate_size=64, sample_size=8)
TINY_VQ = dict(block_out_channels=[8, 8, 16], latent_channels=4, layers_per_block=1, norm_num_groups=4,
               num_vq_embeddings=64)


@dataclasses.dataclass
class Setup:
    uvit: UViTConfig
    vq: VQGANConfig
    text_len: int
    text_dim: int
    resolution: int
    device: torch.device
    bnb: object  # the bitsandbytes module, or None


def adamw(setup: Setup, params, lr=1e-4, eight_bit=True):
    if eight_bit and setup.bnb is not None:
        return setup.bnb.optim.AdamW8bit(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr)


def clip_like(setup: Setup, dtype):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    small = dict(vocab_size=100, hidden_size=setup.text_dim, intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=setup.text_len, projection_dim=setup.text_dim)
    config = CLIPTextConfig(**(CLIP_L if setup.text_dim == 768 else small))
    with setup.device:
        return CLIPTextModelWithProjection(config).to(dtype).eval().requires_grad_(False)


def batch_source(setup: Setup, batch: int, with_encoders: bool, dtype):
    """() -> (ids, hidden, pooled, micro): synthetic pre-encoded data, or images + token ids through encoders."""
    dev, cfg, grid = setup.device, setup.uvit, setup.resolution // setup.vq.scale_factor
    micro = torch.tensor([[setup.resolution, setup.resolution, 0, 0, 6.0]] * batch, device=dev)
    if not with_encoders:
        ids = torch.randint(0, cfg.codebook_size, (batch, grid, grid), device=dev)
        hidden = torch.randn(batch, setup.text_len, setup.text_dim, device=dev, dtype=torch.float16)
        pooled = torch.randn(batch, setup.text_dim, device=dev, dtype=torch.float16)
        return lambda: (ids, hidden.to(dtype), pooled.to(dtype), micro)
    with dev:
        vq = VQGAN(setup.vq).to(torch.bfloat16).eval().requires_grad_(False)
    del vq.decoder, vq.post_quant_conv  # training only encodes
    text = clip_like(setup, torch.bfloat16)
    pixels = torch.rand(batch, 3, setup.resolution, setup.resolution, device=dev)
    tokens = torch.randint(0, text.config.vocab_size, (batch, setup.text_len), device=dev)

    @torch.no_grad()
    def fn():
        ids = vq.encode(pixels)
        out = text(tokens, output_hidden_states=True)
        return ids, out.hidden_states[-2].to(dtype), out.text_embeds.to(dtype), micro

    return fn


def ours(setup: Setup, mode: str, with_encoders: bool, batch: int = 1):
    """A step function for our U-ViT in one of the modes of the module docstring."""
    torch.manual_seed(0)
    with setup.device:
        model = UViT(setup.uvit)
    amp = None
    if mode == "full":
        model.to(torch.bfloat16).gradient_checkpointing = True
        opt = FusedStepOptimizer(model.parameters(), lambda p: adamw(setup, p), stochastic_rounding=True)
    elif mode == "lora":
        model.to(torch.bfloat16).gradient_checkpointing = True
        lora.add_lora(model, r=16, alpha=16)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    else:  # "fp16amp": the reference's recipe
        opt, amp = adamw(setup, model.parameters()), torch.float16
    dtype = model.dtype
    source = batch_source(setup, batch, with_encoders, dtype)
    scaler = torch.amp.GradScaler(setup.device.type, enabled=amp == torch.float16 and setup.device.type == "cuda")

    def step():
        ids, hidden, pooled, micro = source()
        masked = mask_tokens(ids, setup.uvit.mask_token_id)
        with torch.autocast(setup.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            logits = model(masked.input_ids, hidden, pooled, micro)
        loss = masked_loss(logits, ids, masked.mask).loss
        return optimizer_step(loss, scaler, opt)

    return step


def optimizer_step(loss, scaler, opt):
    """Backward, (scaled) step, free the gradients: the same tail for every setting."""
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return loss


def reference(setup: Setup, mode: str, batch: int = 1):
    """diffusers' UVit2DModel stepped as examples/amused/train_amused.py does (fp16 autocast, no checkpointing)."""
    from diffusers import UVit2DModel

    torch.manual_seed(0)
    with setup.device:
        model = UVit2DModel(**dataclasses.asdict(setup.uvit))
    if mode == "lora":
        lora.add_lora(model, r=16, alpha=16)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    else:
        opt = adamw(setup, model.parameters())
    source = batch_source(setup, batch, False, torch.float32)
    amp = torch.float16 if setup.device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(setup.device.type, enabled=setup.device.type == "cuda")

    def step():
        ids, hidden, pooled, micro = source()
        masked = mask_tokens(ids, setup.uvit.mask_token_id)
        labels = torch.where(masked.mask, ids, -100)
        with torch.autocast(setup.device.type, dtype=amp):
            logits = model(masked.input_ids, encoder_hidden_states=hidden, pooled_text_emb=pooled,
                           micro_conds=micro)
            logits = logits.permute(0, 2, 3, 1).reshape(-1, setup.uvit.codebook_size)
            loss = F.cross_entropy(logits, labels.view(-1), ignore_index=-100, label_smoothing=0.1)
        return optimizer_step(loss, scaler, opt)

    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, build, setup: Setup, note: str, steps: int, warmup: int = 3) -> dict:
    gc.collect()
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    row = {"name": name, "note": note}
    try:
        step = build()
        for _ in range(warmup):
            step()
        sync(setup.device)
        if setup.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            loss = step()
        sync(setup.device)
        elapsed = time.perf_counter() - start
        row.update(ms_per_step=1000 * elapsed / steps, images_per_s=steps / elapsed, loss=float(loss))
        if setup.device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    except Exception as e:  # one failing setting must not hide the others
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    step = None
    gc.collect()
    return row


def curve_data(setup: Setup, batch: int, generator: torch.Generator):
    """16 prompts; prompt c = a fixed 32x32 arrangement of its own 64 codes and fixed random text states."""
    dev, grid, n = setup.device, setup.resolution // setup.vq.scale_factor, 16
    per = min(64, setup.uvit.codebook_size // n)  # codes per prompt
    codes = torch.randperm(setup.uvit.codebook_size, generator=generator)[:n * per].view(n, per)
    layout = torch.randint(0, per, (n, grid, grid), generator=generator)
    grids = torch.gather(codes[:, None, :].expand(n, grid, per), 2, layout).to(dev)  # (n, grid, grid)
    hidden = torch.randn(n, setup.text_len, setup.text_dim, generator=generator).to(dev)
    pooled = torch.randn(n, setup.text_dim, generator=generator).to(dev)
    micro = torch.tensor([[setup.resolution, setup.resolution, 0, 0, 6.0]] * batch, device=dev)

    def draw(step: int):
        c = torch.randint(0, n, (batch,), generator=torch.Generator().manual_seed(10_000 + step)).to(dev)
        return grids[c], hidden[c], pooled[c], micro

    return draw


def loss_curve(setup: Setup, variant: str, steps: int, batch: int, lr: float) -> list[float]:
    torch.manual_seed(0)
    with setup.device:
        model = UViT(setup.uvit)
    model.gradient_checkpointing = True
    amp = variant == "fp32-master"
    if amp:
        opt = adamw(setup, model.parameters(), lr)
    else:
        model.to(torch.bfloat16)
        opt = FusedStepOptimizer(model.parameters(), lambda p: adamw(setup, p, lr),
                                 stochastic_rounding=variant == "bf16-sr")
    sched = make_lr_scheduler(opt, "constant", 10, steps)
    draw = curve_data(setup, batch, torch.Generator().manual_seed(1))
    mask_gen = torch.Generator(setup.device).manual_seed(2)
    losses = []
    for step in range(steps):
        ids, hidden, pooled, micro = draw(step)
        masked = mask_tokens(ids, setup.uvit.mask_token_id, generator=mask_gen)
        with torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(masked.input_ids, hidden.to(model.dtype), pooled.to(model.dtype), micro)
        loss = masked_loss(logits, ids, masked.mask).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def make_synthetic(setup: Setup, folder: Path, samples: int = 512) -> None:
    """A random pipeline in the published layout + random pre-encoded data (see the module docstring)."""
    from safetensors.torch import save_file

    from amused.loading import write_json
    from amused.pipeline import AmusedPipeline, SchedulerConfig

    from amused.presets import write_clip_tokenizer  # character-level: no CLIP vocabulary offline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = write_clip_tokenizer(folder / "_tokenizer", max_length=setup.text_len)
    small = dict(hidden_size=setup.text_dim, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=setup.text_len, projection_dim=setup.text_dim)
    shape = {**(CLIP_L if setup.text_dim == 768 else small), "vocab_size": 516}  # the character vocabulary
    text = CLIPTextModelWithProjection(CLIPTextConfig(**shape, bos_token_id=514, eos_token_id=515, pad_token_id=515))
    torch.manual_seed(0)
    with setup.device:
        transformer, vq = UViT(setup.uvit), VQGAN(setup.vq)
    AmusedPipeline(vq.cpu(), tokenizer, text, transformer.cpu(),
                   SchedulerConfig(mask_token_id=setup.uvit.mask_token_id)).save_pretrained(folder / "pipe")
    enc, grid = folder / "enc", setup.resolution // setup.vq.scale_factor
    enc.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shard = {"ids": torch.randint(0, setup.uvit.codebook_size, (samples, grid, grid), generator=g).to(torch.int16),
             "hidden": torch.randn(samples, setup.text_len, setup.text_dim, generator=g).half(),
             "pooled": torch.randn(samples, setup.text_dim, generator=g).half(),
             "micro_conds": torch.tensor([[setup.resolution, setup.resolution, 0, 0, 6.0]] * samples)}
    save_file(shard, str(enc / "shard-00000.safetensors"), metadata={"captions": json.dumps(["x"] * samples)})
    save_file({"hidden": torch.zeros(1, setup.text_len, setup.text_dim).half(),
               "pooled": torch.zeros(1, setup.text_dim).half()}, str(enc / "empty_prompt.safetensors"))
    write_json(enc / "index.json", {"num_samples": samples, "resolution": setup.resolution,
                                    "shards": [{"file": "shard-00000.safetensors", "num_samples": samples}]})
    print(f"wrote {folder / 'pipe'} and {enc} ({samples} samples)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON results path")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    parser.add_argument("--loss_curves", action="store_true", help="run the loss-curve comparison instead")
    parser.add_argument("--curve_steps", type=int, default=200)
    parser.add_argument("--curve_batch", type=int, default=4)
    parser.add_argument("--curve_lr", type=float, default=1e-4)
    parser.add_argument("--skip_reference", action="store_true")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="run only these settings (one process per setting gives clean peaks)")
    parser.add_argument("--make_synthetic", metavar="DIR", help="write a random pipeline + pre-encoded data and exit")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    if device.type != "cuda":
        bnb = None
    uvit = UViTConfig(**TINY_UVIT) if args.tiny else uvit_config("amused-512")
    vq = VQGANConfig(**TINY_VQ) if args.tiny else VQ_PRESETS["amused"]()
    setup = Setup(uvit, vq, 8 if args.tiny else 77, uvit.encoder_hidden_size, 32 if args.tiny else 512, device, bnb)
    opt_name = "AdamW8bit" if bnb is not None else "torch AdamW (bitsandbytes unavailable)"
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "optimizer": opt_name, "resolution": setup.resolution, "batch": 1,
            "uvit_params_M": sum(p.numel() for p in UViT(uvit).parameters()) / 1e6 if args.tiny else 608.3}
    print(json.dumps(info))
    if args.make_synthetic:
        make_synthetic(setup, Path(args.make_synthetic))
        result = {**info, "synthetic": args.make_synthetic}
    elif args.loss_curves:
        curves = {}
        for variant in ("fp32-master", "bf16-sr", "bf16-nearest"):
            t0 = time.perf_counter()
            curves[variant] = loss_curve(setup, variant, args.curve_steps, args.curve_batch, args.curve_lr)
            print(f"{variant}: {time.perf_counter() - t0:.1f} s")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"\nloss (mean of each 10 steps), batch {args.curve_batch}, lr {args.curve_lr}, {opt_name}")
        print("step   " + "  ".join(f"{v:>13}" for v in curves))
        for s in range(0, args.curve_steps, 10):
            print(f"{s + 10:>4}   " + "  ".join(f"{sum(c[s:s + 10]) / len(c[s:s + 10]):13.4f}" for c in curves.values()))
        result = {**info, "curves": curves}
    else:
        rows = []
        plan = [("ours-full-pre", lambda: ours(setup, "full", False), f"bf16 w + {opt_name} + fused step + ckpt"),
                ("ours-full-enc", lambda: ours(setup, "full", True), "same + VQGAN enc + CLIP-L in step"),
                ("ours-lora16-pre", lambda: ours(setup, "lora", False), "bf16 base + LoRA r16 + AdamW + ckpt"),
                ("ours-lora16-enc", lambda: ours(setup, "lora", True), "same + VQGAN enc + CLIP-L in step"),
                ("ours-full-fp16amp", lambda: ours(setup, "fp16amp", False), f"fp32 w + fp16 autocast + {opt_name}")]
        if not args.skip_reference:
            try:
                import diffusers  # noqa: F401

                plan += [("ref-full", lambda: reference(setup, "full"), f"UVit2DModel fp16 autocast + {opt_name}"),
                         ("ref-lora16", lambda: reference(setup, "lora"), "UVit2DModel fp16 autocast + LoRA r16")]
            except ImportError:
                print("diffusers not importable: reference rows skipped")
        if args.only:
            plan = [p for p in plan if p[0] in args.only]
        for name, build, note in plan:
            rows.append(measure(name, build, setup, note, args.steps))
            print(json.dumps(rows[-1]))
        print(f"\n{'setting':<20} {'peak GiB':>9} {'img/s':>7} {'ms/step':>8}  note")
        for r in rows:
            peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "n/a"
            speed = f"{r['images_per_s']:7.2f} {r['ms_per_step']:8.1f}" if "images_per_s" in r else " " * 16
            print(f"{r['name']:<20} {peak:>9} {speed}  {r.get('error', r['note'])}")
        result = {**info, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
