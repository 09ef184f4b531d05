"""`amused train` (a U-ViT from scratch) and `amused finetune` (a pipeline, full or LoRA): one accelerate loop.

Each optimizer step: images -> VQ token ids (frozen VQGAN) and captions -> text states + pooled embedding
(frozen text encoder, LoRA-trained, or fully trained with `--train_text_encoder`), or both read from
pre-encoded shards; text dropped for classifier-free guidance with probability `--cond_dropout_prob`; a
cosine-scheduled fraction of tokens masked; cross-entropy with label smoothing on the masked tokens
(masking.py); with `--with_prior_preservation`, plus `--prior_loss_weight` times the same loss on images the base
model drew (prior.py). Gradient accumulation, clipping, EMA, warmup + decay, mixed precision and DDP/FSDP come from
accelerate (`accelerate launch -m amused.cli train ...`); the memory options are `--weights_dtype bf16`,
`--use_8bit_adam`, `--gradient_checkpointing` and `--fused_optimizer_step` (optim.py). Checkpoints are atomic
and resumable, with the run's arguments checked on resume (checkpoint.py); the result is saved in the published
layout (`AmusedPipeline.save_pretrained`, EMA weights when EMA is on, the trained text encoder in place of the
one it started from, the base model's generation_config.json) or, for LoRA, as `pytorch_lora_weights.safetensors`.
Each log line of logs/train_log.jsonl holds loss, masked-token accuracy, LR, images/s since the previous line,
the gradient norm before clipping (with `--max_grad_norm`) and the peak `torch.cuda.max_memory_allocated` so far
(largest over processes; null on the CPU).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset

from ..loading import config_from_dict, load_model, read_json, resolve
from ..models.text_encoder import TextEncoder
from ..models.uvit import UViT, UViTConfig
from ..models.vqgan import VQGAN, VQGANConfig
from ..presets import UVIT_PRESETS
from . import checkpoint as ckpt
from . import prior
from .data import EpochSampler, PreencodedDataset, make_dataset
from .ema import EMA
from .masking import drop_text, mask_tokens, masked_loss
from .optim import FusedStepOptimizer, adamw_factory, make_lr_scheduler, set_learning_rate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# --default_* flag -> the generation_config.json key it sets in the saved pipeline
GENERATION_FLAGS = {"default_num_inference_steps": "num_inference_steps", "default_guidance_scale": "guidance_scale",
                    "default_temperature": "temperature"}


@dataclasses.dataclass
class Components:
    transformer: UViT
    vqvae: VQGAN | None
    tokenizer: object
    text_encoder: torch.nn.Module | None  # the transformers model


# ----------------------------------------------------------------------------------------------------------
# Building the model
# ----------------------------------------------------------------------------------------------------------


def load_text(root: Path | None, text_encoder_path: str | None):
    """(tokenizer, text model) from a pipeline folder's tokenizer/ + text_encoder/, or a transformers folder (model
    and tokenizer files together; the class its config.json names in `architectures`, so
    CLIPTextModelWithProjection keeps its projection)."""
    from ..components import load_text_components, load_text_folder

    if text_encoder_path:
        return load_text_folder(Path(text_encoder_path), Path(text_encoder_path), default="AutoModel")
    return load_text_components(root, None, None)


def transformer_config(spec: str, vq: VQGANConfig, text: TextEncoder, resolution: int) -> UViTConfig:
    """A preset name (adapted to the VQGAN and text encoder) or a config.json path (checked against them)."""
    grid = resolution // vq.scale_factor
    if spec in UVIT_PRESETS:
        cfg = UVIT_PRESETS[spec]()
        vocab = cfg.vocab_size if cfg.codebook_size == vq.num_vq_embeddings else vq.num_vq_embeddings + 1
        return dataclasses.replace(cfg, codebook_size=vq.num_vq_embeddings, vocab_size=vocab,
                                   encoder_hidden_size=text.hidden_size, cond_embed_dim=text.pooled_size,
                                   sample_size=grid)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--transformer_config {spec!r} is neither a preset ({', '.join(UVIT_PRESETS)}) nor a file")
    cfg = config_from_dict(UViTConfig, read_json(path), path)
    for name, want in (("codebook_size", vq.num_vq_embeddings), ("encoder_hidden_size", text.hidden_size),
                       ("cond_embed_dim", text.pooled_size)):
        if getattr(cfg, name) != want:
            raise ValueError(f"{path}: {name} is {getattr(cfg, name)} but the VQGAN / text encoder need {want}")
    return cfg


def build_components(args, mode: str) -> Components:
    """finetune: every component from the pipeline folder; train: a new U-ViT with a given VQGAN + text encoder."""
    root = resolve(args.pretrained_model_name_or_path) if args.pretrained_model_name_or_path else None
    if mode == "finetune":
        if root is None:
            raise ValueError("amused finetune needs --pretrained_model_name_or_path (a pipeline folder or hub id)")
        from ..pipeline import AmusedPipeline

        pipe = AmusedPipeline.from_pretrained(root, variant=args.variant)
        return Components(pipe.transformer, pipe.vqvae, pipe.tokenizer, pipe.text_encoder)
    vq_path, text_path = getattr(args, "vqvae_path", None), getattr(args, "text_encoder_path", None)
    vq_folder = Path(vq_path) if vq_path else (root / "vqvae" if root else None)
    if vq_folder is None or (root is None and not text_path):
        raise ValueError("amused train needs --pretrained_model_name_or_path (a pipeline folder giving vqvae/, "
                         "text_encoder/ and tokenizer/), or --vqvae_path and --text_encoder_path")
    vqvae = load_model(VQGAN, VQGANConfig, vq_folder)
    tokenizer, text_encoder = load_text(root, text_path)
    cfg = transformer_config(args.transformer_config, vqvae.config, TextEncoder(text_encoder, tokenizer),
                             args.resolution)
    with torch.random.fork_rng(devices=[]):  # the same init on every process, and set_seed's per-process RNG
        torch.manual_seed(args.seed or 0)   # (different masks on each) left as it was
        transformer = UViT(cfg)
    return Components(transformer, vqvae, tokenizer, text_encoder)


def check_args(args, accelerator) -> None:
    from accelerate.utils import DistributedType

    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true") and not fsdp:
        raise ValueError(f"accelerate was configured for FSDP but runs {accelerator.distributed_type.value} "
                         f"(accelerate turns FSDP on for GPU-like devices only, not for CPU processes): refusing to "
                         f"train unsharded. Use a DDP config (distributed_type: MULTI_GPU) for CPU runs")
    if fsdp and (args.text_encoder_use_lora or args.train_text_encoder):
        raise ValueError("--train_text_encoder / --text_encoder_use_lora are not supported with FSDP (the text "
                         "encoder would be sharded apart from the U-ViT and its optimizer); use DDP")
    defaults = [f"--{name}" for name in GENERATION_FLAGS if getattr(args, name, None) is not None]
    if defaults and args.use_lora:
        raise ValueError(f"{', '.join(defaults)} set the saved pipeline's generation_config.json; --use_lora saves "
                         f"only adapters. Drop them (generation uses the base model's settings)")
    if len(getattr(args, "default_temperature", None) or []) > 2:
        raise ValueError(f"--default_temperature takes START [END], got {len(args.default_temperature)} values")

    if args.fused_optimizer_step:
        if accelerator.num_processes > 1:
            raise ValueError("--fused_optimizer_step steps each parameter inside backward, before DDP/FSDP has "
                             "reduced its gradient: use it on a single process")
        if args.max_grad_norm:
            raise ValueError("--max_grad_norm needs every gradient at once; --fused_optimizer_step frees them as it "
                             "goes. Drop one of the two")
        if args.mixed_precision == "fp16":
            raise ValueError("--fused_optimizer_step cannot unscale fp16 gradients; use --mixed_precision bf16")
    if args.weights_dtype != "fp32" and args.mixed_precision == "fp16":
        raise ValueError("--weights_dtype bf16 trains in bf16 already; drop --mixed_precision fp16")
    if args.use_ema and fsdp:
        raise ValueError("--use_ema is not supported with FSDP (the averaged weights would be sharded)")
    for flag in ("text_encoder_use_lora", "train_text_encoder"):
        if args.preencoded_data_dir and getattr(args, flag):
            raise ValueError(f"--{flag} needs the text encoder in the step; it cannot train on "
                             "--preencoded_data_dir embeddings")
    if args.train_text_encoder and args.text_encoder_use_lora:
        raise ValueError("--train_text_encoder trains all the text encoder's weights; --text_encoder_use_lora "
                         "trains adapters on it. Drop one of the two")
    if args.train_text_encoder and args.use_lora:
        raise ValueError("--use_lora saves only adapters, so a --train_text_encoder result would be lost; train "
                         "the U-ViT fully, or use --text_encoder_use_lora")
    prior.check_args(args)


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


def make_loader(dataset, args, epoch: int, start_batch: int, rank: int, world: int) -> DataLoader:
    common = dict(batch_size=args.train_batch_size, num_workers=args.dataloader_num_workers, drop_last=True,
                  generator=torch.Generator(), pin_memory=torch.cuda.is_available())  # no global-RNG draws
    if isinstance(dataset, IterableDataset):
        dataset.set_position(epoch, start_batch)
        return DataLoader(dataset, **common)
    sampler = EpochSampler(len(dataset), args.train_batch_size, epoch, args.seed or 0, True, rank, world, start_batch)
    return DataLoader(dataset, sampler=sampler, collate_fn=getattr(dataset, "collate_batch", None), **common)


def run(args, mode: str) -> Path:
    """Train or fine-tune as the parsed arguments say; returns the output folder."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    out = Path(args.output_dir)
    if args.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ImportError("--report_to tensorboard needs the tensorboard package (pip install tensorboard); without "
                          "it, metrics still go to <output_dir>/logs/train_log.jsonl")
    accelerator = Accelerator(mixed_precision=None if args.mixed_precision in (None, "no") else args.mixed_precision,
                              log_with=args.report_to if args.report_to in ("tensorboard",) else None,
                              project_dir=str(out))
    check_args(args, accelerator)
    ckpt.check_world(accelerator)
    recorded = ckpt.args_to_record(args)
    candidates = ckpt.resume_candidates(out, args.resume_from_checkpoint)
    if candidates:  # a changed LoRA/EMA/... flag fails here, before the model is built, not in accelerate
        ckpt.compare_run_args(candidates[0], recorded)
    device, main = accelerator.device, accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_stale(out)
    set_seed(args.seed or 0, device_specific=True)  # different masks per rank
    prior_preservation = bool(getattr(args, "with_prior_preservation", False))
    if prior_preservation:  # before the model is built: the base model draws them, alone on the device
        if main:
            made = prior.ensure_class_images(args, device)
            accelerator.print(f"class images: {made} drawn, {args.num_class_images - made} reused from "
                              f"{args.class_data_dir}")
        accelerator.wait_for_everyone()
    comps = build_components(args, mode)
    if not getattr(args, "preencoded_data_dir", None):  # before any work: the first batch would fail deep inside
        vq_factor = comps.vqvae.config.scale_factor
        f = vq_factor * (2 if comps.transformer.config.downsample else 1)  # the U-ViT halves the token grid
        if args.resolution < f or args.resolution % f:
            raise ValueError(f"--resolution {args.resolution} must be a positive multiple of {f} for this model "
                             f"(VQ factor {vq_factor}{', token grid halved by the U-ViT' if f > vq_factor else ''})")
    model = comps.transformer.to(dtype=DTYPES[args.weights_dtype])
    model.gradient_checkpointing = args.gradient_checkpointing
    lora_configs = {}
    if args.use_lora or args.text_encoder_use_lora:
        from .. import lora  # peft: imported only for LoRA runs (it takes seconds)
    if args.use_lora:
        targets = list(args.lora_target_modules or lora.TRANSFORMER_TARGETS)
        lora_configs["transformer"] = lora.add_lora(model, args.lora_r, args.lora_alpha, targets)
    text_trainable = bool(args.text_encoder_use_lora or args.train_text_encoder)
    if args.train_text_encoder:  # every weight, in the U-ViT's dtype; no longer the packaged file's weights
        comps.text_encoder.requires_grad_(True)
        if hasattr(comps.text_encoder, "amused_package"):  # so the pipeline saves the trained weights
            del comps.text_encoder.amused_package
    elif text_trainable:
        targets = args.text_encoder_lora_target_modules or lora.text_encoder_targets(comps.text_encoder)
        lora_configs["text_encoder"] = lora.add_lora(comps.text_encoder, args.text_encoder_lora_r,
                                                     args.text_encoder_lora_alpha, list(targets))
    model.train()

    dataset = make_dataset(args, accelerator.process_index, accelerator.num_processes)
    if prior_preservation:
        dataset = prior.PriorPreservationDataset(dataset, prior.class_dataset(args))
    preencoded = isinstance(dataset, PreencodedDataset)
    frozen_dtype = torch.bfloat16 if "bf16" in (args.mixed_precision, args.weights_dtype) else (
        torch.float16 if args.mixed_precision == "fp16" else torch.float32)
    if preencoded:  # the VQGAN and the text encoder never touch the GPU
        cond = Conditioner(None, None, [t.to(device) for t in dataset.empty_prompt()], False,
                           args.cond_dropout_prob, device)
    else:
        vq = comps.vqvae.eval().requires_grad_(False)
        if frozen_dtype == torch.bfloat16:  # fp16 VQ encoding can overflow; bf16 has fp32's range
            vq.to(torch.bfloat16)
        for part in (vq.encoder, vq.quant_conv, vq.quantize):  # the decoder stays on the CPU
            part.to(device)
        te_dtype = DTYPES[args.weights_dtype] if args.train_text_encoder else (
            torch.float32 if text_trainable else frozen_dtype)
        te = comps.text_encoder.to(device, te_dtype)
        te.train() if text_trainable else te.requires_grad_(False)
        prompt_encoder = TextEncoder(te, comps.tokenizer)
        with torch.no_grad():
            empty = list(prompt_encoder([""]))
        cond = Conditioner(vq, prompt_encoder, empty, text_trainable, args.cond_dropout_prob, device)

    params = [p for p in model.parameters() if p.requires_grad]
    if text_trainable:
        params += [p for p in comps.text_encoder.parameters() if p.requires_grad]
    make_opt = adamw_factory(args.use_8bit_adam, device, args.learning_rate, (args.adam_beta1, args.adam_beta2),
                             args.adam_weight_decay, args.adam_epsilon)
    model.to(device)
    if getattr(args, "compile", False):
        comps.transformer.compile_blocks(backend=args.compile_backend)
    if args.fused_optimizer_step:
        optimizer = FusedStepOptimizer(params, make_opt, stochastic_rounding=args.weights_dtype == "bf16")
        model = accelerator.prepare(model)
    else:
        optimizer = make_opt(params)
        model, optimizer = accelerator.prepare(model, optimizer)
    if text_trainable:
        cond.text.model = accelerator.prepare(cond.text.model)
    # Clip the parameters the prepared modules hold: under FSDP they replace the ones built above (accelerate uses
    # FSDP's sharded-aware clipping only for exactly the wrapped model's parameters), and a norm over the old
    # objects would see no gradients at all.
    clip_params = list(model.parameters())
    if text_trainable:
        clip_params += [p for p in cond.text.model.parameters() if p.requires_grad]
    scheduler = make_lr_scheduler(optimizer, args.lr_scheduler, args.lr_warmup_steps, args.max_train_steps)
    unwrapped = accelerator.unwrap_model(model)
    averaged = [(n, p) for n, p in unwrapped.named_parameters() if p.requires_grad]
    if args.train_text_encoder:  # the saved pair must match: average the encoder the U-ViT learnt to read, too
        averaged += [(f"text_encoder.{n}", p) for n, p in comps.text_encoder.named_parameters()]
    ema = EMA(averaged, args.ema_decay, args.ema_update_after_step) if args.use_ema else None
    accelerator.register_for_checkpointing(scheduler, *([optimizer] if args.fused_optimizer_step else []),
                                           *([ema] if ema else []))
    state, changes = ckpt.resume_state(accelerator, out, args.resume_from_checkpoint, main, recorded)
    if changes.optimizer:
        set_learning_rate(optimizer, scheduler, args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                          weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
        accelerator.print(f"note: applied {', '.join('--' + n for n in changes.optimizer)} to the resumed optimizer "
                          f"(the checkpoint's values would otherwise be restored)")
    if main:
        (out / "logs").mkdir(exist_ok=True)
        if args.report_to == "tensorboard":
            accelerator.init_trackers("amused", config={k: v for k, v in vars(args).items()
                                                        if isinstance(v, (int, float, str, bool))})

    ga = args.gradient_accumulation_steps
    mask_id = unwrapped.config.mask_token_id
    bar = tqdm(total=args.max_train_steps, initial=state["step"], disable=not main, desc=mode)
    sums = torch.zeros(5, device=device)  # loss, accuracy, micro-batches, instance loss, class loss since the log
    norms = []  # gradient norms (before clipping) since the last log
    micro = 0
    clock = (time.perf_counter(), state["step"])  # for images/s between logs
    while state["step"] < args.max_train_steps:
        loader = make_loader(dataset, args, state["epoch"], state["batch_in_epoch"], accelerator.process_index,
                             accelerator.num_processes)
        seen = 0
        for batch in loader:
            seen += 1
            if args.debug_log_batches:  # lets tests check the data order across a resume
                debug_log_batch(out, accelerator.process_index, state["step"] + 1, batch)
            sync = (micro + 1) % ga == 0
            if args.fused_optimizer_step:
                optimizer.sync = sync
            with (accelerator.no_sync(model) if not sync else nullcontext()):
                result = step_loss(batch, model, cond, mask_id, args)
                accelerator.backward(result.loss / ga)
            sums += torch.stack([result.loss.detach().float(), result.accuracy.float(), torch.ones((), device=device),
                                 result.instance_loss.detach().float(), result.prior_loss.detach().float()])
            micro += 1
            state["batch_in_epoch"] += 1
            if not sync:
                continue
            if args.max_grad_norm and accelerator.sync_gradients:
                norms.append(accelerator.clip_grad_norm_(clip_params, args.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
            state["step"] += 1
            bar.update(1)
            if state["step"] % args.logging_steps == 0 or state["step"] == args.max_train_steps:
                images = (state["step"] - clock[1]) * args.train_batch_size * ga * accelerator.num_processes
                log(accelerator, out, state["step"], sums, scheduler.get_last_lr()[0], bar,
                    images / (time.perf_counter() - clock[0]), norms, prior_preservation)
                sums.zero_()
                norms = []
                clock = (time.perf_counter(), state["step"])
            if args.checkpointing_steps and state["step"] % args.checkpointing_steps == 0:
                ckpt.save_checkpoint(accelerator, out, state["step"], {**state, "seed": args.seed},
                                     args.checkpoints_total_limit, recorded)
            if args.validation_prompts and args.validation_steps and state["step"] % args.validation_steps == 0:
                validate(args, accelerator, comps, model, out, state["step"])
            if args.debug_sleep_per_step:  # lets tests kill a run mid-way
                time.sleep(args.debug_sleep_per_step)
            if state["step"] >= args.max_train_steps:
                break
        else:
            if seen == 0 and state["batch_in_epoch"] == 0:
                raise ValueError("the dataset gives no full batch: lower --train_batch_size")
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    bar.close()
    save_final(args, accelerator, comps, model, cond.text.model if args.train_text_encoder else None, ema,
               lora_configs, out, mode)
    accelerator.end_training()
    return out


class Conditioner:
    """Batch -> (token ids, text states, pooled text, micro-conditioning), with text dropout applied.

    From images + captions through the VQGAN encoder and the text encoder, or from pre-encoded shards.
    """

    def __init__(self, vq: VQGAN | None, text: TextEncoder | None, empty: list[torch.Tensor], text_trainable: bool,
                 dropout: float, device: torch.device):
        self.vq, self.text, self.empty, self.text_trainable = vq, text, empty, text_trainable
        self.dropout, self.device = dropout, device

    def __call__(self, batch: dict) -> tuple[torch.Tensor, ...]:
        micro = batch["micro_conds"].to(self.device)
        empty_hidden, empty_pooled = self.empty
        if self.text is None:  # pre-encoded
            ids = batch["ids"].to(self.device)
            hidden, pooled = batch["hidden"].to(self.device), batch["pooled"].to(self.device)
        else:
            with torch.no_grad():
                ids = self.vq.encode(batch["pixels"].to(self.device))  # (B, h, w)
            prompts = list(batch["caption"])
            if self.text_trainable:  # the empty prompt's embedding moves as the encoder trains: encode it too
                hidden, pooled = self.text(prompts + [""])
                empty_hidden, empty_pooled = hidden[-1:], pooled[-1:]
                hidden, pooled = hidden[:-1], pooled[:-1]
            else:
                with torch.no_grad():
                    hidden, pooled = self.text(prompts)
        hidden, pooled, _ = drop_text(hidden, pooled, empty_hidden, empty_pooled, self.dropout)
        return ids, hidden, pooled, micro


class StepLoss(NamedTuple):
    loss: torch.Tensor  # scalar to minimise: instance loss + prior_loss_weight * prior loss
    accuracy: torch.Tensor  # masked-token accuracy on the instance examples (no grad)
    instance_loss: torch.Tensor  # scalar, the instance examples' loss
    prior_loss: torch.Tensor  # scalar, the class examples' loss (0 without prior preservation)


def step_loss(batch: dict, model, cond: Conditioner, mask_id: int, args) -> StepLoss:
    """Masked-token loss and accuracy of one micro-batch; with prior preservation (`batch["is_prior"]`, prior.py)
    the class examples' loss is added with weight --prior_loss_weight."""
    ids, hidden, pooled, micro = cond(batch)
    dtype = DTYPES[args.weights_dtype]
    masked = mask_tokens(ids, mask_id, args.min_masking_rate)
    logits = model(masked.input_ids, hidden.to(dtype), pooled.to(dtype), micro.to(dtype))  # (B, V, h, w)
    is_prior = batch.get("is_prior")
    if is_prior is None:
        loss, accuracy = masked_loss(logits, ids, masked.mask, args.label_smoothing)
        return StepLoss(loss, accuracy, loss, torch.zeros((), device=loss.device))
    is_prior = is_prior.to(ids.device)
    part = lambda keep: masked_loss(logits[keep], ids[keep], masked.mask[keep], args.label_smoothing)  # noqa: E731
    instance, cls = part(~is_prior), part(is_prior)
    return StepLoss(instance.loss + args.prior_loss_weight * cls.loss, instance.accuracy, instance.loss, cls.loss)


def log(accelerator, out: Path, step: int, sums: torch.Tensor, lr: float, bar, images_per_s: float,
        grad_norms: list[torch.Tensor], prior_preservation: bool = False) -> None:
    """Reduce the running sums over processes; progress bar, logs/train_log.jsonl and trackers.

    With prior preservation, `loss` is the weighted sum and `instance_loss` / `prior_loss` its two terms.

    `grad_norms` are the global norms `clip_grad_norm_` returned since the last log (the same on every process);
    their mean is logged. The peak memory is the largest `torch.cuda.max_memory_allocated` of any process so far.
    """
    totals = accelerator.reduce(sums.clone(), reduction="sum")
    n = max(float(totals[2]), 1.0)
    peak = None
    if accelerator.device.type == "cuda":
        mine = torch.tensor([torch.cuda.max_memory_allocated(accelerator.device)], device=accelerator.device)
        peak = float(accelerator.gather(mine).max()) / 2 ** 30
    metrics = {"loss": float(totals[0]) / n, "masked_accuracy": float(totals[1]) / n, "lr": lr,
               "images_per_s": images_per_s, "max_memory_allocated_gib": peak}
    if prior_preservation:
        metrics.update(instance_loss=float(totals[3]) / n, prior_loss=float(totals[4]) / n)
    if grad_norms:
        local = [norm.full_tensor() if hasattr(norm, "full_tensor") else norm for norm in grad_norms]  # FSDP2: DTensor
        metrics["grad_norm"] = float(torch.stack([x.detach().float().reshape(()) for x in local]).mean())
    if accelerator.is_main_process:
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['masked_accuracy']:.3f}")
        with open(out / "logs" / "train_log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
    accelerator.log({k: v for k, v in metrics.items() if v is not None}, step=step)


def debug_log_batch(out: Path, rank: int, step: int, batch: dict) -> None:
    """Append the captions of one micro-batch to logs/batches_rank{rank}.jsonl (`--debug_log_batches`)."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    with open(out / "logs" / f"batches_rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "captions": list(batch["caption"])}) + "\n")


@torch.no_grad()
def validate(args, accelerator, comps: Components, model, out: Path, step: int) -> None:
    """Images for --validation_prompts into <output_dir>/validation/step-N/ (main process only)."""
    if not accelerator.is_main_process:
        return
    from ..pipeline import AmusedPipeline, SchedulerConfig

    transformer = accelerator.unwrap_model(model)
    places = {m: next(m.parameters()).device for m in (comps.vqvae.decoder, comps.vqvae.post_quant_conv,
                                                       comps.vqvae.encoder, comps.text_encoder)}
    for m in places:
        m.to(accelerator.device)
    text_training = comps.text_encoder.training
    transformer.eval()
    comps.text_encoder.eval()  # no dropout in the validation prompts' embeddings
    try:
        pipe = AmusedPipeline(comps.vqvae, comps.tokenizer, comps.text_encoder, transformer,
                              SchedulerConfig(mask_token_id=transformer.config.mask_token_id))
        root = resolve(args.pretrained_model_name_or_path) if args.pretrained_model_name_or_path else None
        pipe.generation_defaults = generation_defaults(args, root)  # what the saved pipeline will generate with
        folder = out / "validation" / f"step-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator(accelerator.device).manual_seed(args.seed or 0)
        for i, prompt in enumerate(args.validation_prompts):
            pipe(prompt, generator=generator).images[0].save(folder / f"{i:02d}.png")
    finally:
        transformer.train()
        comps.text_encoder.train(text_training)
        for m, place in places.items():
            m.to(place)


def save_final(args, accelerator, comps: Components, model, text_model, ema: EMA | None, lora_configs: dict,
               out: Path, mode: str) -> None:
    """The trained transformer (and text encoder, when `text_model` is the prepared trained one) in the published
    layout, frozen parts re-read from disk, untouched; or the LoRA file. EMA weights when EMA is on."""
    from accelerate.utils import DistributedType

    accelerator.wait_for_everyone()
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    full_state = accelerator.get_state_dict(model) if fsdp else None
    text_state = accelerator.get_state_dict(text_model) if fsdp and text_model is not None else None
    if not accelerator.is_main_process:
        return
    transformer = accelerator.unwrap_model(model)
    if ema is not None:
        ema.copy_to()
    if full_state is not None:
        transformer = UViT(transformer.config)
        transformer.load_state_dict(full_state)
    if lora_configs:
        from .. import lora

        path = lora.save_lora_weights(out, transformer if args.use_lora else None,
                                      comps.text_encoder if "text_encoder" in lora_configs else None, lora_configs)
        accelerator.print(f"LoRA weights saved to {path}")
    if not args.use_lora:
        from ..pipeline import AmusedPipeline, SchedulerConfig

        root = resolve(args.pretrained_model_name_or_path) if args.pretrained_model_name_or_path else None
        vq_folder = Path(args.vqvae_path) if getattr(args, "vqvae_path", None) else root / "vqvae"
        if text_model is not None:  # the trained encoder (with its EMA weights, copied in above)
            tokenizer, text_encoder = comps.tokenizer, accelerator.unwrap_model(text_model)
            if text_state is not None:
                text_encoder = type(text_encoder)(text_encoder.config)
                text_encoder.load_state_dict(text_state)
        else:
            tokenizer, text_encoder = load_text(root, getattr(args, "text_encoder_path", None))
        pipe = AmusedPipeline(load_model(VQGAN, VQGANConfig, vq_folder), tokenizer, text_encoder, transformer,
                              SchedulerConfig(mask_token_id=transformer.config.mask_token_id))
        pipe.generation_defaults = generation_defaults(args, root)
        pipe.save_pretrained(out)
        accelerator.print(f"pipeline saved to {out} (load it with AmusedPipeline.from_pretrained)")



def generation_defaults(args, root: Path | None) -> dict:
    """The saved pipeline's generation_config.json: the base pipeline's (so generating from the result keeps the
    settings the base model was tuned with, not diffusers' guidance 10), with the `--default_*` flags on top."""
    path = root / "generation_config.json" if root is not None else None
    base = read_json(path) if path is not None and path.is_file() else {}
    given = {key: getattr(args, flag) for flag, key in GENERATION_FLAGS.items()
             if getattr(args, flag, None) is not None}
    if "temperature" in given:
        t = [float(x) for x in given["temperature"]]
        given["temperature"] = t * 2 if len(t) == 1 else t  # one value: constant
    return {**base, **given}
