"""The `amused` command line: `amused generate "a red apple" --out apple.png`, and the other subcommands.

Each subcommand is a function taking the parsed arguments; heavy imports happen inside them so `--help`
answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXAMPLES = {
    "generate": """examples:
  amused generate "red apple, openmoji style" --out apple.png
  amused generate "a cat" --model amused/amused-256 --seed 3 --out cat.png --steps 12 --guidance-scale 10
""",
}

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def default_model() -> str:
    """The model shipped inside the package (trained here), used when --model is not given."""
    from .embedded import embedded_model_path

    return str(embedded_model_path())


def load_pipeline(model: str | None, device: str, dtype: str, cls_name: str = "AmusedPipeline"):
    import torch

    import amused

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = getattr(torch, DTYPES[dtype]) if dtype != "auto" else (
        torch.float16 if device.startswith("cuda") else torch.float32)
    pipe = getattr(amused, cls_name).from_pretrained(model or default_model(), torch_dtype=torch_dtype)
    return pipe.to(device)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .images import save_image

    pipe = load_pipeline(args.model, args.device, args.dtype)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    kwargs = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                  guidance_scale=args.guidance_scale, height=args.height, width=args.width, generator=generator)
    if args.temperature is not None:
        kwargs["temperature"] = tuple(args.temperature) if len(args.temperature) == 2 else args.temperature[0]
    image = pipe(args.prompt, **kwargs).images[0]
    steps, guidance, temperature = pipe.resolve_defaults(args.steps, args.guidance_scale, kwargs.get("temperature"))
    save_image(image, args.out, {"prompt": args.prompt, "seed": args.seed, "model": args.model or "embedded",
                                 "steps": steps, "guidance_scale": guidance, "temperature": temperature,
                                 "negative_prompt": args.negative_prompt})
    if args.json:
        print(json.dumps({"out": str(args.out), "prompt": args.prompt, "seed": args.seed}))
    elif not args.quiet:
        print(f"wrote {args.out}")
    return 0


def add_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="text to image", epilog=EXAMPLES["generate"],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the embedded model)")
    p.add_argument("--out", type=Path, default=Path("out.png"), help="output PNG (default: out.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None, help="decoding steps (default: the model's, else 12)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance (default: the model's, else 10)")
    p.add_argument("--temperature", type=float, nargs="+", default=None, metavar="T",
                   help="start [end] of the temperature ramp (default: the model's, else 2 0)")
    p.add_argument("--height", type=int, default=None, help="pixels, a multiple of the VQ factor")
    p.add_argument("--width", type=int, default=None, help="pixels, a multiple of the VQ factor")
    add_runtime_args(p)
    p.set_defaults(func=cmd_generate)


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="weights dtype (default: fp16 on GPU)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--json", action="store_true", help="print a JSON result line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amused", description="aMUSEd masked-token text-to-image generation")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate(sub)
    from .bench import add_command as add_bench
    from .data.emoji import add_command as add_emoji_data

    add_bench(sub)
    add_emoji_data(sub)
    try:
        from .training.cli import add_commands as add_training
    except ModuleNotFoundError as e:  # training extras (peft, accelerate) not installed
        if e.name and e.name.startswith("amused"):
            raise
        add_training = None
    if add_training is not None:
        add_training(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"amused {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
