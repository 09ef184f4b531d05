"""Joining emoji.json with openmoji.json: canonical names, skin tones, captions, held-out pairs, records."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


from .packages import ALL_STYLES, HELDOUT_FRACTION, SKIN_TONES, _VARIATION_SELECTOR


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
