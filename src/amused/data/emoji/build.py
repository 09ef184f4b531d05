"""Writing the data set: PNGs, metadata.jsonl, ATTRIBUTION.md, summary, built atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from PIL import Image

from .catalog import heldout_style, image_file_name, join_emoji, make_record
from .packages import ALL_STYLES, HELDOUT_FRACTION, OPENMOJI_PACKAGE, default_cache_dir
from .sources import Sources, load_sources, render_item


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
