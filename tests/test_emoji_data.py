"""Offline tests of the emoji data set builder (no downloads, tiny synthetic inputs)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

import shutil

from amused.data import emoji as E
from amused.data.emoji import build as emoji_build
from amused.data.emoji import cli as emoji_cli
from amused.data.emoji import sources as emoji_sources

WHITE = (255, 255, 255)
GARBAGE = (250, 0, 250)  # colour hidden under fully transparent pixels

FAKE_EMOJI = [
    {
        "name": "COPYRIGHT SIGN",
        "unified": "00A9-FE0F",
        "image": "00a9-fe0f.png",
        "category": "Symbols",
        "subcategory": "other-symbol",
        "sort_order": 2,
    },
    {
        "name": "WAVING HAND SIGN",
        "unified": "1F44B",
        "image": "1f44b.png",
        "category": "People & Body",
        "subcategory": "hand-fingers-open",
        "sort_order": 1,
        "skin_variations": {
            "1F3FF": {"unified": "1F44B-1F3FF", "image": "1f44b-1f3ff.png"},
            "1F3FD": {"unified": "1F44B-1F3FD", "image": "1f44b-1f3fd.png"},
        },
    },
    {
        "name": "FACE WITH BAGS UNDER EYES",
        "unified": "1FAE9",
        "image": "1fae9.png",
        "category": "Smileys & Emotion",
        "subcategory": "face-sleepy",
        "sort_order": 3,
    },
]

FAKE_OPENMOJI = [
    {"hexcode": "1F44B", "annotation": "waving hand", "tags": "hand, Wave, wave, "},
    {"hexcode": "1F44B-1F3FD", "annotation": "waving hand: medium skin tone", "tags": ""},
    {"hexcode": "00A9", "annotation": "copyright", "tags": "c"},
]

SQUARE_SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10" viewBox="0 0 10 10">'
    b'<rect x="2.5" y="2.5" width="5" height="5" fill="#ff0000"/></svg>'
)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def garbage_rgba(size: int = 8, colour=(10, 20, 30)) -> Image.Image:
    """Transparent image with garbage colour, an opaque top-left pixel and a half-alpha one."""
    image = Image.new("RGBA", (size, size), (*GARBAGE, 0))
    image.putpixel((0, 0), (*colour, 255))
    image.putpixel((1, 0), (0, 0, 0, 128))
    return image


def integrity_of(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def fake_sources() -> E.Sources:
    google = {
        name: png_bytes(garbage_rgba(colour=(i, 100, 200)))
        for i, name in enumerate(
            ["00a9-fe0f.png", "1f44b.png", "1f44b-1f3fd.png", "1f44b-1f3ff.png", "1fae9.png"]
        )
    }
    twitter = {name: data for name, data in google.items() if name != "1fae9.png"}
    return E.Sources(
        emoji_entries=FAKE_EMOJI,
        openmoji_entries=FAKE_OPENMOJI,
        pngs={"google": google, "twitter": twitter},
        svgs={"1F44B": SQUARE_SVG, "00A9": SQUARE_SVG, "1F44B-1F3FD": SQUARE_SVG},
        versions={
            "google": "emoji-datasource-google@16.0.0",
            "twitter": "emoji-datasource-twitter@16.0.0",
            "openmoji": "openmoji@17.0.0",
            "openmoji-data": "openmoji@17.0.0",
        },
        licenses={"openmoji-LICENSE.txt": b"CC BY-SA 4.0 text"},
    )


def read_rows(split_dir: Path) -> list[dict]:
    text = (split_dir / "metadata.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# --- compositing and drawing ------------------------------------------------


def test_composite_discards_colour_under_transparent_pixels():
    image = garbage_rgba()
    assert image.convert("RGB").getpixel((5, 5)) == GARBAGE  # the naive conversion leaks it

    out = E.composite(image, WHITE)
    assert out.mode == "RGB" and out.size == image.size
    assert out.getpixel((5, 5)) == WHITE
    assert out.getpixel((0, 0)) == (10, 20, 30)
    assert all(abs(v - 127) <= 1 for v in out.getpixel((1, 0)))  # black at half alpha on white
    assert E.composite(image, (0, 128, 0)).getpixel((7, 7)) == (0, 128, 0)


def test_render_png_handles_palette_and_grey_alpha_and_resizes():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([*GARBAGE, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 1)
    palette.info["transparency"] = 0
    out = E.render_png(png_bytes(palette), size=4, background=WHITE)
    assert out.getpixel((3, 3)) == WHITE and out.getpixel((0, 0)) == (255, 0, 0)

    grey = Image.new("LA", (4, 4), (200, 0))
    assert E.render_png(png_bytes(grey), size=4).getpixel((2, 2)) == WHITE

    big = E.render_png(png_bytes(garbage_rgba(4)), size=8)
    assert big.size == (8, 8) and big.mode == "RGB"


def test_render_svg_rasterises_to_size_on_background():
    out = E.render_svg(SQUARE_SVG, size=16, background=(0, 0, 255))
    assert out.mode == "RGB" and out.size == (16, 16)
    assert out.getpixel((8, 8)) == (255, 0, 0)
    assert out.getpixel((0, 0)) == (0, 0, 255)
    assert out.getpixel((15, 15)) == (0, 0, 255)


def test_codepoints_to_text():
    assert E.codepoints_to_text("1F44B-1F3FD") == "\U0001f44b\U0001f3fd"


# --- names, captions and joining -------------------------------------------


def test_skin_tone_phrase_names_each_tone_once():
    assert E.skin_tone_phrase("1F3FD") == "medium skin tone"
    assert E.skin_tone_phrase("1f3fb-1F3FF") == "light skin tone, dark skin tone"
    assert E.skin_tone_phrase("1F3FC-1F3FC") == "medium-light skin tone"
    with pytest.raises(ValueError):
        E.skin_tone_phrase("1F600")


def test_make_caption():
    assert E.make_caption("red apple", "openmoji") == "red apple, openmoji style"
    assert (
        E.make_caption("waving hand", "twitter", "medium skin tone")
        == "waving hand, medium skin tone, twitter style"
    )


def test_parse_tags():
    assert E.parse_tags("hand, Wave, wave, ") == ("hand", "wave")
    assert E.parse_tags("") == () and E.parse_tags(None) == ()


def test_match_openmoji_prefers_exact_then_drops_fe0f():
    index = {"00A9": 1, "263A-FE0F": 2, "263A": 3, "1F3F3-FE0F-200D-1F308": 4}
    assert E.match_openmoji("00A9-FE0F", index) == "00A9"
    assert E.match_openmoji("263A-FE0F", index) == "263A-FE0F"
    assert E.match_openmoji("1F3F3-FE0F-200D-1F308", index) == "1F3F3-FE0F-200D-1F308"
    assert E.match_openmoji("1F600", index) is None


def test_join_emoji_names_variants_and_tags():
    items = E.join_emoji(FAKE_EMOJI, FAKE_OPENMOJI)
    assert [i.unified for i in items] == [
        "1F44B",
        "1F44B-1F3FD",
        "1F44B-1F3FF",
        "00A9-FE0F",
        "1FAE9",
    ]
    by = {i.unified: i for i in items}

    medium = by["1F44B-1F3FD"]
    assert (medium.name, medium.skin_tone, medium.base_unified) == (
        "waving hand",
        "medium skin tone",
        "1F44B",
    )
    assert medium.openmoji_hexcode == "1F44B-1F3FD"
    assert medium.tags == ("hand", "wave") and medium.category == "People & Body"
    assert by["1F44B-1F3FF"].openmoji_hexcode is None  # no OpenMoji art, still named from the base
    assert by["1F44B-1F3FF"].name == "waving hand"
    assert by["1F44B"].skin_tone is None

    assert (by["00A9-FE0F"].name, by["00A9-FE0F"].openmoji_hexcode) == ("copyright", "00A9")
    assert (by["1FAE9"].name, by["1FAE9"].tags) == (
        "face with bags under eyes",
        (),
    )  # emoji.json fallback

    assert [
        i.unified for i in E.join_emoji(FAKE_EMOJI, FAKE_OPENMOJI, include_skin_tones=False)
    ] == [
        "1F44B",
        "00A9-FE0F",
        "1FAE9",
    ]


def test_make_record():
    item = E.join_emoji(FAKE_EMOJI, FAKE_OPENMOJI)[1]
    record = E.make_record(item, "twitter", E.image_file_name("twitter", item.unified))
    assert record == {
        "file_name": "twitter_1f44b-1f3fd.png",
        "text": "waving hand, medium skin tone, twitter style",
        "emoji": "waving hand",
        "style": "twitter",
        "unified": "1F44B-1F3FD",
        "skin_tone": "medium skin tone",
        "category": "People & Body",
        "subcategory": "hand-fingers-open",
        "tags": ["hand", "wave"],
    }


def test_heldout_style_is_stable_and_near_the_fraction():
    names = [f"emoji number {i}" for i in range(4000)]
    picks = [E.heldout_style(name) for name in names]
    assert picks == [E.heldout_style(name) for name in names]
    assert 0.04 < sum(p is not None for p in picks) / len(names) < 0.06
    assert {p for p in picks if p} == set(E.ALL_STYLES)
    assert all(E.heldout_style(n, fraction=0.0) is None for n in names[:100])
    assert all(E.heldout_style(n, fraction=1.0) in E.ALL_STYLES for n in names[:100])
    # Pinned: the split must not move silently (these come from the real build).
    assert E.heldout_style("flag: andorra") == "google"
    assert E.heldout_style("red apple") is None


def test_normalize_styles_and_parse_background():
    assert E.normalize_styles(["noto", "Google", "google"]) == ("google", "noto")
    with pytest.raises(ValueError):
        E.normalize_styles(["apple"])
    assert E.parse_background("0,128,255") == (0, 128, 255)
    assert E.parse_background("#ffffff") == WHITE
    assert E.parse_background("black") == (0, 0, 0)


# --- writing the data set ---------------------------------------------------


def test_build_from_sources_writes_imagefolder_layout(tmp_path):
    out = tmp_path / "emoji"
    summary = E.build_from_sources(
        out, fake_sources(), ("google", "twitter", "openmoji"), size=16, heldout_fraction=0.0
    )

    rows = read_rows(out / "train")
    assert [r["file_name"] for r in rows] == sorted(r["file_name"] for r in rows)
    assert {p.name for p in (out / "train").glob("*.png")} == {r["file_name"] for r in rows}
    assert read_rows(out / "heldout") == [] and not list((out / "heldout").glob("*.png"))
    assert summary["styles"] == {
        "google": {"train": 5, "heldout": 0, "missing": 0},
        "twitter": {"train": 4, "heldout": 0, "missing": 1},
        "openmoji": {"train": 3, "heldout": 0, "missing": 2},
    }
    assert summary["train"] == len(rows) == 12 and summary["emoji"] == 3

    by_file = {r["file_name"]: r for r in rows}
    assert by_file["openmoji_00a9-fe0f.png"]["text"] == "copyright, openmoji style"
    assert by_file["google_1f44b-1f3ff.png"]["text"] == "waving hand, dark skin tone, google style"
    for name in by_file:
        with Image.open(out / "train" / name) as image:
            assert image.mode == "RGB" and image.size == (16, 16)
            assert image.getpixel((15, 15)) == WHITE  # garbage colour gone
            assert not image.info  # no text or time chunks

    attribution = (out / "ATTRIBUTION.md").read_text()
    for needle in [
        "Apache License 2.0",
        "CC BY 4.0",
        "CC BY-SA 4.0",
        "openmoji@17.0.0",
        "Twitter, Inc",
        "OpenMoji",
    ]:
        assert needle in attribution
    assert "Noto Color Emoji font" not in attribution
    assert (out / "licenses" / "openmoji-LICENSE.txt").read_bytes() == b"CC BY-SA 4.0 text"
    assert json.loads((out / "summary.json").read_text())["train"] == 12
    assert [p.name for p in tmp_path.iterdir()] == ["emoji"]  # no temporary directories left


def test_heldout_split_moves_whole_emoji_style_pairs(tmp_path):
    E.build_from_sources(
        tmp_path / "out",
        fake_sources(),
        ("google", "twitter", "openmoji"),
        size=8,
        heldout_fraction=1.0,
    )
    train, heldout = read_rows(tmp_path / "out" / "train"), read_rows(tmp_path / "out" / "heldout")
    assert heldout and len(train) + len(heldout) == 12
    for row in heldout:
        assert row["style"] == E.heldout_style(row["emoji"], 1.0)
        assert (tmp_path / "out" / "heldout" / row["file_name"]).is_file()
    for row in train:
        assert row["style"] != E.heldout_style(row["emoji"], 1.0)
    held_pairs = {(r["emoji"], r["style"]) for r in heldout}
    assert not held_pairs & {(r["emoji"], r["style"]) for r in train}


def test_build_is_byte_identical_and_replaces_previous_output(tmp_path):
    args = (fake_sources(), ("google", "twitter", "openmoji"))
    E.build_from_sources(tmp_path / "a", *args, size=16)
    E.build_from_sources(tmp_path / "b", *args, size=16)
    first = tree_bytes(tmp_path / "a")
    assert first == tree_bytes(tmp_path / "b")

    (tmp_path / "a" / "stale.txt").write_text("old")
    E.build_from_sources(tmp_path / "a", *args, size=16)
    assert tree_bytes(tmp_path / "a") == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_failed_build_keeps_previous_output(tmp_path):
    out = tmp_path / "emoji"
    E.build_from_sources(out, fake_sources(), ("google",), size=8)
    before = tree_bytes(out)
    broken = fake_sources()
    broken.pngs["google"]["1f44b.png"] = b"not a png"
    with pytest.raises(OSError):  # PIL.UnidentifiedImageError
        E.build_from_sources(out, broken, ("google",), size=8)
    assert tree_bytes(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["emoji"]


# --- download cache, integrity and tarballs ---------------------------------


def test_verify_integrity(tmp_path):
    path = tmp_path / "x.tgz"
    path.write_bytes(b"abc")
    assert E.sha512_integrity(path) == integrity_of(b"abc")
    E.verify_integrity(path, integrity_of(b"abc"))
    with pytest.raises(E.IntegrityError):
        E.verify_integrity(path, integrity_of(b"abd"))
    with pytest.raises(ValueError):
        E.verify_integrity(path, "sha1-qZk+NkcGgWq6PiVxeFDCbJzQ2J0=")


def test_fetch_package_reuses_verified_cache_and_drops_corrupt_one(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)  # any npm call would fail
    package = E.NpmPackage("fake-emoji", "1.0.0", integrity_of(b"tarball"))
    cached = tmp_path / package.tarball
    cached.write_bytes(b"tarball")
    assert E.fetch_package(package, tmp_path) == cached

    cached.write_bytes(b"corrupt")
    with pytest.raises(RuntimeError, match="npm"):
        E.fetch_package(package, tmp_path)
    assert not cached.exists()


def make_tgz(path: Path, files: dict[str, bytes]) -> bytes:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def test_read_tar_members_filters_by_name(tmp_path):
    make_tgz(
        tmp_path / "p.tgz",
        {"package/a.json": b"{}", "package/img/x.png": b"png", "package/README.md": b"r"},
    )
    members = E.read_tar_members(tmp_path / "p.tgz", lambda n: n.endswith((".json", ".png")))
    assert members == {"package/a.json": b"{}", "package/img/x.png": b"png"}


def test_build_emoji_dataset_offline_from_cached_tarballs(tmp_path, monkeypatch, capsys):
    """The public entry point, run on fake pinned tarballs already in the cache."""
    cache = tmp_path / "cache"
    cache.mkdir()
    sources = fake_sources()
    packages = {}
    for vendor in ("google", "twitter"):
        files = {
            "package/emoji.json": json.dumps(FAKE_EMOJI).encode(),
            "package/LICENSE": b"MIT",
            "package/img/apple/64/1f44b.png": b"must not be read",
        }
        files.update({f"package/img/{vendor}/64/{n}": d for n, d in sources.pngs[vendor].items()})
        name = f"fake-datasource-{vendor}"
        data = make_tgz(cache / f"{name}-1.0.0.tgz", files)
        packages[vendor] = E.NpmPackage(name, "1.0.0", integrity_of(data))
    files = {
        "package/data/openmoji.json": json.dumps(FAKE_OPENMOJI).encode(),
        "package/LICENSE.txt": b"CC BY-SA",
    }
    files.update({f"package/color/svg/{h}.svg": d for h, d in sources.svgs.items()})
    openmoji = E.NpmPackage(
        "fake-openmoji", "1.0.0", integrity_of(make_tgz(cache / "fake-openmoji-1.0.0.tgz", files))
    )
    monkeypatch.setattr(emoji_sources, "DATASOURCE_PACKAGES", packages)
    monkeypatch.setattr(emoji_sources, "OPENMOJI_PACKAGE", openmoji)
    monkeypatch.setattr(emoji_build, "OPENMOJI_PACKAGE", openmoji)
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no npm: the cache must suffice

    out = tmp_path / "emoji"
    summary = E.build_emoji_dataset(
        out, size=16, cache_dir=cache, noto_font=tmp_path / "missing.ttf"
    )
    captured = capsys.readouterr()
    assert "skipping the noto style" in captured.err
    assert "train" in captured.out and "took" in captured.out
    assert list(summary["styles"]) == ["google", "twitter", "openmoji"]
    assert summary["train"] + summary["heldout"] == 12 and summary["seconds"] >= 0
    assert summary["sources"]["twitter"] == "fake-datasource-twitter@1.0.0"
    assert (out / "licenses" / "emoji-datasource-LICENSE.txt").read_bytes() == b"MIT"
    assert not any(r["file_name"].startswith("apple") for r in read_rows(out / "train"))


def test_main_passes_arguments(monkeypatch):
    calls = []
    monkeypatch.setattr(emoji_cli, "build_emoji_dataset", lambda *a, **k: calls.append((a, k)))
    assert (
        E.main(
            [
                "--out",
                "x",
                "--styles",
                "google,openmoji",
                "--background",
                "0,0,0",
                "--size",
                "32",
                "--no-skin-tones",
            ]
        )
        == 0
    )
    ((args, kwargs),) = calls
    assert args == ("x",)
    assert kwargs["styles"] == ["google", "openmoji"] and kwargs["background"] == (0, 0, 0)
    assert (
        kwargs["size"] == 32
        and kwargs["include_skin_tones"] is False
        and kwargs["cache_dir"] is None
    )


# --- the optional Noto Color Emoji font -------------------------------------


@pytest.mark.skipif(E.find_noto_font() is None, reason="fonts-noto-color-emoji not installed")
def test_noto_renderer_draws_single_glyphs_only():
    renderer = E.NotoRenderer(E.find_noto_font())
    wave = renderer.render_rgba("1F44B")
    assert wave is not None and wave.mode == "RGBA" and wave.size == (128, 128)
    assert wave.getbbox() is not None
    medium = renderer.render_rgba("1F44B-1F3FD")
    assert medium is not None and medium.tobytes() != wave.tobytes()
    assert renderer.render_rgba("1F600-200D-1F34E") is None  # not an emoji: two glyphs
    assert renderer.render_rgba("1F1E6-1F1E6") is None  # no such region: unknown-flag glyph
