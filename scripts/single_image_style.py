"""Single-image style on the embedded model, shown and measured (issue 17, item 4).

One image in a style the embedded model never saw: a drawing made here from one emoji (Google's "grinning
face", in the training data) redrawn as a three-tone blue ink stamp on cream paper (luminance posterised onto a
fixed ink palette). The documented recipe (`amused finetune --use_lora` on that one image and its caption) is run
as a user runs it; then 20 other emoji are generated with "NAME, ink style" before (the base model) and after
(the base model + the LoRA), seed 0, no selection. Two measures, before and after:

- style: the share of drawn pixels (not near-white, not near-cream) that lie near the ink palette (RGB distance
  < 60): the three ink tones; the base model draws in emoji colours, so this is near 0 before;
- recognisable: top-1 retrieval of the prompted emoji among all real images, as `amused eval` does, but on
  luminance thumbnails (16x16, centred, L2-normalised), so that a blue drawing of a red apple can still find the
  real red apple: a hit when the nearest real image shows the prompted emoji in any style.

With `--prior N` the recipe adds DreamBooth prior preservation (`--with_prior_preservation`): N class images the
base model draws of other emoji names, without the style word (emoji outside the 200 the 20 are chosen from, so
the measured prompts are never trained on), weighted `--prior-weight`.

With `--feedback-rounds R` the recipe becomes StyleDrop's iterative training with feedback (Sohn et al., 2023,
section 3.3; they scored with humans or CLIP, here with the two measures above): after a round, the round's LoRA
draws `--feedback-pool` other emoji (names after the class prompts in the same order, so disjoint from the 200 the
20 come from and from the class prompts), the images the retrieval recognises are ranked by their ink share, the
best `--feedback-keep` are written with their prompts (and the instance image) into an image folder with a
metadata.jsonl, and a fresh LoRA is trained on that folder (`amused finetune --train_data_dir`) with the same
settings, prior preservation included. The measured "after" is the last round's LoRA.

    python scripts/single_image_style.py --data data/emoji --out docs/results/single_image_style_cpu.json \\
        --grid docs/images/single_image_style.png
    python scripts/single_image_style.py --data data/emoji --pick recognised --prior 100 \\
        --out docs/results/single_image_style_cpu_prior.json
    python scripts/single_image_style.py --data data/emoji --prior 100 --feedback-rounds 1 --feedback-pool 200 \\
        --feedback-keep 20 --names-from docs/results/single_image_style_cpu_prior100_recognised.json \\
        --out docs/results/single_image_style_cpu_feedback.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from amused import AmusedPipeline
from amused.embedded import embedded_model_path
from amused.evaluate import load_images, load_rows
from amused.images import make_image_grid

PAPER = np.array([246, 240, 225])
INK = np.array([[20, 40, 110], [70, 110, 190], [160, 190, 235]])  # dark, mid, light ink
STYLE_WORD = "ink style"
INSTANCE_EMOJI = "grinning face"


def ink_drawing(image: Image.Image) -> Image.Image:
    """The instance image: an emoji redrawn as a three-tone ink stamp on cream paper."""
    rgb = np.asarray(image.convert("RGB")).astype(float)
    lum = rgb @ np.array([0.299, 0.587, 0.114])
    out = np.empty_like(rgb)
    out[:] = PAPER
    for k, (lo, hi) in enumerate(((0, 90), (90, 170), (170, 235))):
        out[(lum >= lo) & (lum < hi)] = INK[k]
    return Image.fromarray(out.astype(np.uint8))


def ink_share(images: torch.Tensor) -> float:
    """Share of drawn pixels (not white, not paper) within RGB distance 60 of an ink tone; (N, 3, H, W) in [0, 1]."""
    px = images.permute(0, 2, 3, 1).reshape(-1, 3).numpy() * 255
    background = (np.linalg.norm(px - 255, axis=1) < 40) | (np.linalg.norm(px - PAPER, axis=1) < 40)
    drawn = px[~background]
    if not len(drawn):
        return 0.0
    near = np.linalg.norm(drawn[:, None, :] - INK[None], axis=2).min(1) < 60
    return float(near.mean())


def ink_shares(images: torch.Tensor) -> list[float]:
    """`ink_share` of each image alone."""
    return [ink_share(image[None]) for image in images]


def pick_feedback(ink: list[float], recognised: list[bool], keep: int) -> list[int]:
    """StyleDrop's feedback on our two measures: of the images the retrieval recognises (content kept), the `keep`
    with the highest ink share (most style), best first. Returns indices; fewer than `keep` when fewer are
    recognised."""
    hits = [k for k, hit in enumerate(recognised) if hit]
    return sorted(hits, key=lambda k: -ink[k])[:keep]


def write_image_folder(folder: Path, images: list[Image.Image], captions: list[str]) -> None:
    """An image folder as `amused finetune --train_data_dir` reads it: NNNNN.png and metadata.jsonl (file_name,
    text)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as f:
        for k, (image, caption) in enumerate(zip(images, captions)):
            image.save(folder / f"{k:05d}.png")
            f.write(json.dumps({"file_name": f"{k:05d}.png", "text": caption}) + "\n")


def crop_views(image: Image.Image, n: int, seed: int = 0, min_side: float = 0.4) -> list[Image.Image]:
    """`n` views of the one image for training: the whole image, then random square crops (side a uniform
    `min_side`..1 of the image's) resized back to its size, each maybe mirrored and turned by a multiple of 90
    degrees. A LoRA trained on these sees the style's palette and strokes at many places and scales, and the
    drawing's layout less."""
    rng = np.random.default_rng(seed)
    side = image.width
    views = [image]
    for _ in range(n - 1):
        c = int(round(side * rng.uniform(min_side, 1.0)))
        x, y = (int(v) for v in rng.integers(0, side - c + 1, size=2))
        view = image.crop((x, y, x + c, y + c)).resize((side, side), Image.BILINEAR)
        if rng.random() < 0.5:
            view = view.transpose(Image.FLIP_LEFT_RIGHT)
        views.append(view.rotate(90 * int(rng.integers(4))))
    return views


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> RGB image."""
    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def luminance_features(images: torch.Tensor) -> torch.Tensor:
    lum = (images * torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]).sum(1, keepdim=True)
    thumbs = F.adaptive_avg_pool2d(lum, 16).flatten(1)
    return F.normalize(thumbs - thumbs.mean(1, keepdim=True), dim=1)


def generate(pipe, prompts: list[str], seed: int) -> torch.Tensor:
    """One image per prompt, each drawn alone from its own generator seeded `seed` (so a prompt's image does not
    depend on which others are drawn with it)."""
    out = [pipe(p, generator=torch.Generator().manual_seed(seed), output_type="np").images[0] for p in prompts]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/emoji")
    p.add_argument("--work", default="single_image_style")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--learning-rate", default="1e-3")
    p.add_argument("--targets", nargs="+", default=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
                   help="--lora_target_modules")
    p.add_argument("--rank", type=int, default=16, help="--lora_r (--lora_alpha is twice it)")
    p.add_argument("--scale", type=float, default=1.0, help="LoRA scale at generation")
    p.add_argument("--out", required=True)
    p.add_argument("--grid", default=None)
    p.add_argument("--pick", choices=["random", "recognised"], default="random",
                   help="the 20 emoji: a seeded random choice, or the first 20 (same seeded order) that the base "
                        "model draws recognisably with the style prompt (measures what the style keeps)")
    p.add_argument("--reuse", action="store_true", help="keep a LoRA already trained in --work (another --scale)")
    p.add_argument("--style-word", default=STYLE_WORD,
                   help="the style's words, after the emoji name in every prompt; '' for none: the adapter alone "
                        "carries the style, and the instance caption is the emoji's name as the base model knows it")
    p.add_argument("--random-resized-crop", type=float, default=None, metavar="MIN",
                   help="`amused finetune --random_resized_crop MIN --random_flip`: every step a random zoomed crop "
                        "of the one image, mirrored half the time")
    p.add_argument("--crops", type=int, default=0,
                   help="train on this many views of the one image (the image itself and random crops, mirrors and "
                        "quarter turns of it, all with its caption) in an image folder instead of the image alone")
    p.add_argument("--prior", type=int, default=0, help="prior preservation with this many class images (0: off)")
    p.add_argument("--prior-weight", default="1.0", help="--prior_loss_weight")
    p.add_argument("--class-dir", help="--class_data_dir (default: <work>/class_N); share one between runs to draw "
                                       "the class images once")
    p.add_argument("--eval-seeds", type=int, nargs="+", default=[0],
                   help="draw each prompt once per seed (the grid shows the first); --pick recognised chooses on seed "
                        "0, so seeds other than 0 measure the pick without its selection luck")
    p.add_argument("--names-from", help="an earlier result JSON: measure its 20 emoji (skips drawing the candidates "
                                        "of --pick recognised again; the pick depends on --style-word)")
    p.add_argument("--feedback-rounds", type=int, default=0,
                   help="StyleDrop's iterative training with feedback: this many more rounds, each a fresh LoRA on "
                        "the previous round's best images (0: off)")
    p.add_argument("--feedback-pool", type=int, default=200, help="emoji names the round's LoRA draws (seed 0)")
    p.add_argument("--feedback-keep", type=int, default=20,
                   help="of the pool images the retrieval recognises, this many with the most ink are trained on")
    p.add_argument("--feedback-scale", type=float, default=1.0, help="LoRA scale when drawing the pool")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = load_rows(args.data)
    source = next(r for r in rows if r["emoji"] == INSTANCE_EMOJI and r["style"] == "google" and not r.get("skin_tone"))
    instance = ink_drawing(Image.open(Path(args.data) / source["split"] / source["file_name"]))
    instance.save(work / "instance.png")

    def styled(name: str) -> str:  # "NAME, STYLE WORDS", or the name alone with --style-word ""
        return f"{name}, {args.style_word}" if args.style_word else name

    caption = styled(INSTANCE_EMOJI)
    # the 20 come from the first 200 of a seeded order of the emoji drawn in all three styles in training; class
    # prompts (prior preservation) from the rest of that order
    full = sorted({r["emoji"] for r in rows if r["split"] == "train" and not r.get("skin_tone")} - {INSTANCE_EMOJI})
    order = [full[k] for k in np.random.default_rng(0).permutation(len(full))]
    prior = []
    if args.prior:
        (work / "class_prompts.txt").write_text("".join(name + "\n" for name in order[200:200 + args.prior]))
        prior = ["--with_prior_preservation", "--class_data_dir", args.class_dir or str(work / f"class_{args.prior}"),
                 "--class_prompts_file", str(work / "class_prompts.txt"), "--num_class_images", str(args.prior),
                 "--prior_loss_weight", args.prior_weight]

    def finetune(data: list[str], output_dir: Path) -> list[str]:
        return [sys.executable, "-m", "amused.cli", "finetune", "--pretrained_model_name_or_path", "embedded",
                *data, "--resolution", "64", "--use_lora", "--lora_r", str(args.rank), "--lora_alpha", str(2 * args.rank),
                "--lora_target_modules", *args.targets,
                "--learning_rate", args.learning_rate, "--train_batch_size", "4", "--max_train_steps", str(args.steps),
                "--checkpointing_steps", "0", "--logging_steps", "50", "--output_dir", str(output_dir), *prior,
                *(["--random_resized_crop", str(args.random_resized_crop), "--random_flip"]
                  if args.random_resized_crop else [])]

    def train(cmd: list[str], output_dir: Path) -> float:
        started = time.perf_counter()
        if not (args.reuse and (output_dir / "pytorch_lora_weights.safetensors").is_file()):
            subprocess.run(cmd, check=True)
        return time.perf_counter() - started

    lora = work / "lora"
    if args.crops:
        views = crop_views(instance, args.crops)
        write_image_folder(work / "views", views, [caption] * len(views))
        cmd = finetune(["--train_data_dir", str(work / "views")], lora)
    else:
        cmd = finetune(["--instance_data_image", str(work / "instance.png"), "--instance_prompt", caption], lora)
    train_s = train(cmd, lora)

    pipe = AmusedPipeline.from_pretrained(embedded_model_path())
    real = load_images(args.data, rows)
    db = luminance_features(real)
    emoji = [r["emoji"] for r in rows]
    if args.names_from:
        earlier = json.loads(Path(args.names_from).read_text())
        names = earlier.get("names") or [q.rsplit(", ", 1)[0] for q in earlier["prompts"]]  # older files: no "names"
    elif args.pick == "random":
        names = order[:20]
    else:  # each candidate drawn alone with seed 0, as the measured images are drawn below
        names = []
        for name in order[:200]:
            image = generate(pipe, [styled(name)], 0)
            if emoji[int((luminance_features(image) @ db.T).argmax(1))] == name:
                names.append(name)
            if len(names) == 20:
                break
    prompts = [styled(n) for n in names]
    before = torch.cat([generate(pipe, prompts, seed) for seed in args.eval_seeds])  # (S * 20, 3, H, W)

    feedback = []
    pool_names = order[200 + args.prior:200 + args.prior + args.feedback_pool]  # after the class prompts
    for round_ in range(1, args.feedback_rounds + 1):
        folder, previous, lora = work / f"feedback_{round_}", lora, work / f"lora_round{round_ + 1}"
        if args.reuse and (folder / "feedback.json").is_file() and (lora / "pytorch_lora_weights.safetensors").is_file():
            feedback.append(json.loads((folder / "feedback.json").read_text()))  # another --scale: no new pool
            continue
        pipe.load_lora_weights(str(previous), scale=args.feedback_scale)
        pool = generate(pipe, [styled(n) for n in pool_names], 0)  # (pool, 3, H, W)
        pipe.unload_lora_weights()
        ink = ink_shares(pool)
        recognised = [emoji[j] == n for j, n in zip((luminance_features(pool) @ db.T).argmax(1).tolist(), pool_names)]
        kept = pick_feedback(ink, recognised, args.feedback_keep)
        write_image_folder(folder, [instance] + [to_pil(pool[k]) for k in kept],
                           [caption] + [styled(pool_names[k]) for k in kept])
        round_cmd = finetune(["--train_data_dir", str(folder)], lora)
        round_s = train(round_cmd, lora)
        feedback.append({"round": round_ + 1, "pool": len(pool_names), "pool_ink_share": ink_share(pool),
                         "pool_recognised": float(np.mean(recognised)), "kept": [pool_names[k] for k in kept],
                         "kept_ink_share": [round(ink[k], 4) for k in kept],
                         "command": shlex.join(["amused", *round_cmd[3:]]), "train_seconds": round(round_s, 1)})
        (folder / "feedback.json").write_text(json.dumps(feedback[-1], indent=1) + "\n")
        print(f"round {round_ + 1}: kept {len(kept)} of {len(pool_names)} (pool: ink {ink_share(pool):.1%}, "
              f"recognised {np.mean(recognised):.1%})", flush=True)

    pipe.load_lora_weights(str(lora), scale=args.scale)
    after = torch.cat([generate(pipe, prompts, seed) for seed in args.eval_seeds])

    result = {"pick": args.pick, "instance": {"source": source["text"], "caption": caption, "path": str(work / "instance.png")},
              "command": shlex.join(["amused", *cmd[3:]]), "train_seconds": round(train_s, 1),
              "lora_scale": args.scale, "prior_class_images": args.prior, "eval_seeds": args.eval_seeds, "names": names,
              "prompts": prompts}
    if feedback:
        result["feedback"] = {"scale": args.feedback_scale, "keep": args.feedback_keep, "rounds": feedback}
    for name, images in (("before", before), ("after", after)):
        nearest = (luminance_features(images) @ db.T).argmax(1).tolist()
        hits = [emoji[j] == n for j, n in zip(nearest, names * len(args.eval_seeds))]
        result[name] = {"ink_share": ink_share(images), "recognised": float(np.mean(hits)),
                        "neighbours": [[p_, rows[j]["text"]] for p_, j in zip(prompts * len(args.eval_seeds), nearest)]}
    result["instance"]["ink_share"] = ink_share(torch.from_numpy(np.array(instance)).permute(2, 0, 1)[None] / 255)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'':<8}{'ink share':>10}{'recognised':>12}   (20 emoji, '{args.style_word}', seeds "
          f"{' '.join(map(str, args.eval_seeds))})")
    for name in ("before", "after"):
        print(f"{name:<8}{result[name]['ink_share']:>10.1%}{result[name]['recognised']:>12.1%}")
    if args.grid:
        def tiles(images):
            return [to_pil(im).resize((128, 128), Image.NEAREST) for im in images]
        blank = Image.new("RGB", (128, 128), (255, 255, 255))
        big = instance.resize((128, 128), Image.NEAREST)
        grid = make_image_grid([big, *tiles(before[:10]), blank, *tiles(after[:10]),
                                big, *tiles(before[10:20]), blank, *tiles(after[10:20])], rows=4, cols=11)
        grid.save(args.grid)
        print("grid:", args.grid)


if __name__ == "__main__":
    main()
