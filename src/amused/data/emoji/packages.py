"""The pinned sources (npm packages with their sha512, the optional Debian Noto font), and fetching them
with `npm pack` into a verified cache."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path



@dataclass(frozen=True)
class NpmPackage:
    """A pinned npm package and the integrity npm publishes for its tarball."""

    name: str
    version: str
    integrity: str  # Subresource-integrity string, "sha512-<base64 digest>".

    @property
    def spec(self) -> str:
        """The ``name@version`` argument for ``npm pack``."""
        return f"{self.name}@{self.version}"

    @property
    def tarball(self) -> str:
        """The file name ``npm pack`` writes."""
        return f"{self.name}-{self.version}.tgz"


GOOGLE_PACKAGE = NpmPackage(
    "emoji-datasource-google",
    "16.0.0",
    "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
)
TWITTER_PACKAGE = NpmPackage(
    "emoji-datasource-twitter",
    "16.0.0",
    "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
)
OPENMOJI_PACKAGE = NpmPackage(
    "openmoji",
    "17.0.0",
    "sha512-EBnYrNGdcdw+OSXmENeNE1yBNRu6tOraTmoOyUbJkTmvT/+XETp8RZLSJFzD3lrPc5N9CzsyPnRTk0Vp4UaI9w==",
)

#: Every style this module can draw, in canonical order.
ALL_STYLES = ("google", "twitter", "openmoji", "noto")
#: Styles whose PNGs come from an emoji-datasource package.
DATASOURCE_PACKAGES = {"google": GOOGLE_PACKAGE, "twitter": TWITTER_PACKAGE}
#: Fraction of base emoji that get one of their styles held out.
HELDOUT_FRACTION = 0.05
#: CLDR names of the Fitzpatrick skin-tone modifiers.
SKIN_TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}
NOTO_FONT_PATHS = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/google-noto-color-emoji/NotoColorEmoji.ttf",
)
#: Noto Color Emoji is a bitmap font with a single strike; FreeType loads only this size.
NOTO_STRIKE_SIZE = 109
NOTO_DEBIAN_PACKAGE = "fonts-noto-color-emoji"
_VARIATION_SELECTOR = "FE0F"


class IntegrityError(RuntimeError):
    """A downloaded tarball does not match its pinned integrity."""


# --------------------------------------------------------------------------
# Download and unpack
# --------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Return the default download cache, ``~/.cache/amused/emoji``.

    Returns:
        ``$XDG_CACHE_HOME/amused/emoji`` when that variable is set, else
        ``~/.cache/amused/emoji``.
    """
    root = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(root).expanduser() / "amused" / "emoji"


def sha512_integrity(path: str | os.PathLike) -> str:
    """Compute the npm-style ``sha512-<base64>`` integrity of a file.

    Args:
        path: File to hash.

    Returns:
        The integrity string, comparable with ``npm pack --json`` output.
    """
    digest = hashlib.sha512()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode("ascii")


def verify_integrity(path: str | os.PathLike, expected: str) -> None:
    """Check a file against a pinned ``sha512-...`` integrity string.

    Args:
        path: File to check.
        expected: The pinned integrity.

    Raises:
        IntegrityError: If the digest differs.
        ValueError: If ``expected`` is not a sha512 integrity.
    """
    if not expected.startswith("sha512-"):
        raise ValueError(f"only sha512 integrities are supported, got {expected!r}")
    actual = sha512_integrity(path)
    if actual != expected:
        raise IntegrityError(f"{path}: integrity {actual} != pinned {expected}")


def fetch_package(package: NpmPackage, cache_dir: str | os.PathLike) -> Path:
    """Download a pinned package tarball with ``npm pack`` unless cached.

    A cached tarball is re-verified on every call; a corrupt one is fetched
    again. A fresh download is checked both against the integrity npm reports
    and against the pinned one before it is moved into the cache.

    Args:
        package: The package to fetch.
        cache_dir: Directory holding the tarballs.

    Returns:
        Path of the verified tarball.

    Raises:
        IntegrityError: If the download does not match the pin.
        RuntimeError: If npm is missing or fails.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / package.tarball
    if target.exists():
        try:
            verify_integrity(target, package.integrity)
            return target
        except IntegrityError as error:
            print(f"note: discarding corrupt cached tarball ({error})", file=sys.stderr)
            target.unlink()
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is required to download the emoji art (install Node.js and npm)")
    print(f"downloading {package.spec} with npm pack ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".npm-pack-") as tmp:
        proc = subprocess.run(
            [npm, "pack", "--json", "--pack-destination", tmp, package.spec],
            cwd=tmp,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"npm pack {package.spec} failed:\n{proc.stderr.strip()}")
        reported = json.loads(proc.stdout)[0]
        if reported.get("integrity") != package.integrity:
            raise IntegrityError(
                f"npm reports integrity {reported.get('integrity')} for {package.spec}, "
                f"pinned {package.integrity}"
            )
        downloaded = Path(tmp) / reported["filename"]
        verify_integrity(downloaded, package.integrity)
        os.replace(downloaded, target)
    return target


def read_tar_members(tarball: str | os.PathLike, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """Read the regular files of a ``.tgz`` whose names pass ``wanted``.

    Members are read into memory, never written to disk, so member paths
    cannot escape anywhere.

    Args:
        tarball: Path of the gzipped tar.
        wanted: Predicate on member names (e.g. ``"package/emoji.json"``).

    Returns:
        Mapping of member name to its bytes.
    """
    members: dict[str, bytes] = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            if member.isfile() and wanted(member.name):
                handle = tar.extractfile(member)
                assert handle is not None
                members[member.name] = handle.read()
    return members
