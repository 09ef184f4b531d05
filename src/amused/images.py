"""Image conversions at the pipeline's edges: user images and masks in, PIL/numpy/tensor images out.

Pixels are in [0, 1] throughout (aMUSEd's VQGAN is not trained on [-1, 1]).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from PIL import JpegImagePlugin, PngImagePlugin, WebPImagePlugin

ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor, Sequence[PIL.Image.Image]]


def _to_batch_tensor(image: ImageInput, name: str, channels: int) -> torch.Tensor:
    """Any accepted image form -> (B, C, H, W) float32 in [0, 1]."""
    if isinstance(image, PIL.Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError(f"{name} is an empty list")
        if all(isinstance(i, PIL.Image.Image) for i in image):
            mode = "RGB" if channels == 3 else "L"
            sizes = {i.size for i in image}
            if len(sizes) > 1:
                raise ValueError(f"{name}: all images of a batch must have one size, got {sorted(sizes)}")
            arrays = [np.asarray(flatten_alpha(eight_bit(i)) if mode == "RGB" else eight_bit(i).convert(mode),
                                 dtype=np.float32) / 255.0 for i in image]
            array = np.stack(arrays)  # (B, H, W[, C])
            if array.ndim == 3:
                array = array[..., None]
            return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
        image = torch.stack([torch.as_tensor(np.asarray(i)) for i in image])
    if isinstance(image, np.ndarray):
        if image.dtype.kind not in "biuf":  # bool, int, uint, float: not strings, objects or complex
            raise TypeError(f"{name}: numpy arrays must hold real numbers, got dtype {image.dtype}")
        array = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
        if array.ndim == 2:
            array = array[None, ..., None]
        elif array.ndim == 3:
            array = array[None] if array.shape[-1] in (1, 3) else array[..., None]
        if array.ndim != 4:
            raise ValueError(f"{name}: numpy arrays must be (H, W), (H, W, C) or (B, H, W, C), got {image.shape}")
        tensor = torch.from_numpy(array).permute(0, 3, 1, 2)
    elif isinstance(image, torch.Tensor):
        if image.is_complex() or image.device.type == "meta":
            raise TypeError(f"{name} must be a real-valued tensor holding data, got {image.dtype} on {image.device}")
        tensor = image.float() / (255.0 if image.dtype == torch.uint8 else 1.0)
        if tensor.ndim == 2:
            tensor = tensor[None, None]
        elif tensor.ndim == 3:
            tensor = tensor[None]
        if tensor.ndim != 4:
            raise ValueError(f"{name}: tensors must be (H, W), (C, H, W) or (B, C, H, W), got {tuple(image.shape)}")
    else:
        raise TypeError(f"{name} must be a PIL image, numpy array, torch tensor or a list of PIL images, "
                        f"got {type(image).__name__}")
    if tensor.shape[1] != channels:
        if channels == 1 and tensor.shape[1] == 3:
            tensor = tensor.mean(dim=1, keepdim=True)
        elif channels == 3 and tensor.shape[1] == 1:
            tensor = tensor.expand(-1, 3, -1, -1)
        else:
            raise ValueError(f"{name} has {tensor.shape[1]} channels, expected {channels}")
    if not torch.isfinite(tensor).all() or tensor.min() < 0 or tensor.max() > 1:
        raise ValueError(f"{name} values must be finite and in [0, 1] (or uint8 in [0, 255])")
    return tensor.contiguous()


def flatten_alpha(image: PIL.Image.Image, background=(255, 255, 255)) -> PIL.Image.Image:
    """RGB view of an image; transparent pixels become `background` instead of whatever colour they hide
    (a plain `.convert("RGB")` exposes it; most emoji PNGs hold garbage colour there)."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:  # tRNS: palette, gray or RGB key
        rgba = image.convert("RGBA")
        canvas = PIL.Image.new("RGBA", rgba.size, tuple(background)[:3] + (255,))
        return PIL.Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


# ----------------------------------------------------------------------------------------------------------
# Reading untrusted images: one function for every face (CLI, server, demo, training data)
# ----------------------------------------------------------------------------------------------------------

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # decoders Pillow ships and fuzzes most; no TIFF/EPS/PSD surprises
MAX_IMAGE_PIXELS = 8192 * 8192  # 64 Mi pixels: 192 MiB decoded as RGB; raise it with the variable below
MAX_PIXELS_ENV = "AMUSED_MAX_IMAGE_PIXELS"

# Opened through the format's own class, so only the header is read before our size check. Pillow's
# `Image.open` would try all 40-odd formats it knows and apply its own fixed bomb limit (a warning at 89 Mi
# pixels, an exception at twice that), which the user could not raise with ours.
_SIGNATURES = (("PNG", lambda h: h[:8] == b"\x89PNG\r\n\x1a\n", PngImagePlugin.PngImageFile),
               ("JPEG", lambda h: h[:3] == b"\xff\xd8\xff", JpegImagePlugin.JpegImageFile),
               ("WEBP", lambda h: h[:4] == b"RIFF" and h[8:12] == b"WEBP", WebPImagePlugin.WebPImageFile))


class ImageError(ValueError):
    """An image input is unreadable, too large, or not PNG, JPEG or WebP (the message names the input)."""


def max_image_pixels(override: int | None = None) -> int:
    """The pixel limit in force: `override`, else $AMUSED_MAX_IMAGE_PIXELS, else `MAX_IMAGE_PIXELS`."""
    if override is None:
        from .env import positive_int_env

        return positive_int_env(MAX_PIXELS_ENV, unit="pixels") or MAX_IMAGE_PIXELS
    if isinstance(override, bool) or not isinstance(override, int) or override < 1:
        raise ValueError(f"max_pixels must be a positive whole number of pixels, got {override!r}")
    return override


def load_image(image, *, mode: str | None = "RGB", name: str | None = None, max_pixels: int | None = None,
               max_side: int | None = None) -> PIL.Image.Image:
    """Read an untrusted image completely, checked before any pixel is decoded.

    Only PNG, JPEG and WebP are accepted (recognised by content, not by file name), and the size the header
    declares must be within `max_pixels`. The pixels are then normalised the same way on every path: EXIF
    orientation applied, 16-bit grayscale scaled to 8 bits (a plain `.convert` clips it to white), and
    transparency composited onto white for "RGB". PNG text chunks (the settings amused writes) stay in `.info`.

    Args:
        image: a path, the file's bytes, a binary file object, or a PIL image (e.g. from a `datasets` column).
        mode: "RGB"; "L" for masks (transparent pixels count as black: unpainted means keep); or None for the
            8-bit image in its own mode (alpha kept).
        name: what errors call the input (the path by default; the server passes the request field).
        max_pixels: width x height limit; default $AMUSED_MAX_IMAGE_PIXELS, else `MAX_IMAGE_PIXELS`.
        max_side: optional limit on the longer side, in pixels.

    Returns:
        A new, fully decoded PIL image.

    Raises:
        ImageError: a ValueError whose one-line message names the input: missing, unreadable, not PNG/JPEG/WebP,
            or too large.
    """
    if mode not in ("RGB", "L", None):
        raise ValueError(f"load_image mode must be 'RGB', 'L' or None, got {mode!r}")
    if isinstance(image, PIL.Image.Image):
        return _normalise(image, mode, name or "image", max_pixels, max_side)
    if isinstance(image, (str, os.PathLike)):
        name = name or str(image)
        try:
            with open(image, "rb") as f:
                return _normalise(_open(f, name), mode, name, max_pixels, max_side)
        except FileNotFoundError:
            raise ImageError(f"{name}: no such file") from None
        except IsADirectoryError:
            raise ImageError(f"{name}: is a folder, not an image file") from None
        except PermissionError:
            raise ImageError(f"{name}: permission denied") from None
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _normalise(_open(io.BytesIO(image), name or "image"), mode, name or "image", max_pixels, max_side)
    if hasattr(image, "read"):
        name = name or str(getattr(image, "name", "image"))
        return _normalise(_open(image, name), mode, name, max_pixels, max_side)
    raise TypeError(f"{name or 'image'} must be a path, bytes, a binary file object or a PIL image, "
                    f"got {type(image).__name__}")


def decode_base64_image(data: str, *, name: str = "image", **kwargs) -> PIL.Image.Image:
    """`load_image` for a base64 string or a data: URL (request bodies); `kwargs` as `load_image` takes."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"{name}: not valid base64: {e}") from None
    return load_image(raw, name=name, **kwargs)


def _open(f, name: str) -> PIL.Image.Image:
    """Header only: the format's class parses it; no pixel data is read."""
    if not f.seekable():
        f = io.BytesIO(f.read())
    head = f.read(16)
    f.seek(-len(head), io.SEEK_CUR)
    for _, accepts, cls in _SIGNATURES:
        if accepts(head):
            try:
                return cls(f)
            except Exception as e:  # noqa: BLE001 (Pillow raises many kinds for damaged headers)
                raise ImageError(f"{name}: cannot read image: {_one_line(e)}") from None
    raise ImageError(f"{name}: not a PNG, JPEG or WebP image (the only formats accepted)")


def _normalise(image: PIL.Image.Image, mode: str | None, name: str, max_pixels: int | None,
               max_side: int | None) -> PIL.Image.Image:
    if image.format is not None and image.format not in IMAGE_FORMATS:
        raise ImageError(f"{name}: {image.format} images are not accepted; give a PNG, JPEG or WebP image")
    width, height = image.size
    limit = max_image_pixels(max_pixels)
    if width * height > limit:
        raise ImageError(f"{name}: image is {width}x{height} ({width * height:,} pixels), over the limit of "
                         f"{limit:,}; if you trust it, raise the limit with {MAX_PIXELS_ENV}")
    if max_side is not None and max(width, height) > max_side:
        raise ImageError(f"{name}: image is {width}x{height}; the limit is {max_side} pixels a side")
    try:
        image = PIL.ImageOps.exif_transpose(image)  # decodes the pixels; returns a copy
    except Exception as e:  # noqa: BLE001 (truncated or corrupt pixel data)
        raise ImageError(f"{name}: cannot read image: {_one_line(e)}") from None
    info = dict(image.info)  # text chunks, and the EXIF without its (now applied) orientation
    image = eight_bit(image)
    if mode == "RGB":
        image = flatten_alpha(image)
    elif mode == "L":
        image = flatten_alpha(image, background=(0, 0, 0)).convert("L")
    image.info = info
    return image


def eight_bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """16-bit grayscale (PNG's "I;16", or "I") scaled to 8-bit "L"; other images as they are. Pillow's own
    conversion clips 0..65535 to 0..255, which turns almost every pixel white."""
    if image.mode not in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        return image
    wide = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    return PIL.Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))  # rounded x 255 / 65535


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def resize(image: ImageInput, height: int, width: int) -> ImageInput:
    """Resize PIL images (Lanczos, as the reference's preprocessing does); tensors are left to the caller."""
    if isinstance(image, PIL.Image.Image):
        return image if image.size == (width, height) else image.resize((width, height), PIL.Image.LANCZOS)
    if isinstance(image, (list, tuple)) and all(isinstance(i, PIL.Image.Image) for i in image):
        return [resize(i, height, width) for i in image]
    raise ValueError("height/width resizing is only supported for PIL images; resize tensors yourself")


def preprocess_image(image: ImageInput, name: str = "image") -> torch.Tensor:
    """(B, 3, H, W) float32 in [0, 1]."""
    return _to_batch_tensor(image, name, channels=3)


def preprocess_mask(mask: ImageInput, grid_height: int, grid_width: int, name: str = "mask_image") -> torch.Tensor:
    """Mask image -> (B, grid_height, grid_width) bool, True where tokens are to be regenerated.

    PIL masks are downsampled with Lanczos then binarised at 0.5, as the reference does; tensors are
    area-averaged.
    """
    if isinstance(mask, PIL.Image.Image):
        mask = [mask]
    if isinstance(mask, (list, tuple)) and all(isinstance(m, PIL.Image.Image) for m in mask):
        small = [eight_bit(m).convert("L").resize((grid_width, grid_height), PIL.Image.LANCZOS) for m in mask]
        values = _to_batch_tensor(small, name, channels=1)
    else:
        values = _to_batch_tensor(mask, name, channels=1)
        values = torch.nn.functional.adaptive_avg_pool2d(values, (grid_height, grid_width))
    return values[:, 0] >= 0.5


def image_size(image: ImageInput, name: str = "image") -> tuple[int, int]:
    """(height, width) of an image input."""
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    if isinstance(image, (list, tuple)) and image and isinstance(image[0], PIL.Image.Image):
        return image[0].height, image[0].width
    tensor = _to_batch_tensor(image, name, channels=1 if name.startswith("mask") else 3)
    return tensor.shape[-2], tensor.shape[-1]


def postprocess(images: torch.Tensor, output_type: str):
    """(B, 3, H, W) in [0, 1] -> list of PIL images ("pil"), NHWC float32 array ("np") or the tensor ("pt")."""
    return from_device(output_tensor(images, output_type), output_type)


def output_tensor(images: torch.Tensor, output_type: str) -> torch.Tensor:
    """The tensor that goes to the host, made where the images are (on the GPU: one small kernel instead of
    the host converting every pixel): "pil" -> (B, H, W, 3) uint8, "np" -> (B, H, W, 3) float32, "pt" ->
    (B, 3, H, W) float32."""
    if output_type == "pt":
        return images.float()
    if output_type == "np":
        return images.float().permute(0, 2, 3, 1).contiguous()
    if output_type == "pil":  # round half to even, as numpy's round did here before
        return (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")


def to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """`tensors` on the host, with one wait for the device: each is copied into page-locked memory without
    blocking, then the stream is synchronised once (tensors already on the host are returned as they are)."""
    if not any(t.is_cuda for t in tensors):
        return list(tensors)
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for h, t in zip(host, tensors):
        h.copy_(t, non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return host


def from_device(output: torch.Tensor, output_type: str):
    """`output_tensor`'s result (on any device) -> what the pipeline hands out."""
    if output_type == "pt":
        return output
    array = output.cpu().numpy()
    return array if output_type == "np" else [PIL.Image.fromarray(a) for a in array]


def make_image_grid(images: Sequence[PIL.Image.Image], rows: int | None = None, cols: int | None = None
                    ) -> PIL.Image.Image:
    """Tile equally sized images into one, row by row (diffusers' helper of the same name)."""
    if not images:
        raise ValueError("make_image_grid needs at least one image")
    n = len(images)
    if rows is None and cols is None:
        cols = int(np.ceil(np.sqrt(n)))
    if cols is None:
        cols = int(np.ceil(n / rows))
    if rows is None:
        rows = int(np.ceil(n / cols))
    if rows * cols < n:
        raise ValueError(f"a {rows}x{cols} grid cannot hold {n} images")
    w, h = images[0].size
    grid = PIL.Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), box=(i % cols * w, i // cols * h))
    return grid


def check_output_path(path, flag: str = "--out") -> Path:
    """Refuse, before any work is done, an output path that cannot take a PNG.

    Args:
        path: where the image is to be written.
        flag: the argument it came from, named in the error (e.g. "--out", "--grid").

    Returns:
        The path, with `~` expanded.

    Raises:
        ValueError: one line naming `flag`: not a .png name, an existing folder or device, a parent that is a
            file (`/dev/null/x.png`), or a folder that cannot be written.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give a file name ending in .png")
    if path.suffix.lower() != ".png":
        raise ValueError(f"{flag} {path}: only .png output is supported (it carries the generation settings)")
    if path.exists() and not path.is_file():  # a device or pipe: the rename would replace it
        raise ValueError(f"{flag} {path}: exists and is not a regular file")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # atomic_write creates missing folders
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot write in {folder} (permission denied)")
    return path


def png_text(metadata: dict | None) -> dict[str, str]:
    """The PNG text chunks that carry generation settings: "amused" (all of them, JSON) and "prompt"."""
    import json

    if not metadata:
        return {}
    text = {"amused": json.dumps(metadata, sort_keys=True)}
    if "prompt" in metadata:
        text["prompt"] = str(metadata["prompt"])
    return text


def save_image(image: PIL.Image.Image, path, metadata: dict | None = None) -> None:
    """Write a PNG atomically (temp file + rename: an interrupted run leaves no half-written image), with the
    generation settings stored as PNG text chunks ("amused" holds them as JSON)."""
    from .loading import atomic_write
    from .png import encode_png

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--out {path}: only .png output is supported (it carries the generation settings)")
    data = encode_png(image, png_text(metadata))
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
