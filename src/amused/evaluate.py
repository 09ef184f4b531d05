"""`amused eval`: the quality figures of a text-to-image checkpoint on the emoji data (`amused build-emoji-data`).

Two measurements (docs/embedded_model.md gives the embedded model's figures and the reasoning):

- VQGAN reconstruction PSNR: encode to token ids, decode, mean per-image PSNR (dB, pixels in [0, 1]) on the
  held-out images and on a fixed sample of training images (the same definition as `amused train-vqgan`).
- Prompt adherence as top-1 retrieval accuracy: generate one image per caption; its nearest real image (all
  images of the evaluated styles, train + held-out) is a hit when it shows the prompted emoji (same `emoji`
  field: the base name, so skin-tone variants of one emoji count as the same emoji). Three caption sets:
  a sample of training captions ("red apple, google style"), the held-out (emoji, style) pairs, and the
  *names*: every training emoji's base name as a person types it ("red apple", "dog face"; no style, no skin
  tone), a hit when the neighbour shows that emoji in any style. The feature space is a
  16x16 RGB thumbnail (area-downsampled, on white), centred on its own mean and L2-normalised: the cosine
  is then the Pearson correlation of two thumbnails. Among cheap offline candidates (8 to 32 px thumbnails,
  grey, database- or image-centred, VQGAN encoder latents pooled to 2..16 px) it separated real images from
  random ones best at no cost; the VQGAN latents were no better and take 40 ms an image on a CPU.
  The scale: the same metric for images decoded from uniformly random token grids (the floor), for the real
  image of each caption with itself excluded (skin-tone siblings of the same style are then often nearest),
  and for the real image with every drawing of its emoji in its own style excluded (does another style's
  drawing come nearest: how far pixel similarity carries across styles).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .images import flatten_alpha

STYLES = ("google", "twitter", "openmoji")  # what the embedded model was trained on; noto is left out
FEATURE_SIZE = 16  # thumbnail side of the retrieval feature space
GRID_EMOJI = ("red apple", "cat face", "grinning face", "red heart", "rocket", "pizza", "ghost", "dog face")


# ----------------------------------------------------------------------------------------------------------
# Data


def load_rows(data_dir: str | Path, styles=STYLES) -> list[dict]:
    """The metadata rows of train/ and heldout/ in the given styles, each with a `split` key added.

    Raises:
        FileNotFoundError: naming --data, when the folder was not built.
    """
    data_dir = Path(data_dir)
    if not (data_dir / "train" / "metadata.jsonl").is_file():
        raise FileNotFoundError(f"--data {data_dir}: no emoji data there (expected train/metadata.jsonl and "
                                f"heldout/metadata.jsonl); build it with `amused build-emoji-data --out {data_dir}`")
    rows = []
    for split in ("train", "heldout"):
        path = data_dir / split / "metadata.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("style") in styles:
                    rows.append({**row, "split": split})
    if not rows:
        raise ValueError(f"--data {data_dir}: no images in the styles {', '.join(styles)}")
    return rows


def load_images(data_dir: str | Path, rows: list[dict]) -> torch.Tensor:
    """(N, 3, H, W) float images in [0, 1]; transparent ones are composited on white."""
    from PIL import Image

    arrays = []
    for row in rows:
        image = Image.open(Path(data_dir) / row["split"] / row["file_name"])
        arrays.append(np.asarray(flatten_alpha(image)))
    sizes = {a.shape for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"images of several sizes in the data: {sorted(sizes)}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def sample_rows(rows: list[dict], n: int, seed: int) -> list[int]:
    """Indices of a fixed, seeded sample of n rows (all of them when n >= len(rows)), in file order."""
    if n >= len(rows):
        return list(range(len(rows)))
    return sorted(np.random.default_rng(seed).choice(len(rows), n, replace=False).tolist())


# ----------------------------------------------------------------------------------------------------------
# Metrics


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) images in [0, 1]; inf for identical images."""
    mse = (a.float().clamp(0, 1) - b.float().clamp(0, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse)


def features(images: torch.Tensor, size: int = FEATURE_SIZE) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] -> (B, 3 * size * size) thumbnails, each centred on its mean and L2-normalised
    (the dot product of two is their Pearson correlation)."""
    thumbs = F.adaptive_avg_pool2d(images.float(), size).flatten(1)  # area downsampling (B, 3*s*s)
    return F.normalize(thumbs - thumbs.mean(1, keepdim=True), dim=1)


def nearest(queries: torch.Tensor, database: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Index of each query's nearest database vector by cosine; `exclude` (Q, N) bool masks out candidates."""
    sims = queries @ database.T  # (Q, N)
    if exclude is not None:
        sims = sims.masked_fill(exclude, float("-inf"))
    return sims.argmax(1)


def name_rows(rows: list[dict], limit: int | None = None) -> list[dict]:
    """The *names* caption set: one query per emoji of the training split, its base name as the prompt (no style,
    no skin tone), sorted by name; `style` None (any style is a hit). `limit` takes the first names only."""
    names = sorted({r["emoji"] for r in rows if r["split"] == "train"})
    return [{"text": name, "emoji": name, "style": None, "skin_tone": None} for name in names[:limit]]


def retrieval_scores(neighbours: torch.Tensor, query_rows: list[dict], db_rows: list[dict],
                     exclude: torch.Tensor | None = None) -> dict:
    """Top-1 accuracies of a retrieval: emoji (same base name), style (over queries that name one; None when
    none does), both at once (the prompted emoji in the prompted style; over the same queries), the emoji accuracy
    on captions without a skin tone, and chance (the emoji accuracy of a uniformly random candidate)."""
    db_emoji = np.array([r["emoji"] for r in db_rows], dtype=object)
    hits, style_hits, both_hits, plain, chance = [], [], [], [], []
    for i, (j, row) in enumerate(zip(neighbours.tolist(), query_rows)):
        hits.append(db_rows[j]["emoji"] == row["emoji"])
        if row.get("style") is not None:
            style_hits.append(db_rows[j]["style"] == row["style"])
            both_hits.append(hits[-1] and style_hits[-1])
        if not row.get("skin_tone"):
            plain.append(hits[-1])
        allowed = np.ones(len(db_rows), bool) if exclude is None else ~exclude[i].numpy()
        chance.append((db_emoji[allowed] == row["emoji"]).sum() / max(allowed.sum(), 1))
    return {"n": len(query_rows), "emoji_accuracy": float(np.mean(hits)),
            "style_accuracy": float(np.mean(style_hits)) if style_hits else None,
            "both_accuracy": float(np.mean(both_hits)) if both_hits else None,
            "emoji_accuracy_no_skin_tone": float(np.mean(plain)) if plain else None, "n_no_skin_tone": len(plain),
            "chance": float(np.mean(chance)),
            "neighbours": [[row["text"], db_rows[j]["text"]] for j, row in zip(neighbours.tolist(), query_rows)]}


def heldout_breakdown(retrieval: dict, rows: list[dict]) -> dict | None:
    """Where the held-out pairs' hits come from, out of `retrieval`'s neighbour lists (None unless both the
    held-out pairs and the names were evaluated): the names accuracy on the held-out pairs' emoji alone (does the
    model know those emoji?), the held-out hits whose neighbour is in the prompted style (the unseen drawing or its
    skin-tone siblings) or in another style, and how many (emoji, style) pairs were hit at least once."""
    held, names = retrieval.get("generated_heldout"), retrieval.get("generated_names")
    if held is None or names is None:
        return None
    by_text = {r["text"]: r for r in rows}
    held_emoji = {by_text[q]["emoji"] for q, _ in held["neighbours"]}
    known = [by_text[n]["emoji"] == q for q, n in names["neighbours"] if q in held_emoji]
    same = other = 0
    pairs, hit_pairs = set(), set()
    for q, n in held["neighbours"]:
        query, found = by_text[q], by_text[n]
        pairs.add((query["emoji"], query["style"]))
        if found["emoji"] == query["emoji"]:
            hit_pairs.add((query["emoji"], query["style"]))
            same += found["style"] == query["style"]
            other += found["style"] != query["style"]
    return {"names_of_heldout_emoji": {"n": len(known), "emoji_accuracy": float(np.mean(known)) if known else None},
            "heldout_hits_in_prompted_style": same, "heldout_hits_in_other_style": other,
            "pairs": len(pairs), "pairs_hit": len(hit_pairs)}


# ----------------------------------------------------------------------------------------------------------
# Images from the model


@torch.inference_mode()
def generate(pipe, prompts: list[str], seed: int, guidance_scale: float, temperature, steps: int,
             batch_size: int, sampler: str | None = None) -> torch.Tensor:
    """(N, 3, H, W) images in [0, 1], one per prompt; one generator seeded once, batches in order."""
    from tqdm.auto import tqdm

    from .runtime import make_generator

    generator = make_generator(pipe.device, seed)
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="eval: generate", unit="batch", leave=False):
        images = pipe(prompts[i:i + batch_size], generator=generator, guidance_scale=guidance_scale,
                      temperature=temperature, num_inference_steps=steps, output_type="np", sampler=sampler).images
        out.append(torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float())  # (B, 3, H, W)
    return torch.cat(out)


@torch.inference_mode()
def random_images(pipe, n: int, seed: int, batch_size: int) -> torch.Tensor:
    """(n, 3, H, W) images decoded from uniformly random token grids of the model's native size."""
    size = pipe.transformer.config.sample_size
    codes = pipe.vqvae.config.num_vq_embeddings
    ids = torch.randint(0, codes, (n, size, size), generator=torch.Generator().manual_seed(seed))
    return torch.cat([pipe.vqvae.decode(ids[i:i + batch_size].to(pipe.device)).float().cpu()
                      for i in range(0, n, batch_size)])


@torch.inference_mode()
def reconstruct(pipe, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """VQGAN round trip (encode to ids, decode) of (N, 3, H, W) images in [0, 1]."""
    vq = pipe.vqvae
    return torch.cat([vq.decode(vq.encode(images[i:i + batch_size].to(pipe.device, vq.dtype))).float().cpu()
                      for i in range(0, len(images), batch_size)])


# ----------------------------------------------------------------------------------------------------------
# The evaluation


def evaluate(pipe, data_dir: str | Path, num_train: int = 200, seed: int = 0, guidance_scale: float | None = None,
             temperature=None, steps: int | None = None, batch_size: int = 32, log=print,
             sampler: str | None = None, num_names: int | None = None) -> dict:
    """All figures of `amused eval` as a JSON-ready dict (see the module docstring). Sampling settings left as
    None are the model's own defaults (its generation_config.json), as `amused generate` uses them.
    `num_names`: how many of the names (sorted) to evaluate; None for all of them, 0 for none."""
    t0 = time.perf_counter()
    steps, guidance_scale, temperature = pipe.resolve_defaults(steps, guidance_scale, temperature)
    sampler = pipe.resolve_sampler(sampler)
    generating = 0.0  # seconds spent generating (the time the sampler settings change)
    rows = load_rows(data_dir)
    log(f"loading {len(rows)} real images ({', '.join(STYLES)}; train + held-out) from {data_dir}")
    images = load_images(data_dir, rows)  # (N, 3, H, W)
    db = features(images)
    train_idx = [i for i, r in enumerate(rows) if r["split"] == "train"]
    held_idx = [i for i, r in enumerate(rows) if r["split"] == "heldout"]
    train_idx = [train_idx[k] for k in sample_rows([rows[i] for i in train_idx], num_train, seed)]
    sets = {"train": train_idx, "heldout": held_idx}
    emoji = np.array([r["emoji"] for r in rows], dtype=object)
    style = np.array([r["style"] for r in rows], dtype=object)

    results = {"psnr": {}, "retrieval": {}}
    log("VQGAN reconstruction")
    for name, idx in sets.items():
        if idx:
            values = psnr(reconstruct(pipe, images[idx], batch_size), images[idx])
            results["psnr"][name] = {"n": len(idx), "psnr_db": float(values.mean())}

    for name, idx in sets.items():
        if not idx:
            continue
        log(f"generating {len(idx)} images for the {name} captions")
        started = time.perf_counter()
        gen = generate(pipe, [rows[i]["text"] for i in idx], seed, guidance_scale, temperature, steps, batch_size,
                       sampler)
        generating += time.perf_counter() - started
        query_rows = [rows[i] for i in idx]
        results["retrieval"][f"generated_{name}"] = retrieval_scores(nearest(features(gen), db), query_rows, rows)
        self_mask = torch.zeros(len(idx), len(rows), dtype=torch.bool)
        self_mask[torch.arange(len(idx)), torch.tensor(idx)] = True
        results["retrieval"][f"real_{name}"] = retrieval_scores(nearest(db[idx], db, self_mask), query_rows, rows,
                                                                self_mask)

    names = name_rows(rows, num_names)
    if names:
        log(f"generating {len(names)} images for the emoji names (no style)")
        started = time.perf_counter()
        gen = generate(pipe, [r["text"] for r in names], seed, guidance_scale, temperature, steps, batch_size, sampler)
        generating += time.perf_counter() - started
        results["retrieval"]["generated_names"] = retrieval_scores(nearest(features(gen), db), names, rows)
        breakdown = heldout_breakdown(results["retrieval"], rows)
        if breakdown is not None:
            results["heldout_breakdown"] = breakdown

    both = train_idx + held_idx
    both_rows = [rows[i] for i in both]
    log(f"decoding {len(both)} random token grids")
    rand = random_images(pipe, len(both), seed, batch_size)
    results["retrieval"]["random"] = retrieval_scores(nearest(features(rand), db), both_rows, rows)
    same_drawing = torch.from_numpy((emoji[both][:, None] == emoji[None, :]) & (style[both][:, None] == style[None, :]))
    results["retrieval"]["real_other_styles"] = retrieval_scores(nearest(db[both], db, same_drawing), both_rows, rows,
                                                                 same_drawing)
    space = f"{FEATURE_SIZE}x{FEATURE_SIZE} RGB thumbnail (area), centred on its own mean, L2-normalised; cosine"
    results["database"] = {"images": len(rows), "styles": list(STYLES), "feature_space": space}
    results["settings"] = {"num_train": len(train_idx), "num_heldout": len(held_idx), "num_names": len(names),
                           "seed": seed,
                           "guidance_scale": guidance_scale, "steps": steps, "batch_size": batch_size,
                           "composed_guidance": pipe.composed_guidance and pipe.composed_guidance.to_config(),
                           "sampler": sampler, "device": pipe.device.type,
                           "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
                           "temperature": list(temperature) if isinstance(temperature, (tuple, list)) else temperature}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    n = len(train_idx) + len(held_idx) + len(names)
    results["generation"] = {"images": n, "seconds": round(generating, 2),
                             "ms_per_image": round(1000 * generating / n, 2) if n else None}
    return results


# ----------------------------------------------------------------------------------------------------------
# Report and sample grid

ROWS = [("generated", "generated_names", "names, no style"), ("generated", "generated_train", "train"),
        ("generated", "generated_heldout", "held-out"),
        ("random token grids", "random", "train + held-out"), ("real, itself excluded", "real_train", "train"),
        ("real, itself excluded", "real_heldout", "held-out"),
        ("real, own style's drawings excluded", "real_other_styles", "train + held-out")]


def format_table(results: dict) -> str:
    lines = ["VQGAN reconstruction PSNR (mean over images)"]
    for name, label in (("heldout", "held-out"), ("train", "train sample")):
        if name in results["psnr"]:
            r = results["psnr"][name]
            lines.append(f"  {label:<14}{r['n']:>5} images  {r['psnr_db']:6.2f} dB")
    db = results["database"]
    lines += ["", f"Prompt adherence: top-1 retrieval among {db['images']} real images ({db['feature_space']})",
              f"  {'images':<37}{'captions':<18}{'n':>5}{'emoji':>8}{'(no skin)':>10}{'style':>8}{'chance':>8}"]
    for images, key, captions in ROWS:
        r = results["retrieval"].get(key)
        if r is None:
            continue
        plain = f"{r['emoji_accuracy_no_skin_tone']:.1%}" if r["emoji_accuracy_no_skin_tone"] is not None else "-"
        style = f"{r['style_accuracy']:.1%}" if r["style_accuracy"] is not None else "-"
        lines.append(f"  {images:<37}{captions:<18}{r['n']:>5}{r['emoji_accuracy']:>8.1%}{plain:>10}"
                     f"{style:>8}{r['chance']:>8.2%}")
    b = results.get("heldout_breakdown")
    if b:
        known = b["names_of_heldout_emoji"]
        lines += ["", f"Held-out pairs: {b['pairs_hit']} of {b['pairs']} (emoji, style) pairs hit; hits in the prompted "
                      f"style {b['heldout_hits_in_prompted_style']}, in another {b['heldout_hits_in_other_style']}; "
                      f"their {known['n']} emoji by name alone: {known['emoji_accuracy']:.1%}"]
    return "\n".join(lines)


def grid_captions(rows: list[dict], seed: int, per_row: int = 8) -> list[list[dict]]:
    """Rows of the sample grid: GRID_EMOJI (topped up with seeded others drawn in all three styles in training)
    by name alone (no style, as a person types it), then in each style, then a seeded row of held-out captions
    of distinct emoji."""
    train = {(r["emoji"], r["style"]): r for r in rows if r["split"] == "train" and not r.get("skin_tone")}
    full = sorted({e for e, _ in train if all((e, s) in train for s in STYLES)})
    names = [e for e in GRID_EMOJI if e in full]
    rng = np.random.default_rng(seed)
    others = [e for e in full if e not in names]
    names += [others[k] for k in rng.permutation(len(others))[:per_row - len(names)]] if others else []
    plain = [{"text": e, "emoji": e, "style": None, "skin_tone": None, "split": "train"} for e in names[:per_row]]
    grid = [plain] + [[train[(e, s)] for e in names[:per_row]] for s in STYLES]
    held, seen = [], set()
    for k in rng.permutation(len(rows)).tolist():
        r = rows[k]
        if r["split"] == "heldout" and r["emoji"] not in seen and len(held) < per_row:
            held.append(r)
            seen.add(r["emoji"])
    return [g for g in grid + [held] if g]


def save_grid(pipe, rows: list[dict], path: str | Path, seed: int, guidance_scale: float, temperature, steps: int,
              scale: int = 2, sampler: str | None = None) -> list[list[str]]:
    """Generate the sample grid and save it as a PNG: each tile upscaled `scale`x (nearest) over its emoji name
    and style ("held out" marked). Returns the prompts, row by row."""
    from PIL import Image, ImageDraw, ImageFont

    from .images import make_image_grid

    layout = grid_captions(rows, seed)
    flat = [r for row in layout for r in row]
    images = generate(pipe, [r["text"] for r in flat], seed, guidance_scale, temperature, steps, len(flat), sampler)
    font = ImageFont.load_default(size=11)
    tiles = []
    for image, row in zip(images, flat):
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        picture = Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.NEAREST)
        w = max(picture.width, 150)
        tile = Image.new("RGB", (w, picture.height + 30), (255, 255, 255))
        tile.paste(picture, ((w - picture.width) // 2, 0))
        draw = ImageDraw.Draw(tile)
        tag = (row["style"] or "name only") + (", held out" if row["split"] == "heldout" else "")
        if row.get("skin_tone"):
            tag += ", " + row["skin_tone"].replace(" skin tone", "")
        for y, text, colour in ((2, row["emoji"], (0, 0, 0)), (16, tag, (110, 110, 110))):
            text = text.replace(" ", "  ")  # the default font's space is 2 px wide at this size
            while draw.textlength(text, font=font) > w - 4:
                text = text[:-2] + "…"
            draw.text((w // 2, picture.height + y), text, fill=colour, font=font, anchor="ma")
        tiles.append(tile)
    cols = max(len(row) for row in layout)
    padded, k = [], 0  # short rows padded with blank tiles
    for row in layout:
        padded += tiles[k:k + len(row)] + [Image.new("RGB", tiles[0].size, (255, 255, 255))] * (cols - len(row))
        k += len(row)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(padded, rows=len(layout), cols=cols).save(path)
    return [[r["text"] for r in row] for row in layout]


# ----------------------------------------------------------------------------------------------------------
# Command line


def cmd_eval(args: argparse.Namespace) -> int:
    from .runtime import engine_from_args

    if args.num_train < 0 or args.batch_size < 1 or (args.steps is not None and args.steps < 1):
        raise ValueError("--num-train must be >= 0, --batch-size and --steps >= 1")
    if args.num_names is not None and args.num_names < 0:
        raise ValueError(f"--num-names must be >= 0 (0 skips the names set), got {args.num_names}")
    temperature = None if args.temperature is None else (
        tuple(args.temperature) if len(args.temperature) == 2 else args.temperature[0])
    rows = load_rows(args.data)  # fail on a missing --data before loading the model
    quiet = args.quiet or args.json

    def log(message):
        if not quiet:
            print(message, file=sys.stderr, flush=True)

    engine = engine_from_args(args, expected_images=args.num_train + 200 + (2000 if args.num_names is None else args.num_names))
    pipe = engine.pipe
    steps, guidance_scale, temperature = pipe.resolve_defaults(args.steps, args.guidance_scale, temperature)
    results = evaluate(pipe, args.data, num_train=args.num_train, seed=args.seed, guidance_scale=guidance_scale,
                       temperature=temperature, steps=steps, batch_size=args.batch_size, log=log,
                       sampler=args.sampler, num_names=args.num_names)
    results["model"] = args.model or "embedded"
    results["data"] = str(args.data)
    if args.grid:
        log(f"sample grid -> {args.grid}")
        results["grid"] = {"path": str(args.grid),
                           "prompts": save_grid(pipe, rows, args.grid, args.seed,
                                                guidance_scale, temperature, steps, sampler=args.sampler)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps({k: v for k, v in results.items() if k != "retrieval"} | {"retrieval": {
            k: {m: x for m, x in v.items() if m != "neighbours"} for k, v in results["retrieval"].items()}}))
    elif not args.quiet:
        print(format_table(results))
        print(f"\n{results['seconds']:.0f} s; wrote {args.out}" + (f" and {args.grid}" if args.grid else ""))
    return 0


def add_command(subparsers) -> None:
    """Register `amused eval` on the main CLI."""
    from .runtime import add_output_args, add_runtime_args

    p = subparsers.add_parser(
        "eval", help="measure VQGAN PSNR and prompt adherence on the emoji data",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""examples:
  amused eval                                     # the embedded model on data/emoji, writes eval.json
  amused eval --num-train 200 --grid docs/images/embedded_grid.png
  amused eval --model path/to/checkpoint --data data/emoji --out my_eval.json
""")
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the embedded model)")
    p.add_argument("--data", type=Path, default=Path("data/emoji"),
                   help="output of `amused build-emoji-data` (default: data/emoji)")
    p.add_argument("--num-train", type=int, default=200, help="training captions sampled (default 200)")
    p.add_argument("--num-names", type=int, default=None,
                   help="emoji names (no style) evaluated, the first N sorted; default all of them, 0 skips")
    p.add_argument("--seed", type=int, default=0, help="seeds the caption sample and the generation (default 0)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance (default: the model's generation_config.json)")
    p.add_argument("--temperature", type=float, nargs="+", default=None, metavar="T",
                   help="start [end] of the temperature ramp (default: the model's)")
    p.add_argument("--steps", type=int, default=None, help="decoding steps (default: the model's)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--out", type=Path, default=Path("eval.json"), help="results JSON (default eval.json)")
    p.add_argument("--grid", type=Path, default=None, help="also save a sample grid PNG here")
    p.add_argument("--sampler", default=None, choices=["confidence", "halton"],
                   help="which samples stay revealed each step (default: the model's, else confidence)")
    add_runtime_args(p)
    add_output_args(p)
    p.set_defaults(func=cmd_eval)
