"""Webdataset-style tar shards, streamed with the standard library's `tarfile`.

A shard is a plain tar in which the files of one sample share a key (the path up to the basename's first dot):
`000123.jpg` + `000123.txt` (or `.caption`, or `.json` with a "text" field). Reading them with `tarfile`
needs no extra dependency, and the position in the stream is ours, so a resumed run skips exactly the samples
it has seen (without decoding their images). Shards are shuffled per epoch (seeded), split across ranks, then
across DataLoader workers. `tar_bytes` writes one (the tests and the attack set build theirs with it).
"""

from __future__ import annotations

import glob
import io
import json
import lzma
import random
import re
import tarfile
import zlib
from pathlib import Path
from typing import Any, Iterator

import torch

from ..images import load_image
from .data import preprocess, sample_rng


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar holding `members` (name, bytes) in order: a shard, when the names share keys as above."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def expand_shards(spec: str) -> list[str]:
    """"data/{000..009}.tar", globs and comma-separated lists -> sorted shard paths."""
    paths: list[str] = []
    for part in spec.split(","):
        match = re.search(r"\{(\d+)\.\.(\d+)\}", part)
        if match:
            lo, hi, width = int(match[1]), int(match[2]), len(match[1])
            names = [part[:match.start()] + str(i).zfill(width) + part[match.end():] for i in range(lo, hi + 1)]
        else:
            names = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
        paths.extend(names)
    missing = [p for p in paths if not Path(p).is_file()]
    if missing or not paths:
        raise ValueError(f"tar shards {spec!r}: missing {missing[:3] or 'all'}")
    return paths


MAX_MEMBER_BYTES = 256 << 20  # one file of a sample, as its tar header declares it: past any image within the
# pixel limit (64 Mi pixels), so a gzip bomb or a lying header is refused before anything is read


def iter_tar(path: str, max_member_bytes: int | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one webdataset tar: members grouped by key (path up to the basename's first dot). Nothing is
    extracted to disk. A file that is not a (possibly compressed) tar, is cut short, or holds a member over
    `max_member_bytes` (default `MAX_MEMBER_BYTES`) raises ValueError naming the shard."""
    max_member_bytes = MAX_MEMBER_BYTES if max_member_bytes is None else max_member_bytes
    current: dict[str, bytes] = {}
    key = None
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot or stem.startswith("."):
                    continue
                if member.size > max_member_bytes:
                    raise ValueError(f"tar shard {path}: member {member.name[:200]!r} declares {member.size:,} bytes, "
                                     f"over the limit of {max_member_bytes:,}")
                member_key = f"{folder}/{stem}" if folder else stem
                if member_key != key and current:
                    yield {"__key__": key, **current}
                    current = {}
                key = member_key
                current[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:  # bz2 raises OSError
        raise ValueError(f"tar shard {path}: not a readable tar file ({' '.join(str(e).split()) or type(e).__name__})"
                         ) from None
    if current:
        yield {"__key__": key, **current}


def decode_tar_sample(sample: dict[str, Any], source: str) -> dict[str, Any]:
    name = f"{source}: sample {sample['__key__']}"
    image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
    if image_ext is None:
        raise ValueError(f"{name} has no jpg/png/webp member")
    try:
        if "txt" in sample or "caption" in sample:
            caption = sample.get("txt", sample.get("caption")).decode("utf-8")
        elif "json" in sample:
            meta = json.loads(sample["json"])
            caption = meta.get("text", meta.get("caption", "")) if isinstance(meta, dict) else None
            if not isinstance(caption, str):
                raise ValueError("the json member needs a string 'text' or 'caption'")
        else:
            raise ValueError("no txt/caption/json member")
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{name}: unreadable caption: {e}") from None
    # the one image reader: format and declared size checked before any pixel is decoded
    image = load_image(sample[image_ext], name=name)
    return {"image": image, "caption": caption.strip()}


class TarShardStream(torch.utils.data.IterableDataset):
    """Streams tar shards: shards shuffled per epoch, split across ranks then DataLoader workers.

    `set_position(epoch, start_batch)` must be called before each epoch's iterator is made. On resume, worker
    w takes over the stream of the worker that would have produced the resumed run's w-th batch, so the
    batch order is the uninterrupted one's (exactly, while every worker still has data).
    """

    def __init__(self, shards: list[str], resolution: int, batch_size: int, center_crop: bool = False,
                 random_flip: bool = False, seed: int = 0, rank: int = 0, world: int = 1,
                 prompt_prefix: str | None = None, min_crop: float = 1.0):
        self.shards, self.resolution, self.batch_size, self.seed = shards, resolution, batch_size, seed
        self.center_crop, self.random_flip, self.rank, self.world = center_crop, random_flip, rank, world
        self.prompt_prefix, self.min_crop = prompt_prefix, min_crop
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        order = random.Random(f"{self.seed}/shards/{self.epoch}").sample(self.shards, len(self.shards))
        role = (self.start_batch + worker) % workers  # the original worker whose stream this one continues
        skip = (self.start_batch + worker) // workers * self.batch_size
        mine = order[self.rank::self.world][role::workers]
        index = 0
        for shard in mine:
            for sample in iter_tar(shard):
                index += 1
                if index <= skip:
                    continue  # skipped without decoding the image
                item = decode_tar_sample(sample, shard)
                rng = sample_rng(self.seed, self.epoch, f"{Path(shard).name}/{sample['__key__']}")
                out = preprocess(item["image"], self.resolution, rng, self.center_crop, self.random_flip,
                                 min_crop=self.min_crop)
                out["caption"] = (self.prompt_prefix or "") + item["caption"]
                yield out
