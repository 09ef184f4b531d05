"""Training data: image-caption sources, the reference preprocessing, resumable ordering, pre-encoded shards.

Sources, each a sequence (or stream) of `{"image": PIL.Image, "caption": str}`:
    ImageFolder   a folder of images with captions in `metadata.jsonl` / `metadata.csv` (`file_name` + `text`
                  per row: the layout Hugging Face `datasets` reads as "imagefolder"); without a metadata file,
                  one prompt for every image (`--instance_prompt`) or each file's stem, as diffusers'
                  train_amused.py does. Read in plain Python: no pyarrow, images decoded lazily per item.
    Records       any indexable of dicts, e.g. a `datasets.Dataset` (an image column and a caption column).
    TarShardStream  webdataset-style tar shards (shards.py).
`PreencodedDataset` reads the shards `amused preencode` writes (VQ token ids + text embeddings).

Preprocessing is the reference's (diffusers' train_amused.py): resize the shorter side to `resolution`
(bilinear), crop a square (random or centre), optionally flip; micro-conditioning is [orig_width, orig_height,
crop_top, crop_left, aesthetic] with the real original size and the crop in resized coordinates (SDXL's
definition; a flip mirrors crop_left). Transparent images are composited onto white first.

Every random choice of a sample (crop, flip) comes from an RNG seeded by (seed, epoch, index), and the order
of an epoch from (seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import PIL.Image
import torch
from safetensors import SafetensorError, safe_open

from ..images import load_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
DEFAULT_AESTHETIC = 6.0


# ----------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """EXIF-rotated 8-bit RGB, transparent pixels white: `load_image`'s normalisation, which also checks the
    size and format of images opened elsewhere (tar shards, `datasets` columns) before decoding them."""
    if image.mode == "RGB" and image.format is None:  # made in memory, e.g. by a source below: done already
        return image
    return load_image(image, name=getattr(image, "filename", None) or None)


def preprocess(image: PIL.Image.Image, resolution: int, rng: random.Random, center_crop: bool = False,
               random_flip: bool = False, aesthetic: float = DEFAULT_AESTHETIC,
               min_crop: float = 1.0) -> dict[str, torch.Tensor]:
    """One training image: resize the shorter side, crop a square, maybe flip.

    Args:
        image: any PIL image.
        resolution: output side in pixels.
        rng: source of the crop offset and flip decision.
        center_crop: centre crop instead of a random one.
        random_flip: flip horizontally with probability 0.5.
        aesthetic: the aesthetic-score micro-conditioning value (6 as the reference).
        min_crop: below 1, zoom in first (`--random_resized_crop`): the crop's side is a uniform random fraction
            in [min_crop, 1] of the shorter side (the image is resized so that fraction becomes `resolution`).

    Returns:
        {"pixels": (3, R, R) float32 in [0, 1], "micro_conds": (5,) float32
        [orig_width, orig_height, crop_top, crop_left, aesthetic]}.
    """
    image = to_rgb(image)
    orig_w, orig_h = image.size
    side = min(orig_w, orig_h) * (rng.uniform(min_crop, 1.0) if min_crop < 1 else 1.0)  # no draw when off
    scale = resolution / side
    new_w, new_h = max(resolution, round(orig_w * scale)), max(resolution, round(orig_h * scale))
    image = image.resize((new_w, new_h), PIL.Image.BILINEAR)
    if center_crop:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    else:
        top, left = rng.randint(0, new_h - resolution), rng.randint(0, new_w - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        image = image.transpose(PIL.Image.FLIP_LEFT_RIGHT)
        left = new_w - left - resolution  # the crop's left edge as seen in the flipped image
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, R, R)
    micro = torch.tensor([orig_w, orig_h, top, left, aesthetic], dtype=torch.float32)
    return {"pixels": pixels.contiguous(), "micro_conds": micro}


def sample_rng(seed: int, epoch: int, index: int | str) -> random.Random:
    return random.Random(f"{seed}/{epoch}/{index}")  # str seeds hash deterministically (sha512)


# ----------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------


class ImageFolder:
    """Images of a folder with their captions (see the module docstring for the layout).

    Args:
        root: the folder.
        caption_column: caption field of the metadata rows ("text").
        image_column: file-name field of the metadata rows ("file_name").
        instance_prompt: caption for every image when the folder has no metadata file.
    """

    def __init__(self, root: str | Path, caption_column: str = "text", image_column: str = "file_name",
                 instance_prompt: str | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"image folder {self.root} does not exist")
        rows = self._read_metadata(caption_column, image_column)
        if rows is None:
            files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            rows = [(p, instance_prompt if instance_prompt is not None else p.stem.replace("_", " ")) for p in files]
        if not rows:
            raise ValueError(f"image folder {self.root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.rows = rows

    def _read_metadata(self, caption_column: str, image_column: str) -> list[tuple[Path, str]] | None:
        jsonl, csv_path = self.root / "metadata.jsonl", self.root / "metadata.csv"
        if jsonl.is_file():
            records = []
            for n, line in enumerate(jsonl.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{jsonl}:{n}: not JSON: {e}") from e
            source = jsonl
        elif csv_path.is_file():
            with open(csv_path, newline="") as f:
                records = list(csv.DictReader(f))
            source = csv_path
        else:
            return None
        rows = []
        for n, record in enumerate(records, 1):
            if not isinstance(record, dict) or image_column not in record or caption_column not in record:
                raise ValueError(f"{source} row {n} lacks {image_column!r} or {caption_column!r} "
                                 f"(has {sorted(record) if isinstance(record, dict) else type(record).__name__}); "
                                 f"set --image_column / --caption_column")
            name = record[image_column]
            # a path relative to the folder, inside it (as `datasets` reads "imagefolder"): the metadata cannot
            # point the training at files elsewhere (symbolic links inside the folder still work)
            if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
                raise ValueError(f"{source} row {n}: {image_column} must be a path relative to the folder and inside "
                                 f"it, got {name!r:.200}")
            path = self.root / name
            if not path.is_file():
                raise ValueError(f"{source} row {n}: image {path} does not exist")
            rows.append((path, str(record[caption_column])))
        return rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, caption = self.rows[index]
        return {"image": load_image(path, name=f"training image {path}"), "caption": caption}


class SingleImage:
    """One image and its prompt (single-image style training): index 0 only, the sampler repeats it."""

    def __init__(self, path: str | Path, prompt: str):
        self.path, self.prompt = Path(path), prompt
        if not self.path.is_file():
            raise ValueError(f"--instance_data_image {self.path} does not exist")

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": load_image(self.path, name=f"--instance_data_image {self.path}"), "caption": self.prompt}


class Records:
    """An indexable of dicts, such as a `datasets.Dataset`, viewed as image-caption pairs.

    Args:
        records: supports `len()` and `records[i] -> dict`.
        image_column: the PIL image (or file path, or {"bytes": ...}) field.
        caption_column: the caption field.
    """

    def __init__(self, records: Sequence[dict], image_column: str = "image", caption_column: str = "text"):
        names = getattr(records, "column_names", None)
        if names is not None and (image_column not in names or caption_column not in names):
            raise ValueError(f"dataset columns are {names}; set --image_key / --prompt_key")
        self.records = without_image_decoding(records, image_column)
        self.image_column, self.caption_column = image_column, caption_column

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image = record[self.image_column]
        if isinstance(image, dict):  # a `datasets` Image column without decoding: {"bytes": ..., "path": ...}
            image = image["bytes"] if image.get("bytes") is not None else image.get("path")
        return {"image": load_image(image, name=f"dataset row {index} {self.image_column!r}"),
                "caption": str(record[self.caption_column])}


def without_image_decoding(records, column: str):
    """A `datasets.Dataset` whose `column` is an Image feature, cast so that rows hand over the file's bytes (or
    path) instead of a decoded image: `datasets` decodes with Pillow before we see the row (any format Pillow knows,
    EPS through Ghostscript included, and no size limit but Pillow's own), so `load_image` must do it. Anything
    else is returned as it is."""
    feature = (getattr(records, "features", None) or {}).get(column)
    if type(feature).__name__ != "Image" or not getattr(feature, "decode", False) or not hasattr(records,
                                                                                                "cast_column"):
        return records
    import datasets

    return records.cast_column(column, datasets.Image(decode=False))


# ----------------------------------------------------------------------------------------------------------
# Training datasets: source + preprocessing + ordering
# ----------------------------------------------------------------------------------------------------------


class TrainDataset(torch.utils.data.Dataset):
    """Map-style training set; `EpochSampler` yields (epoch, index) keys so augmentation is reproducible."""

    def __init__(self, source, resolution: int, center_crop: bool = False, random_flip: bool = False,
                 seed: int = 0, prompt_prefix: str | None = None, min_crop: float = 1.0):
        self.source, self.resolution, self.seed = source, resolution, seed
        self.center_crop, self.random_flip, self.prompt_prefix = center_crop, random_flip, prompt_prefix
        self.min_crop = min_crop

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        item = self.source[index]
        out = preprocess(item["image"], self.resolution, sample_rng(self.seed, epoch, index), self.center_crop,
                         self.random_flip, min_crop=self.min_crop)
        out["caption"] = (self.prompt_prefix or "") + item["caption"]
        return out


class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of epoch `epoch`, from micro-batch `start_batch` on; yields (epoch, index).

    The order is a permutation seeded by (seed, epoch), tiled when the data is smaller than one global batch
    (single-image training), cut to whole batches and split across ranks by striding.
    """

    def __init__(self, size: int, batch_size: int, epoch: int, seed: int, shuffle: bool = True, rank: int = 0,
                 world: int = 1, start_batch: int = 0):
        self.size, self.batch_size, self.epoch, self.seed = size, batch_size, epoch, seed
        self.shuffle, self.rank, self.world, self.start_batch = shuffle, rank, world, start_batch

    def batches_per_epoch(self) -> int:
        return max(self.size, self.batch_size * self.world) // (self.batch_size * self.world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1000003 + self.epoch))
        else:
            order = torch.arange(self.size)
        total = self.batches_per_epoch() * self.batch_size * self.world
        order = order.repeat(-(-total // self.size))[:total]
        mine = order[self.rank::self.world][self.start_batch * self.batch_size:]
        return iter([(self.epoch, int(i)) for i in mine])

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.start_batch) * self.batch_size


# ----------------------------------------------------------------------------------------------------------
# Pre-encoded shards
# ----------------------------------------------------------------------------------------------------------


class PreencodedDataset(torch.utils.data.Dataset):
    """Reads `amused preencode` output: index.json + shard-NNNNN.safetensors (ids int16, hidden/pooled fp16).

    Items: {"ids": (h, w) long, "hidden": (S, D), "pooled": (P,), "micro_conds": (5,), "caption": str}.
    A data set whose shards total at most `in_memory_bytes` is read into memory once (per loader worker) and
    served a whole batch per gather (`__getitems__`, with `collate_batch` as the loader's collate_fn): per-item
    reads and collation of a few hundred small tensors cost more than a small model's training step. Larger
    ones are read from the memory-mapped files per item, so they do not have to fit in RAM.
    """

    in_memory_bytes = 4 << 30

    def __init__(self, root: str | Path, in_memory: bool | None = None):
        self.root = Path(root)
        index_path = self.root / "index.json"
        if not index_path.is_file():
            raise ValueError(f"{self.root} is not a pre-encoded dataset (missing index.json; run `amused preencode`)")
        try:
            self.index = json.loads(index_path.read_text())
            self.shards = [(self.root / s["file"], s["num_samples"]) for s in self.index["shards"]]
            if not all(isinstance(n, int) and n >= 0 and path.parent == self.root for path, n in self.shards):
                raise ValueError("each shard needs a file name in the folder and a whole num_samples")
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{index_path}: not an index `amused preencode` writes ({' '.join(str(e).split())})"
                             ) from None
        self.offsets = np.cumsum([0] + [n for _, n in self.shards])
        self._open: dict[int, Any] = {}
        self._captions: dict[int, list[str]] = {}
        if in_memory is None:
            in_memory = sum(path.stat().st_size for path, _ in self.shards) <= self.in_memory_bytes
        self.in_memory = in_memory
        self._all: dict[str, Any] | None = None  # every shard's tensors, concatenated (in-memory mode)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _handle(self, shard: int):
        if shard not in self._open:  # opened lazily, per DataLoader worker
            path = self.shards[shard][0]
            try:
                handle = safe_open(str(path), framework="pt")
                self._captions[shard] = json.loads((handle.metadata() or {}).get("captions", "[]"))
            except (SafetensorError, OSError, ValueError) as e:
                raise ValueError(f"pre-encoded shard {path}: unreadable ({' '.join(str(e).split())})") from None
            self._open[shard] = handle
        return self._open[shard]

    def __getitem__(self, key) -> dict[str, Any]:
        index = key[1] if isinstance(key, tuple) else key
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        row = index - int(self.offsets[shard])
        f = self._handle(shard)
        out = {name: f.get_slice(name)[row:row + 1][0] for name in ("ids", "hidden", "pooled", "micro_conds")}
        out["ids"] = out["ids"].long()
        captions = self._captions[shard]
        out["caption"] = captions[row] if row < len(captions) else ""
        return out

    def _load_all(self) -> dict[str, Any]:
        if self._all is None:
            parts: dict[str, list] = {name: [] for name in ("ids", "hidden", "pooled", "micro_conds")}
            captions: list[str] = []
            for shard, (_, n) in enumerate(self.shards):
                f = self._handle(shard)
                for name in parts:
                    parts[name].append(f.get_tensor(name))
                shard_captions = self._captions[shard]
                captions += shard_captions[:n] + [""] * (n - len(shard_captions))
            self._all = {name: torch.cat(tensors) for name, tensors in parts.items()}
            self._all["caption"] = captions
            self._open.clear()
        return self._all

    def __getitems__(self, keys: list) -> dict[str, Any]:
        """A whole batch at once: {"ids": (B, h, w) long, "hidden": (B, S, D), ...}; see `collate_batch`."""
        indices = [key[1] if isinstance(key, tuple) else key for key in keys]
        if not self.in_memory:
            return torch.utils.data.default_collate([self[i] for i in indices])
        data = self._load_all()
        at = torch.tensor(indices, dtype=torch.long)
        batch = {name: data[name].index_select(0, at) for name in ("ids", "hidden", "pooled", "micro_conds")}
        batch["ids"] = batch["ids"].long()
        batch["caption"] = [data["caption"][i] for i in indices]
        return batch

    @staticmethod
    def collate_batch(batch: dict[str, Any]) -> dict[str, Any]:
        """The loader's collate_fn: `__getitems__` has already built the batch."""
        return batch

    def empty_prompt(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, S, D) hidden and (1, P) pooled embedding of "" (what text dropout substitutes)."""
        path = self.root / "empty_prompt.safetensors"
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("hidden"), f.get_tensor("pooled")


# ----------------------------------------------------------------------------------------------------------
# From command-line arguments
# ----------------------------------------------------------------------------------------------------------


def load_hf_dataset(name_or_path: str, split: str = "train"):
    """A `datasets` dataset from a `save_to_disk` folder or `load_dataset` (a hub name or local files)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("--instance_data_dataset needs the `datasets` package: pip install datasets") from e
    path = Path(name_or_path)
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        data = datasets.load_from_disk(str(path))
    else:
        data = datasets.load_dataset(name_or_path, split=split)
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"dataset {name_or_path} has splits {list(data)}, not {split!r} (--dataset_split)")
        data = data[split]
    return data


def make_dataset(args, rank: int = 0, world: int = 1, dataset=None):
    """The training dataset the arguments name: exactly one of --train_data_dir / --instance_data_dir,
    --instance_data_image, --instance_data_dataset, --train_shards, --preencoded_data_dir (or `dataset`, a
    `datasets.Dataset` or list of dicts passed from Python).

    Returns:
        A `TrainDataset` or `PreencodedDataset` (map-style, ordered by `EpochSampler`) or a `TarShardStream`.
    """
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    folder = get("train_data_dir") or get("instance_data_dir")
    given = {name: value for name, value in [("--train_data_dir/--instance_data_dir", folder),
                                             ("--instance_data_image", get("instance_data_image")),
                                             ("--instance_data_dataset", get("instance_data_dataset")),
                                             ("--train_shards", get("train_shards")),
                                             ("--preencoded_data_dir", get("preencoded_data_dir")),
                                             ("dataset", dataset)] if value is not None}
    if len(given) != 1:
        raise ValueError(f"give exactly one data source, got {sorted(given) or 'none'}")
    min_crop = get("random_resized_crop")
    min_crop = 1.0 if min_crop is None else min_crop
    if not 0.05 <= min_crop <= 1:  # below 0.05 a crop would be zoomed over 20x (and the image resized as much)
        raise ValueError(f"--random_resized_crop takes the smallest crop side as a fraction of the image's shorter "
                         f"side, in [0.05, 1]; got {min_crop}")
    if min_crop < 1 and get("preencoded_data_dir"):
        raise ValueError("--random_resized_crop cannot change --preencoded_data_dir tokens (their crops were fixed "
                         "at encoding time)")
    if get("preencoded_data_dir"):
        return PreencodedDataset(args.preencoded_data_dir)
    caption_column = get("prompt_key") or get("caption_column") or "text"
    common = dict(resolution=args.resolution, center_crop=bool(get("center_crop")),
                  random_flip=bool(get("random_flip")), seed=get("seed") or 0, prompt_prefix=get("prompt_prefix"),
                  min_crop=min_crop)
    if get("train_shards"):
        from .shards import TarShardStream, expand_shards

        return TarShardStream(expand_shards(args.train_shards), batch_size=args.train_batch_size, rank=rank,
                              world=world, **common)
    if folder:
        source = ImageFolder(folder, caption_column, get("image_column") or "file_name", get("instance_prompt"))
    elif get("instance_data_image"):
        if not get("instance_prompt"):
            raise ValueError("--instance_data_image needs --instance_prompt (the caption of the image)")
        source = SingleImage(args.instance_data_image, args.instance_prompt)
    else:
        records = dataset if dataset is not None else load_hf_dataset(args.instance_data_dataset,
                                                                       get("dataset_split") or "train")
        source = Records(records, get("image_key") or "image", caption_column)
    return TrainDataset(source, **common)
