"""Command-line entry points for training: `amused train`, `finetune`, `train-vqgan`, `preencode`.

Argument names follow diffusers' examples/amused/train_amused.py where it has them. `amused.cli` registers these
with `add_commands(subparsers)`; each handler takes the parsed arguments. Also runnable alone:
`python -m amused.training.cli train ...` or, on several GPUs, `accelerate launch -m amused.training.cli ...`.
"""

from __future__ import annotations

import argparse

FORMAT = argparse.RawDescriptionHelpFormatter


def model_name(value: str) -> str:
    """--pretrained_model_name_or_path: "embedded" names the model shipped in the package (its folder)."""
    from ..embedded import resolve_model_name

    try:
        return resolve_model_name(value)
    except FileNotFoundError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def output_dir(value: str) -> str:
    """--output_dir: a folder (made if missing), not a file, and not under one."""
    from pathlib import Path

    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a file, not a folder")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: {parent} is a file, not a folder")
    return value


def _data(p: argparse.ArgumentParser, preencoded: bool = True, resolution: int = 256) -> None:
    g = p.add_argument_group("data (give exactly one source)")
    g.add_argument("--train_data_dir", "--instance_data_dir", dest="train_data_dir",
                   help="image folder; captions from metadata.jsonl/metadata.csv (file_name + text), else "
                        "--instance_prompt or each file's name")
    g.add_argument("--instance_data_image", help="a single training image (with --instance_prompt)")
    g.add_argument("--instance_prompt", help="caption of --instance_data_image, or of every image of a folder "
                                             "without metadata")
    g.add_argument("--instance_data_dataset", help="a Hugging Face dataset: save_to_disk folder or load_dataset name")
    g.add_argument("--dataset_split", default="train")
    g.add_argument("--image_key", default="image", help="image column of --instance_data_dataset")
    g.add_argument("--prompt_key", "--caption_column", dest="prompt_key", default="text", help="caption column")
    g.add_argument("--image_column", default="file_name", help="file-name column of metadata.jsonl")
    g.add_argument("--train_shards", help="webdataset tar shards: 'shards/{00000..00099}.tar', a glob or a list")
    if preencoded:
        g.add_argument("--preencoded_data_dir", help="output of `amused preencode` (skips the VQGAN and text "
                                                     "encoder)")
    g.add_argument("--resolution", type=int, default=resolution, help="training crop side in pixels")
    g.add_argument("--center_crop", action="store_true", help="centre crop (default: random crop)")
    g.add_argument("--random_flip", action="store_true", help="flip horizontally with probability 0.5")
    g.add_argument("--random_resized_crop", type=float, default=1.0, metavar="MIN",
                   help="zoom in at random before the crop: its side is a uniform fraction in [MIN, 1] of the "
                        "image's shorter side (MIN in [0.05, 1]; default 1: off); for training on one or a few "
                        "images, e.g. 0.4 for a single-image style")
    g.add_argument("--prompt_prefix", help="text put before every caption")
    g.add_argument("--dataloader_num_workers", type=int, default=0)


def _optim(p: argparse.ArgumentParser, lr: float) -> None:
    g = p.add_argument_group("optimization")
    g.add_argument("--max_train_steps", type=int, required=True, help="optimizer steps to run")
    g.add_argument("--train_batch_size", type=int, default=16, help="per device")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=lr)
    g.add_argument("--lr_scheduler", default="constant", choices=["constant", "constant_with_warmup", "cosine",
                                                                  "linear"])
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=None, help="clip the global gradient norm")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="autocast precision (default: accelerate's config)")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (CUDA only)")


def _run(p: argparse.ArgumentParser, checkpointing_steps: int = 500) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", required=True, type=output_dir)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--checkpointing_steps", type=int, default=checkpointing_steps, help="0: never")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep the last N checkpoints")
    g.add_argument("--resume_from_checkpoint", help="'latest' or a checkpoint-N folder")
    g.add_argument("--logging_steps", type=int, default=10)
    g.add_argument("--report_to", choices=["none", "tensorboard"], default="none",
                   help="metrics always go to <output_dir>/logs/*.jsonl; tensorboard needs the package")
    g.add_argument("--debug_sleep_per_step", type=float, default=0.0, help=argparse.SUPPRESS)
    g.add_argument("--debug_log_batches", action="store_true", help=argparse.SUPPRESS)  # captions of every batch


def _uvit_args(p: argparse.ArgumentParser, finetune: bool) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", "--model", required=finetune, type=model_name, metavar="MODEL",
                   help="pipeline folder, hub id, or 'embedded' (the shipped model)" + (
                       "" if finetune else ", supplying vqvae/, text_encoder/, tokenizer/"))
    g.add_argument("--variant", help="weight variant, e.g. fp16")
    if not finetune:
        from ..presets import UVIT_PRESETS

        g.add_argument("--transformer_config", default="amused-256",
                       help=f"preset ({', '.join(UVIT_PRESETS)}) or a transformer config.json")
        g.add_argument("--vqvae_path", help="VQGAN folder (config.json + weights), e.g. from train-vqgan")
        g.add_argument("--text_encoder_path", help="transformers text-model folder (instead of the pipeline's)")
    g = p.add_argument_group("objective")
    g.add_argument("--cond_dropout_prob", type=float, default=0.0 if finetune else 0.1,
                   help="probability of replacing a caption by the empty prompt (classifier-free guidance)")
    g.add_argument("--min_masking_rate", type=float, default=0.0)
    g.add_argument("--label_smoothing", type=float, default=0.1)
    g = p.add_argument_group("memory")
    g.add_argument("--weights_dtype", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: pure bf16 weights (no fp32 master copy); stochastic rounding with the fused step")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g = p.add_argument_group("speed")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the U-ViT's blocks (fewer, fused kernels: a small model's step is bound by "
                        "per-op launch cost otherwise)")
    g.add_argument("--compile_backend", default="inductor", help="torch.compile backend (default inductor)")
    g.add_argument("--fused_optimizer_step", action="store_true",
                   help="step each parameter inside backward and free its gradient (single process)")
    g = p.add_argument_group("EMA")
    g.add_argument("--use_ema", action="store_true")
    g.add_argument("--ema_decay", type=float, default=0.9999)
    g.add_argument("--ema_update_after_step", type=int, default=0)
    g = p.add_argument_group("LoRA")
    g.add_argument("--use_lora", action="store_true", help="train LoRA adapters on the transformer only")
    g.add_argument("--lora_r", type=int, default=16)
    g.add_argument("--lora_alpha", type=float, default=32)
    g.add_argument("--lora_target_modules", nargs="+", default=None,
                   help="default to_q to_k to_v to_out.0; add ff.net.0.proj ff.net.2 for the MLP")
    g.add_argument("--text_encoder_use_lora", action="store_true", help="also LoRA on the text encoder")
    g.add_argument("--text_encoder_lora_r", type=int, default=16)
    g.add_argument("--text_encoder_lora_alpha", type=float, default=32)
    g.add_argument("--text_encoder_lora_target_modules", nargs="+", default=None,
                   help="default: q_proj k_proj v_proj out_proj (CLIP) or query key value (BERT)")
    if finetune:
        g = p.add_argument_group("prior preservation (DreamBooth)",
                                 "train beside each instance batch on as many images the base model drew of the class "
                                 "prompts; loss = instance loss + prior_loss_weight * class loss")
        g.add_argument("--with_prior_preservation", action="store_true")
        g.add_argument("--class_data_dir", help="folder of class images; the base model draws the missing ones "
                                                "into it (kept, with their prompts in metadata.jsonl, for reruns)")
        g.add_argument("--class_prompt", help="one prompt for every class image")
        g.add_argument("--class_prompts_file", help="instead of --class_prompt: a text file, one prompt a line, used "
                                                    "in turn (for a style: many subjects, without the style word)")
        g.add_argument("--num_class_images", type=int, default=100, help="class images to train with")
        g.add_argument("--prior_loss_weight", type=float, default=1.0, help="weight of the class loss")
        g.add_argument("--sample_batch_size", type=int, default=4, help="batch size drawing class images")
    g = p.add_argument_group("text encoder")
    g.add_argument("--train_text_encoder", action="store_true",
                   help="train all the text encoder's weights with the U-ViT (same optimizer and LR, the U-ViT's "
                        "weights dtype); needs captions in the step, not --preencoded_data_dir; saved in the "
                        "pipeline")
    g = p.add_argument_group("validation")
    g.add_argument("--validation_prompts", nargs="*", default=None)
    g.add_argument("--validation_steps", type=int, default=500)
    g = p.add_argument_group("generation defaults",
                             "the saved pipeline's generation_config.json is the base pipeline's (the settings it was "
                             "tuned with), these flags override single values")
    g.add_argument("--default_guidance_scale", type=float, help="classifier-free guidance scale")
    g.add_argument("--default_temperature", type=float, nargs="+", metavar="T",
                   help="START [END] of the sampling temperature ramp (one value: constant)")
    g.add_argument("--default_num_inference_steps", type=int, help="decoding steps")


TRAIN_EXAMPLE = """example:
  accelerate launch -m amused.cli train --pretrained_model_name_or_path amused/amused-256 \\
      --transformer_config amused-256 --preencoded_data_dir enc/ --train_batch_size 64 --learning_rate 1e-4 \\
      --lr_warmup_steps 2000 --lr_scheduler cosine --use_ema --cond_dropout_prob 0.1 --mixed_precision bf16 \\
      --max_train_steps 100000 --checkpointing_steps 1000 --checkpoints_total_limit 3 --output_dir run/
"""
FINETUNE_EXAMPLE = """examples:
  amused finetune --pretrained_model_name_or_path amused/amused-512 --train_data_dir my_images/ \\
      --resolution 512 --use_lora --lora_r 16 --learning_rate 1e-4 --train_batch_size 1 \\
      --gradient_accumulation_steps 8 --gradient_checkpointing --mixed_precision bf16 --max_train_steps 1000 \\
      --output_dir my_lora/
  full, low memory (one GPU): --weights_dtype bf16 --use_8bit_adam --gradient_checkpointing --fused_optimizer_step
  one style image, prior preserved: --instance_data_image style.png --instance_prompt "a house in sks style" \\
      --with_prior_preservation --class_data_dir class_images/ --class_prompts_file subjects.txt \\
      --num_class_images 100
"""
VQGAN_EXAMPLE = """example:
  amused train-vqgan --vqgan_config amused --train_data_dir images/ --resolution 256 --train_batch_size 8 \\
      --learning_rate 1e-4 --disc_weight 0.1 --disc_start_step 20000 --restart_dead_codes_every 1000 \\
      --max_train_steps 200000 --output_dir vq_run/      # writes vq_run/vqvae/ (the published layout)
"""
PREENCODE_EXAMPLE = """example:
  amused preencode --pretrained_model_name_or_path amused/amused-256 --train_data_dir images/ \\
      --resolution 256 --center_crop --output_dir enc/
  then: amused train ... --preencoded_data_dir enc/
"""


def _import(module: str):
    """The training module, or an error naming the missing package (accelerate and peft are dependencies of
    amused; a broken install can still lack them)."""
    import importlib

    try:
        return importlib.import_module(f"amused.training.{module}")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("amused"):
            raise
        raise SystemExit(f"amused training needs the {e.name!r} package: pip install {e.name}") from e


def train_command(args) -> None:
    _import("train").run(args, "train")


def finetune_command(args) -> None:
    _import("train").run(args, "finetune")


def vqgan_command(args) -> None:
    _import("vqgan_train").run(args)


def preencode_command(args) -> None:
    _import("preencode").run(args)


def add_commands(subparsers) -> None:
    """Register train, finetune, train-vqgan and preencode on an argparse subparsers object."""
    for name, finetune, example, help_text in (
            ("train", False, TRAIN_EXAMPLE, "train a U-ViT from scratch with a given VQGAN + text encoder"),
            ("finetune", True, FINETUNE_EXAMPLE, "fine-tune a pipeline: full or LoRA")):
        p = subparsers.add_parser(name, help=help_text, description=help_text, epilog=example, formatter_class=FORMAT)
        _uvit_args(p, finetune)
        _data(p, resolution=512 if finetune else 256)
        _optim(p, lr=1e-4)
        _run(p)
        p.set_defaults(func=finetune_command if finetune else train_command)

    p = subparsers.add_parser("train-vqgan", help="train the VQGAN tokenizer", epilog=VQGAN_EXAMPLE,
                              description="train (or continue training) the VQGAN image tokenizer",
                              formatter_class=FORMAT)
    g = p.add_argument_group("model")
    g.add_argument("--vqgan_config", default="amused", help="'amused' (the published config) or a config.json")
    g.add_argument("--pretrained_model_name_or_path", "--model", type=model_name, metavar="MODEL",
                   help="continue from a vqvae folder, a pipeline folder, or 'embedded' (the shipped model's VQGAN)")
    g = p.add_argument_group("losses")
    g.add_argument("--rec_loss", choices=["l1", "l2"], default="l1")
    g.add_argument("--codebook_weight", type=float, default=1.0)
    g.add_argument("--commitment_cost", type=float, default=0.25, help="beta")
    g.add_argument("--perceptual_weight", type=float, default=0.0, help="LPIPS (needs lpips + its weights offline)")
    g.add_argument("--disc_weight", type=float, default=0.0, help="adversarial weight (0: no discriminator)")
    g.add_argument("--disc_start_step", type=int, default=10000)
    g.add_argument("--disc_learning_rate", type=float, default=None, help="default: --learning_rate")
    g.add_argument("--restart_dead_codes_every", type=int, default=0,
                   help="re-seed codes unused for this many steps from encoder outputs (0: off)")
    g.add_argument("--train_decoder_only", action="store_true",
                   help="continue a VQGAN (--pretrained_model_name_or_path) training only post_quant_conv and the "
                        "decoder: encoder and codebook stay fixed, so token ids and every transformer trained on "
                        "them stay valid while reconstructions improve")
    g = p.add_argument_group("evaluation")
    g.add_argument("--validation_data_dir", help="held-out image folder (default: --validation_split of the data)")
    g.add_argument("--validation_split", type=float, default=0.05)
    g.add_argument("--eval_steps", type=int, default=1000)
    _data(p, preencoded=False)
    _optim(p, lr=1e-4)
    _run(p)
    p.set_defaults(func=vqgan_command)

    p = subparsers.add_parser("preencode", help="store VQ tokens + text embeddings once", epilog=PREENCODE_EXAMPLE,
                              description="encode a dataset once (VQ token ids int16, text embeddings fp16) into "
                                          "safetensors shards that `train --preencoded_data_dir` reads",
                              formatter_class=FORMAT)
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", "--model", type=model_name, metavar="MODEL",
                   help="pipeline folder, hub id, or 'embedded' (the shipped model)")
    g.add_argument("--vqvae_path", help="VQGAN folder overriding the pipeline's")
    g.add_argument("--text_encoder_path", help="transformers text-model folder overriding the pipeline's")
    _data(p, preencoded=False)
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", required=True, type=output_dir)
    g.add_argument("--batch_size", type=int, default=32)
    g.add_argument("--shard_size", type=int, default=2048, help="samples per safetensors shard")
    g.add_argument("--seed", type=int, default=0, help="seeds the random crops / flips")
    p.set_defaults(func=preencode_command)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="amused", description="aMUSEd training commands")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
