"""Split .stage/ (pack_inputs.py) over several device calls: each call carries at most 64 MiB, and the
repository's tracked files alone take ~41 MiB (session 12), so the ~54 MiB stage needs five calls:

    python scripts/embedded/split_stage.py [--vq FOLDER] [--first 9] [--size 11.4]

.stage/ (with a VQGAN given by --vq copied in as .stage/vqvae/, for a U-ViT trained on another VQGAN's tokens:
retrain_uvit.sh's VQ=.stage/vqvae) is packed as one xz-compressed tar and cut into byte chunks:
.stage_a/ holds the first --first MiB (small, so that the first call can carry the wheels beside it),
.stage_b/, .stage_c/, ... hold --size MiB each. The device keeps ignored paths that a later call does not carry,
so calls made within the machine's warm window find the earlier chunks; join_stage.py joins them there.
"""

import argparse
import io
import lzma
import shutil
import string
import tarfile
from pathlib import Path

MIB = 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vq", help="a VQGAN folder to stage as .stage/vqvae")
    ap.add_argument("--first", type=float, default=9, help="MiB in .stage_a (default 9)")
    ap.add_argument("--size", type=float, default=11.4, help="MiB in each later chunk (default 11.4)")
    args = ap.parse_args()
    src = Path(".stage")
    if args.vq:
        shutil.rmtree(src / "vqvae", ignore_errors=True)
        shutil.copytree(args.vq, src / "vqvae")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(src, arcname=".stage")
    packed = lzma.compress(buf.getvalue(), preset=6)
    for old in Path(".").glob(".stage_?"):
        shutil.rmtree(old)
    start = 0
    for letter in string.ascii_lowercase:
        if start >= len(packed):
            break
        size = int((args.first if letter == "a" else args.size) * MIB)
        chunk = Path(f".stage_{letter}")
        chunk.mkdir()
        (chunk / f"stage.tar.xz.{letter}").write_bytes(packed[start:start + size])
        start += size
        print(chunk, f"{(chunk / f'stage.tar.xz.{letter}').stat().st_size / MIB:.1f} MiB")


if __name__ == "__main__":
    main()
