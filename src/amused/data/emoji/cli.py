"""`amused build-emoji-data` / `python -m amused.data.emoji`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from PIL import ImageColor

from .build import build_emoji_dataset
from .packages import ALL_STYLES, HELDOUT_FRACTION


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

