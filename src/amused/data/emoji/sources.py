"""Loading every source into one `Sources` bundle, and drawing an item in a style from it."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .catalog import EmojiItem
from .packages import ALL_STYLES, DATASOURCE_PACKAGES, NOTO_DEBIAN_PACKAGE, NpmPackage, OPENMOJI_PACKAGE, fetch_package, read_tar_members
from .render import NotoRenderer, composite, find_noto_font, fit, render_png, render_svg


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
