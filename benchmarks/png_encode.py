"""PNG encoding of generated images: Pillow (compress_level 1, what the server used before) against amused.png.

Three 512x512 RGB images: noise (what random weights draw, the benchmarks' checkpoints: incompressible), a smooth
picture with texture (a real emoji image, the first tile of docs/images/tour_img2img.png, scaled up with bicubic, plus Gaussian noise of sigma 4: a stand-in for a
photo), and a flat-colour drawing (the emoji scaled up, no noise). Per image: ms per encode (median of N, one
thread) and bytes; and 8 encodes in 8 threads (as the server encodes a batch's responses), wall ms.

    python benchmarks/png_encode.py --out docs/results/png_encode_cpu.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from amused.png import encode_png  # noqa: E402

EMOJI = Path(__file__).resolve().parents[1] / "docs" / "images" / "tour_img2img.png"


def images(side: int = 512) -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    source = Image.open(EMOJI).convert("RGB")
    source = source.crop((0, 0, min(source.size), min(source.size))).resize((side, side), Image.BICUBIC)
    flat = np.asarray(source)
    photo = np.clip(flat.astype(float) + rng.normal(0, 4, flat.shape), 0, 255).astype(np.uint8)
    return {"noise": Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)),
            "photo-like": Image.fromarray(photo), "flat drawing": Image.fromarray(flat)}


def pillow(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def timed(fn, image, repeats: int) -> dict:
    fn(image)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data = fn(image)
        times.append((time.perf_counter() - start) * 1000)
    with ThreadPoolExecutor(8) as pool:
        start = time.perf_counter()
        list(pool.map(fn, [image] * 8))
        threads_ms = (time.perf_counter() - start) * 1000
    return {"ms_median": round(statistics.median(times), 2), "bytes": len(data), "eight_in_8_threads_ms":
            round(threads_ms, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("png_encode.json"))
    args = parser.parse_args()
    rows = []
    for name, image in images().items():
        for encoder, fn in (("pillow level 1", pillow), ("amused.png", encode_png)):
            back = np.asarray(Image.open(io.BytesIO(fn(image))))
            assert np.array_equal(back, np.asarray(image)), f"{encoder} changed the pixels of {name}"
            rows.append({"image": name, "encoder": encoder, **timed(fn, image, args.repeats)})
    print(f"{'image':<14} {'encoder':<16} {'ms':>7} {'bytes':>9} {'8 in 8 threads ms':>18}")
    for r in rows:
        print(f"{r['image']:<14} {r['encoder']:<16} {r['ms_median']:>7.2f} {r['bytes']:>9} "
              f"{r['eight_in_8_threads_ms']:>18.1f}")
    result = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "pillow": PIL.__version__,
              "side_px": 512, "repeats": args.repeats, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
