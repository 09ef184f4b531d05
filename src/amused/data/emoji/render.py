"""Drawing one emoji: alpha-compositing PNGs, rasterising SVGs, rendering the Noto font."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, features

from ...images import flatten_alpha

from .packages import NOTO_DEBIAN_PACKAGE, NOTO_FONT_PATHS, NOTO_STRIKE_SIZE


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
    return flatten_alpha(image, background)


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
