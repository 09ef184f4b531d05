"""Prior preservation for `amused finetune` (DreamBooth, Ruiz et al., 2023), with diffusers' argument names.

Fine-tuning on one image (or a few) pulls the whole model towards it: prompts that share no word with the
instance caption start to draw the instance. Prior preservation trains, beside every instance batch, on as many
"class" examples the base model drew itself, and adds their masked-token loss with weight `--prior_loss_weight`:

    loss = loss(instance examples) + prior_loss_weight * loss(class examples)

so the adapter is paid for leaving the base model's own drawings of those prompts unchanged.

The class examples are images the base model generated (`runtime.load_engine`: the engine every face uses, the
fast path on a GPU by the number of images, the plain loop on the CPU) from `--class_prompt` or from the prompts
of `--class_prompts_file` (one a line, used in turn: for style transfer, many different subjects without the
style word), into `--class_data_dir` until it holds `--num_class_images`. The folder is an image folder as
`--train_data_dir` reads it: `class_NNNNN.png` files and a metadata.jsonl of `file_name` + `text`, each file and
the metadata replaced atomically, so a killed run leaves a readable folder and a rerun generates only what is
missing (image i is drawn from seed `--seed` + i whatever was there before). A folder of images without
metadata.jsonl (class images a person gathered) is read with `--class_prompt` as every caption.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .data import IMAGE_EXTENSIONS, ImageFolder, TrainDataset

METADATA = "metadata.jsonl"
CLASS_ARGS = ("class_data_dir", "class_prompt", "class_prompts_file")


def check_args(args) -> None:
    """One-line errors, each naming its argument; no-op for commands without these flags (`amused train`)."""
    if not hasattr(args, "with_prior_preservation"):
        return
    if not args.with_prior_preservation:
        given = [f"--{name}" for name in CLASS_ARGS if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} given without --with_prior_preservation (add it, or drop them)")
        return
    if not args.class_data_dir:
        raise ValueError("--with_prior_preservation needs --class_data_dir (where the class images are kept)")
    if Path(args.class_data_dir).exists() and not Path(args.class_data_dir).is_dir():
        raise ValueError(f"--class_data_dir {args.class_data_dir} is a file, not a folder")
    if (args.class_prompt is None) == (args.class_prompts_file is None):
        raise ValueError("--with_prior_preservation needs exactly one of --class_prompt (one prompt) and "
                         "--class_prompts_file (one prompt a line)")
    if args.class_prompt is not None and not args.class_prompt.strip():
        raise ValueError("--class_prompt is empty")
    if args.num_class_images < 1:
        raise ValueError(f"--num_class_images must be >= 1, got {args.num_class_images}")
    if args.sample_batch_size < 1:
        raise ValueError(f"--sample_batch_size must be >= 1, got {args.sample_batch_size}")
    if not args.prior_loss_weight >= 0:  # also refuses nan
        raise ValueError(f"--prior_loss_weight must be >= 0, got {args.prior_loss_weight}")
    for name in ("preencoded_data_dir", "train_shards"):
        if getattr(args, name, None):
            raise ValueError(f"--with_prior_preservation needs images with captions (--instance_data_image, "
                             f"--train_data_dir or --instance_data_dataset), not --{name}")
    class_prompts(args)  # the file's errors, before any model is loaded


def class_prompts(args) -> list[str]:
    """--class_prompt as a one-item list, or the non-blank lines of --class_prompts_file."""
    if args.class_prompt is not None:
        return [args.class_prompt]
    path = Path(args.class_prompts_file)
    if not path.is_file():
        raise ValueError(f"--class_prompts_file {path} does not exist")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise ValueError(f"--class_prompts_file {path} is not UTF-8 text") from None
    if not prompts:
        raise ValueError(f"--class_prompts_file {path} holds no prompt")
    return prompts


def read_rows(folder: Path) -> list[dict[str, str]]:
    """The metadata rows of a class folder that point at existing files ([] without metadata.jsonl)."""
    path = folder / METADATA
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            row = {}
        if row is not None and not (isinstance(row, dict) and isinstance(row.get("file_name"), str)
                                    and isinstance(row.get("text"), str)):
            raise ValueError(f"--class_data_dir {path}:{n}: not a row with file_name and text")
        if row is not None and (folder / row["file_name"]).is_file():
            rows.append(row)
    return rows


def _replace(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename it over `path` (atomic on POSIX)."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def ensure_class_images(args, device: torch.device) -> int:
    """Generate class images into --class_data_dir until it holds --num_class_images; returns how many were made.

    Call on one process (the others wait): the folder is shared.
    """
    folder = Path(args.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    rows = read_rows(folder)
    if not (folder / METADATA).is_file():
        loose = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]
        if loose:  # a person's own class images: used as they are, never added to
            if len(loose) < args.num_class_images:
                raise ValueError(f"--class_data_dir {folder} holds {len(loose)} images without {METADATA}, fewer "
                                 f"than --num_class_images {args.num_class_images}: add images, lower the number, "
                                 f"or use an empty folder (the base model then draws them)")
            if args.class_prompt is None:
                raise ValueError(f"--class_data_dir {folder} holds images without {METADATA}: caption them with "
                                 f"--class_prompt (--class_prompts_file applies to generated images only)")
            return 0
    missing = args.num_class_images - len(rows)
    if missing <= 0:
        return 0
    from tqdm.auto import tqdm

    from ..runtime import load_engine

    prompts = class_prompts(args)
    threads = torch.get_num_threads()  # load_engine sets the CPU threads for generation; training keeps its own
    try:
        engine = load_engine(args.pretrained_model_name_or_path, device=str(device), expected_images=missing)
        bar = tqdm(total=missing, desc="class images")
        for start in range(len(rows), args.num_class_images, args.sample_batch_size):
            index = list(range(start, min(start + args.sample_batch_size, args.num_class_images)))
            batch = [prompts[i % len(prompts)] for i in index]
            images = engine.pipe(batch, generator=engine.generator((args.seed or 0) + start)).images
            for i, prompt, image in zip(index, batch, images):
                name = f"class_{i:05d}.png"
                _replace(folder / name, lambda tmp: image.save(tmp, format="PNG"))
                rows.append({"file_name": name, "text": prompt})
            text = "".join(json.dumps(r) + "\n" for r in rows)
            _replace(folder / METADATA, lambda tmp: tmp.write_text(text))
            bar.update(len(index))
        bar.close()
    finally:
        torch.set_num_threads(threads)
    return missing


def class_dataset(args) -> TrainDataset:
    """The first --num_class_images of --class_data_dir, preprocessed as the instance data (no --prompt_prefix:
    the class captions are the base model's prompts)."""
    source = ImageFolder(args.class_data_dir, instance_prompt=args.class_prompt)
    source.rows = source.rows[:args.num_class_images]
    return TrainDataset(source, args.resolution, center_crop=bool(args.center_crop),
                        random_flip=bool(args.random_flip), seed=args.seed or 0)


class PriorPreservationDataset(torch.utils.data.Dataset):
    """Pairs of (instance example, class example): item i is instance i mod N and class i mod M, as diffusers'
    DreamBoothDataset. `collate_batch` stacks B pairs as one batch of 2B, instance examples first, with
    `is_prior` (2B,) bool marking the class half, so the VQGAN and the text encoder run once on both."""

    def __init__(self, instance: TrainDataset, prior: TrainDataset):
        self.instance, self.prior = instance, prior

    def __len__(self) -> int:
        return max(len(self.instance), len(self.prior))

    def __getitem__(self, key) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        return {"instance": self.instance[(epoch, index % len(self.instance))],
                "prior": self.prior[(epoch, index % len(self.prior))]}

    @staticmethod
    def collate_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
        collate = torch.utils.data.default_collate
        a, b = collate([it["instance"] for it in items]), collate([it["prior"] for it in items])
        batch = {name: torch.cat([a[name], b[name]]) for name in ("pixels", "micro_conds")}
        batch["caption"] = list(a["caption"]) + list(b["caption"])
        batch["is_prior"] = torch.arange(2 * len(items)) >= len(items)
        return batch
