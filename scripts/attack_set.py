"""The attack set of issue 15 ("Untrusted input cannot hurt"), re-measured against amused's real faces.

    python scripts/attack_set.py                      # every case (~600), 5 min on 2 shared CPU cores
    python scripts/attack_set.py --quick              # a subset (~90), 2 min
    python scripts/attack_set.py --only lora,config   # categories whose name contains a word

Every hostile file is made here, in a temp folder, small: an image bomb is a 1x1 image whose header is patched
to declare a huge size; a tar bomb is a gzip stream of zeros. Nothing is downloaded (the hub and `datasets` run
offline). Each case has an expectation:

    clean  the input is refused: a non-zero exit with a one-line error and no traceback (command line), an
           HTTP 4xx with a JSON {error, message} body (server), or a ValueError/TypeError whose one-line
           message names the input (Python functions the faces call, run in a worker process);
    works  the input is accepted and the output is right (its size, its pixels, a finite image...).

and bounds: a memory bound (peak RSS above the process's baseline: the worker's, the server's, or the whole
process for a command) and a time bound. Every process runs under RLIMIT_AS = 4 GiB; a case over a bound, or
one that crashes, hangs or prints a traceback, fails. Faces:

    cli     `amused.cli.main(argv)` in a child process per case (the tiny checkpoint of tests/train_tiny.py, or the
            embedded model): the quick cases as fresh `python -m amused.cli` processes, the others as forks of a
            process that has imported amused.cli once (the same entry point and exit code, a traceback printed
            as the interpreter would, without paying ~6 s of imports a case); peak RSS: the process's VmHWM,
            read every 20 ms;
    http    a real `amused serve` (embedded model) on a free port, spoken to over raw sockets (so bodies over the
            limit, chunked bodies, lying Host headers and clients that hang up can be sent as they are); peak
            RSS of the server per case from /proc (VmHWM, reset through clear_refs);
    python  the loading functions every face calls (load_image, load_lora_weights, from_pretrained, the training
            data sources, parse_recorded), many cases in one worker process, which is restarted after a crash
            or a timeout; peak RSS per case as for the server.

Writes docs/results/attack_set_cpu.json (every case: name, category, face, expectation, outcome, exit code or
HTTP status, first line of stderr or the error, wall s, peak MiB) and prints a table per category.
`tests/test_attack_set.py` runs the quick in-process cases under pytest.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import gzip
import io
import json
import os
import pickle
import platform
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "tests", ROOT / "src"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402

MEMORY_LIMIT = 4 << 30  # RLIMIT_AS of every process the harness starts
CLEAN_ERRORS = (ValueError, TypeError, FileNotFoundError, FloatingPointError)  # what `amused` prints as one line
GOOD_RECORD = {"prompt": "red apple", "seed": 3, "batch_prompts": ["red apple"], "batch_index": 0, "steps": 2,
               "model": "embedded"}


@dataclass
class Case:
    """One attack. `run` is a callable (python), an argv list after `python -m amused.cli` (cli) or a request
    dict (http). `names`: the refusal must contain one of these (case-insensitive). `check(result)` raises
    AssertionError when a "works" output is wrong (or, for "clean", when a side effect happened anyway)."""

    name: str
    category: str
    face: str  # "python", "cli", "http"
    expect: str  # "clean" or "works"
    run: Any
    names: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None
    max_mib: float = 512.0  # peak RSS above the baseline (python, http) or of the whole process (cli)
    max_s: float = 30.0
    quick: bool = False
    server: str = "main"  # http: which server ("main" or "slow")
    fresh: bool = False  # cli: a new `python -m amused.cli` process instead of a fork of the preloaded one
    prepare: Callable[[], Any] | None = None  # makes the case's costlier files, before it runs (not measured)


# ----------------------------------------------------------------------------------------------------------
# The arsenal: hostile files, made once in the temp folder (idempotent, so the worker finds them made)
# ----------------------------------------------------------------------------------------------------------


def encode(image: PIL.Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A 1x1 grayscale PNG whose IHDR declares width x height (CRC fixed, so only the size is a lie)."""
    raw = bytearray(encode(PIL.Image.new("L", (1, 1)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(raw[24:29])
    raw[16:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(raw)


def jpeg_bomb(width: int, height: int) -> bytes:
    """An 8x8 baseline JPEG whose SOF0 segment declares width x height."""
    raw = bytearray(encode(PIL.Image.new("RGB", (8, 8)), "JPEG"))
    sof = raw.find(b"\xff\xc0")
    raw[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


def webp_bomb(width: int, height: int) -> bytes:
    """A 1x1 lossless WebP whose VP8L header declares width x height (at most 16384 a side)."""
    raw = bytearray(encode(PIL.Image.new("RGB", (1, 1)), "WEBP", lossless=True))
    assert raw[12:16] == b"VP8L" and raw[20] == 0x2F
    bits = struct.unpack("<I", raw[21:25])[0]
    bits = (bits & ~((1 << 28) - 1)) | (width - 1) | ((height - 1) << 14)
    raw[21:25] = struct.pack("<I", bits)
    return bytes(raw)


def safetensors_bytes(header: Any, data: bytes = b"", length: int | None = None) -> bytes:
    text = header if isinstance(header, (bytes, str)) else json.dumps(header)
    text = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(text) if length is None else length) + text + data


class Zeros(io.RawIOBase):
    """`size` zero bytes, read in chunks (a tar bomb's member, never held in memory)."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def gz_bomb() -> bytes:
    """A gzipped tar whose caption member is 512 MiB of zeros (0.5 MiB on disk)."""
    png = encode(PIL.Image.new("RGB", (8, 8)), "PNG")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("0000.png")
        info.size = len(png)
        tar.addfile(info, io.BytesIO(png))
        info = tarfile.TarInfo("0000.txt")
        info.size = 512 << 20
        tar.addfile(info, Zeros(info.size))
    return buffer.getvalue()


class Arsenal:
    """Makes the hostile inputs under `root`; each maker returns the path and does nothing if it exists."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.markers = root / "markers"  # a Ghostscript or a pickle that ran leaves a file here
        self.markers.mkdir(exist_ok=True)
        self.bin = root / "bin"  # put first on PATH: a fake `gs` that leaves a marker
        self.bin.mkdir(exist_ok=True)
        gs = self.bin / "gs"
        if not gs.exists():
            gs.write_text(f'#!/bin/sh\ntouch "{self.markers}/ghostscript-$(basename "$PWD")"\nexit 1\n')
            gs.chmod(0o755)
        self._pipe = None

    def file(self, name: str, data: bytes | Callable[[], bytes]) -> Path:
        path = self.root / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data() if callable(data) else data)
        return path

    def ran(self, folder: str | None = None) -> list[str]:
        """What ran since the last call (a Ghostscript, a pickle, a tokenizer's code), in processes whose working
        folder is named `folder` (None: any); forgets it. Each marker is named WHAT-FOLDER."""
        found = sorted(p.name for p in self.markers.iterdir() if folder is None or p.name.endswith("-" + folder))
        for name in found:
            (self.markers / name).unlink(missing_ok=True)
        return [name.rpartition("-")[0] for name in found]

    # ---- images ------------------------------------------------------------------------------------------

    def picture(self, width: int = 16, height: int = 16) -> PIL.Image.Image:
        """Quadrants of four colours, so orientation and colour are checkable after any lossy round trip."""
        array = np.zeros((height, width, 3), dtype=np.uint8)
        h2, w2 = height // 2, width // 2
        array[:h2, :w2], array[:h2, w2:] = (250, 20, 20), (20, 250, 20)
        array[h2:, :w2], array[h2:, w2:] = (20, 20, 250), (250, 250, 20)
        return PIL.Image.fromarray(array)

    def good_png(self) -> Path:
        return self.file("good.png", lambda: encode(self.picture(), "PNG"))

    # ---- `datasets` datasets (save_to_disk folders) ------------------------------------------------------

    DATASET_ROWS = [  # label, bytes maker, expectation
        ("good 16x16 png", lambda a: a.good_png().read_bytes(), "works"),
        ("png bomb 30000x30000 (past Pillow's DecompressionBombError)", lambda a: png_bomb(30000, 30000), "clean"),
        ("real 12000x12000 png (144 MB decoded; past ours, under Pillow's error)",
         lambda a: encode(PIL.Image.new("L", (12000, 12000)), "PNG"), "clean"),
        ("png bomb 9000x9000", lambda a: png_bomb(9000, 9000), "clean"),
        ("jpeg bomb 30000x30000", lambda a: jpeg_bomb(30000, 30000), "clean"),
        ("webp bomb 16384x16384", lambda a: webp_bomb(16384, 16384), "clean"),
        ("EPS (never handed to Ghostscript)", lambda a: FAKE_FILES["eps_text"], "clean"),
        ("TIFF", lambda a: encode(PIL.Image.new("RGB", (8, 8)), "TIFF"), "clean")]

    def datasets_rows(self) -> Path:
        """A dataset whose image column holds DATASET_ROWS' files as bytes."""
        return self._dataset("datasets_rows", lambda: [{"bytes": make(self), "path": None}
                                                       for _, make, _ in self.DATASET_ROWS],
                             [label for label, _, _ in self.DATASET_ROWS])

    def datasets_paths(self) -> Path:
        """A dataset whose image column names files by path: a 30000x30000 bomb, then a good image."""
        bomb = self.file("bombs/png_30000x30000.png", png_bomb(30000, 30000))
        return self._dataset("datasets_paths", lambda: [str(bomb), str(self.good_png())], ["bomb", "good"])

    def _dataset(self, name: str, images: Callable[[], list], texts: list[str]) -> Path:
        folder = self.root / "train" / name
        if not folder.exists():
            import datasets

            datasets.disable_progress_bars()
            datasets.Dataset.from_dict({"image": images(), "text": texts}).cast_column(
                "image", datasets.Image()).save_to_disk(str(folder))
        return folder

    # ---- checkpoints -------------------------------------------------------------------------------------

    def tiny(self) -> Path:
        """tests/train_tiny.py's random pipeline (ours, saved in the published layout): 8x8 px native, factor 2."""
        path = self.root / "tiny"
        if not (path / "model_index.json").exists():
            from train_tiny import make_pipeline

            make_pipeline(path)
        return path

    def tiny_variant(self, name: str, change: Callable[[Path], None]) -> Path:
        path = self.root / "ckpt" / name
        if not path.exists():
            shutil.copytree(self.tiny(), path)
            change(path)
        return path

    def tiny_pipe(self):
        """The tiny pipeline, loaded once per process (LoRA cases load into it and unload)."""
        if self._pipe is None:
            from amused import AmusedPipeline

            self._pipe = AmusedPipeline.from_pretrained(self.tiny())
        return self._pipe

    def lora(self) -> Path:
        """A valid transformer LoRA (r=4, alpha=8) for the tiny pipeline, settings in the file's metadata only."""
        path = self.root / "lora" / "good.safetensors"
        if not path.exists():
            from amused import AmusedPipeline, lora

            pipe = AmusedPipeline.from_pretrained(self.tiny())
            lora.add_lora(pipe.transformer, r=4, alpha=8)
            lora.save_lora_weights(path, transformer=pipe.transformer)
            (path.parent / lora.CONFIG_FILE).unlink()
        return path

    def lora_variant(self, name: str, change: Callable[[dict], None] | None = None, settings: Any = "same",
                     raw: str | None = None) -> Path:
        """The good LoRA with its tensors changed and/or its settings replaced (`settings=None`: no metadata)."""
        path = self.root / "lora" / f"{name}.safetensors"
        if not path.exists():
            import torch
            from safetensors.torch import load_file, save_file

            state = load_file(str(self.lora()))
            if change is not None:
                with torch.no_grad():
                    change(state)
            if raw is not None:
                metadata = {"lora_adapter_metadata": raw}
            elif settings == "same":
                metadata = {"lora_adapter_metadata": json.dumps({"transformer": {"r": 4, "lora_alpha": 8}})}
            elif settings is None:
                metadata = None
            else:
                metadata = {"lora_adapter_metadata": json.dumps({"transformer": settings})}
            save_file(state, str(path), metadata=metadata)
        return path

    def pickle_file(self, name: str) -> Path:
        """A pickle that, when loaded, runs a command leaving a marker (it must never be loaded)."""
        return self.file(name, lambda: pickle.dumps(_Evil(str(self.markers))))


class _Evil:
    def __init__(self, markers: str):
        self.markers = markers

    def __reduce__(self):
        return os.system, (f'touch "{self.markers}/pickle-$(basename "$PWD")"',)


def edit_json(relative: str, **changes) -> Callable[[Path], None]:
    """A checkpoint change: set (or, with value ..., delete) keys of one JSON file."""
    def change(folder: Path) -> None:
        path = folder / relative
        data = json.loads(path.read_text())
        for key, value in changes.items():
            if value is ...:
                data.pop(key, None)
            else:
                data[key] = value
        path.write_text(json.dumps(data))
    return change


def write_text(relative: str, text: str) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        (folder / relative).write_text(text)
    return change


def edit_weights(component: str, how: Callable[[dict], None]) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        path = folder / component / ("model.safetensors" if component == "text_encoder" else
                                     "diffusion_pytorch_model.safetensors")
        state = load_file(str(path))
        with torch.no_grad():
            how(state)
        save_file(state, str(path), metadata={"format": "pt"})
    return change


def first_float(state: dict, contains: str = "") -> str:
    return next(k for k in sorted(state) if state[k].is_floating_point() and contains in k)


# ----------------------------------------------------------------------------------------------------------
# Checks for "works" outputs
# ----------------------------------------------------------------------------------------------------------


def ensure(condition, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def is_rgb(width: int, height: int, colour: tuple | None = None, tolerance: int = 12):
    def check(image) -> None:
        assert isinstance(image, PIL.Image.Image), f"got {type(image).__name__}"
        assert image.mode == "RGB" and image.size == (width, height), f"got {image.mode} {image.size}"
        if colour is not None:
            step = max(1, max(image.size) // 256)  # a sample: an 8192x8192 image as float64 would be 1.5 GiB
            mean = np.asarray(image)[::step, ::step].reshape(-1, 3).mean(0)
            assert np.abs(mean - colour).max() <= tolerance, f"mean colour {mean.round()} not {colour}"
    return check


def quadrants(image: PIL.Image.Image) -> np.ndarray:
    """(4, 3) mean colour of each quadrant: top-left, top-right, bottom-left, bottom-right."""
    a = np.asarray(image.convert("RGB"), dtype=float)
    h2, w2 = a.shape[0] // 2, a.shape[1] // 2
    return np.stack([p.reshape(-1, 3).mean(0) for p in (a[:h2, :w2], a[:h2, w2:], a[h2:, :w2], a[h2:, w2:])])


def png_file(width: int, height: int, name: str = "out.png"):
    """cli works: the output PNG (in the case's folder) exists, decodes, and has this size."""
    def check(folder: Path) -> None:
        path = folder / name
        assert path.is_file(), f"{path.name} not written"
        with PIL.Image.open(path) as image:
            image.load()
            assert image.size == (width, height), f"{path.name} is {image.size}, expected {(width, height)}"
    return check


def finite_image(image) -> None:
    a = np.asarray(image, dtype=float)
    assert a.ndim == 3 and np.isfinite(a).all() and a.std() > 0, "not a finite, non-constant image"


# ----------------------------------------------------------------------------------------------------------
# The cases, by category
# ----------------------------------------------------------------------------------------------------------

BOMBS, FORMATS, CONTENT = "image bombs", "image formats", "16-bit, alpha, EXIF"
COST, STOPPING, FIELDS = "server: costly requests", "server: disconnects, timeouts", "server: fields, headers"
REPLAY, LORA, CONFIG = "--from-image settings", "LoRA files", "config and weight files"
TRAIN, PATHS, ARGS = "training data", "paths and outputs", "command-line arguments"
CATEGORIES = (BOMBS, FORMATS, CONTENT, COST, STOPPING, FIELDS, REPLAY, LORA, CONFIG, TRAIN, PATHS, ARGS)

PNG_BOMBS = [(9000, 9000), (12000, 12000), (30000, 30000), (65535, 65535), (2**31 - 1, 1), (1, 2**31 - 1),
             (100000, 1000)]
JPEG_BOMBS = [(9000, 9000), (30000, 30000), (65500, 65500), (65535, 1100)]
WEBP_BOMBS = [(9000, 9000), (16384, 16384), (16384, 8192)]
TIFF_MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "I", "I;16", "I;16B",
              "I;16L", "F"]
OTHER_FORMATS = [("BMP", "RGB"), ("BMP", "P"), ("BMP", "1"), ("DIB", "RGB"), ("GIF", "P"), ("GIF", "L"),
                 ("ICO", "RGBA"), ("ICNS", "RGBA"), ("PPM", "RGB"), ("PPM", "L"), ("PCX", "RGB"), ("TGA", "RGB"),
                 ("SGI", "RGB"), ("IM", "RGB"), ("MSP", "1"), ("SPIDER", "F"), ("XBM", "1"), ("DDS", "RGBA"),
                 ("PDF", "RGB"), ("JPEG2000", "RGB"), ("AVIF", "RGB"), ("QOI", "RGB"), ("BLP", "P"),
                 ("PALM", "P"), ("EPS", "RGB")]
FAKE_FILES = {  # content no Pillow writer makes (or that must never reach one)
    "eps_text": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke showpage\n",
    "psd": b"8BPS\x00\x01" + bytes(6) + struct.pack(">HIIHH", 3, 8, 8, 8, 3) + bytes(64),
    "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8" height="8"/></svg>',
    "heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64),
    "html": b"<!doctype html><script>alert(1)</script>",
    "text": b"just some words\n",
    "empty": b"",
    "png_signature_then_garbage": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
    "jpeg_signature_then_garbage": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,
    "webp_riff_then_garbage": b"RIFF\x40\x00\x00\x00WEBPVP8 " + bytes(range(64)),
    "gzipped_png": gzip.compress(encode(PIL.Image.new("RGB", (8, 8)), "PNG")),
}
EXIF_TURNS = {1: None, 2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
              7: "TRANSVERSE", 8: "ROTATE_90"}


def py(name, category, expect, run, names=(), check=None, **kw) -> Case:
    return Case(name, category, "python", expect, run, tuple(names), check, **kw)


def cli(name, category, expect, argv, names=(), check=None, max_s=90.0, max_mib=2048.0, **kw) -> Case:
    """A command-line case; the quick ones run as fresh `python -m amused.cli` processes, the others as forks of
    the preloaded command line (the same `main`, without paying the imports again)."""
    return Case(name, category, "cli", expect, [str(a) for a in argv], tuple(names), check, max_mib=max_mib,
                max_s=max_s, fresh=kw.get("quick", False), **kw)


def http(name, category, expect, request, names=(), check=None, max_s=30.0, max_mib=512.0, **kw) -> Case:
    return Case(name, category, "http", expect, request, tuple(names), check, max_mib=max_mib, max_s=max_s, **kw)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bomb_cases(a: Arsenal) -> list[Case]:
    from amused.images import decode_base64_image, load_image

    cases = []
    made = [("png", w, h, png_bomb(w, h)) for w, h in PNG_BOMBS] + \
           [("jpeg", w, h, jpeg_bomb(w, h)) for w, h in JPEG_BOMBS] + \
           [("webp", w, h, webp_bomb(w, h)) for w, h in WEBP_BOMBS]
    for fmt, w, h, data in made:
        path = a.file(f"bombs/{fmt}_{w}x{h}.{fmt}", data)
        sources = {"path": lambda p=path: load_image(p),
                   "base64": lambda d=data: decode_base64_image(b64(d), name="image")}
        if fmt == "png":
            sources["bytes"] = lambda d=data: load_image(d, name="upload")
            sources["file"] = lambda d=data: load_image(io.BytesIO(d), name="upload")
        for i, (source, fn) in enumerate(sources.items()):
            cases.append(py(f"bomb {fmt} {w}x{h} ({len(data)} B) from {source}", BOMBS, "clean", fn,
                            (f"{w}x{h}", "cannot read"), max_mib=64, max_s=10, quick=i == 0 and w == h))
    limit, over = a.root / "bombs" / "real_8192x8192.png", a.root / "bombs" / "real_8193x8192.png"
    cases += [
        py("real 8192x8192 PNG (the default limit) is read", BOMBS, "works", lambda: load_image(limit),
           check=is_rgb(8192, 8192, (40, 40, 40)), max_mib=1024, max_s=60,
           prepare=lambda: a.file(limit.relative_to(a.root), lambda: encode(PIL.Image.new("L", (8192, 8192), 40),
                                                                            "PNG"))),
        py("real 8193x8192 PNG (one column over) is refused undecoded", BOMBS, "clean", lambda: load_image(over),
           ("8193x8192",), max_mib=64, max_s=10, quick=True,
           prepare=lambda: a.file(over.relative_to(a.root), lambda: encode(PIL.Image.new("L", (8193, 8192), 40),
                                                                           "PNG"))),
        py("30000x30000 PNG bomb with the limit raised to 1e9 (Pillow's own bomb check is off our path)", BOMBS,
           "clean", lambda: load_image(png_bomb(30000, 30000), max_pixels=10**9), ("cannot read",),
           max_mib=1100, max_s=30),
    ]
    return cases


def training_bomb_cases(a: Arsenal) -> list[Case]:
    from amused.training import data, shards

    cases = []
    for fmt, raw in (("png", png_bomb(30000, 30000)), ("jpeg", jpeg_bomb(30000, 30000)),
                     ("webp", webp_bomb(16384, 16384))):
        folder = a.file(f"train/bomb_folder_{fmt}/bomb.{fmt}", raw).parent
        cases.append(py(f"image folder with a {fmt} bomb", BOMBS, "clean",
                        lambda f=folder: data.ImageFolder(f, instance_prompt="x")[0], ("bomb.",), max_mib=64,
                        quick=fmt == "png"))
        tar = a.file(f"train/bomb_{fmt}.tar", shards.tar_bytes([(f"0000.{fmt}", raw), ("0000.txt", b"a bomb")]))
        cases.append(py(f"tar shard with a {fmt} bomb", BOMBS, "clean",
                        lambda t=tar: next(iter(shards.TarShardStream([str(t)], resolution=8, batch_size=1))),
                        ("sample 0000",), max_mib=64))
    single = a.file("bombs/png_30000x30000.png", png_bomb(30000, 30000))
    cases.append(py("--instance_data_image bomb", BOMBS, "clean", lambda: data.SingleImage(single, "x")[0],
                    ("png_30000x30000",), max_mib=64))
    rows, by_path = a.root / "train" / "datasets_rows", a.root / "train" / "datasets_paths"
    for i, (label, _, expect) in enumerate(a.DATASET_ROWS):
        cases.append(py(f"datasets row: {label}", BOMBS, expect,
                        lambda i=i: data.Records(data.load_hf_dataset(str(rows)))[i]["image"],
                        (f"dataset row {i}",), is_rgb(16, 16) if expect == "works" else None,
                        max_mib=96, max_s=20, quick=i in (0, 1, 2), prepare=a.datasets_rows))
    cases += [
        py("datasets row naming a bomb file by path", BOMBS, "clean",
           lambda: data.Records(data.load_hf_dataset(str(by_path)))[0], ("dataset row 0",), max_mib=96,
           prepare=a.datasets_paths),
        py("datasets row naming a good file by path", BOMBS, "works",
           lambda: data.Records(data.load_hf_dataset(str(by_path)))[1]["image"], check=is_rgb(16, 16),
           prepare=a.datasets_paths),
        py("datasets bomb row through make_dataset (what finetune builds)", BOMBS, "clean",
           lambda: data.make_dataset(argparse.Namespace(instance_data_dataset=str(rows), resolution=8))[(0, 1)],
           ("dataset row 1",), max_mib=96, prepare=a.datasets_rows),
        py("lazily opened 9000x9000 PIL bomb in a list of dicts (Python dataset=)", BOMBS, "clean",
           lambda: data.TrainDataset(data.Records([{"image": PIL.Image.open(a.root / "bombs" / "png_9000x9000.png"),
                                                    "text": "x"}]), 8)[0], ("9000x9000",), max_mib=64),
        py("demo upload of a bomb (gradio hands a path)", BOMBS, "clean",
           lambda: __import__("amused.demo").demo.as_image(str(single), "image"), ("30000x30000",), max_mib=64),
    ]
    return cases


def readable(path: Path) -> bool:
    """Whether Pillow reads this file back (PDF and PALM are write-only formats)."""
    try:
        with PIL.Image.open(path):
            return True
    except Exception:  # noqa: BLE001
        return False


def format_cases(a: Arsenal) -> list[Case]:
    from amused.images import load_image

    cases = []
    made = [(f"TIFF {mode}", lambda m=mode: encode(PIL.Image.new(m, (16, 16)), "TIFF")) for mode in TIFF_MODES]
    made += [(f"{fmt} {mode}", lambda f=fmt, m=mode: encode(PIL.Image.new(m, (16, 16)), f))
             for fmt, mode in OTHER_FORMATS]
    for label, maker in made:
        path = a.file(f"formats/{label.replace(' ', '_').replace(';', '')}.png", maker)  # a lying name
        cases.append(py(f"{label} named .png", FORMATS, "clean", lambda p=path: load_image(p),
                        ("not a PNG, JPEG or WebP",), max_mib=64, max_s=10,
                        quick=label in ("TIFF I;16", "EPS RGB", "GIF P")))
        if not label.startswith("EPS") and readable(path):  # a PIL image in that format (a `datasets` column)
            cases.append(py(f"{label} opened by Pillow, then handed over", FORMATS, "clean",
                            lambda p=path: load_image(PIL.Image.open(p)), ("images are not accepted",),
                            max_mib=64, max_s=10))
    for label, raw in FAKE_FILES.items():
        path = a.file(f"formats/{label}.png", raw)
        cases.append(py(f"{label} named .png", FORMATS, "clean", lambda p=path: load_image(p),
                        ("not a PNG, JPEG or WebP", "cannot read"), max_mib=64, max_s=10,
                        quick=label == "eps_text"))
    noise = encode(PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    path = a.file("formats/truncated.png", noise[:len(noise) // 2])  # cut inside the pixel data
    cases.append(py("PNG cut in half", FORMATS, "clean", lambda p=path: load_image(p), ("cannot read",)))
    picture = a.picture()
    works = {"PNG 1": ("PNG", picture.convert("1"), {}), "PNG L": ("PNG", picture.convert("L"), {}),
             "PNG LA": ("PNG", picture.convert("LA"), {}), "PNG P": ("PNG", picture.convert("P"), {}),
             "PNG RGB": ("PNG", picture, {}), "PNG RGBA": ("PNG", picture.convert("RGBA"), {}),
             "PNG I;16": ("PNG", PIL.Image.fromarray(np.full((16, 16), 30000, np.uint16)), {}),
             "PNG P with tRNS": ("PNG", picture.convert("P"), {"transparency": 0}),
             "APNG, 2 frames": ("PNG", picture, {"save_all": True, "append_images": [picture.rotate(90)]}),
             "JPEG L": ("JPEG", picture.convert("L"), {"quality": 95}),
             "JPEG RGB": ("JPEG", picture, {"quality": 95}),
             "JPEG CMYK": ("JPEG", picture.convert("CMYK"), {"quality": 95}),
             "JPEG progressive": ("JPEG", picture, {"quality": 95, "progressive": True}),
             "WebP lossy": ("WEBP", picture, {"quality": 95}),
             "WebP lossless RGBA": ("WEBP", picture.convert("RGBA"), {"lossless": True}),
             "WebP animated, 2 frames": ("WEBP", picture, {"save_all": True, "append_images": [picture],
                                                           "lossless": True})}
    for label, (fmt, image, save) in works.items():
        path = a.file(f"formats/ok_{label.replace(' ', '_').replace(',', '').replace(';', '')}.{fmt.lower()}",
                      lambda i=image, f=fmt, s=save: encode(i, f, **s))
        cases.append(py(f"{label} is read", FORMATS, "works", lambda p=path: load_image(p), check=is_rgb(16, 16),
                        quick=label in ("PNG I;16", "JPEG CMYK")))
    return cases


def palette_image() -> PIL.Image.Image:
    """8x8 palette image: left half index 0 (red, made transparent by tRNS when saved), right half index 1."""
    image = PIL.Image.new("P", (8, 8), 0)
    image.putpalette([255, 0, 0, 200, 0, 0] + [0] * 762)
    image.paste(1, (4, 0, 8, 8))
    return image


def content_cases(a: Arsenal) -> list[Case]:
    from amused import images
    from amused.images import decode_base64_image, load_image
    from amused.training import data

    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    deep = a.file("content/ramp16.png", lambda: encode(PIL.Image.fromarray(ramp), "PNG"))
    expected = np.round(ramp / 257.0)

    def ramp_rgb(image):
        assert image.mode == "RGB", image.mode
        assert np.abs(np.asarray(image, dtype=float)[..., 0] - expected).max() <= 1, "16-bit not scaled to 8"

    def ramp_l(image):
        assert image.mode == "L" and np.abs(np.asarray(image, dtype=float) - expected).max() <= 1

    def ramp_tensor(tensor):
        assert abs(float(tensor.mean()) - 0.5) < 0.02, f"mean {float(tensor.mean()):.3f}, not ~0.5 (white: 1.0)"

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red under fully transparent pixels (left half); right half opaque red
    rgba[:, 4:, 3] = 255
    hidden = {"RGBA PNG": ("png", PIL.Image.fromarray(rgba), {}),
              "LA PNG": ("png", PIL.Image.fromarray(rgba[..., [0, 3]], "LA"), {}),
              "P PNG with tRNS": ("png", palette_image(), {"transparency": 0}),
              "RGBA WebP": ("webp", PIL.Image.fromarray(rgba), {"lossless": True, "exact": True})}

    def white_left(image):
        array = np.asarray(image.convert("RGB"))
        assert (array[:, :4] >= 250).all(), f"transparent pixels show {array[0, 0].tolist()}, not white"

    def white_left_tensor(tensor):
        assert (tensor[0, :, :, :4] > 0.98).all(), "transparent pixels are not white"

    cases = [
        py("16-bit grayscale PNG -> RGB", CONTENT, "works", lambda: load_image(deep), check=ramp_rgb, quick=True),
        py("16-bit grayscale PNG -> L (mask)", CONTENT, "works", lambda: load_image(deep, mode="L"), check=ramp_l),
        py("16-bit grayscale PNG -> training pixels", CONTENT, "works",
           lambda: data.preprocess(PIL.Image.open(deep), 64, data.sample_rng(0, 0, 0), center_crop=True)["pixels"],
           check=ramp_tensor),
        py("16-bit grayscale PNG -> server (base64, then the pipeline's preprocessing)", CONTENT, "works",
           lambda: images.preprocess_image(decode_base64_image(b64(deep.read_bytes()), mode=None)),
           check=ramp_tensor),
    ]
    for label, (fmt, image, save) in hidden.items():
        path = a.file(f"content/hidden_{label.replace(' ', '_')}.{fmt}", lambda i=image, f=fmt, s=save:
                      encode(i, f.upper(), **s))
        cases.append(py(f"{label}, colour under transparency -> white", CONTENT, "works",
                        lambda p=path: load_image(p), check=white_left, quick=fmt == "png" and "RGBA" in label))
    rgba_png = a.root / "content" / "hidden_RGBA_PNG.png"
    cases += [
        py("RGBA PNG as a mask: transparent counts as black (keep)", CONTENT, "works",
           lambda: load_image(rgba_png, mode="L"),
           check=lambda m: ensure((np.asarray(m)[:, :4] == 0).all(), "transparent pixels are not black")),
        py("RGBA PNG -> server path (alpha kept, the pipeline flattens)", CONTENT, "works",
           lambda: images.preprocess_image(decode_base64_image(b64(rgba_png.read_bytes()), mode=None)),
           check=white_left_tensor),
        py("RGBA PNG -> training pixels", CONTENT, "works",
           lambda: data.preprocess(PIL.Image.open(rgba_png), 8, data.sample_rng(0, 0, 0), center_crop=True)["pixels"][
               None], check=white_left_tensor),
    ]
    source = a.picture(32, 16)
    for fmt, orientations in (("jpeg", range(1, 9)), ("png", (3, 6, 8)), ("webp", (6,))):
        for o in orientations:
            exif = PIL.Image.Exif()
            exif[0x0112] = o
            path = a.file(f"content/exif{o}.{fmt}", lambda e=exif, f=fmt: encode(
                source, f.upper(), exif=e, **({"quality": 95} if f != "png" else {})))
            turn = EXIF_TURNS[o]
            want = source if turn is None else source.transpose(getattr(PIL.Image.Transpose, turn))

            def oriented(image, want=want):
                assert image.size == want.size, f"size {image.size}, expected {want.size}"
                off = np.abs(quadrants(image) - quadrants(want)).max()  # a wrong turn is off by ~230
                assert off < 60, f"not turned as the EXIF orientation says (quadrant colours off by {off:.0f})"
                assert image.getexif().get(0x0112, 1) == 1, "orientation tag left in (would be applied twice)"
                assert data.to_rgb(image).size == want.size

            cases.append(py(f"EXIF orientation {o} in {fmt.upper()}", CONTENT, "works", lambda p=path: load_image(p),
                            check=oriented, quick=o == 6))
    six = a.root / "content" / "exif6.jpeg"
    cases.append(py("EXIF orientation 6 -> training micro-conditioning (original size turned)", CONTENT, "works",
                    lambda: data.preprocess(PIL.Image.open(six), 16, data.sample_rng(0, 0, 0))["micro_conds"],
                    check=lambda m: ensure(m[:2].tolist() == [16, 32], f"micro_conds {m[:2].tolist()}")))
    return cases


def recorded_png(a: Arsenal, name: str, record: Any, size: int = 8) -> Path:
    """An 8x8 PNG carrying `record` as its amused chunk (a dict as JSON, a string as it is)."""
    from PIL.PngImagePlugin import PngInfo

    def make() -> bytes:
        info = PngInfo()
        info.add_text("amused", record if isinstance(record, str) else json.dumps(record))
        return encode(PIL.Image.new("RGB", (size, size), (200, 40, 40)), "PNG", pnginfo=info)
    return a.file(f"replay/{name}.png", make)


def replay_cases(a: Arsenal) -> list[Case]:
    from amused.replay import confirm_model, parse_recorded

    def replay(record, model=None, lora=None, trust=False):
        text = record if isinstance(record, str) else json.dumps(record)
        recorded = parse_recorded(text, "--from-image x.png")
        return confirm_model(recorded, model, lora, trust, "--from-image x.png")

    drop = ...
    bad = [("seed", drop), ("seed", None), ("seed", "3"), ("seed", -1), ("seed", 2**64), ("seed", 1.5), ("seed", True),
           ("batch_index", 99), ("batch_index", -1), ("batch_index", "0"), ("batch_index", 1.5),
           ("batch_prompts", "red apple"), ("batch_prompts", [1]), ("batch_prompts", ["a"] * 65),
           ("batch_prompts", [["a"]]), ("prompt", drop), ("prompt", 5), ("prompt", "x" * 10001),
           ("steps", 0), ("steps", 201), ("steps", "12"), ("steps", 10**6),
           ("height", 4096), ("height", 0), ("height", "64"), ("height", -8), ("width", 4096),
           ("guidance_scale", "nan"), ("guidance_scale", float("nan")), ("guidance_scale", 1e300),
           ("guidance_scale", "10"), ("temperature", [1, 2, 3]), ("temperature", "hot"), ("temperature", -1),
           ("temperature", [1, "x"]), ("negative_prompt", 3), ("negative_prompt", ["a"]), ("stream", "gpu"),
           ("sampler", "evil"), ("model", 5), ("model", ""), ("model", "someone/else"), ("model", "../../etc"),
           ("lora", "/tmp/evil.safetensors"), ("lora", 5), ("lora_scale", 1e30), ("lora_scale", "1")]
    cases = []
    for i, (key, value) in enumerate(bad):
        record = {k: v for k, v in {**GOOD_RECORD, key: value}.items() if v is not ...}
        label = "missing" if value is ... else repr(value)[:40]
        names = ("--use-recorded-model",) if key in ("model", "lora") and isinstance(value, str) and value else (key,)
        cases.append(py(f"recorded {key} {label}", REPLAY, "clean", lambda r=record: replay(r), names,
                        quick=i % 6 == 0))
    for label, text in (("a JSON list", "[1, 2]"), ("a JSON string", '"red apple"'), ("a JSON number", "3"),
                        ("not JSON", "{seed: 3"), ("empty", ""), ("null", "null")):
        cases.append(py(f"recorded settings: {label}", REPLAY, "clean", lambda t=text: replay(t),
                        ("amused metadata",)))
    ok = lambda result: ensure(isinstance(result, tuple) and len(result) == 2, f"got {result!r}")  # noqa: E731
    cases += [
        py("recorded settings as written by amused", REPLAY, "works", lambda: replay(GOOD_RECORD), check=ok),
        py("recorded temperature pair", REPLAY, "works", lambda: replay({**GOOD_RECORD, "temperature": [2, 0]}),
           check=ok),
        py("a model named in the file, the user's --model wins", REPLAY, "works",
           lambda: replay({**GOOD_RECORD, "model": "someone/else"}, model="embedded"),
           check=lambda r: ensure(r[0] == "embedded", f"used {r[0]!r}")),
        py("a model named in the file, with --use-recorded-model", REPLAY, "works",
           lambda: replay({**GOOD_RECORD, "model": "someone/else"}, trust=True),
           check=lambda r: ensure(r[0] == "someone/else", f"used {r[0]!r}")),
    ]
    return cases


def replay_cli_cases(a: Arsenal) -> list[Case]:
    cases = []
    tiny = a.tiny()
    base = ["generate", "--from-image", None, "--model", tiny, "--out", "out.png", "--device", "cpu"]
    for label, record, names in (
            ("missing seed", {k: v for k, v in GOOD_RECORD.items() if k != "seed"}, ("recorded seed",)),
            ("batch_index 99", {**GOOD_RECORD, "batch_index": 99}, ("recorded batch_index",)),
            ("a JSON list", "[1, 2]", ("must be a JSON object",)),
            ("string seed", {**GOOD_RECORD, "seed": "3"}, ("recorded seed",)),
            ("4096x4096", {**GOOD_RECORD, "height": 4096, "width": 4096}, ("recorded height",)),
            ("no amused chunk", None, ("no amused metadata",))):
        path = recorded_png(a, f"cli_{label.replace(' ', '_')}", record) if record is not None else \
            a.file("replay/plain.png", lambda: encode(PIL.Image.new("RGB", (8, 8)), "PNG"))
        argv = list(base)
        argv[2] = path
        cases.append(cli(f"generate --from-image with {label}", REPLAY, "clean", argv, names,
                         quick=label == "missing seed"))
    model_only = recorded_png(a, "cli_model_only", {**GOOD_RECORD, "model": str(tiny)})
    lora_only = recorded_png(a, "cli_lora_only", {**GOOD_RECORD, "lora": "../../evil.safetensors"})
    traversal = recorded_png(a, "cli_model_traversal", {**GOOD_RECORD, "model": "../../nowhere/model"})
    good = recorded_png(a, "cli_good", GOOD_RECORD)
    bad_variations = recorded_png(a, "cli_variations_bad", {**GOOD_RECORD, "prompt": 5})
    tiff = a.file("replay/tiff.png", lambda: encode(PIL.Image.new("RGB", (8, 8)), "TIFF"))
    run = ["--out", "out.png", "--device", "cpu"]
    cases += [
        cli("generate --from-image naming a model only in the file", REPLAY, "clean",
            ["generate", "--from-image", model_only, *run], ("--use-recorded-model",)),
        cli("generate --from-image naming a LoRA only in the file", REPLAY, "clean",
            ["generate", "--from-image", lora_only, "--model", tiny, *run], ("--use-recorded-model",)),
        cli("generate --from-image --use-recorded-model with a missing model path", REPLAY, "clean",
            ["generate", "--from-image", traversal, "--use-recorded-model", *run], ("nowhere",)),
        cli("generate --from-image of a TIFF", REPLAY, "clean", ["generate", "--from-image", tiff, "--model", tiny,
                                                                 *run], ("not a PNG",)),
        cli("generate --from-image, good settings, replayed", REPLAY, "works",
            ["generate", "--from-image", good, "--model", tiny, *run], check=png_file(8, 8), quick=True),
        cli("variations of a PNG with a malformed recorded prompt", REPLAY, "clean",
            ["variations", bad_variations, "--model", tiny, "--steps", "2", *run], ("recorded prompt",)),
        cli("variations of a PNG with good settings", REPLAY, "works",
            ["variations", good, "--model", tiny, "--steps", "3", *run], check=png_file(8, 8)),
    ]
    return cases


def lora_cases(a: Arsenal) -> list[Case]:
    import torch

    from amused import lora

    def apply(path, scale=1.0):
        pipe = a.tiny_pipe()
        try:
            lora.load_lora_weights(pipe, path, adapter_scale=scale)
            generator = torch.Generator().manual_seed(0)
            return pipe("red", num_inference_steps=2, height=8, width=8, generator=generator).images[0]
        finally:
            if any(getattr(getattr(pipe, c), "peft_config", None) for c in ("transformer", "text_encoder")):
                lora.unload_lora_weights(pipe)

    def a_key(state, part="lora_A"):
        return next(k for k in sorted(state) if part in k)

    def lower_rank(state):
        key_a = a_key(state)
        key_b = key_a.replace("lora_A", "lora_B")
        state[key_a], state[key_b] = state[key_a][:2].clone(), state[key_b][:, :2].clone()

    good = a.lora()
    variants = [  # name, tensor change, settings (dict, None: no metadata, "same"), expect, names
        ("declared rank 20000", None, {"r": 20000, "lora_alpha": 20000}, "clean", ("r=20000",)),
        ("declared rank 1e9", None, {"r": 10**9, "lora_alpha": 8}, "clean", ("r=1000000000",)),
        ("declared rank 0", None, {"r": 0, "lora_alpha": 8}, "clean", ("r=0",)),
        ("declared rank -1", None, {"r": -1, "lora_alpha": 8}, "clean", ("r=-1",)),
        ("declared rank '4'", None, {"r": "4", "lora_alpha": 8}, "clean", ("r='4'",)),
        ("declared rank 4.5", None, {"r": 4.5, "lora_alpha": 8}, "clean", ("r=4.5",)),
        ("rank missing, alpha given", None, {"lora_alpha": 8}, "clean", ("r=None",)),
        ("lora_alpha NaN", None, {"r": 4, "lora_alpha": float("nan")}, "clean", ("lora_alpha=nan",)),
        ("lora_alpha 1e9", None, {"r": 4, "lora_alpha": 1e9}, "clean", ("lora_alpha",)),
        ("lora_alpha 'x'", None, {"r": 4, "lora_alpha": "x"}, "clean", ("lora_alpha",)),
        ("lora_dropout 2", None, {"r": 4, "lora_alpha": 8, "lora_dropout": 2}, "clean", ("lora_dropout",)),
        ("lora_dropout -0.1", None, {"r": 4, "lora_alpha": 8, "lora_dropout": -0.1}, "clean", ("lora_dropout",)),
        ("no settings at all (inferred from the tensors)", None, None, "works", ()),
        ("NaN weights", lambda s: s[a_key(s)].fill_(float("nan")), "same", "clean", ("NaN or infinite",)),
        ("inf weights", lambda s: s[a_key(s, "lora_B")].fill_(float("inf")), "same", "clean", ("NaN or infinite",)),
        ("int32 weights", lambda s: s.update({a_key(s, "lora_B"): s[a_key(s, "lora_B")].to(torch.int32)}), "same",
         "clean", ("floating-point",)),
        ("3-D weights", lambda s: s.update({a_key(s): s[a_key(s)][None]}), "same", "clean", ("2-D",)),
        ("A shaped (4, 99)", lambda s: s.update({a_key(s): torch.zeros(4, 99)}), "same", "clean",
         ("do not fit the layer",)),
        ("ranks differ between layers", lower_rank, "same", "clean", ("differ",)),
        ("B missing", lambda s: s.pop(a_key(s, "lora_B")), "same", "clean", ("not both A and B",)),
        ("a layer the model lacks", lambda s: s.update({"transformer.nowhere.to_q.lora_A.weight": torch.zeros(4, 4),
                                                        "transformer.nowhere.to_q.lora_B.weight": torch.zeros(4, 4)}),
         "same", "clean", ("names no layer",)),
        ("a DoRA magnitude vector", lambda s: s.update(
            {"transformer.transformer_layers.0.attn1.to_q.lora_magnitude_vector": torch.zeros(4)}), "same", "clean",
         ("not a LoRA A or B weight",)),
        ("keys without a component prefix", lambda s: [s.update({k.partition(".")[2]: s.pop(k)}) for k in list(s)],
         "same", "clean", ("not a LoRA weight of the transformer or text_encoder",)),
        ("a component named unet", lambda s: [s.update({"unet." + k.partition(".")[2]: s.pop(k)}) for k in list(s)],
         "same", "clean", ("not a LoRA weight",)),
        ("no tensors", lambda s: s.clear(), "same", "clean", ("no LoRA weights",)),
        ("fp16 weights", lambda s: s.update({k: v.half() for k, v in s.items()}), "same", "works", ()),
        ("bf16 weights", lambda s: s.update({k: v.bfloat16() for k, v in s.items()}), "same", "works", ()),
    ]
    cases = []
    for i, (label, change, settings, expect, names) in enumerate(variants):
        path = a.lora_variant(label.replace(" ", "_").replace("'", ""), change, settings)
        cases.append(py(f"LoRA: {label}", LORA, expect, lambda p=path: apply(p), names,
                        finite_image if expect == "works" else None, max_mib=256, quick=i % 4 == 0))
    for label, raw, names in (("metadata not JSON", "{not json", ("not JSON",)),
                              ("metadata a JSON list", json.dumps(["r", 4]), ("must map each component",)),
                              ("component settings a string", json.dumps({"transformer": "r=4"}),
                               ("must map each component",))):
        path = a.lora_variant(label.replace(" ", "_"), raw=raw)
        cases.append(py(f"LoRA: {label}", LORA, "clean", lambda p=path: apply(p), names))
    for scale, expect in ((float("nan"), "clean"), (float("inf"), "clean"), (float("-inf"), "clean"),
                          (1e30, "clean"), (-1e30, "clean"), (101.0, "clean"), (True, "clean"), ("1", "clean"),
                          (100.0, "works"), (-100.0, "works"), (0.0, "works")):
        cases.append(py(f"LoRA scale {scale!r}", LORA, expect, lambda s=scale: apply(good, s),
                        ("--lora-scale",), finite_image if expect == "works" else None, quick=scale == 1e30))
    size = good.stat().st_size
    forged = {
        "header length past the end": safetensors_bytes({}, length=10**6),
        "header length 2^63": safetensors_bytes({}, length=2**63),
        "header not JSON": safetensors_bytes(b"{not json" + b" " * 7),
        "header a JSON list": safetensors_bytes("[1, 2, 3]     "),
        "data offsets past the end": safetensors_bytes(
            {"transformer.x.lora_A.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 10**9]}}, bytes(64)),
        "overlapping offsets": safetensors_bytes(
            {"transformer.a.lora_A.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
             "transformer.a.lora_B.weight": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24)),
        "unknown dtype": safetensors_bytes(
            {"transformer.a.lora_A.weight": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16)),
        "shape 2^40 x 2^40 in 4 bytes": safetensors_bytes(
            {"transformer.a.lora_A.weight": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}},
            bytes(4)),
        "negative offsets": safetensors_bytes(
            {"transformer.a.lora_A.weight": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, bytes(4)),
        "zero bytes": b"",
        "seven bytes": b"\x07" * 7,
        "cut in half": lambda: good.read_bytes()[:size // 2],
    }
    for i, (label, raw) in enumerate(forged.items()):
        path = a.file(f"lora/forged_{label.replace(' ', '_').replace('^', '')}.safetensors", raw)
        cases.append(py(f"LoRA safetensors: {label}", LORA, "clean", lambda p=path: apply(p),
                        ("corrupt or unreadable LoRA file", "LoRA"), max_mib=128, quick=i % 4 == 0))
    for name in ("evil.bin", "evil.pt", "evil.ckpt", "pickle_named.safetensors",
                 "pickle_folder/pytorch_lora_weights.bin"):
        path = a.pickle_file(f"lora/{name}")
        target = path.parent if name.startswith("pickle_folder") else path
        cases.append(py(f"LoRA pickle: {name}", LORA, "clean", lambda p=target: apply(p),
                        ("pickle", "safetensors", "corrupt", "does not exist"), quick=name == "evil.bin"))
    fifo = a.root / "lora" / "fifo.safetensors"
    if not fifo.exists():
        os.mkfifo(fifo)
    link = a.root / "lora" / "zero.safetensors"
    if not link.exists():
        link.symlink_to("/dev/zero")
    cases += [
        py("LoRA: a FIFO named .safetensors (must not block)", LORA, "clean", lambda: apply(fifo),
           ("does not exist", "not a regular file", "LoRA"), max_s=10),
        py("LoRA: a link to /dev/zero named .safetensors", LORA, "clean", lambda: apply(link),
           ("corrupt", "LoRA", "not a regular file"), max_s=10, max_mib=128),
        py("LoRA: a missing file", LORA, "clean", lambda: apply(a.root / "lora" / "missing.safetensors"),
           ("does not exist",)),
        py("LoRA: a good file", LORA, "works", lambda: apply(good), check=finite_image, quick=True),
    ]
    tiny = a.tiny()
    run = ["generate", "red", "--model", tiny, "--steps", "2", "--out", "out.png", "--device", "cpu"]
    for label, extra, expect, names in (
            ("NaN weights", ["--lora", a.root / "lora" / "NaN_weights.safetensors"], "clean", ("NaN",)),
            ("declared rank 20000", ["--lora", a.root / "lora" / "declared_rank_20000.safetensors"], "clean",
             ("r=20000",)),
            ("a forged header", ["--lora", a.root / "lora" / "forged_header_length_past_the_end.safetensors"], "clean",
             ("LoRA",)),
            ("a pickle .bin", ["--lora", a.root / "lora" / "evil.bin"], "clean", ("pickle",)),
            ("/etc/passwd", ["--lora", "/etc/passwd"], "clean", ("safetensors",)),
            ("--lora-scale nan", ["--lora", good, "--lora-scale", "nan"], "clean", ("--lora-scale",)),
            ("--lora-scale 1e30", ["--lora", good, "--lora-scale", "1e30"], "clean", ("--lora-scale",)),
            ("a good file", ["--lora", good], "works", ())):
        cases.append(cli(f"generate --lora with {label}", LORA, expect, run + extra, names,
                         png_file(8, 8) if expect == "works" else None, quick=label == "NaN weights"))
    return cases


def config_cases(a: Arsenal) -> list[Case]:
    import torch

    from amused import AmusedPipeline

    def load_and_generate(folder):
        pipe = AmusedPipeline.from_pretrained(folder)
        return pipe("red", num_inference_steps=2, height=8, width=8,
                    generator=torch.Generator().manual_seed(0)).images[0]

    mark = "import os\nopen(os.path.join(%r, '%s-' + os.path.basename(os.getcwd())), 'w').close()\n"
    tokenizer_code = mark % (str(a.markers), "tokenizer_code") + "class EvilTokenizer: pass\n"
    model_code = mark % (str(a.markers), "model_code") + "class Evil: pass\n"

    def remote_tokenizer(folder: Path) -> None:
        (folder / "tokenizer" / "evil.py").write_text(tokenizer_code)
        edit_json("tokenizer/tokenizer_config.json", tokenizer_class="EvilTokenizer",
                  auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})(folder)

    def remote_model(folder: Path) -> None:
        (folder / "text_encoder" / "evil.py").write_text(model_code)
        edit_json("text_encoder/config.json", auto_map={"AutoModel": "evil.Evil"})(folder)

    def pickle_only(folder: Path) -> None:
        (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
        (folder / "transformer" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Evil(str(a.markers))))

    def cut(component: str, keep: float = 0.5) -> Callable[[Path], None]:
        def change(folder: Path) -> None:
            path = folder / component / "diffusion_pytorch_model.safetensors"
            path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])
        return change

    def forged(folder: Path) -> None:
        (folder / "vqvae" / "diffusion_pytorch_model.safetensors").write_bytes(safetensors_bytes({}, length=2**40))

    T, V, E = "transformer/config.json", "vqvae/config.json", "text_encoder/config.json"
    weights_nan = lambda s: s[first_float(s)].fill_(float("nan"))  # noqa: E731
    variants = [  # name, change, expect, names
        ("hidden_size 1e9", edit_json(T, hidden_size=10**9), "clean", ("hidden_size",)),
        ("hidden_size '32'", edit_json(T, hidden_size="32"), "clean", ("hidden_size",)),
        ("hidden_size 32.0", edit_json(T, hidden_size=32.0), "clean", ("hidden_size",)),
        ("hidden_size true", edit_json(T, hidden_size=True), "clean", ("hidden_size",)),
        ("hidden_size null", edit_json(T, hidden_size=None), "clean", ("hidden_size",)),
        ("num_attention_heads 0", edit_json(T, num_attention_heads=0), "clean", ("num_attention_heads",)),
        ("block_num_heads 3", edit_json(T, block_num_heads=3), "clean", ("block_num_heads",)),
        ("sample_size 16384", edit_json(T, sample_size=16384), "clean", ("sample_size",)),
        ("sample_size 0", edit_json(T, sample_size=0), "clean", ("sample_size",)),
        ("vocab_size 2^40", edit_json(T, vocab_size=2**40), "clean", ("vocab_size",)),
        ("codebook_size -1", edit_json(T, codebook_size=-1), "clean", ("codebook_size",)),
        ("layer_norm_eps 0", edit_json(T, layer_norm_eps=0), "clean", ("layer_norm_eps",)),
        ("hidden_dropout 1.5", edit_json(T, hidden_dropout=1.5), "clean", ("hidden_dropout",)),
        ("use_bias 'false'", edit_json(T, use_bias="false"), "clean", ("use_bias",)),
        ("an unknown transformer key", edit_json(T, evil_key=1), "clean", ("evil_key",)),
        ("upsample without downsample", edit_json(T, upsample=True), "clean", ("upsample",)),
        ("micro_cond_embed_dim 12", edit_json(T, micro_cond_embed_dim=12), "clean", ("micro_cond_embed_dim",)),
        ("num_hidden_layers 1e6", edit_json(T, num_hidden_layers=10**6), "clean", ("num_hidden_layers",)),
        ("intermediate_size -1", edit_json(T, intermediate_size=-1), "clean", ("intermediate_size",)),
        ("vq block_out_channels [8, 1e8]", edit_json(V, block_out_channels=[8, 10**8]), "clean",
         ("block_out_channels",)),
        ("vq block_out_channels '88'", edit_json(V, block_out_channels="88"), "clean", ("block_out_channels",)),
        ("vq 9 stages", edit_json(V, block_out_channels=[8] * 9, down_block_types=["DownEncoderBlock2D"] * 9,
                                  up_block_types=["UpDecoderBlock2D"] * 9), "clean", ("block_out_channels",)),
        ("vq norm_num_groups 0", edit_json(V, norm_num_groups=0), "clean", ("norm_num_groups",)),
        ("vq norm_num_groups 3", edit_json(V, norm_num_groups=3), "clean", ("norm_num_groups",)),
        ("vq scaling_factor '0.18'", edit_json(V, scaling_factor="0.18"), "clean", ("scaling_factor",)),
        ("vq scaling_factor NaN", edit_json(V, scaling_factor=float("nan")), "clean", ("scaling_factor",)),
        ("vq num_vq_embeddings 2^40", edit_json(V, num_vq_embeddings=2**40), "clean", ("num_vq_embeddings",)),
        ("vq unknown block types", edit_json(V, down_block_types=["EvilBlock"] * 2), "clean", ("block types",)),
        ("vq force_upcast 'yes'", edit_json(V, force_upcast="yes"), "clean", ("force_upcast",)),
        ("vq latent_channels 0", edit_json(V, latent_channels=0), "clean", ("latent_channels",)),
        ("text encoder architectures LlamaForCausalLM", edit_json(E, architectures=["LlamaForCausalLM"]), "clean",
         ("unknown text model class",)),
        ("text encoder architectures os.system", edit_json(E, architectures=["os.system"]), "clean",
         ("unknown text model class",)),
        ("text encoder hidden_size 1e6", edit_json(E, hidden_size=10**6), "clean", ("text encoder",)),
        ("text encoder vocab_size 'x'", edit_json(E, vocab_size="x"), "clean", ("text encoder", "vocab_size")),
        ("text encoder auto_map to remote code (ignored)", remote_model, "works", ()),
        ("tokenizer auto_map to remote code", remote_tokenizer, "clean", ("tokenizer", "text encoder")),
        ("tokenizer.json not JSON", write_text("tokenizer/tokenizer.json", "{oops"), "clean",
         ("tokenizer", "text encoder")),
        ("model_index.json not JSON", write_text("model_index.json", "{oops"), "clean", ("model_index.json",)),
        ("model_index.json a list", write_text("model_index.json", "[1]"), "clean", ("model_index.json",)),
        ("model_index.json naming os.system", edit_json("model_index.json", _class_name="EvilPipeline",
                                                        transformer=["os", "system"]), "clean",
         ("not a pipeline amused can run",)),
        ("model_index.json with an unknown _class_name", edit_json("model_index.json", _class_name="EvilPipeline"),
         "works", ()),
        ("scheduler mask_token_id 1e9", edit_json("scheduler/scheduler_config.json", mask_token_id=10**9), "clean",
         ("mask_token_id",)),
        ("scheduler mask_token_id -1", edit_json("scheduler/scheduler_config.json", mask_token_id=-1), "clean",
         ("mask_token_id",)),
        ("scheduler mask_token_id '23'", edit_json("scheduler/scheduler_config.json", mask_token_id="23"), "clean",
         ("mask_token_id",)),
        ("scheduler masking_schedule 'evil'", edit_json("scheduler/scheduler_config.json", masking_schedule="evil"),
         "clean", ("masking_schedule",)),
        ("generation_config guidance_scale NaN", write_text("generation_config.json", '{"guidance_scale": NaN}'),
         "clean", ("guidance_scale",)),
        ("generation_config num_inference_steps 1e9",
         write_text("generation_config.json", '{"num_inference_steps": 1000000000}'), "clean",
         ("num_inference_steps",)),
        ("generation_config temperature 'hot'", write_text("generation_config.json", '{"temperature": "hot"}'),
         "clean", ("temperature",)),
        ("transformer NaN weights", edit_weights("transformer", weights_nan), "clean", ("NaN",)),
        ("VQ-GAN NaN weights", edit_weights("vqvae", weights_nan), "clean", ("NaN",)),
        ("text encoder NaN weights", edit_weights("text_encoder", weights_nan), "clean", ("NaN",)),
        ("transformer inf weights", edit_weights("transformer", lambda s: s[first_float(s)].fill_(float("inf"))),
         "clean", ("NaN", "infinite")),
        ("transformer weights 1e30 (finite, overflow)",
         edit_weights("transformer", lambda s: [v.fill_(1e30) for v in s.values() if v.is_floating_point()]),
         "clean", ("non-finite", "NaN", "infinite", "overflow")),
        ("VQ-GAN int64 tensor", edit_weights("vqvae", lambda s: s.update(
            {first_float(s): s[first_float(s)].to(torch.int64)})), "clean", ("int64",)),
        ("transformer tensor of the wrong shape", edit_weights("transformer", lambda s: s.update(
            {first_float(s, "weight"): torch.zeros(3, 5)})), "clean", ("shape",)),
        ("transformer extra tensor", edit_weights("transformer", lambda s: s.update({"evil": torch.zeros(1)})),
         "clean", ("unexpected",)),
        ("transformer weights cut in half", cut("transformer"), "clean", ("corrupt",)),
        ("VQ-GAN forged safetensors header", forged, "clean", ("corrupt",)),
        ("transformer weights only as a pickle", pickle_only, "clean", ("pickle",)),
        ("no model_index.json", lambda f: (f / "model_index.json").unlink(), "clean", ("model_index.json",)),
        ("unchanged", lambda f: None, "works", ()),
    ]
    cases = []
    for i, (label, change, expect, names) in enumerate(variants):
        folder = a.tiny_variant(label.replace(" ", "_").replace("'", "").replace("^", ""), change)
        cases.append(py(f"checkpoint: {label}", CONFIG, expect, lambda f=folder: load_and_generate(f), names,
                        finite_image if expect == "works" else None, max_mib=400, quick=i % 5 == 0))
    a.file("not_a_folder", b"x")
    for label, where, names in (("a missing folder", a.root / "nowhere", ("does not exist",)),
                                ("a file", a.root / "not_a_folder", ("is a file",)),
                                ("a hub id, offline", "someone/nothing-here", ("someone/nothing-here",))):
        cases.append(py(f"checkpoint: {label}", CONFIG, "clean", lambda w=where: load_and_generate(w), names))
    run = ["--steps", "2", "--out", "out.png", "--device", "cpu"]
    for label in ("sample_size 16384", "hidden_size '32'", "transformer NaN weights", "VQ-GAN NaN weights",
                  "transformer weights 1e30 (finite, overflow)", "text encoder architectures os.system",
                  "transformer weights only as a pickle", "tokenizer auto_map to remote code",
                  "scheduler mask_token_id 1e9"):
        names = next(v[3] for v in variants if v[0] == label)
        folder = a.root / "ckpt" / label.replace(" ", "_").replace("'", "").replace("^", "")
        cases.append(cli(f"generate --model with {label}", CONFIG, "clean",
                         ["generate", "red", "--model", folder, *run], names, quick=label == "transformer NaN weights"))
    cases.append(cli("generate --model with a hub id, offline", CONFIG, "clean",
                     ["generate", "red", "--model", "someone/nothing-here", *run], ("someone/nothing-here",)))
    return cases


def training_cases(a: Arsenal) -> list[Case]:
    from amused.training import data, shards

    good = a.good_png()
    cases = []
    stream = lambda t: next(iter(shards.TarShardStream([str(t)], resolution=8, batch_size=1)))  # noqa: E731
    png = good.read_bytes()

    def declared_8gib() -> bytes:
        raw = bytearray(shards.tar_bytes([("0000.png", png), ("0000.txt", b"x" * 600)]))
        info = tarfile.TarInfo("0000.txt")
        info.size = 8 << 30
        header = info.tobuf(format=tarfile.GNU_FORMAT)
        start = raw.find(b"0000.txt")
        raw[start:start + 512] = header
        return bytes(raw[:start + 512 + 1024])

    shard_inputs = [  # label, file name, content; the refusal names the shard, or the sample in it
        ("not a tar", "not-a-tar.tar", b"hello world\n" * 200),
        ("a tar cut short", "cut-short.tar",
         lambda: shards.tar_bytes([("0000.png", png), ("0000.txt", b"x" * 5000)])[:2000]),  # inside the caption
        ("gzip garbage named .tar.gz", "gzip-garbage.tar.gz", b"\x1f\x8b\x08\x00" + bytes(range(200))),
        ("a gzip bomb: 512 MiB caption in 0.5 MiB", "gz-bomb.tar.gz", gz_bomb),
        ("a member declaring 8 GiB", "declares-8gib.tar", declared_8gib),
        ("caption JSON not JSON", "bad-json.tar", lambda: shards.tar_bytes([("0000.png", png), ("0000.json", b"{oops")])),
        ("caption not UTF-8", "bad-utf8.tar", lambda: shards.tar_bytes([("0000.png", png), ("0000.txt", b"\xff\xfe\xfa")])),
        ("a sample without an image", "no-image.tar", lambda: shards.tar_bytes([("0000.txt", b"caption")])),
        ("a TIFF member", "tiff-member.tar",
         lambda: shards.tar_bytes([("0000.png", encode(PIL.Image.new("RGB", (8, 8)), "TIFF")), ("0000.txt", b"x")])),
    ]
    for i, (label, name, raw) in enumerate(shard_inputs):
        path = a.root / "train" / f"shard_{name}"
        make = lambda p=path, r=raw: a.file(p.relative_to(a.root), r)  # noqa: E731
        if raw is not gz_bomb:  # cheap: made now (the command-line cases use some); the bomb takes seconds
            make()
        cases.append(py(f"tar shard: {label}", TRAIN, "clean", lambda p=path: stream(p), (name,), max_mib=96,
                        max_s=20, quick=i in (0, 3), prepare=make))
    traversal = a.file("train/shard_traversal.tar", lambda: shards.tar_bytes([("../../../etc/evil.png", png),
                                                                         ("../../../etc/evil.txt", b"x")]))
    cases.append(py("tar shard: member names with ../ (nothing is extracted)", TRAIN, "works",
                    lambda: stream(traversal)["pixels"], check=lambda t: ensure(tuple(t.shape) == (3, 8, 8),
                                                                                f"shape {tuple(t.shape)}")))

    def folder(name: str, files: dict[str, bytes | str]) -> Path:
        for rel, content in files.items():
            a.file(f"train/{name}/{rel}", content.encode() if isinstance(content, str) else content)
        return a.root / "train" / name

    index = json.dumps({"shards": [{"file": "shard-00000.safetensors", "num_samples": 2}]})
    empty_prompt = safetensors_bytes({"hidden": {"dtype": "F32", "shape": [1, 16, 8], "data_offsets": [0, 512]},
                                      "pooled": {"dtype": "F32", "shape": [1, 8], "data_offsets": [512, 544]}},
                                     bytes(544))  # what `amused preencode` writes beside its shards
    bad_jsonl = folder("bad_jsonl", {"a.png": png, "metadata.jsonl": "{oops\n"})
    list_row = folder("list_row", {"a.png": png, "metadata.jsonl": "[1, 2]\n"})
    csv_columns = folder("csv_columns", {"a.png": png, "metadata.csv": "file_name,other\na.png,x\n"})
    empty = folder("empty", {"notes.txt": "x"})
    tiff = folder("tiff", {"a.png": encode(PIL.Image.new("RGB", (8, 8)), "TIFF")})
    pre_json = folder("pre_json", {"index.json": "{oops"})
    pre_shape = folder("pre_shape", {"index.json": '{"shards": 5}'})
    pre_missing = folder("pre_missing", {"index.json": index})
    pre_forged = folder("pre_forged", {"index.json": index, "empty_prompt.safetensors": empty_prompt,
                                       "shard-00000.safetensors": safetensors_bytes({}, length=2**40)})
    rows = str(a.root / "train" / "datasets_rows")
    cases += [
        py("image folder: metadata.jsonl not JSON", TRAIN, "clean", lambda: data.ImageFolder(bad_jsonl),
           ("metadata.jsonl",)),
        py("image folder: metadata row a JSON list", TRAIN, "clean", lambda: data.ImageFolder(list_row),
           ("metadata.jsonl",)),
        py("image folder: metadata.csv without the text column", TRAIN, "clean", lambda: data.ImageFolder(csv_columns),
           ("metadata.csv",)),
        py("image folder: no images", TRAIN, "clean", lambda: data.ImageFolder(empty), ("holds no images",)),
        py("image folder: a TIFF named .png", TRAIN, "clean", lambda: data.ImageFolder(tiff, instance_prompt="x")[0],
           ("not a PNG, JPEG or WebP",), quick=True),
        py("pre-encoded: index.json not JSON", TRAIN, "clean", lambda: data.PreencodedDataset(pre_json),
           ("index.json",)),
        py("pre-encoded: index.json shards a number", TRAIN, "clean", lambda: data.PreencodedDataset(pre_shape),
           ("index.json",)),
        py("pre-encoded: a missing shard file", TRAIN, "clean", lambda: data.PreencodedDataset(pre_missing),
           ("shard-00000",)),
        py("pre-encoded: a forged shard header", TRAIN, "clean", lambda: data.PreencodedDataset(pre_forged)[0],
           ("shard-00000",)),
        py("datasets: the image column is missing", TRAIN, "clean",
           lambda: data.Records(data.load_hf_dataset(rows), image_column="img"), ("--image_key",)),
        py("datasets: a folder that is not a dataset (offline)", TRAIN, "clean",
           lambda: data.load_hf_dataset(str(empty / "nothing")), ("nothing",)),
    ]
    return cases


def training_cli_cases(a: Arsenal) -> list[Case]:
    """A real `amused finetune` of the tiny model for one step, on good and hostile data."""
    from train_tiny import make_image_folder

    cases = []

    images = a.root / "train" / "good_folder"
    if not images.exists():
        make_image_folder(images, n=4, size=12)
    run = ["finetune", "--model", a.tiny(), "--resolution", "8", "--max_train_steps", "1", "--output_dir", "run"]
    bomb_folder = a.root / "train" / "bomb_folder_png"
    for label, extra, expect, names in (
            ("a good image folder", ["--train_data_dir", images, "--train_batch_size", "2"], "works", ()),
            ("a bomb in the image folder", ["--train_data_dir", bomb_folder, "--instance_prompt", "x"], "clean",
             ("30000x30000",)),
            ("a bomb in the image folder, 1 loader worker", ["--train_data_dir", bomb_folder, "--instance_prompt", "x",
                                                             "--dataloader_num_workers", "1"], "clean",
             ("30000x30000",)),
            ("a TIFF named .png in the folder", ["--train_data_dir", a.root / "train" / "tiff", "--instance_prompt",
                                                 "x"], "clean", ("not a PNG",)),
            ("a bomb row in a datasets dataset", ["--instance_data_dataset", a.datasets_rows(),
                                                  "--train_batch_size", "8"], "clean", ("dataset row",)),
            ("a bomb in a tar shard", ["--train_shards", a.root / "train" / "bomb_png.tar"], "clean", ("sample",)),
            ("a tar shard that is not a tar", ["--train_shards", a.root / "train" / "shard_not-a-tar.tar"], "clean",
             ("not-a-tar",)),
            ("a gzip bomb shard", ["--train_shards", a.file("train/shard_gz-bomb.tar.gz", gz_bomb)], "clean",
             ("gz-bomb",)),
            ("a pre-encoded folder with a forged shard", ["--preencoded_data_dir", a.root / "train" / "pre_forged"],
             "clean", ("shard-00000",))):
        cases.append(cli(f"finetune with {label}", TRAIN, expect, run + extra, names,
                         (lambda f: ensure(any((f / "run").rglob("*.safetensors")), "no weights written"))
                         if expect == "works" else None, max_s=120, quick=label == "a bomb row in a datasets dataset"))
    return cases


def path_cases(a: Arsenal) -> list[Case]:
    from amused.training import data

    good = a.good_png()
    cases = []
    for label, file_name in (("../ out of the folder", "../../good.png"), ("an absolute path", str(good)),
                             ("a number", 5), ("sub/../../ out of the folder", "sub/../../../good.png")):
        root = a.root / "train" / f"meta_{label.split()[0].replace('/', '_').replace('.', 'd')}"
        a.file(f"train/{root.name}/metadata.jsonl", (json.dumps({"file_name": file_name, "text": "x"}) + "\n").encode())
        cases.append(py(f"image folder metadata file_name {label}", PATHS, "clean",
                        lambda r=root: data.ImageFolder(r)[0], ("metadata.jsonl",), quick=label.startswith("..")))
    for label, request, status in (
            ("GET /../../etc/passwd", {"method": "GET", "path": "/../../etc/passwd"}, (404, 400)),
            ("GET /v1/%2e%2e/%2e%2e/etc/passwd", {"method": "GET", "path": "/v1/%2e%2e/%2e%2e/etc/passwd"}, (404, 400)),
            ("GET /docs/../../../etc/passwd", {"method": "GET", "path": "/docs/../../../etc/passwd"}, (404, 400)),
            ("a model field naming a path", {"json": {"prompt": "x", "model": "../../etc/passwd"}}, (422,)),
            ("an output field naming a path", {"json": {"prompt": "x", "output": "/etc/cron.d/x"}}, (422,)),
            ("a path field", {"json": {"prompt": "x", "path": "../../etc/passwd"}}, (422,))):
        cases.append(http(f"server: {label}", PATHS, "clean", {"method": "POST", "path": "/v1/generate", **request,
                                                               "status": status}))
    return cases


def path_cli_cases(a: Arsenal) -> list[Case]:
    cases = []
    tiny = a.tiny()
    a.file("paths/a_file", b"x")
    (a.root / "paths" / "folder.png").mkdir(parents=True, exist_ok=True)
    for label, argv, names in (
            ("--out /dev/null/x.png", ["generate", "red", "--out", "/dev/null/x.png"], ("--out",)),
            ("--out naming a folder", ["generate", "red", "--out", a.root / "paths" / "folder.png"], ("--out",)),
            ("--out x.jpg", ["generate", "red", "--out", "x.jpg"], ("--out",)),
            ("--grid naming a folder", ["generate", "red", "--num-images", "2", "--grid", a.root / "paths"],
             ("--grid",)),
            ("--out under a file", ["generate", "red", "--out", a.root / "paths" / "a_file" / "x.png"], ("--out",)),
            ("--lora ../../etc/passwd", ["generate", "red", "--lora", "../../etc/passwd", "--out", "out.png"],
             ("safetensors",))):
        cases.append(cli(f"generate {label}", PATHS, "clean", [*argv, "--model", tiny, "--device", "cpu"], names,
                         quick=label == "--out /dev/null/x.png"))
    return cases


def argument_cases(a: Arsenal) -> list[Case]:
    tiny = a.tiny()
    good = a.good_png()
    garbage = a.file("args/garbage.bin", bytes(range(128, 256)) * 64)
    a.file("args/a_file", b"x")
    model = ["--model", tiny, "--device", "cpu"]
    rows = [
        ("generate --device bogus", ["generate", "red", "--model", tiny, "--device", "bogus"], ("--device",)),
        ("generate --seed 2**64", ["generate", "red", "--seed", str(2**64), *model], ("--seed",)),
        ("generate --num-images -1", ["generate", "red", "--num-images", "-1", *model], ("--num-images",)),
        ("generate --steps 0", ["generate", "red", "--steps", "0", *model], ("steps",)),
        ("generate --guidance-scale nan", ["generate", "red", "--guidance-scale", "nan", *model], ("guidance",)),
        ("generate --temperature nan", ["generate", "red", "--temperature", "nan", *model], ("temperature",)),
        ("generate --batch-size 0", ["generate", "red", "--batch-size", "0", *model], ("batch",)),
        ("generate --height 65536 --width 65536", ["generate", "red", "--height", "65536", "--width", "65536",
                                                   *model], ("height",)),
        ("generate --height 4096 --width 4096, embedded model", ["generate", "red", "--height", "4096", "--width",
                                                                 "4096", "--device", "cpu"], ("height",)),
        ("generate --prompts-file of binary garbage", ["generate", "--prompts-file", garbage, *model],
         ("garbage.bin", "utf-8", "prompts")),
        ("generate --prompts-file missing", ["generate", "--prompts-file", "missing.txt", *model], ("missing.txt",)),
        ("img2img --num-images 0", ["img2img", good, "red", "--num-images", "0", *model], ("--num-images",)),
        ("img2img --strength 0", ["img2img", good, "red", "--strength", "0", *model], ("strength",)),
        ("img2img --strength nan", ["img2img", good, "red", "--strength", "nan", *model], ("strength",)),
        ("img2img --height 100000 --width 100000 (the resize)", ["img2img", good, "red", "--height", "100000",
                                                                 "--width", "100000", *model], ("height",)),
        ("inpaint --extend 100000 0 0 0", ["inpaint", good, "red", "--extend", "100000", "0", "0", "0", *model],
         ("extend", "100016x16")),
        ("inpaint --rect outside the image", ["inpaint", good, "red", "--rect", "0", "0", "99", "99", *model],
         ("--rect",)),
        ("variations --num-images 0 --grid g.png", ["variations", good, "--num-images", "0", "--grid", "g.png",
                                                   *model], ("--num-images",)),
        ("finetune --resolution 37", ["finetune", "--model", tiny, "--train_data_dir", a.root / "train" / "good_folder",
                                      "--resolution", "37", "--max_train_steps", "1", "--output_dir", "run"],
         ("resolution",)),
        ("finetune --output_dir naming a file", ["finetune", "--model", tiny, "--train_data_dir",
                                                 a.root / "train" / "good_folder", "--resolution", "8",
                                                 "--max_train_steps", "1", "--output_dir", a.root / "args" / "a_file"],
         ("output_dir",)),
    ]
    cases = [cli(label, ARGS, "clean", argv, names, quick=label == "generate --height 65536 --width 65536")
             for label, argv, names in rows]
    cases.append(cli("img2img, EXIF-rotated 32x16 JPEG -> a 16x32 image", CONTENT, "works",
                     ["img2img", a.root / "content" / "exif6.jpeg", "red", "--steps", "2", "--out", "out.png", *model],
                     check=png_file(16, 32), quick=True))
    cases.append(cli("img2img, 16-bit grayscale PNG", CONTENT, "works",
                     ["img2img", a.root / "content" / "ramp16.png", "red", "--steps", "2", "--out", "out.png", *model],
                     check=png_file(64, 64)))
    cases.append(cli("inpaint, RGBA image with hidden colour", CONTENT, "works",
                     ["inpaint", a.root / "content" / "hidden_RGBA_PNG.png", "red", "--rect", "0", "0", "4", "4",
                      "--steps", "2", "--out", "out.png", *model], check=png_file(8, 8)))
    return cases


# ---- the server ----------------------------------------------------------------------------------------------

def embedded_limits() -> tuple[int, int, int]:
    """(native size, size multiple, default max_work) of `amused serve` with the embedded model, from its files."""
    from amused import embedded_model_path

    root = Path(embedded_model_path())
    uvit = json.loads((root / "transformer" / "config.json").read_text())
    factor = 2 ** (len(json.loads((root / "vqvae" / "config.json").read_text())["block_out_channels"]) - 1)
    steps = json.loads((root / "generation_config.json").read_text()).get("num_inference_steps", 12)
    native = uvit["sample_size"] * factor
    return native, factor * (2 if uvit.get("downsample") else 1), 2 * native ** 2 * (max(steps, 12) + 4) * 8


def images_of(width: int, height: int, count: int):
    def check(response) -> None:
        ensure(response.status == 200, f"HTTP {response.status}: {response.body[:200]!r}")
        body = response.json()
        ensure(len(body["images"]) == count, f"{len(body['images'])} images, expected {count}")
        for text in body["images"]:
            with PIL.Image.open(io.BytesIO(base64.b64decode(text))) as image:
                ensure(image.size == (width, height), f"image {image.size}, expected {(width, height)}")
    return check


def server_cases(a: Arsenal) -> list[Case]:
    native, multiple, max_work = embedded_limits()
    good = a.good_png().read_bytes()
    cases = []
    # image bombs and formats as uploads
    for label, raw in (("png bomb 30000x30000", png_bomb(30000, 30000)), ("png bomb 9000x9000", png_bomb(9000, 9000)),
                       ("jpeg bomb 30000x30000", jpeg_bomb(30000, 30000)),
                       ("webp bomb 16384x16384", webp_bomb(16384, 16384))):
        cases.append(http(f"server img2img upload: {label}", BOMBS, "clean",
                          {"path": "/v1/img2img", "json": {"prompt": "x", "image": b64(raw)}, "status": (422,)},
                          ("image",), quick=label.startswith("png bomb 3")))
    cases += [
        http("server img2img multipart upload: png bomb 30000x30000", BOMBS, "clean",
             {"path": "/v1/img2img", "multipart": {"prompt": "x", "image": ("bomb.png", png_bomb(30000, 30000))},
              "status": (422,)}, ("image",)),
        http("server inpaint: mask_image a png bomb", BOMBS, "clean",
             {"path": "/v1/inpaint", "json": {"prompt": "x", "image": b64(good), "mask_image": b64(png_bomb(30000,
                                                                                                         30000))},
              "status": (422,)}, ("mask_image",)),
    ]
    for label in ("TIFF_RGB", "GIF_P", "BMP_RGB", "EPS_RGB", "AVIF_RGB", "ICO_RGBA"):
        raw = (a.root / "formats" / f"{label}.png").read_bytes()
        cases.append(http(f"server img2img upload: {label.replace('_', ' ')}", FORMATS, "clean",
                          {"path": "/v1/img2img", "json": {"prompt": "x", "image": b64(raw)}, "status": (422,)},
                          ("image",), quick=label == "EPS_RGB"))
    for label in ("psd", "svg", "eps_text"):
        cases.append(http(f"server img2img upload: {label}", FORMATS, "clean",
                          {"path": "/v1/img2img", "json": {"prompt": "x", "image": b64(FAKE_FILES[label])},
                           "status": (422,)}, ("image",)))
    cases.append(http("server img2img multipart upload: TIFF", FORMATS, "clean",
                      {"path": "/v1/img2img", "multipart": {"prompt": "x", "image": (
                          "x.png", (a.root / "formats" / "TIFF_RGB.png").read_bytes())}, "status": (422,)}, ("image",)))
    # costly but valid: pixels x steps x images against --max-work (the default, for the embedded model)
    for side in (native, 2 * native, 4 * native, 1024):
        for steps in (1, 12, 100):
            for n in (1, 8):
                work = side * side * n * (steps + 4)  # the server counts each image's VQ decode as 4 steps
                body = {"prompt": "red apple", "height": side, "width": side, "num_inference_steps": steps,
                        "num_images": n, "response_format": "json"}
                if work <= max_work:
                    cases.append(http(f"server {side}x{side}, {steps} steps, {n} images (work {work:,})", COST,
                                      "works", {"json": body}, check=images_of(side, side, n), max_s=60,
                                      max_mib=1024, quick=(side, steps, n) == (native, 12, 1)))
                else:
                    cases.append(http(f"server {side}x{side}, {steps} steps, {n} images (work {work:,})", COST,
                                      "clean", {"json": body, "status": (422,)}, ("--max-work",), max_s=5,
                                      quick=(side, steps, n) == (1024, 100, 8)))
    big = encode(PIL.Image.new("RGB", (1024, 1024), (90, 90, 90)), "PNG")
    cases += [
        http("server img2img of a 1024x1024 upload at default steps", COST, "clean",
             {"path": "/v1/img2img", "json": {"prompt": "x", "image": b64(big)}, "status": (422,)}, ("--max-work",)),
        http("server img2img asking height/width 16384", COST, "clean",
             {"path": "/v1/img2img", "json": {"prompt": "x", "image": b64(good), "height": 16384, "width": 16384},
              "status": (422,)}, ("height",)),
        http("server inpaint of 1024x1024 image and mask", COST, "clean",
             {"path": "/v1/inpaint", "json": {"prompt": "x", "image": b64(big), "mask_image": b64(big)},
              "status": (422,)}, ("--max-work",)),
        http("server generate 2048x2048 (over --max-side)", COST, "clean",
             {"json": {"prompt": "x", "height": 2048, "width": 2048}, "status": (422,)}, ("height",)),
    ]
    # a job past its deadline stops between steps (the "slow" server: --timeout-s 2, a huge --max-work)
    slow = {"prompt": "red apple", "height": 256, "width": 256, "num_inference_steps": 100}
    for label, request in (("text, no seed", {"json": slow}), ("text, with a seed", {"json": {**slow, "seed": 1}}),
                           ("img2img", {"path": "/v1/img2img", "json": {**slow, "strength": 1.0, "image": b64(
                               encode(PIL.Image.new("RGB", (256, 256), (120, 30, 30)), "PNG"))}})):
        cases.append(http(f"server timeout: a 256x256, 100-step {label} job stops at its deadline", STOPPING, "clean",
                          {**request, "kind": "timeout", "status": (504,)}, ("timeout", "no result", "stopped"),
                          server="slow", max_s=30, max_mib=1536, quick=label == "text, no seed"))
    for i in range(10):  # ten clients that hang up after 0.3 s; their jobs must be dropped or stopped
        cases.append(http(f"server: client {i + 1} of 10 hangs up after 0.3 s", STOPPING, "clean",
                          {"kind": "disconnect", "index": i, "clients": 10,
                           "json": {"prompt": f"apple {i}", "num_images": 8, "num_inference_steps": 24}},
                          max_s=60, max_mib=1024, quick=i < 3))
    # fields and headers
    bad_fields = [("prompt", 5), ("prompt", ["a"]), ("prompt", None), ("prompt", "x" * 2001), ("seed", -1),
                  ("seed", 2**64), ("seed", "three"), ("seed", 1.5), ("seed", True), ("num_inference_steps", 0),
                  ("num_inference_steps", 101), ("num_inference_steps", True), ("num_inference_steps", 1000.5),
                  ("num_images", True), ("guidance_scale", True), ("height", True), ("temperature", [True, 0]),
                  ("guidance_scale", -1), ("guidance_scale", 1e9), ("guidance_scale", "x"), ("temperature", [1, 2, 3]),
                  ("temperature", -1), ("temperature", "hot"), ("num_images", 0), ("num_images", 9), ("height", 0),
                  ("height", 63), ("height", 16384), ("response_format", "gif"), ("sampler", "evil"),
                  ("callback_url", "http://evil.example/")]
    for i, (key, value) in enumerate(bad_fields):
        cases.append(http(f"server field {key}={value!r:.30}", FIELDS, "clean",
                          {"json": {"prompt": "red apple", key: value}, "status": (422,)}, (key,), quick=i % 5 == 0))
    raw_cases = [
        ("guidance_scale NaN (a JSON extension)", {"raw": b'{"prompt": "x", "guidance_scale": NaN}'}, (422,),
         ("guidance_scale",)),
        ("temperature [1, Infinity]", {"raw": b'{"prompt": "x", "temperature": [1, Infinity]}'}, (422,),
         ("temperature",)),
        ("a body that is not JSON", {"raw": b"{oops"}, (422,), ("JSON",)),
        ("a JSON list body", {"raw": b"[1, 2]"}, (422,), ()),
        ("an empty body", {"raw": b""}, (422,), ()),
        ("content-type text/plain", {"raw": b"prompt=x", "headers": {"Content-Type": "text/plain"},
                                     "path": "/v1/img2img"}, (415,), ("text/plain",)),
        ("an 11 MiB body", {"raw": b"{" + b" " * (11 << 20) + b"}"}, (413,), ()),
        ("an 11 MiB chunked body, no Content-Length", {"raw": b"{" + b" " * (11 << 20) + b"}", "chunked": True},
         (413,), ()),
        ("Content-Length: abc", {"raw": b"{}", "headers": {"Content-Length": "abc"}, "plain": True}, (413, 400), ()),
        ("Host: evil.example (DNS rebinding)", {"json": {"prompt": "x"}, "headers": {"Host": "evil.example"}},
         (403,), ("evil.example",)),
        ("Origin: http://evil.example", {"json": {"prompt": "x"}, "headers": {"Origin": "http://evil.example"}},
         (403,), ("evil.example",)),
        ("TRACE /v1/generate", {"method": "TRACE"}, (405,), ()),
        ("GET /v1/generate", {"method": "GET"}, (405,), ()),
        ("img2img image not base64", {"path": "/v1/img2img", "json": {"prompt": "x", "image": "not base64!"}},
         (422,), ("image",)),
        ("img2img image a data: URL of text", {"path": "/v1/img2img", "json": {
            "prompt": "x", "image": "data:text/plain;base64," + b64(b"hello")}}, (422,), ("image",)),
        ("img2img image a number", {"path": "/v1/img2img", "json": {"prompt": "x", "image": 5}}, (422,), ("image",)),
        ("img2img strength 0", {"path": "/v1/img2img", "json": {"prompt": "x", "image": b64(good), "strength": 0}},
         (422,), ("strength",)),
        ("img2img strength 1.5", {"path": "/v1/img2img", "json": {"prompt": "x", "image": b64(good),
                                                                  "strength": 1.5}}, (422,), ("strength",)),
        ("inpaint mask of another size", {"path": "/v1/inpaint", "json": {
            "prompt": "x", "image": b64(good), "mask_image": b64(encode(PIL.Image.new("L", (8, 8)), "PNG"))}},
         (422,), ("mask_image",)),
        ("img2img multipart with two extra files", {"path": "/v1/img2img", "multipart": {
            "prompt": "x", "image": ("a.png", good), "mask_image": ("b.png", good), "other": ("c.png", good)}},
         (422,), ()),
        ("img2img multipart with the seed as a file", {"path": "/v1/img2img", "multipart": {
            "prompt": "x", "image": ("a.png", good), "seed": ("seed.txt", b"3")}}, (422,), ("seed", "files")),
    ]
    for label, request, status, names in raw_cases:
        cases.append(http(f"server: {label}", FIELDS, "clean", {**request, "status": status}, names,
                          quick=label.startswith(("Host", "an 11 MiB chunked"))))
    for key, value in (("seed", "3"), ("num_inference_steps", "2")):  # digit strings convert (form fields are text)
        cases.append(http(f"server field {key}={value!r} (a digit string, as multipart sends it)", FIELDS, "works",
                          {"json": {"prompt": "red apple", key: value}},
                          check=lambda r, k=key, v=value: ensure(r.status == 200 and r.json()["settings"].get(
                              k, r.json()["seed"]) == int(v), f"HTTP {r.status}: {r.body[:200]!r}")))
    ramp = (a.root / "content" / "ramp16.png").read_bytes()
    mask = np.full((64, 64, 4), 255, dtype=np.uint8)  # white everywhere, hidden under transparency on the left
    mask[:, :32, 3] = 0
    cases += [
        http("server generate, PNG response", FIELDS, "works", {"json": {"prompt": "red apple", "seed": 1},
                                                                "headers": {"Accept": "image/png"}},
             check=lambda r: ensure(r.status == 200 and r.body[:8] == b"\x89PNG\r\n\x1a\n", f"HTTP {r.status}"),
             quick=True),
        http("server generate, 2 images as JSON", FIELDS, "works", {"json": {"prompt": "red apple", "num_images": 2}},
             check=images_of(native, native, 2)),
        http("server img2img, multipart 16-bit grayscale upload", FIELDS, "works",
             {"path": "/v1/img2img", "multipart": {"prompt": "x", "image": ("ramp.png", ramp)}},
             check=images_of(64, 64, 1)),
        http("server inpaint, RGBA mask", FIELDS, "works",
             {"path": "/v1/inpaint", "json": {"prompt": "x",
                                              "image": b64(encode(PIL.Image.new("RGB", (64, 64)), "PNG")),
                                              "mask_image": b64(encode(PIL.Image.fromarray(mask), "PNG"))}},
             check=images_of(64, 64, 1)),
    ]
    return cases


# Builders that need no checkpoint (the quick pytest, tests/test_attack_set.py, uses these), then the rest.
LIGHT_BUILDERS = (bomb_cases, training_bomb_cases, format_cases, content_cases, replay_cases, training_cases,
                  path_cases, server_cases)
BUILDERS = LIGHT_BUILDERS + (replay_cli_cases, lora_cases, config_cases, training_cli_cases, path_cli_cases,
                             argument_cases)


def build_cases(a: Arsenal, builders=BUILDERS) -> list[Case]:
    cases = []
    for builder in builders:
        cases += builder(a)
    names = [c.name for c in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, f"duplicate case names: {duplicates}"
    return cases


# ----------------------------------------------------------------------------------------------------------
# Running: memory and time per case, and the judgement
# ----------------------------------------------------------------------------------------------------------


def _status_kib(pid: int | str, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def reset_peak(pid: int | str = "self") -> int:
    """Reset the process's peak RSS (VmHWM) to its current RSS; returns the RSS in KiB."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status_kib(pid, "VmRSS")


def one_line(text: str) -> str:
    return next((line.strip() for line in text.strip().splitlines() if line.strip()), "")


def judge_refusal(case: Case, message: str) -> tuple[bool, str]:
    if "\n" in message.strip():
        return False, f"the error spans {len(message.strip().splitlines())} lines: {one_line(message)[:200]}"
    if case.names and not any(n.lower() in message.lower() for n in case.names):
        return False, f"the error does not name {' or '.join(case.names)}: {message[:200]}"
    return True, message[:300]


def run_check(case: Case, value) -> str | None:
    if case.check is None:
        return None
    try:
        case.check(value)
    except AssertionError as e:
        return str(e) or "check failed"
    except Exception as e:  # noqa: BLE001
        return f"check raised {type(e).__name__}: {e}"
    return None


def side_effects(a: Arsenal | None, folder: str | None = None) -> str | None:
    ran = a.ran(folder) if a is not None else []
    return f"it started something it must not: {', '.join(ran)}" if ran else None


def run_python(case: Case, a: Arsenal | None = None) -> dict:
    """One in-process case: call it, classify what came back, measure it (and what it started: `a`'s markers)."""
    if case.prepare is not None:
        case.prepare()
    if a is not None:
        a.ran()
    base = reset_peak()
    started = time.perf_counter()
    error: BaseException | None = None
    try:
        result = case.run()
    except BaseException as e:  # noqa: BLE001 (MemoryError and SystemExit are outcomes too)
        if isinstance(e, KeyboardInterrupt):
            raise
        error, result = e, None
    wall = time.perf_counter() - started
    peak = _status_kib("self", "VmHWM")
    growth = (peak - base) / 1024
    message = "" if error is None else str(error)
    if error is None:
        problem = run_check(case, result) if case.expect == "works" else "accepted: it returned " + \
            type(result).__name__
        handled, detail = problem is None, problem or "works"
    elif isinstance(error, CLEAN_ERRORS):
        if case.expect == "works":
            handled, detail = False, f"refused: {one_line(message)[:300]}"
        else:
            handled, detail = judge_refusal(case, message)
            problem = run_check(case, None)
            if handled and problem:
                handled, detail = False, problem
    else:
        handled, detail = False, f"uncaught {type(error).__name__}: {one_line(message)[:300]}"
    started_something = side_effects(a)
    if started_something:
        handled, detail = False, started_something
    if handled and growth > case.max_mib:
        handled, detail = False, f"over the memory bound: {growth:.0f} MiB > {case.max_mib:.0f} ({detail[:100]})"
    if handled and wall > case.max_s:
        handled, detail = False, f"over the time bound: {wall:.1f} s > {case.max_s:.0f} ({detail[:100]})"
    return {"outcome": "handled" if handled else "failed", "detail": detail, "exit_code": None,
            "first_line": one_line(f"{type(error).__name__}: {message}" if error else ""), "wall_s": round(wall, 3),
            "peak_mib": round(peak / 1024, 1), "growth_mib": round(growth, 1)}


def child_env(a: Arsenal) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "AMUSED_MAX_IMAGE_PIXELS"}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]), AMUSED_NUM_THREADS="1",
               OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1", PATH=f"{a.bin}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONWARNINGS="ignore")
    return env


def limited(argv: list[str]) -> list[str]:
    """argv run under RLIMIT_AS = MEMORY_LIMIT (set by the shell, which then execs it: same pid)."""
    return ["/bin/sh", "-c", f'ulimit -v {MEMORY_LIMIT // 1024} && exec "$@"', "sh", *argv]


def spawn(argv: list[str], env: dict, cwd: Path, stdout, stderr, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen(limited(argv), cwd=cwd, env=env, stdin=stdin, stdout=stdout, stderr=stderr,
                            start_new_session=True)


def kill(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)[:80]


def run_cli(case: Case, a: Arsenal, env: dict, zygote: "Zygote | None" = None) -> dict:
    """One command-line case in a folder of its own: a fresh `python -m amused.cli ...` process, or a fork of
    `zygote` (which has imported amused.cli and torch already) calling `amused.cli.main(argv)` as `-m` would.
    Peak RSS: the child's VmHWM either way (`wait_limited`)."""
    if case.prepare is not None:
        case.prepare()
    folder = a.root / "cli" / slug(case.name)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if zygote is None or case.fresh:
        rc, wall, maxrss_kib, timed_out = run_fresh(case, folder, env)
    else:
        rc, wall, maxrss_kib, timed_out = zygote.run(case.run, folder, case.max_s)
    stderr = (folder / "stderr.txt").read_text(errors="replace")
    lines = [line for line in stderr.splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ""
    peak = maxrss_kib / 1024
    if timed_out:
        handled, detail = False, f"timed out after {case.max_s:.0f} s (killed)"
    elif rc < 0:
        handled, detail = False, f"killed by signal {-rc} ({last[:200]})"
    elif "Traceback (most recent call last)" in stderr:
        handled, detail = False, f"traceback: {last[:300]}"
    elif rc == 0:
        problem = run_check(case, folder) if case.expect == "works" else "accepted: exit 0"
        handled, detail = problem is None, problem or "works"
    elif case.expect == "works":
        handled, detail = False, f"refused (exit {rc}): {last[:300]}"
    else:
        handled, detail = judge_refusal(case, last)
        if handled and "error" not in last.lower():
            handled, detail = False, f"the last line is not an error message: {last[:200]}"
        problem = run_check(case, folder) if handled else None
        if problem:
            handled, detail = False, problem
    started_something = side_effects(a, folder.name)
    if started_something:
        handled, detail = False, started_something
    if handled and peak > case.max_mib:
        handled, detail = False, f"over the memory bound: {peak:.0f} MiB > {case.max_mib:.0f} ({detail[:100]})"
    return {"outcome": "handled" if handled else "failed", "detail": detail, "exit_code": rc,
            "first_line": lines[0].strip()[:300] if lines else "", "wall_s": round(wall, 3),
            "peak_mib": round(peak, 1), "growth_mib": None, "process": "fresh" if zygote is None or case.fresh
            else "fork"}


def wait_limited(pid: int, started: float, limit: float) -> tuple[int, int, bool]:
    """(exit code, peak RSS KiB, timed out) of child `pid`, killing its process group after `limit` s.

    The peak is the child's VmHWM, read every 20 ms while it runs (it only grows, so only a peak in the last
    20 ms could be missed). Not wait4's ru_maxrss: Linux hands a child the RSS of the process it was forked from
    (the harness's 700 MiB) as its starting maximum, even across exec."""
    peak = 0
    while True:
        with contextlib.suppress(OSError, ValueError):
            peak = max(peak, _status_kib(pid, "VmHWM"))
        done, status, _ = os.wait4(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), peak, False
        if time.perf_counter() - started > limit:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            _, status, _ = os.wait4(pid, 0)
            return os.waitstatus_to_exitcode(status), peak, True
        time.sleep(0.02)


def run_fresh(case: Case, folder: Path, env: dict) -> tuple[int, float, int, bool]:
    with open(folder / "stdout.txt", "wb") as out, open(folder / "stderr.txt", "wb") as err:
        started = time.perf_counter()
        process = spawn([sys.executable, "-m", "amused.cli", *case.run], env, folder, out, err)
        rc, maxrss, timed_out = wait_limited(process.pid, started, case.max_s)
        process.returncode = rc
    return rc, time.perf_counter() - started, maxrss, timed_out


ZYGOTE_IMPORTS = ("amused.cli", "amused.runtime", "amused.pipeline", "amused.pipeline_img2img",
                  "amused.pipeline_inpaint", "amused.lora", "amused.replay", "amused.embedded", "amused.training.train",
                  "amused.training.data", "amused.training.shards", "datasets", "transformers.models.clip",
                  "transformers.models.bert")


def zygote_main() -> None:
    """`attack_set.py --zygote`: import the command line once, then fork a child per request (a JSON line on
    stdin: argv, cwd, limit) that runs `amused.cli.main(argv)` as `python -m amused.cli` does; answer with its exit
    code, wall time and peak RSS."""
    import importlib
    import traceback

    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    for module in ZYGOTE_IMPORTS:
        importlib.import_module(module)
    cli_main = sys.modules["amused.cli"].main
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child: a process of its own group, its own folder and output files
            code = 1
            try:
                os.setsid()
                out.close()
                os.chdir(request["cwd"])
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                for fd, name in ((1, "stdout.txt"), (2, "stderr.txt")):
                    os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
                sys.argv = [sys.executable, *request["argv"]]
                try:
                    code = cli_main(request["argv"])
                except SystemExit as e:
                    code = e.code
                except BaseException:  # noqa: BLE001 (what the interpreter would print)
                    traceback.print_exc()
                    code = 1
                if code is None:
                    code = 0
                elif not isinstance(code, int):
                    print(code, file=sys.stderr)
                    code = 1
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        rc, maxrss, timed_out = wait_limited(pid, started, request["limit"])
        out.write(json.dumps({"rc": rc, "wall": time.perf_counter() - started, "maxrss": maxrss,
                              "timed_out": timed_out}) + "\n")


class Zygote:
    """A preloaded command line (see `zygote_main`) that runs one case at a time; restarted if it dies."""

    def __init__(self, a: Arsenal, env: dict):
        self.a, self.env, self.process = a, env, None

    def start(self) -> None:
        log = open(self.a.root / "zygote_stderr.txt", "ab")
        self.process = spawn([sys.executable, __file__, "--zygote"], {**self.env, "TOKENIZERS_PARALLELISM": "false"},
                             ROOT, subprocess.PIPE, log, stdin=subprocess.PIPE)
        log.close()
        ready = self.process.stdout.readline()
        if not ready:
            raise RuntimeError(f"the preloaded command line did not start; see {log.name}")

    def run(self, argv: list[str], folder: Path, limit: float) -> tuple[int, float, int, bool]:
        """(exit code, wall s, peak RSS KiB, timed out)."""
        if self.process is None or self.process.poll() is not None:
            self.start()
        self.process.stdin.write((json.dumps({"argv": argv, "cwd": str(folder), "limit": limit}) + "\n").encode())
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        return answer["rc"], answer["wall"], answer["maxrss"], answer["timed_out"]

    def stop(self) -> None:
        if self.process is not None:
            self.process.stdin.close()
            self.process.wait(30)


# ---- the in-process worker ------------------------------------------------------------------------------------

def worker_main(tmp: Path) -> None:
    """`attack_set.py --worker TMP`: run the named python cases (JSON list on stdin), one JSON line each."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to stderr, not into the protocol
    names = json.loads(sys.stdin.read())
    a = Arsenal(tmp)
    cases = {c.name: c for c in build_cases(a)}
    for name in names:
        out.write(json.dumps({"start": name}) + "\n")
        out.write(json.dumps({"result": name, **run_python(cases[name], a)}) + "\n")


def run_python_cases(cases: list[Case], a: Arsenal, env: dict, report) -> None:
    """Run the python cases in a worker process under the memory limit; a case that hangs past its time bound or
    kills the worker fails, and a new worker takes the rest."""
    pending = list(cases)
    while pending:
        log = open(a.root / "worker_stderr.txt", "ab")
        worker = spawn([sys.executable, __file__, "--worker", str(a.root)], env, ROOT, subprocess.PIPE, log,
                       stdin=subprocess.PIPE)
        worker.stdin.write(json.dumps([c.name for c in pending]).encode())
        worker.stdin.close()
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in worker.stdout] + [lines.put(None)],
                         daemon=True).start()
        first = True
        while pending:
            case = pending[0]
            try:
                message = lines.get(timeout=600 if first else 30)
                if message is not None and json.loads(message).get("start") == case.name:
                    started = time.perf_counter()
                    message = lines.get(timeout=case.max_s + 15)
            except queue.Empty:
                kill(worker)
                report(case, {"outcome": "failed", "detail": f"hung: no answer within {case.max_s + 15:.0f} s "
                                                             f"(killed)", "exit_code": None, "first_line": "",
                              "wall_s": round(time.perf_counter() - started, 1) if not first else None,
                              "peak_mib": None, "growth_mib": None})
                pending.pop(0)
                break
            first = False
            if message is None:  # the worker died during this case
                worker.wait()
                tail = one_line("\n".join((a.root / "worker_stderr.txt").read_text(errors="replace")
                                          .splitlines()[-1:]))
                report(case, {"outcome": "failed", "detail": f"the process died (exit {worker.returncode}): "
                                                             f"{tail[:200]}", "exit_code": worker.returncode,
                              "first_line": tail[:200], "wall_s": None, "peak_mib": None, "growth_mib": None})
                pending.pop(0)
                break
            result = json.loads(message)
            assert result.pop("result") == case.name
            report(case, result)
            pending.pop(0)
        kill(worker)
        worker.wait()
        log.close()


# ---- HTTP --------------------------------------------------------------------------------------------------

@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def multipart(fields: dict) -> tuple[bytes, str]:
    boundary = "amusedattackboundary"
    parts = []
    for name, value in fields.items():
        if isinstance(value, tuple):
            filename, data = value
            head = f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n' \
                   f"Content-Type: application/octet-stream\r\n\r\n"
        else:
            head, data = f'Content-Disposition: form-data; name="{name}"\r\n\r\n', str(value).encode()
        parts.append(f"--{boundary}\r\n".encode() + head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def request_bytes(port: int, spec: dict) -> bytes:
    method, path = spec.get("method", "POST"), spec.get("path", "/v1/generate")
    headers = {"Host": f"127.0.0.1:{port}", "Connection": "close"}
    body = b""
    if "json" in spec:
        body, headers["Content-Type"] = json.dumps(spec["json"]).encode(), "application/json"
    elif "multipart" in spec:
        body, headers["Content-Type"] = multipart(spec["multipart"])
    elif "raw" in spec:
        body, headers["Content-Type"] = spec["raw"], "application/json"
    headers.update(spec.get("headers", {}))
    if spec.get("chunked"):
        headers["Transfer-Encoding"] = "chunked"
        step = 1 << 16
        body = b"".join(f"{len(body[i:i + step]):x}\r\n".encode() + body[i:i + step] + b"\r\n"
                        for i in range(0, len(body), step)) + b"0\r\n\r\n"
    elif method != "GET" and "Content-Length" not in headers:
        headers["Content-Length"] = str(len(body))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode() + body


def send(port: int, spec: dict, timeout: float = 120) -> Response:
    """One request over a raw socket (bodies over the limit are sent as far as the server reads them)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        data = request_bytes(port, spec)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the server may answer 413 mid-body
            for i in range(0, len(data), 1 << 16):
                sock.sendall(data[i:i + (1 << 16)])
        chunks = []  # no half-close: the server takes a closed connection for a client that gave up
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 16):
                chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/"):
        return Response(0, {}, raw)
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size or b"0", 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return Response(int(lines[0].split()[1]), headers, body)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A real `amused serve` (embedded model) under the memory limit."""

    def __init__(self, a: Arsenal, env: dict, name: str, extra: list[str]):
        self.a, self.env, self.name, self.extra = a, env, name, extra
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.port = free_port()
        self.log = open(self.a.root / f"server_{self.name}.txt", "ab")
        self.process = spawn([sys.executable, "-m", "amused.cli", "serve", "--port", str(self.port), "--device", "cpu",
                              "--no-warmup", "--log-level", "warning", "--no-access-log", *self.extra],
                             self.env, self.a.root, self.log, self.log)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"amused serve exited {self.process.returncode}; see {self.log.name}")
            with contextlib.suppress(OSError):
                if send(self.port, {"method": "GET", "path": "/health"}, timeout=5).status == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"amused serve not ready after 300 s; see {self.log.name}")

    def health(self) -> dict:
        return send(self.port, {"method": "GET", "path": "/health"}, timeout=30).json()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None and self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                kill(self.process)
                self.process.wait()
        if self.process is not None:
            self.log.close()

    def wait_idle(self, timeout: float) -> float | None:
        """Seconds until nothing runs and nothing waits, or None."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            h = self.health()
            if h["running"] == 0 and h["queue_depth"] == 0:
                return time.monotonic() - started
            time.sleep(0.1)
        return None


def run_http(case: Case, server: Server, groups: dict) -> dict:
    spec = case.run
    server.a.ran()
    base = reset_peak(server.process.pid)
    started = time.perf_counter()
    handled, detail, status, message = False, "", None, ""
    try:
        if spec.get("kind") == "disconnect":
            if "disconnect" not in groups:
                groups["disconnect"] = disconnect_burst(server, spec)
            stopped, summary = groups["disconnect"]
            status = None
            handled, detail = spec["index"] < stopped, summary
        else:
            before = server.health()["stats"] if spec.get("kind") == "timeout" else None
            response = send(server.port, spec, timeout=case.max_s + 30)
            status = response.status
            try:
                body = response.json()
                message = str(body.get("message", "")) if isinstance(body, dict) else ""
            except ValueError:
                body = None
            if case.expect == "works":
                problem = run_check(case, response)
                handled, detail = problem is None, problem or "works"
            elif status not in spec.get("status", tuple(range(400, 500))):
                handled, detail = False, f"HTTP {status}, expected {spec.get('status')}: {response.body[:200]!r}"
            elif spec.get("plain") and status == 400:  # malformed HTTP framing: uvicorn answers before the app
                handled, detail = True, f"HTTP {status} from the HTTP layer: {response.body[:100]!r}"
            elif not (isinstance(body, dict) and "error" in body and "message" in body):
                handled, detail = False, f"HTTP {status} without a JSON error body: {response.body[:200]!r}"
            else:
                handled, detail = judge_refusal(case, message + " " + json.dumps(body.get("detail")))
                detail = f"HTTP {status}: {message[:250]}"
                problem = run_check(case, response)
                if handled and problem:
                    handled, detail = False, problem
            if handled and spec.get("kind") == "timeout":
                idle = server.wait_idle(60)
                after = server.health()["stats"]
                if idle is None or after["cancelled"] <= before["cancelled"]:
                    handled, detail = False, f"answered {status}, but the job kept running (stats {after})"
                else:
                    detail += f"; the job stopped {idle:.1f} s after the answer"
    except (OSError, ValueError) as e:
        handled, detail = False, f"{type(e).__name__}: {e}"
    wall = time.perf_counter() - started
    started_something = side_effects(server.a)
    if started_something:
        handled, detail = False, started_something
    if not server.alive():
        handled, detail = False, f"the server died (exit {server.process.returncode})"
        peak = None
    else:
        peak = _status_kib(server.process.pid, "VmHWM")
    growth = None if peak is None else (peak - base) / 1024
    if handled and growth is not None and growth > case.max_mib:
        handled, detail = False, f"over the memory bound: {growth:.0f} MiB > {case.max_mib:.0f} ({detail[:100]})"
    if handled and spec.get("kind") != "disconnect" and wall > case.max_s:
        handled, detail = False, f"over the time bound: {wall:.1f} s > {case.max_s:.0f} ({detail[:100]})"
    return {"outcome": "handled" if handled else "failed", "detail": detail, "exit_code": status,
            "first_line": one_line(message)[:300], "wall_s": round(wall, 3),
            "peak_mib": None if peak is None else round(peak / 1024, 1),
            "growth_mib": None if growth is None else round(growth, 1)}


def disconnect_burst(server: Server, spec: dict) -> tuple[int, str]:
    """`clients` requests whose clients hang up after 0.3 s: how many jobs were dropped or stopped unfinished."""
    before = server.health()["stats"]
    sockets = []
    for i in range(spec["clients"]):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(request_bytes(server.port, {"json": {**spec["json"], "prompt": f"apple {i}"}}))
        sockets.append(sock)
    time.sleep(0.3)
    for sock in sockets:
        sock.close()
    idle = server.wait_idle(120)
    after = server.health()["stats"]
    dropped, cancelled = after["dropped"] - before["dropped"], after["cancelled"] - before["cancelled"]
    finished = after["requests"] - before["requests"]
    stopped = min(spec["clients"], dropped + cancelled)
    return stopped, (f"{spec['clients']} clients hung up: {dropped} jobs dropped before starting, {cancelled} stopped "
                     f"between steps, {finished} ran to the end; idle after "
                     f"{'never' if idle is None else f'{idle:.1f} s'}")


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a subset (a few per group)")
    parser.add_argument("--only", default=None, help="comma-separated words; categories containing one of them")
    parser.add_argument("--face", default=None, choices=["python", "cli", "http"], help="only this face")
    parser.add_argument("--jobs", type=int, default=2, help="command-line cases run at once (default 2)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "attack_set_cpu.json")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (its path is printed)")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker)
        return 0
    if args.zygote:
        zygote_main()
        return 0
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="amused-attack-"))
    a = Arsenal(tmp)
    print(f"making the attack files in {tmp} ...", flush=True)
    cases = build_cases(a)
    if args.quick:
        cases = [c for c in cases if c.quick]
    if args.only:
        words = [w.strip().lower() for w in args.only.split(",")]
        cases = [c for c in cases if any(w in c.category.lower() for w in words)]
    if args.face:
        cases = [c for c in cases if c.face == args.face]
    env = child_env(a)
    results: dict[str, dict] = {}
    lock = threading.Lock()

    def report(case: Case, result: dict) -> None:
        with lock:
            results[case.name] = result
            mark = "ok  " if result["outcome"] == "handled" else "FAIL"
            why = "" if result["outcome"] == "handled" else result["detail"][:160]
            print(f"{mark} [{case.face:6}] {case.name[:86]:86} {result['wall_s'] or 0:6.1f}s "
                  f"{result['peak_mib'] or 0:6.0f}MiB  {why}", flush=True)

    by_face = {face: [c for c in cases if c.face == face] for face in ("python", "cli", "http")}
    print(f"{len(cases)} cases: " + ", ".join(f"{len(v)} {k}" for k, v in by_face.items()), flush=True)
    if by_face["python"]:
        run_python_cases(by_face["python"], a, env, report)
    if by_face["cli"]:
        lanes: queue.Queue = queue.Queue()
        zygotes = [Zygote(a, env) for _ in range(max(1, args.jobs))]
        for zygote in zygotes:
            lanes.put(zygote)

        def run_in_lane(case: Case) -> dict:
            zygote = lanes.get()
            try:
                return run_cli(case, a, env, zygote)
            finally:
                lanes.put(zygote)

        with ThreadPoolExecutor(max_workers=len(zygotes)) as pool:
            for case, result in zip(by_face["cli"], pool.map(run_in_lane, by_face["cli"])):
                report(case, result)
        for zygote in zygotes:
            zygote.stop()
    native, _, max_work = embedded_limits()
    for name, extra in (("main", []), ("slow", ["--timeout-s", "2", "--max-work", str(10**12), "--max-side", "256"])):
        todo = [c for c in by_face["http"] if c.server == name]
        if not todo:
            continue
        server = Server(a, env, name, extra)
        print(f"starting amused serve ({name}: {' '.join(extra) or 'default settings'}) ...", flush=True)
        server.start()
        if name == "main":
            assert server.health()["max_work"] == max_work, "the server's default max_work is not the one assumed"
        groups: dict = {}
        try:
            for case in todo:
                if not server.alive():
                    server.start()
                report(case, run_http(case, server, groups))
        finally:
            server.stop()
    wall = time.perf_counter() - started
    summary = {}
    for category in CATEGORIES:
        mine = [results[c.name] for c in cases if c.category == category]
        if mine:
            handled = sum(r["outcome"] == "handled" for r in mine)
            summary[category] = {"cases": len(mine), "handled": handled, "failed": len(mine) - handled}
    total = {k: sum(s[k] for s in summary.values()) for k in ("cases", "handled", "failed")}
    print(f"\n{'category':34} {'cases':>6} {'handled':>8} {'failed':>7}")
    for category, s in {**summary, "all": total}.items():
        print(f"{category:34} {s['cases']:6} {s['handled']:8} {s['failed']:7}")
    failed = [c for c in cases if results[c.name]["outcome"] != "handled"]
    if failed:
        print("\nfailed:")
        for c in failed:
            print(f"  [{c.category}] {c.name}: {results[c.name]['detail'][:300]}")
    import torch

    record = {
        "what": "scripts/attack_set.py: issue 15's attack set against amused's faces (see docs/reliability.md)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python scripts/attack_set.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, shared with other jobs",
        "python": platform.python_version(), "torch": torch.__version__, "pillow": PIL.__version__,
        "memory_limit_gib": MEMORY_LIMIT / 2**30, "wall_s": round(wall, 1),
        "notes": "peak_mib: the process's peak RSS, VmHWM (cli: the command's own process, 'fresh' or a 'fork' of "
                 "the preloaded command line; python: the worker; http: the server); growth_mib: the peak above the "
                 "RSS at the case's start (python, http: the bound applies to it); cli bounds apply to peak_mib (a "
                 "fork shares the preloaded imports' pages, counted in its RSS as they are touched)",
        "summary": summary, "total": total,
        "cases": [{"name": c.name, "category": c.category, "face": c.face, "expect": c.expect,
                   "max_mib": c.max_mib, "max_s": c.max_s, **results[c.name]} for c in cases],
    }
    if not args.quick and not args.only and not args.face:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"\nwrote {args.out}")
    print(f"{total['handled']}/{total['cases']} handled well in {wall / 60:.1f} min")
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
