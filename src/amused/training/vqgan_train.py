"""`amused train-vqgan`: train the VQGAN image tokenizer (Esser et al., 2021), which aMUSEd never released.

Loss per step, on images in [0, 1]:
    L1 (or L2) reconstruction + codebook_weight * ||sg(z) - q||^2 + beta * ||z - sg(q)||^2      (beta = 0.25)
    [+ perceptual_weight * LPIPS]   needs the `lpips` package and its VGG weights, which torchvision downloads on
                                    first use: not available offline, so off by default (a clear error if asked)
    [+ lambda * disc_weight * hinge generator loss]   after --disc_start_step, with a PatchGAN discriminator
                                    (Isola et al., 2017) trained on the hinge loss, and lambda the adaptive weight
                                    ||grad L_rec|| / ||grad L_gan|| at the decoder's last layer (taming-transformers).
Codebook usage over each logging window is reported as perplexity (exp of the code-frequency entropy; K when
every code is used equally) and the fraction of codes used. Dead-code restarts (--restart_dead_codes_every N):
a code no input has picked during the last N steps gets no codebook-loss gradient, so it would stay dead for
ever; it is moved onto an encoder output from the current batch (plus a little noise), where it will win some
inputs, and its Adam moments are reset. Reconstruction PSNR on held-out images is reported at --eval_steps and
at the end. The result is saved as `<output_dir>/vqvae/` in the published layout.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from ..loading import config_from_dict, load_model, read_json, save_model
from ..models.vqgan import VQGAN, VQGANConfig
from ..presets import VQ_PRESETS
from . import checkpoint as ckpt
from .data import EpochSampler, ImageFolder, TrainDataset, make_dataset
from .optim import make_lr_scheduler, set_learning_rate

# ----------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """PatchGAN: a grid of real/fake logits, each seeing one patch. GroupNorm, so no BatchNorm sync under DDP."""

    def __init__(self, resolution: int, channels: int = 64, max_layers: int = 3):
        super().__init__()
        n = max(1, min(max_layers, int(math.log2(resolution)) - 3))
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, n + 1):
            c_next = channels * min(2 ** i, 8)
            layers += [nn.Conv2d(c, c_next, 4, 2 if i < n else 1, 1, bias=False), nn.GroupNorm(min(32, c_next // 4),
                                                                                                 c_next),
                       nn.LeakyReLU(0.2)]
            c = c_next
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2 - 1)  # (B, 1, h, w) logits


class WithLatents(nn.Module):
    """VQGAN forward that also returns the pre-quantization latents (for dead-code restarts), through the
    wrapper's forward so DDP sees the call."""

    def __init__(self, vq: VQGAN):
        super().__init__()
        self.vq = vq

    def forward(self, images: torch.Tensor):
        z = self.vq.encode_latents(images)  # (B, D, h, w)
        q = self.vq.quantize(z)
        return self.vq.decode_latents(q.quantized), q, z


def lpips_loss(device: torch.device):
    try:
        import lpips

        model = lpips.LPIPS(net="vgg", verbose=False).to(device).eval().requires_grad_(False)
    except Exception as e:  # ImportError, or the VGG weight download failing offline
        raise RuntimeError(f"--perceptual_weight needs the lpips package and its VGG weights (torchvision downloads "
                           f"them on first use): {e}. Train without it (--perceptual_weight 0)") from e
    return lambda x, y: model(x * 2 - 1, y * 2 - 1).mean()


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    g_rec = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4).detach()


def usage(counts: torch.Tensor) -> dict[str, float]:
    """Perplexity and fraction of codes used from a code histogram."""
    total = counts.sum().clamp(min=1)
    p = counts.float() / total
    entropy = -(p * p.clamp(min=1e-12).log()).sum()
    return {"perplexity": float(entropy.exp()), "codes_used": float((counts > 0).float().mean())}


@torch.no_grad()
def evaluate(vq: VQGAN, loader, device) -> dict[str, float]:
    """Mean reconstruction PSNR (dB, images in [0, 1]) and code usage over a loader."""
    psnrs, counts = [], torch.zeros(vq.config.num_vq_embeddings, device=device)
    was_training = vq.training
    vq.eval()
    for batch in loader:
        x = batch["pixels"].to(device, vq.dtype)
        rec, q = vq(x)
        mse = (rec.float().clamp(0, 1) - x.float()).pow(2).flatten(1).mean(1).clamp(min=1e-10)
        psnrs.append(10 * torch.log10(1 / mse))
        counts += torch.bincount(q.ids.flatten(), minlength=len(counts))
    vq.train(was_training)
    if not psnrs:
        return {}
    return {"psnr": float(torch.cat(psnrs).mean()), **{f"eval_{k}": v for k, v in usage(counts).items()}}


# ----------------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------------


def build_vqgan(args) -> VQGAN:
    if args.pretrained_model_name_or_path:
        folder = Path(args.pretrained_model_name_or_path)
        folder = folder / "vqvae" if (folder / "vqvae").is_dir() else folder
        return load_model(VQGAN, VQGANConfig, folder).train()
    if args.vqgan_config in VQ_PRESETS:
        cfg = VQ_PRESETS[args.vqgan_config]()
    else:
        path = Path(args.vqgan_config)
        cfg = config_from_dict(VQGANConfig, read_json(path), path)
    torch.manual_seed(args.seed)
    return VQGAN(cfg)


def freeze_tokenizer(vq: VQGAN, args) -> None:
    """--train_decoder_only: encoder, quant_conv and codebook keep their weights (so every image keeps its token
    ids); post_quant_conv and the decoder train."""
    if not args.pretrained_model_name_or_path:
        raise ValueError("--train_decoder_only continues a trained VQGAN: give --pretrained_model_name_or_path")
    if args.restart_dead_codes_every:
        raise ValueError("--train_decoder_only keeps the codebook fixed: drop --restart_dead_codes_every")
    for module in (vq.encoder, vq.quant_conv, vq.quantize):
        module.requires_grad_(False)
        module.eval()  # nothing in them changes with train/eval today; frozen parts stay in eval all the same


class Subset:
    def __init__(self, source, indices: list[int]):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[self.indices[i]]


def split_data(args, rank: int, world: int):
    """(train dataset, held-out dataset or None): --validation_data_dir, else a seeded split of the data."""
    train = make_dataset(args, rank, world)
    common = dict(resolution=args.resolution, center_crop=True, seed=args.seed)
    if args.validation_data_dir:
        return train, TrainDataset(ImageFolder(args.validation_data_dir, instance_prompt=""), **common)
    if isinstance(train, IterableDataset) or len(train) < 2 or args.validation_split <= 0:
        return train, None
    n = len(train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed)).tolist()
    k = max(1, round(n * args.validation_split))
    held_out = TrainDataset(Subset(train.source, order[:k]), **common)
    train.source = Subset(train.source, order[k:])
    return train, held_out


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


def run(args) -> dict[str, float]:
    """Train as the parsed arguments say; returns the final held-out metrics."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast, set_seed
    from tqdm.auto import tqdm

    out = Path(args.output_dir)
    accelerator = Accelerator(mixed_precision=None if args.mixed_precision in (None, "no") else args.mixed_precision)
    ckpt.check_world(accelerator)
    device, main = accelerator.device, accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "logs").mkdir(exist_ok=True)
        ckpt.clean_stale(out)
    set_seed(args.seed, device_specific=True)
    vq = build_vqgan(args)
    vq.check_size(args.resolution, args.resolution, "--resolution")
    train_set, held_out = split_data(args, accelerator.process_index, accelerator.num_processes)
    use_disc = args.disc_weight > 0
    disc = PatchDiscriminator(args.resolution) if use_disc else None
    perceptual = lpips_loss(device) if args.perceptual_weight > 0 else None
    if args.use_8bit_adam:
        raise ValueError("train-vqgan uses torch AdamW; drop --use_8bit_adam")
    if getattr(args, "train_decoder_only", False):
        freeze_tokenizer(vq, args)
    opt = torch.optim.AdamW([p for p in vq.parameters() if p.requires_grad], lr=args.learning_rate, betas=(0.5, 0.9),
                            weight_decay=args.adam_weight_decay)
    model, opt = accelerator.prepare(WithLatents(vq), opt)
    if use_disc:
        opt_d = torch.optim.AdamW(disc.parameters(), lr=args.disc_learning_rate or args.learning_rate,
                                  betas=(0.5, 0.9), weight_decay=args.adam_weight_decay)
        disc, opt_d = accelerator.prepare(disc, opt_d)
    scheduler = make_lr_scheduler(opt, args.lr_scheduler, args.lr_warmup_steps, args.max_train_steps)
    accelerator.register_for_checkpointing(scheduler)
    vq = accelerator.unwrap_model(model).vq
    K = vq.config.num_vq_embeddings
    recorded = ckpt.args_to_record(args)
    state, changes = ckpt.resume_state(accelerator, out, args.resume_from_checkpoint, main, recorded)
    if {"learning_rate", "disc_learning_rate", "adam_weight_decay"} & set(changes.changed):
        set_learning_rate(opt, scheduler, args.learning_rate, weight_decay=args.adam_weight_decay)
        if use_disc:  # no schedule on the discriminator
            for group in opt_d.param_groups:
                group.update(lr=args.disc_learning_rate or args.learning_rate, weight_decay=args.adam_weight_decay)
        accelerator.print("note: applied the learning rates and weight decay to the resumed optimizers (the "
                          "checkpoint's values would otherwise be restored)")
    eval_loader = DataLoader(held_out, batch_size=args.train_batch_size) if held_out is not None else None
    if eval_loader is not None and state["step"] == 0:
        write_log(accelerator, out, 0, evaluate(vq, eval_loader, device), None, "eval_log")
    window = torch.zeros(K, device=device)  # code counts since the last log
    since_restart = torch.zeros(K, device=device)  # code counts since the last restart check
    sums = torch.zeros(4, device=device)  # rec, codebook, commitment, micro-batches
    bar = tqdm(total=args.max_train_steps, initial=state["step"], disable=not main, desc="train-vqgan")
    metrics: dict[str, float] = {}
    while state["step"] < args.max_train_steps:
        if isinstance(train_set, IterableDataset):
            train_set.set_position(state["epoch"], state["batch_in_epoch"])
            loader = DataLoader(train_set, batch_size=args.train_batch_size, drop_last=True,
                                num_workers=args.dataloader_num_workers, generator=torch.Generator())
        else:
            sampler = EpochSampler(len(train_set), args.train_batch_size, state["epoch"], args.seed, True,
                                   accelerator.process_index, accelerator.num_processes, state["batch_in_epoch"])
            loader = DataLoader(train_set, batch_size=args.train_batch_size, sampler=sampler, drop_last=True,
                                num_workers=args.dataloader_num_workers, generator=torch.Generator())
        for batch in loader:
            x = batch["pixels"].to(device)
            rec, q, z = model(x)
            rec_loss = F.l1_loss(rec, x) if args.rec_loss == "l1" else F.mse_loss(rec, x)
            if perceptual is not None:
                rec_loss = rec_loss + args.perceptual_weight * perceptual(rec.float(), x.float())
            loss = rec_loss + args.codebook_weight * q.codebook_loss + args.commitment_cost * q.commitment_loss
            gan_on = use_disc and state["step"] >= args.disc_start_step
            if gan_on:
                g_loss = -disc(rec).mean()
                weight = adaptive_weight(rec_loss, g_loss, vq.decoder.conv_out.weight)
                loss = loss + args.disc_weight * weight * g_loss
            opt.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if args.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            opt.step()
            scheduler.step()
            if gan_on:  # hinge loss on real vs (detached) reconstructions
                d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(rec.detach())).mean()
                opt_d.zero_grad(set_to_none=True)
                accelerator.backward(d_loss)
                opt_d.step()
            counts = torch.bincount(q.ids.flatten(), minlength=K).float()
            window += counts
            since_restart += counts
            sums += torch.stack([rec_loss.detach().float(), q.codebook_loss.detach().float(),
                                 q.commitment_loss.detach().float(), torch.ones((), device=device)])
            state["step"] += 1
            state["batch_in_epoch"] += 1
            bar.update(1)
            every = args.restart_dead_codes_every
            if every and state["step"] % every == 0:
                restart_dead_codes(accelerator, vq, opt, accelerator.reduce(since_restart, "sum"), z, broadcast)
                since_restart.zero_()
            if state["step"] % args.logging_steps == 0 or state["step"] == args.max_train_steps:
                totals = accelerator.reduce(sums.clone(), "sum")
                n = max(float(totals[3]), 1.0)
                metrics = {"rec_loss": float(totals[0]) / n, "codebook_loss": float(totals[1]) / n,
                           "commitment_loss": float(totals[2]) / n,
                           **usage(accelerator.reduce(window.clone(), "sum")), "lr": scheduler.get_last_lr()[0]}
                write_log(accelerator, out, state["step"], metrics, bar)
                sums.zero_()
                window.zero_()
            if eval_loader is not None and args.eval_steps and state["step"] % args.eval_steps == 0:
                write_log(accelerator, out, state["step"], evaluate(vq, eval_loader, device), bar, "eval_log")
            if args.checkpointing_steps and state["step"] % args.checkpointing_steps == 0:
                ckpt.save_checkpoint(accelerator, out, state["step"], {**state, "seed": args.seed},
                                     args.checkpoints_total_limit, recorded)
            if args.debug_sleep_per_step:
                time.sleep(args.debug_sleep_per_step)
            if state["step"] >= args.max_train_steps:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    bar.close()
    final = evaluate(vq, eval_loader, device) if eval_loader is not None else {}
    accelerator.wait_for_everyone()
    if main:
        save_model(vq, out / "vqvae", "VQModel")
        summary = {"step": state["step"], **metrics, **final}
        (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        accelerator.print(f"held-out: {final or 'no held-out images'}; VQGAN saved to {out / 'vqvae'}")
    return {**metrics, **final}


@torch.no_grad()
def restart_dead_codes(accelerator, vq: VQGAN, opt, counts: torch.Tensor, z: torch.Tensor, broadcast) -> int:
    """Move codes nobody picked onto random encoder outputs of this batch (the same on every rank)."""
    dead = (counts == 0).nonzero().flatten()
    if len(dead) == 0:
        return 0
    latents = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()  # (N, D)
    pick = latents[torch.randint(len(latents), (len(dead),), device=latents.device)]
    weight = vq.quantize.embedding.weight
    new = pick + 0.01 * pick.std() * torch.randn_like(pick)
    new = broadcast(new.to(weight.dtype).contiguous(), from_process=0)
    weight[dead] = new
    inner = getattr(opt, "optimizer", opt)
    for key in ("exp_avg", "exp_avg_sq"):
        buf = inner.state.get(weight, {}).get(key)
        if buf is not None:
            buf[dead] = 0
    return len(dead)


def write_log(accelerator, out: Path, step: int, metrics: dict, bar, name: str = "train_log") -> None:
    if accelerator.is_main_process and metrics:
        if bar is not None:
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("rec_loss", "perplexity", "psnr")})
        with open(out / "logs" / f"{name}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

