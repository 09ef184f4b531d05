"""Outpainting as inpainting: extend the canvas and mask the new border, then let any inpainting pipeline
(`AmusedInpaintPipeline`, `MeissonicInpaintPipeline`) regenerate the masked tokens, as Meissonic's own outpainting
does (its inpaint.py with a border mask).

    image, mask = outpaint(photo, left=256, right=256)       # 1024x1024 -> 1536x1024, the sides to draw
    wide = MeissonicInpaintPipeline.from_pipe(pipe)("fall mountains", image=image, mask_image=mask).images[0]
"""

from __future__ import annotations

import numpy as np
import PIL.Image

from .images import max_image_pixels


def outpaint(image: PIL.Image.Image, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0
             ) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """Extend `image` by the given pixels on each side and mask the new border.

    The new pixels repeat the nearest edge pixel ("edge" padding): they are regenerated anyway, and a continuation
    of the edge disturbs the VQ tokens of the original next to the seam least.

    Args:
        image: a PIL image (converted to RGB).
        left, right, top, bottom: pixels to add on each side, whole numbers >= 0, at least one > 0. The new size
            must suit the model (a multiple of its token size, or the pipeline says which sizes do); a border
            narrower than half a token is not regenerated (the mask is read per token).

    Returns:
        (image, mask): the extended RGB image and an "L" mask, white (255) on the new border, black on the original.
    """
    if not isinstance(image, PIL.Image.Image):
        raise ValueError(f"image must be a PIL image, got {type(image).__name__}")
    sides = {"left": left, "right": right, "top": top, "bottom": bottom}
    for name, value in sides.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a whole number of pixels >= 0, got {value!r}")
    if not any(sides.values()):
        raise ValueError("outpaint needs at least one of left, right, top, bottom > 0")
    width, height = image.width + left + right, image.height + top + bottom
    if width * height > max_image_pixels():
        raise ValueError(f"left/right/top/bottom: the extended image, {width}x{height}, is over the "
                         f"{max_image_pixels()}-pixel limit")
    pixels = np.asarray(image.convert("RGB"))  # (H, W, 3)
    extended = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")  # (H', W', 3)
    mask = np.full((height, width), 255, dtype=np.uint8)
    mask[top:top + image.height, left:left + image.width] = 0
    return PIL.Image.fromarray(extended), PIL.Image.fromarray(mask)  # uint8 (H, W): mode "L"
