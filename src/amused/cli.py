"""The `amused` command line: `amused generate "a red apple" --out apple.png`, and the other subcommands.

Each subcommand is a function taking the parsed arguments; heavy imports happen inside them so `--help`
answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .runtime import add_output_args, add_runtime_args, check_seed, engine_from_args

EXAMPLES = {
    "generate": """examples:
  amused generate "red apple, openmoji style" --out apple.png
  amused generate "a cat" --model amused/amused-256 --seed 3 --out cat.png --steps 12 --guidance-scale 10
  amused generate --prompts-file prompts.txt --num-images 4 --out-dir out/ --grid grid.png
  amused generate --from-image out/0003_red-apple.png --out again.png
""",
}

def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt and args.prompts_file:
        raise ValueError("give a PROMPT or --prompts-file, not both")
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts-file {path} does not exist")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts-file {path} holds no prompt")
        return prompts
    if args.prompt is None:
        raise ValueError("give a PROMPT, --prompts-file or --from-image")
    return [args.prompt]


def sampling_kwargs(args: argparse.Namespace) -> dict:
    kwargs = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                  guidance_scale=args.guidance_scale, height=args.height, width=args.width, sampler=args.sampler)
    if args.temperature is not None:
        if len(args.temperature) > 2:
            raise ValueError("--temperature takes one or two numbers (start [end])")
        kwargs["temperature"] = tuple(args.temperature) if len(args.temperature) == 2 else args.temperature[0]
    return kwargs


def cmd_generate(args: argparse.Namespace) -> int:
    """Prompts x --num-images images, generated --batch-size at a time (one pipeline call per batch).

    Under `accelerate launch` (or torchrun) the batches are dealt out over the processes, one per GPU or CPU
    process; batch k is seeded seed + k whichever process makes it, so the files are the ones a single process
    writes, pixel for pixel. A rerun skips every batch whose images exist with the same recorded settings."""
    from tqdm import tqdm

    from .images import make_image_grid, save_image
    from .loading import clean_stale_temps

    if args.from_image:
        return regenerate(args)
    started = time.perf_counter()
    prompts = read_prompts(args)
    if args.num_images < 1 or args.batch_size < 1:
        raise ValueError("--num-images and --batch-size must be >= 1")
    jobs = [p for p in prompts for _ in range(args.num_images)]
    single = len(jobs) == 1 and args.out_dir is None
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.out).parent
    check_outputs(args, single, out_dir)  # before any model is loaded
    check_seed(args.seed + (len(jobs) - 1) // args.batch_size, "--seed")
    share = process_share(args)
    batches = [jobs[i:i + args.batch_size] for i in range(0, len(jobs), args.batch_size)]
    paths = [[Path(args.out) if single else out_dir / f"{b * args.batch_size + i:04d}_{_slug(prompt)}.png"
              for i, prompt in enumerate(batch)] for b, batch in enumerate(batches)]
    if share.rank == 0:
        clean_stale_temps(out_dir)  # temp files a killed earlier run left (the images themselves are never partial)
    engine = engine_from_args(args, expected_images=len(jobs) // share.world, lora=args.lora,
                              lora_scale=args.lora_scale)
    loaded = first_done = time.perf_counter()
    pipe = engine.pipe
    kwargs = sampling_kwargs(args)
    steps, guidance, temperature = pipe.resolve_defaults(args.steps, args.guidance_scale, kwargs.get("temperature"))
    sampler = pipe.resolve_sampler(args.sampler)
    settings = {"model": engine.model_name, "steps": steps, "guidance_scale": guidance,
                "composed_guidance": pipe.composed_guidance and pipe.composed_guidance.to_config(),  # the model's
                "temperature": list(temperature) if isinstance(temperature, tuple) else temperature,
                "negative_prompt": args.negative_prompt, "height": args.height, "width": args.width,
                "lora": args.lora, "lora_scale": args.lora_scale if args.lora else None, "sampler": sampler,
                **stream_metadata(engine)}

    def meta(b: int, i: int) -> dict:
        return {"prompt": batches[b][i], "seed": args.seed + b, "batch_prompts": batches[b], "batch_index": i,
                **settings}

    mine = [b for b in range(share.rank, len(batches), share.world)]
    todo = [b for b in mine if single or not all(_recorded_as(path, meta(b, i)) for i, path in enumerate(paths[b]))]
    made = 0
    # PNG encoding (zlib, which releases the GIL) runs on a few threads while the device makes the next batch:
    # written one by one it took longer than the generation itself (docs/results/user_facing_*.json)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as saver:
        saved = []
        for k, b in enumerate(tqdm(todo, desc="generate", unit="batch", disable=args.quiet or args.json or
                                   len(todo) <= 1)):
            # one generator per batch call, seeded seed + batch: the PNG records both, to replay it exactly
            out = pipe(batches[b], generator=engine.generator(args.seed + b), **kwargs).images
            saved += [saver.submit(save_image, image, paths[b][i], meta(b, i)) for i, image in enumerate(out)]
            made += len(out)
            if k == 0:
                first_done = time.perf_counter()
        for future in saved:
            future.result()  # a failed write fails the command
    done = time.perf_counter()
    share.wait_for_everyone()  # the grid and the report need every process's images
    if share.rank != 0:
        return 0
    written = [str(path) for batch_paths in paths for path in batch_paths]
    if args.grid:
        from .images import load_image

        images = [load_image(path) for path in written]
        save_image(make_image_grid(images, cols=args.num_images if len(prompts) > 1 else None), args.grid,
                   {"prompts": prompts})
    if args.json:
        rest = made - (len(batches[todo[0]]) if todo else 0)
        print(json.dumps({"images": written, "grid": str(args.grid) if args.grid else None, "prompts": prompts,
                          "seed": args.seed, "fast": engine.fast, "device": str(engine.device),
                          "processes": share.world, "made_here": made, "skipped_batches": len(mine) - len(todo),
                          "seconds": {"load": round(loaded - started, 3), "first_batch": round(first_done - loaded, 3),
                                      "rest": round(done - first_done, 3), "total": round(done - started, 3)},
                          "images_per_s_after_first_batch": round(rest / (done - first_done), 2) if rest > 0
                          else None}))
    elif not args.quiet:
        where = written[0] if len(written) == 1 else f"{len(written)} images to {out_dir}"
        skipped = sum(len(paths[b]) for b in mine) - made
        print(f"wrote {where}" + (f" and the grid to {args.grid}" if args.grid else "") +
              (f" ({skipped} already there with the same settings: kept)" if skipped else ""))
    return 0


def _recorded_as(path: Path, meta: dict) -> bool:
    """Whether `path` is a PNG that recorded exactly these settings (a rerun keeps it)."""
    import PIL.Image

    try:
        with PIL.Image.open(path) as image:
            return json.loads(image.info.get("amused", "null")) == json.loads(json.dumps(meta))
    except (OSError, ValueError):
        return False


class ProcessShare:
    """This process's share of a multi-process run (`accelerate launch`, torchrun): rank and world size."""

    def __init__(self, rank: int = 0, world: int = 1, group=None):
        self.rank, self.world, self._group = rank, world, group

    def wait_for_everyone(self) -> None:
        if self._group is not None:
            self._group.barrier()
            self._group.destroy_process_group()


def process_share(args: argparse.Namespace) -> ProcessShare:
    """One process, or this one's place among the WORLD_SIZE processes a launcher (accelerate launch, torchrun)
    started; with --device auto each process takes its own GPU (LOCAL_RANK). A gloo group serves only as the
    barrier before the grid and the report."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ProcessShare()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    if args.device == "auto" and torch.cuda.is_available():
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return ProcessShare(dist.get_rank(), world, dist)


def check_outputs(args: argparse.Namespace, single: bool, out_dir: Path | None) -> None:
    """Refuse unusable output paths before any work: a folder or device where a PNG should go, a suffix other
    than .png, a folder that cannot be written, --out-dir naming a file."""
    from .images import check_output_path

    if single:
        check_output_path(args.out, "--out")
    elif out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"--out-dir {out_dir} is a file, not a folder")
        check_output_path(out_dir / "0000_image.png", "--out-dir")
    if getattr(args, "grid", None):
        check_output_path(args.grid, "--grid")


def stream_metadata(engine) -> dict:
    """What a PNG records of the random stream, so `--from-image` draws from the same one."""
    return {"stream": "reference" if engine.reference_stream else "device",
            "device": engine.device.type, "dtype": str(engine.pipe.dtype).removeprefix("torch.")}


def regenerate(args: argparse.Namespace) -> int:
    """Replay the batch recorded in a PNG's metadata and write the same image again (same device and stream)."""
    from .images import load_image, save_image
    from .replay import confirm_model, parse_recorded

    source = f"--from-image {args.from_image}"
    check_outputs(args, True, None)
    recorded = parse_recorded(load_image(args.from_image, name="--from-image").info.get("amused"), source)
    model, lora = confirm_model(recorded, args.model, args.lora, args.use_recorded_model, source)
    if recorded.stream == "reference":
        args.reference_stream = True  # drawn from diffusers' stream: replay from it, on any device
    args.model = model
    engine = engine_from_args(args, lora=lora, lora_scale=args.lora_scale if args.lora else recorded.lora_scale)
    out = engine.pipe(recorded.prompts, negative_prompt=recorded.negative_prompt,
                      num_inference_steps=recorded.steps, guidance_scale=recorded.guidance_scale,
                      temperature=recorded.temperature, height=recorded.height, width=recorded.width,
                      sampler=recorded.sampler, generator=engine.generator(recorded.seed)).images
    save_image(out[recorded.batch_index], args.out, recorded.raw)
    if not args.quiet:
        print(f"wrote {args.out}")
    return 0


def _slug(text: str, limit: int = 40) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(filter(None, keep.split("-")))[:limit] or "image"


def add_sampler_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", default=None, choices=["confidence", "halton"],
                   help="which samples stay revealed each step: the most confident (MaskGIT) or a fixed Halton order "
                        "of positions (default: the model's, else confidence)")


def add_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="text to image", epilog=EXAMPLES["generate"],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", default=None, help="what to draw")
    p.add_argument("--prompts-file", default=None, help="a text file, one prompt a line")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (default 8)")
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the embedded model)")
    p.add_argument("--out", type=Path, default=Path("out.png"), help="output PNG for a single image (default out.png)")
    p.add_argument("--out-dir", default=None, help="folder for several images (default: beside --out)")
    p.add_argument("--grid", type=Path, default=None, help="also write all images as one grid PNG")
    p.add_argument("--from-image", type=Path, default=None, help="regenerate from a PNG's recorded settings")
    p.add_argument("--use-recorded-model", action="store_true",
                   help="with --from-image: load the model and LoRA the PNG names (only files you trust)")
    p.add_argument("--lora", default=None, help="LoRA weights (file or folder) to load")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the first batch (batch k uses seed + k)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None, help="decoding steps (default: the model's, else 12)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance (default: the model's, else 10)")
    p.add_argument("--temperature", type=float, nargs="+", default=None, metavar="T",
                   help="start [end] of the temperature ramp (default: the model's, else 2 0)")
    p.add_argument("--height", type=int, default=None, help="pixels, a multiple of the VQ factor")
    p.add_argument("--width", type=int, default=None, help="pixels, a multiple of the VQ factor")
    add_sampler_arg(p)
    add_runtime_args(p)
    add_output_args(p)
    p.set_defaults(func=cmd_generate)


def cmd_edit(args: argparse.Namespace) -> int:
    """img2img, inpaint and variations: an input image, a prompt, several seeds."""
    from PIL import Image
    from tqdm import tqdm

    from .images import load_image, make_image_grid, save_image
    from .loading import clean_stale_temps
    from .replay import parse_recorded

    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    check_outputs(args, True, None)
    check_seed(args.seed + args.num_images - 1, "--seed")
    # EXIF orientation applied, 16-bit scaled, transparency on white: as the API and training read images
    source = load_image(args.image, name="IMAGE")
    clean_stale_temps(Path(args.out).parent)  # temp files a killed earlier run left
    prompt = args.prompt
    if prompt is None:  # variations (or no prompt given): reuse the prompt recorded in the PNG, else none
        text = source.info.get("amused")
        prompt = parse_recorded(text, f"{args.image}").prompts[0] if text else ""
    kwargs = sampling_kwargs(args)
    kwargs.pop("height"), kwargs.pop("width")
    if args.width or args.height:
        from .images import max_image_pixels

        size = (args.width or source.width, args.height or source.height)
        if min(size) < 1 or size[0] * size[1] > max_image_pixels():
            raise ValueError(f"--width/--height {size[0]}x{size[1]}: the resized input must have 1 to "
                             f"{max_image_pixels():,} pixels")
        source = source.resize(size, Image.LANCZOS)
    if args.command == "inpaint":
        if getattr(args, "extend", None) is not None:  # outpainting: a wider canvas, its new border masked
            if args.mask is not None or args.rect is not None:
                raise ValueError("inpaint needs exactly one of --mask, --rect or --extend")
            source, kwargs["mask_image"] = _extend(args.extend, source)
        else:
            kwargs["mask_image"] = _mask(args, source.size)  # checked before the model loads
    else:
        kwargs["strength"] = args.strength
    engine = engine_from_args(args, expected_images=args.num_images)
    pipe = engine.task("inpaint" if args.command == "inpaint" else "img2img")
    images = []
    for i in tqdm(range(args.num_images), desc=args.command, unit="image",
                  disable=args.quiet or args.json or args.num_images == 1):
        images.append(pipe(prompt, image=source, generator=engine.generator(args.seed + i), **kwargs).images[0])
    paths = [args.out] if args.num_images == 1 else [
        args.out.with_name(f"{args.out.stem}_{i}{args.out.suffix}") for i in range(args.num_images)]
    for i, (path, image) in enumerate(zip(paths, images)):
        save_image(image, path, {"task": args.command, "prompt": prompt, "seed": args.seed + i,
                                 "source": str(args.image), "strength": kwargs.get("strength"),
                                 "extend": args.extend if args.command == "inpaint" else None,
                                 "sampler": pipe.resolve_sampler(args.sampler), **stream_metadata(engine)})
    if args.grid:
        save_image(make_image_grid([source.resize(images[0].size)] + images), args.grid)
    if args.json:
        print(json.dumps({"images": [str(p) for p in paths], "grid": str(args.grid) if args.grid else None,
                          "prompt": prompt}))
    elif not args.quiet:
        print("wrote " + ", ".join(str(p) for p in paths) + (f" and the grid to {args.grid}" if args.grid else ""))
    return 0


def _mask(args: argparse.Namespace, size: tuple[int, int]):
    """The inpainting mask: a mask image, or a rectangle given on the command line (white = regenerate)."""
    from PIL import Image

    from .images import load_image

    if (args.mask is None) == (args.rect is None):
        raise ValueError("inpaint needs exactly one of --mask, --rect or --extend")
    if args.mask is not None:
        return load_image(args.mask, mode="L", name="--mask")
    x0, y0, x1, y1 = args.rect
    if not (0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]):
        raise ValueError(f"--rect {x0} {y0} {x1} {y1} must satisfy 0 <= x0 < x1 <= {size[0]} and "
                         f"0 <= y0 < y1 <= {size[1]} (the image is {size[0]}x{size[1]})")
    mask = Image.new("L", size, 0)
    mask.paste(255, (x0, y0, x1, y1))
    return mask


def _extend(extend: list[int], image):
    """--extend L R T B: the image on a canvas grown by those pixels, and the mask of the new border."""
    from .outpaint import outpaint

    left, right, top, bottom = extend
    try:
        return outpaint(image, left=left, right=right, top=top, bottom=bottom)
    except ValueError as e:
        raise ValueError(f"--extend: {e}") from None


def add_edit_commands(subparsers) -> None:
    specs = {
        "img2img": ("re-generate part of an image's tokens from a prompt",
                    'amused img2img apple.png "green apple, google style" --strength 0.5 --out green.png'),
        "inpaint": ("re-generate the tokens under a mask (image, --rect), or outpaint (--extend)",
                    'amused inpaint face.png "face with tears of joy, google style" --rect 16 32 48 56 --out joy.png\n'
                    '  amused inpaint photo.png "fall mountains" --extend 256 256 0 0 --model DIR --out wide.png'),
        "variations": ("several img2img variations of an image, with its recorded prompt",
                       "amused variations apple.png --num-images 4 --strength 0.4 --out var.png --grid var_grid.png"),
    }
    for name, (help_text, example) in specs.items():
        p = subparsers.add_parser(name, help=help_text, epilog=f"example:\n  {example}",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("image", type=Path, help="input image")
        p.add_argument("prompt", nargs="?", default=None,
                       help="what to draw" + (" (default: the PNG's recorded prompt)" if name == "variations" else ""))
        if name == "inpaint":
            p.add_argument("--mask", type=Path, default=None, help="mask image, white where to regenerate")
            p.add_argument("--rect", type=int, nargs=4, default=None, metavar=("X0", "Y0", "X1", "Y1"),
                           help="regenerate this pixel rectangle instead of a mask image")
            p.add_argument("--extend", type=int, nargs=4, default=None, metavar=("L", "R", "T", "B"),
                           help="outpaint: grow the canvas by these pixels left, right, top, bottom and draw the new "
                                "border (the output is that much larger)")
        else:
            strength = 0.5 if name == "img2img" else 0.4
            p.add_argument("--strength", type=float, default=strength,
                           help=f"fraction of the schedule to run, in (0, 1] (default {strength})")
        p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the embedded model)")
        p.add_argument("--out", type=Path, default=Path(f"{name}.png"), help="output PNG")
        p.add_argument("--num-images", type=int, default=1, help="images, seeds seed..seed+n-1")
        p.add_argument("--grid", type=Path, default=None, help="also write input + outputs as one grid PNG")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--negative-prompt", default=None)
        p.add_argument("--steps", type=int, default=None)
        p.add_argument("--guidance-scale", type=float, default=None)
        p.add_argument("--temperature", type=float, nargs="+", default=None, metavar="T")
        p.add_argument("--height", type=int, default=None, help="resize the input first")
        p.add_argument("--width", type=int, default=None, help="resize the input first")
        add_sampler_arg(p)
        add_runtime_args(p)
        add_output_args(p)
        p.set_defaults(func=cmd_edit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amused", description="aMUSEd masked-token text-to-image generation")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate(sub)
    add_edit_commands(sub)
    from .bench import add_command as add_bench
    from .data.emoji import add_command as add_emoji_data
    from .demo import add_command as add_demo
    from .evaluate import add_command as add_eval
    from .server import add_command as add_serve

    add_bench(sub)
    add_eval(sub)
    add_demo(sub)
    add_serve(sub)
    add_emoji_data(sub)
    try:
        from .training.cli import add_commands as add_training
    except ModuleNotFoundError as e:  # training extras (peft, accelerate) not installed
        if e.name and e.name.startswith("amused"):
            raise
        add_training = None
    if add_training is not None:
        add_training(sub)
    parser.allow_abbrev = False  # "--guidance 3" must not silently mean --guidance-scale
    for command in sub.choices.values():
        command.allow_abbrev = False
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, TypeError, FloatingPointError) as e:
        close_progress_bars()
        print(f"amused {args.command}: error: {error_line(e)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # RuntimeError: only the allocators' out-of-memory errors
        if not isinstance(e, MemoryError) and "out of memory" not in str(e) and "can't allocate" not in str(e):
            raise
        close_progress_bars()
        print(f"amused {args.command}: error: out of memory ({error_line(e)[:200] or 'MemoryError'}); ask for "
              f"fewer or smaller images, or a smaller --batch-size", file=sys.stderr)
        return 2


def close_progress_bars() -> None:
    """End the progress bars a failed command left open (training's), so that its error starts a line of its own
    and is the last line printed (tqdm would print the bar again at exit)."""
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def error_line(error: BaseException) -> str:
    """An error as one line. An error from a DataLoader worker arrives wrapped ("Caught ImageError in DataLoader
    worker process 0. Original Traceback ..."): its last line is the original error."""
    text = str(error)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        kind, _, message = last.partition(": ")
        text = message if message and kind.split(".")[-1].isidentifier() else last
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
