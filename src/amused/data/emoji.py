"""Build a captioned 64x64 RGB emoji image set from freely licensed emoji art.

The art comes from pinned npm packages, fetched with ``npm pack`` into a cache
directory and checked against a pinned sha512 before use:

* ``emoji-datasource-google`` -- Google Noto Emoji PNGs (Apache-2.0), plus
  ``emoji.json``, the list of emoji, skin-tone variants and categories;
* ``emoji-datasource-twitter`` -- Twemoji PNGs (CC-BY-4.0);
* ``openmoji`` -- OpenMoji colour SVGs (CC-BY-SA-4.0), plus ``openmoji.json``
  whose CLDR short names ("red apple") and tags make the captions.

Optionally, a fourth style is drawn with the Noto Color Emoji font of the
Debian package ``fonts-noto-color-emoji`` (OFL-1.1) when it is installed.

Every image is alpha-composited onto a solid background (most of the PNGs hold
garbage colour under fully transparent pixels) and written as an RGB PNG. The
output is a Hugging Face ``imagefolder`` layout, built in a temporary
directory next to ``out_dir`` and renamed into place when complete::

    out_dir/train/<style>_<unified>.png     e.g. twitter_1f44b-1f3fd.png
    out_dir/train/metadata.jsonl            one JSON object per image
    out_dir/heldout/...                     ~5% of emoji with one style held out
    out_dir/ATTRIBUTION.md                  sources, licenses and credits
    out_dir/licenses/                       license files shipped by the sources
    out_dir/summary.json                    counts and source versions

The same inputs give byte-identical output. Run it with::

    python -m amused.data.emoji --out data/emoji

``datasets`` only guesses split names it knows (``heldout`` is not one), so
load both splits with::

    load_dataset("imagefolder", data_files={"train": "data/emoji/train/**",
                                            "heldout": "data/emoji/heldout/**"})
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageColor, ImageDraw, ImageFont, features


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


# --------------------------------------------------------------------------
# Joining emoji.json with openmoji.json, names and captions
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class EmojiItem:
    """One emoji image to draw: a base emoji or one of its skin-tone variants."""

    unified: str  # Code points of this image, e.g. "1F44B-1F3FD".
    base_unified: str  # Code points of the base emoji, e.g. "1F44B".
    name: str  # Canonical lower-case name of the base emoji, e.g. "waving hand".
    skin_tone: str | None  # e.g. "medium skin tone"; None for the base emoji.
    category: str
    subcategory: str
    tags: tuple[str, ...]
    image: str  # emoji-datasource image file name, e.g. "1f44b-1f3fd.png".
    openmoji_hexcode: str | None  # Matching openmoji.json hexcode, if any.


def match_openmoji(unified: str, openmoji_hexcodes: Mapping[str, object]) -> str | None:
    """Find the openmoji.json hexcode for an emoji-datasource ``unified`` code.

    An exact match wins; otherwise the variation selectors (``FE0F``) are
    dropped, as OpenMoji names some emoji without them (``00A9-FE0F`` is
    ``00A9`` there).

    Args:
        unified: Upper-case code points joined by "-", e.g. ``"00A9-FE0F"``.
        openmoji_hexcodes: Mapping (or set-like) keyed by openmoji hexcodes.

    Returns:
        The matching hexcode, or None.
    """
    if unified in openmoji_hexcodes:
        return unified
    stripped = "-".join(cp for cp in unified.split("-") if cp != _VARIATION_SELECTOR)
    return stripped if stripped in openmoji_hexcodes else None


def skin_tone_phrase(modifiers: str) -> str:
    """Name the skin tones of an emoji-datasource ``skin_variations`` key.

    Args:
        modifiers: One or more modifier code points, e.g. ``"1F3FD"`` or
            ``"1F3FB-1F3FF"`` (one per person).

    Returns:
        CLDR names joined by ", ", each named once:
        ``"light skin tone, dark skin tone"``.

    Raises:
        ValueError: If a code point is not a skin-tone modifier.
    """
    names: list[str] = []
    for code in modifiers.upper().split("-"):
        if code not in SKIN_TONES:
            raise ValueError(f"not a skin-tone modifier: {code!r} in {modifiers!r}")
        if SKIN_TONES[code] not in names:
            names.append(SKIN_TONES[code])
    return ", ".join(names)


def make_caption(name: str, style: str, skin_tone: str | None = None) -> str:
    """Build the canonical caption of an image.

    Args:
        name: Canonical emoji name, e.g. ``"waving hand"``.
        style: Art style, e.g. ``"twitter"``.
        skin_tone: Skin-tone phrase, or None.

    Returns:
        e.g. ``"waving hand, medium skin tone, twitter style"``.
    """
    parts = [name, skin_tone, f"{style} style"] if skin_tone else [name, f"{style} style"]
    return ", ".join(parts)


def parse_tags(text: str | None) -> tuple[str, ...]:
    """Split an openmoji.json comma-separated tag string.

    Args:
        text: e.g. ``"bye, hello, wave"``; may be empty or None.

    Returns:
        The lower-cased, stripped, non-empty tags in their original order,
        without duplicates.
    """
    tags: list[str] = []
    for tag in (text or "").split(","):
        tag = tag.strip().lower()
        if tag and tag not in tags:
            tags.append(tag)
    return tuple(tags)


def canonical_name(entry: Mapping, openmoji_entry: Mapping | None) -> str:
    """Name an emoji: the OpenMoji (CLDR) annotation, else emoji.json's name.

    Args:
        entry: An emoji.json entry (``name`` is an upper-case Unicode name).
        openmoji_entry: The matching openmoji.json entry, or None.

    Returns:
        The lower-cased name, e.g. ``"red apple"``.
    """
    annotation = (openmoji_entry or {}).get("annotation") or ""
    name = annotation.strip() or (entry.get("name") or entry.get("short_name") or "").strip()
    if not name:
        raise ValueError(f"emoji {entry.get('unified')} has no name")
    return name.lower()


def join_emoji(
    emoji_entries: Iterable[Mapping],
    openmoji_entries: Iterable[Mapping],
    include_skin_tones: bool = True,
) -> list[EmojiItem]:
    """Join emoji.json entries with openmoji.json into drawable items.

    Args:
        emoji_entries: Entries of emoji-datasource's ``emoji.json``.
        openmoji_entries: Entries of openmoji's ``data/openmoji.json`` (may be
            empty: names then fall back to emoji.json).
        include_skin_tones: Also yield each entry's ``skin_variations``.

    Returns:
        Items sorted by emoji.json ``sort_order`` then code points; variants
        follow their base emoji and share its name, category and tags.
    """
    openmoji = {entry["hexcode"]: entry for entry in openmoji_entries}
    items: list[EmojiItem] = []
    ordered = sorted(emoji_entries, key=lambda e: (e.get("sort_order", 0), e["unified"]))
    for entry in ordered:
        base_hexcode = match_openmoji(entry["unified"], openmoji)
        base_openmoji = openmoji.get(base_hexcode) if base_hexcode else None
        shared = {
            "base_unified": entry["unified"],
            "name": canonical_name(entry, base_openmoji),
            "category": entry.get("category") or "",
            "subcategory": entry.get("subcategory") or "",
            "tags": parse_tags((base_openmoji or {}).get("tags")),
        }
        items.append(
            EmojiItem(
                unified=entry["unified"],
                skin_tone=None,
                image=entry["image"],
                openmoji_hexcode=base_hexcode,
                **shared,
            )
        )
        if not include_skin_tones:
            continue
        for modifiers, variant in sorted((entry.get("skin_variations") or {}).items()):
            items.append(
                EmojiItem(
                    unified=variant["unified"],
                    skin_tone=skin_tone_phrase(modifiers),
                    image=variant["image"],
                    openmoji_hexcode=match_openmoji(variant["unified"], openmoji),
                    **shared,
                )
            )
    return items


def heldout_style(
    name: str, fraction: float = HELDOUT_FRACTION, styles: Sequence[str] = ALL_STYLES
) -> str | None:
    """Pick the style, if any, in which an emoji is held out of training.

    The choice depends only on a SHA-256 of the name, so it is stable across
    runs, machines and the set of styles being built.

    Args:
        name: Canonical emoji name.
        fraction: Share of names that get a held-out style.
        styles: Candidate styles (default: all known styles, so the split does
            not move when a style is added or dropped).

    Returns:
        The held-out style, or None when the emoji is fully in training.
    """
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    draw = int.from_bytes(digest[:8], "big") / 2**64
    if draw >= fraction:
        return None
    return styles[int.from_bytes(digest[8:16], "big") % len(styles)]


def image_file_name(style: str, unified: str) -> str:
    """File name of an image, e.g. ``"twitter_1f44b-1f3fd.png"``."""
    return f"{style}_{unified.lower()}.png"


def make_record(item: EmojiItem, style: str, file_name: str) -> dict:
    """Build the metadata.jsonl row of one image.

    Args:
        item: The emoji drawn.
        style: Its art style.
        file_name: The PNG's name, relative to the split directory.

    Returns:
        A dict with ``file_name``, ``text`` (the canonical caption), ``emoji``,
        ``style``, ``unified``, ``skin_tone``, ``category``, ``subcategory``
        and ``tags``.
    """
    return {
        "file_name": file_name,
        "text": make_caption(item.name, style, item.skin_tone),
        "emoji": item.name,
        "style": style,
        "unified": item.unified,
        "skin_tone": item.skin_tone,
        "category": item.category,
        "subcategory": item.subcategory,
        "tags": list(item.tags),
    }


# --------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------


def composite(image: Image.Image, background: Sequence[int] = (255, 255, 255)) -> Image.Image:
    """Alpha-composite an image onto a solid background.

    Colour under fully transparent pixels is discarded, unlike
    ``image.convert("RGB")`` which would expose it.

    Args:
        image: Any Pillow image (RGBA, LA, P with transparency, RGB, ...).
        background: RGB colour.

    Returns:
        An RGB image of the same size.
    """
    rgba = image.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*tuple(background)[:3], 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def fit(image: Image.Image, size: int) -> Image.Image:
    """Resize a square image to ``size`` x ``size`` (Lanczos) if needed."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.LANCZOS)


def render_png(
    data: bytes, size: int = 64, background: Sequence[int] = (255, 255, 255)
) -> Image.Image:
    """Decode a PNG and composite it onto the background.

    Args:
        data: PNG bytes (any mode).
        size: Output side in pixels.
        background: RGB colour.

    Returns:
        An RGB ``size`` x ``size`` image.
    """
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return fit(composite(image, background), size)


def render_svg(
    data: bytes, size: int = 64, background: Sequence[int] = (255, 255, 255)
) -> Image.Image:
    """Rasterise an SVG with cairosvg and composite it onto the background.

    Args:
        data: SVG document bytes.
        size: Output side in pixels (the SVG is scaled to fit it).
        background: RGB colour.

    Returns:
        An RGB ``size`` x ``size`` image.
    """
    import cairosvg  # Imported lazily: only the openmoji style needs it.

    png = cairosvg.svg2png(bytestring=data, output_width=size, output_height=size)
    return render_png(png, size, background)


def codepoints_to_text(unified: str) -> str:
    """Turn ``"1F44B-1F3FD"`` into the corresponding string."""
    return "".join(chr(int(code, 16)) for code in unified.split("-"))


class NotoRenderer:
    """Draws emoji with the Noto Color Emoji bitmap font.

    The font's only strike is 109 px (a 136 x 128 bitmap, the 128 px square
    design with 4 px side bearings); FreeType refuses other sizes, and Pillow
    needs Raqm to shape ZWJ, flag and skin-tone sequences into one glyph.
    """

    def __init__(self, font_path: str | os.PathLike):
        """Load the font.

        Args:
            font_path: Path of ``NotoColorEmoji.ttf``.

        Raises:
            RuntimeError: If Pillow was built without Raqm.
        """
        if not features.check("raqm"):
            raise RuntimeError("Pillow lacks the Raqm layout engine needed for emoji sequences")
        self.font_path = Path(font_path)
        self.font = ImageFont.truetype(
            str(font_path), NOTO_STRIKE_SIZE, layout_engine=ImageFont.Layout.RAQM
        )
        reference = "\U0001f600"
        self.advance = self.font.getlength(reference)
        _, _, self.width, self.height = self.font.getbbox(reference)
        # "AA" is no region: the font draws its generic unknown-flag glyph,
        # which is also what an unsupported (too new) flag gets.
        self._unknown_flag = self._draw(codepoints_to_text("1F1E6-1F1E6")).tobytes()

    def _draw(self, text: str) -> Image.Image:
        canvas = Image.new("RGBA", (self.width, self.height), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((0, 0), text, font=self.font, embedded_color=True)
        return canvas

    def render_rgba(self, unified: str) -> Image.Image | None:
        """Draw one emoji as a square RGBA image.

        Args:
            unified: Code points, e.g. ``"1F44B-1F3FD"``.

        Returns:
            A square RGBA image (128 px), or None when the font lacks the emoji
            (it would draw nothing, several glyphs, or the unknown flag).
        """
        text = codepoints_to_text(unified)
        if self.font.getlength(text) > 1.5 * self.advance:
            return None
        glyph = self._draw(text)
        if glyph.getbbox() is None or glyph.tobytes() == self._unknown_flag:
            return None
        left = (self.width - self.height) // 2
        return glyph.crop((left, 0, left + self.height, self.height))

    def describe(self) -> str:
        """Version string for the attribution: Debian version and file hash."""
        digest = hashlib.sha256(self.font_path.read_bytes()).hexdigest()[:16]
        version = debian_package_version(NOTO_DEBIAN_PACKAGE) or "(version unknown)"
        return f"{NOTO_DEBIAN_PACKAGE} {version}, {self.font_path.name} sha256 {digest}..."


def debian_package_version(package: str) -> str | None:
    """Return an installed Debian package's version, or None."""
    query = shutil.which("dpkg-query")
    if query is None:
        return None
    proc = subprocess.run(
        [query, "-W", "-f=${Version}", package], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def find_noto_font(candidates: Sequence[str] = NOTO_FONT_PATHS) -> Path | None:
    """Return the first existing Noto Color Emoji font path, or None."""
    for candidate in candidates:
        if Path(candidate).is_file():
            return Path(candidate)
    return None


# --------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------


@dataclass
class Sources:
    """Everything the builder reads, already in memory.

    Attributes:
        emoji_entries: emoji-datasource ``emoji.json``.
        openmoji_entries: openmoji ``data/openmoji.json`` (names and tags).
        pngs: Per datasource style, image file name -> PNG bytes.
        svgs: OpenMoji hexcode -> colour SVG bytes.
        noto: Renderer for the noto style, or None.
        versions: Per style, the exact source used (for attribution).
        licenses: License file name -> bytes, copied to ``out_dir/licenses``.
    """

    emoji_entries: list[dict]
    openmoji_entries: list[dict] = field(default_factory=list)
    pngs: dict[str, dict[str, bytes]] = field(default_factory=dict)
    svgs: dict[str, bytes] = field(default_factory=dict)
    noto: NotoRenderer | None = None
    versions: dict[str, str] = field(default_factory=dict)
    licenses: dict[str, bytes] = field(default_factory=dict)


def load_datasource(
    package: NpmPackage, style: str | None, cache_dir: Path
) -> tuple[list[dict], dict[str, bytes], bytes]:
    """Read emoji.json, the 64 px PNGs of one vendor and the LICENSE of a package.

    Args:
        package: An emoji-datasource package.
        style: Vendor whose ``img/<vendor>/64`` PNGs to read, or None for none.
        cache_dir: Download cache.

    Returns:
        ``(emoji.json entries, {image file name: PNG bytes}, LICENSE bytes)``.
    """
    prefix = f"package/img/{style}/64/" if style else None
    members = read_tar_members(
        fetch_package(package, cache_dir),
        lambda name: (
            name in ("package/emoji.json", "package/LICENSE")
            or (prefix is not None and name.startswith(prefix) and name.endswith(".png"))
        ),
    )
    entries = json.loads(members.pop("package/emoji.json"))
    license_text = members.pop("package/LICENSE", b"")
    pngs = {name.rsplit("/", 1)[1]: data for name, data in members.items()}
    return entries, pngs, license_text


def load_openmoji(cache_dir: Path, with_svgs: bool) -> tuple[list[dict], dict[str, bytes], bytes]:
    """Read openmoji.json, optionally the colour SVGs, and the license.

    Args:
        cache_dir: Download cache.
        with_svgs: Also read ``color/svg/*.svg``.

    Returns:
        ``(openmoji.json entries, {hexcode: SVG bytes}, LICENSE.txt bytes)``.
    """
    members = read_tar_members(
        fetch_package(OPENMOJI_PACKAGE, cache_dir),
        lambda name: (
            name in ("package/data/openmoji.json", "package/LICENSE.txt")
            or (with_svgs and name.startswith("package/color/svg/") and name.endswith(".svg"))
        ),
    )
    entries = json.loads(members.pop("package/data/openmoji.json"))
    license_text = members.pop("package/LICENSE.txt", b"")
    svgs = {name.rsplit("/", 1)[1][: -len(".svg")]: data for name, data in members.items()}
    return entries, svgs, license_text


def load_noto(font_path: str | os.PathLike | None) -> NotoRenderer | None:
    """Open the Noto Color Emoji font, or print a note and return None.

    Args:
        font_path: Explicit font path, or None to look in the usual places.
    """
    path = Path(font_path) if font_path else find_noto_font()
    if path is None or not path.is_file():
        print(
            f"note: skipping the noto style: NotoColorEmoji.ttf not found "
            f"(apt-get install {NOTO_DEBIAN_PACKAGE})",
            file=sys.stderr,
        )
        return None
    try:
        return NotoRenderer(path)
    except (OSError, RuntimeError) as error:
        print(f"note: skipping the noto style: {error}", file=sys.stderr)
        return None


def load_sources(
    styles: Sequence[str], cache_dir: Path, noto_font: str | os.PathLike | None = None
) -> Sources:
    """Download (or reuse) and read every source the given styles need.

    emoji.json and openmoji.json are always read, so captions do not depend
    on which styles are built.

    Args:
        styles: Styles to build.
        cache_dir: Download cache.
        noto_font: Optional explicit path of NotoColorEmoji.ttf.

    Returns:
        The loaded sources; ``noto`` is None if the font is unavailable.
    """
    sources = Sources(emoji_entries=[])
    vendors = [style for style in styles if style in DATASOURCE_PACKAGES] or [None]
    for vendor in vendors:
        package = DATASOURCE_PACKAGES[vendor or "google"]
        entries, pngs, license_text = load_datasource(package, vendor, cache_dir)
        sources.emoji_entries = sources.emoji_entries or entries
        sources.licenses["emoji-datasource-LICENSE.txt"] = license_text
        if vendor:
            sources.pngs[vendor] = pngs
            sources.versions[vendor] = package.spec
    entries, svgs, license_text = load_openmoji(cache_dir, "openmoji" in styles)
    sources.openmoji_entries, sources.svgs = entries, svgs
    sources.licenses["openmoji-LICENSE.txt"] = license_text
    sources.versions["openmoji-data"] = OPENMOJI_PACKAGE.spec
    if "openmoji" in styles:
        sources.versions["openmoji"] = OPENMOJI_PACKAGE.spec
    if "noto" in styles:
        sources.noto = load_noto(noto_font)
        if sources.noto is not None:
            sources.versions["noto"] = sources.noto.describe()
    return sources


def render_item(
    item: EmojiItem, style: str, sources: Sources, size: int, background: Sequence[int]
) -> Image.Image | None:
    """Draw one emoji in one style.

    Args:
        item: The emoji.
        style: One of :data:`ALL_STYLES`.
        sources: Loaded sources.
        size: Output side in pixels.
        background: RGB colour.

    Returns:
        An RGB image, or None when the style has no art for this emoji.
    """
    if style in DATASOURCE_PACKAGES:
        data = sources.pngs.get(style, {}).get(item.image)
        return None if data is None else render_png(data, size, background)
    if style == "openmoji":
        data = sources.svgs.get(item.openmoji_hexcode) if item.openmoji_hexcode else None
        return None if data is None else render_svg(data, size, background)
    if style == "noto":
        glyph = sources.noto.render_rgba(item.unified) if sources.noto else None
        return None if glyph is None else fit(composite(glyph, background), size)
    raise ValueError(f"unknown style {style!r}; expected one of {ALL_STYLES}")


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def save_png(image: Image.Image, path: Path) -> None:
    """Write a PNG deterministically (no timestamps or text chunks)."""
    image.save(path, format="PNG", optimize=False, compress_level=6)


def write_metadata(split_dir: Path, records: Iterable[Mapping]) -> None:
    """Write ``metadata.jsonl``, one record a line, sorted by file name."""
    lines = [
        json.dumps(record, ensure_ascii=False) + "\n"
        for record in sorted(records, key=lambda r: r["file_name"])
    ]
    with open(split_dir / "metadata.jsonl", "w", encoding="utf-8", newline="\n") as handle:
        handle.writelines(lines)


_ATTRIBUTION_SECTIONS = {
    "google": """\
## Google Noto Emoji (style "google")

- Source: npm `{version}` (https://github.com/iamcal/emoji-data), images from
  Google's Noto Emoji project, https://github.com/googlefonts/noto-emoji
- License: Apache License 2.0, https://www.apache.org/licenses/LICENSE-2.0
- Credit: Noto Emoji, Copyright Google Inc., licensed under the Apache License,
  Version 2.0. Files `google_*.png` were composited onto a solid background and
  saved as RGB PNGs (modified).
""",
    "twitter": """\
## Twemoji (style "twitter")

- Source: npm `{version}` (https://github.com/iamcal/emoji-data), images from
  Twemoji, https://github.com/jdecked/twemoji
- License: Creative Commons Attribution 4.0 International (CC BY 4.0),
  https://creativecommons.org/licenses/by/4.0/
- Credit: Twemoji graphics, Copyright 2019 Twitter, Inc and other contributors,
  Copyright 2024 jdecked and other contributors, licensed under CC BY 4.0.
  Files `twitter_*.png` were composited onto a solid background and saved as
  RGB PNGs (modified).
""",
    "openmoji": """\
## OpenMoji (style "openmoji")

- Source: npm `{version}`, https://github.com/hfg-gmuend/openmoji
- License: Creative Commons Attribution-ShareAlike 4.0 International
  (CC BY-SA 4.0), https://creativecommons.org/licenses/by-sa/4.0/
  (full text in `licenses/openmoji-LICENSE.txt`)
- Credit: All emojis designed by OpenMoji (https://openmoji.org/) - the
  open-source emoji and icon project. License: CC BY-SA 4.0.
  Files `openmoji_*.png` are adaptations (colour SVGs rasterised with cairosvg
  and composited onto a solid background) and are shared under CC BY-SA 4.0.
""",
    "noto": """\
## Noto Color Emoji font (style "noto")

- Source: Debian package {version}, https://github.com/googlefonts/noto-emoji
- License: SIL Open Font License 1.1 (the font), https://openfontlicense.org;
  the emoji artwork is Noto Emoji, Copyright Google Inc., Apache License 2.0.
- Credit: Noto Color Emoji, Copyright Google Inc. Files `noto_*.png` were
  rendered from the font with Pillow and resized (modified).
""",
}

_ATTRIBUTION_FOOTER = """\
## Emoji list, names and tags (all styles)

- The list of emoji, skin-tone variants and categories is `emoji.json` from
  emoji-datasource (https://github.com/iamcal/emoji-data), MIT License,
  Copyright (c) 2013 Cal Henderson (`licenses/emoji-datasource-LICENSE.txt`).
- Captions and tags come from `data/openmoji.json` of npm `{openmoji}`
  (OpenMoji, CC BY-SA 4.0), whose annotations and tags are Unicode CLDR data
  (Unicode License v3, https://www.unicode.org/license.txt).
"""


def attribution_text(versions: Mapping[str, str], styles: Sequence[str]) -> str:
    """Build ``ATTRIBUTION.md`` for the styles that were built.

    Args:
        versions: Per style, the exact source used (see :class:`Sources`).
        styles: Styles present in the output.

    Returns:
        Markdown text naming each source, version, license and credit.
    """
    parts = [
        "# Attribution\n\n"
        "This image set was built by `amused.data.emoji` from the freely licensed\n"
        "emoji art below. Each file name starts with its style.\n"
    ]
    parts += [_ATTRIBUTION_SECTIONS[style].format(version=versions[style]) for style in styles]
    parts.append(
        _ATTRIBUTION_FOOTER.format(openmoji=versions.get("openmoji-data", OPENMOJI_PACKAGE.spec))
    )
    return "\n".join(parts)


def directory_bytes(root: Path) -> int:
    """Total size in bytes of the regular files under ``root``."""
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Build a directory in a temporary sibling and rename it into place.

    On success an existing ``target`` is replaced; on error the temporary
    directory is removed and ``target`` is left untouched.

    Args:
        target: Final directory path.

    Yields:
        The temporary directory to fill.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_from_sources(
    out_dir: str | os.PathLike,
    sources: Sources,
    styles: Sequence[str],
    size: int = 64,
    background: Sequence[int] = (255, 255, 255),
    include_skin_tones: bool = True,
    heldout_fraction: float = HELDOUT_FRACTION,
) -> dict:
    """Draw, split and write the data set from in-memory sources.

    Args:
        out_dir: Output directory (replaced atomically).
        sources: Loaded sources.
        styles: Styles to draw; each must have art in ``sources``.
        size: Image side in pixels.
        background: RGB background colour.
        include_skin_tones: Also draw the skin-tone variants.
        heldout_fraction: Share of emoji with one style held out.

    Returns:
        The summary also written to ``summary.json``: per-style ``train``,
        ``heldout`` and ``missing`` counts, totals, ``bytes`` (of everything
        but summary.json) and sources; the returned dict adds ``out_dir``.
    """
    items = join_emoji(sources.emoji_entries, sources.openmoji_entries, include_skin_tones)
    counts = {style: Counter(train=0, heldout=0, missing=0) for style in styles}
    records: dict[str, list[dict]] = {"train": [], "heldout": []}
    seen: set[str] = set()
    with atomic_directory(out_dir) as tmp:
        for split in records:
            (tmp / split).mkdir()
        for item in items:
            held = heldout_style(item.name, heldout_fraction)
            for style in styles:
                file_name = image_file_name(style, item.unified)
                if file_name in seen:
                    continue
                image = render_item(item, style, sources, size, background)
                if image is None:
                    counts[style]["missing"] += 1
                    continue
                split = "heldout" if style == held else "train"
                save_png(image, tmp / split / file_name)
                records[split].append(make_record(item, style, file_name))
                counts[style][split] += 1
                seen.add(file_name)
        for split, rows in records.items():
            write_metadata(tmp / split, rows)
        (tmp / "ATTRIBUTION.md").write_text(
            attribution_text(sources.versions, styles), encoding="utf-8"
        )
        for name, data in sorted(sources.licenses.items()):
            if data:
                (tmp / "licenses").mkdir(exist_ok=True)
                (tmp / "licenses" / name).write_bytes(data)
        summary = {
            "size": size,
            "background": list(background)[:3],
            "include_skin_tones": include_skin_tones,
            "heldout_fraction": heldout_fraction,
            "styles": {style: dict(counts[style]) for style in styles},
            "emoji": len({item.base_unified for item in items}),
            "train": len(records["train"]),
            "heldout": len(records["heldout"]),
            "sources": dict(sorted(sources.versions.items())),
            "bytes": directory_bytes(tmp),
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return {"out_dir": str(out_dir), **summary}


def normalize_styles(styles: Iterable[str]) -> tuple[str, ...]:
    """Validate styles and put them in canonical order without duplicates.

    Raises:
        ValueError: On an unknown or empty style list.
    """
    wanted = {style.strip().lower() for style in styles if style.strip()}
    unknown = wanted - set(ALL_STYLES)
    if unknown or not wanted:
        raise ValueError(f"styles must be a non-empty subset of {ALL_STYLES}, got {sorted(wanted)}")
    return tuple(style for style in ALL_STYLES if style in wanted)


def format_summary(summary: Mapping) -> str:
    """Human-readable multi-line summary of a build."""
    lines = [f"emoji data set written to {summary['out_dir']}"]
    for style, count in summary["styles"].items():
        lines.append(
            f"  {style:<9} train {count['train']:>5}  heldout {count['heldout']:>4}"
            f"  missing {count['missing']:>4}"
        )
    lines.append(
        f"  total     train {summary['train']:>5}  heldout {summary['heldout']:>4}"
        f"  ({summary['emoji']} base emoji, {summary['bytes'] / 1e6:.1f} MB)"
    )
    if "seconds" in summary:
        lines.append(f"  took {summary['seconds']:.1f} s")
    return "\n".join(lines)


def build_emoji_dataset(
    out_dir: str | os.PathLike,
    styles: Sequence[str] = ("google", "twitter", "openmoji", "noto"),
    size: int = 64,
    background: Sequence[int] = (255, 255, 255),
    cache_dir: str | os.PathLike | None = None,
    include_skin_tones: bool = True,
    *,
    heldout_fraction: float = HELDOUT_FRACTION,
    noto_font: str | os.PathLike | None = None,
) -> dict:
    """Download the pinned emoji art and build the captioned image set.

    Args:
        out_dir: Output directory; replaced atomically when the build ends.
        styles: Subset of :data:`ALL_STYLES`. ``noto`` is skipped with a note
            when the font (Debian ``fonts-noto-color-emoji``) is missing.
        size: Image side in pixels.
        background: RGB colour the transparent art is composited onto.
        cache_dir: Download cache (default ``~/.cache/amused/emoji``).
        include_skin_tones: Also draw the skin-tone variants.
        heldout_fraction: Share of emoji with one style held out.
        noto_font: Explicit path of NotoColorEmoji.ttf.

    Returns:
        The summary dict (see :func:`build_from_sources`) plus ``seconds``.
    """
    start = time.perf_counter()
    styles = normalize_styles(styles)
    if "openmoji" in styles:
        import cairosvg  # noqa: F401  Fail before downloading if it is missing.
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    sources = load_sources(styles, cache, noto_font)
    built = tuple(style for style in styles if style != "noto" or sources.noto is not None)
    summary = build_from_sources(
        out_dir, sources, built, size, background, include_skin_tones, heldout_fraction
    )
    summary["seconds"] = round(time.perf_counter() - start, 1)
    print(format_summary(summary))
    return summary


def parse_background(text: str) -> tuple[int, int, int]:
    """Parse a colour: ``"255,255,255"``, ``"#ffffff"`` or a name (``"white"``)."""
    if "," in text and not text.strip().startswith("rgb"):
        values = tuple(int(part) for part in text.split(","))
    else:
        values = tuple(ImageColor.getrgb(text.strip()))[:3]
    if len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise argparse.ArgumentTypeError(f"not an RGB colour: {text!r}")
    return values  # type: ignore[return-value]


DESCRIPTION = ("Build a captioned emoji image set (imagefolder layout) from freely licensed emoji art "
               "downloaded with npm.")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command-line parser of :func:`main`."""
    return _add_arguments(argparse.ArgumentParser(prog=prog, description=DESCRIPTION))


def add_command(subparsers) -> None:
    """Register `amused build-emoji-data` on the main CLI."""
    parser = subparsers.add_parser("build-emoji-data", help="build the emoji training set (npm downloads)",
                                   description=DESCRIPTION, epilog="example:\n  amused build-emoji-data --out "
                                   "data/emoji --styles google,twitter,openmoji",
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    parser.set_defaults(func=lambda args: _run(args))


def _add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--out", default="data/emoji", help="output directory (default: data/emoji)"
    )
    parser.add_argument(
        "--styles",
        default=",".join(ALL_STYLES),
        help=f"comma-separated subset of {','.join(ALL_STYLES)} (default: all)",
    )
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    parser.add_argument(
        "--background",
        type=parse_background,
        default=(255, 255, 255),
        help="background colour, e.g. 255,255,255 or '#ffffff' (default: white)",
    )
    parser.add_argument(
        "--cache-dir", default=None, help="download cache (default: ~/.cache/amused/emoji)"
    )
    parser.add_argument("--no-skin-tones", action="store_true", help="skip skin-tone variants")
    parser.add_argument(
        "--heldout-fraction",
        type=float,
        default=HELDOUT_FRACTION,
        help=f"share of emoji with one style held out (default: {HELDOUT_FRACTION})",
    )
    parser.add_argument("--noto-font", default=None, help="path of NotoColorEmoji.ttf")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``amused build-emoji-data``).

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        Process exit status.
    """
    return _run(build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    build_emoji_dataset(
        args.out,
        styles=args.styles.split(","),
        size=args.size,
        background=args.background,
        cache_dir=args.cache_dir,
        include_skin_tones=not args.no_skin_tones,
        heldout_fraction=args.heldout_fraction,
        noto_font=args.noto_font,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
