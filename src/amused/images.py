"""Image conversions at the pipeline's edges: user images and masks in, PIL/numpy/tensor images out.

Pixels are in [0, 1] throughout (aMUSEd's VQGAN is not trained on [-1, 1]).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import PIL.Image
import torch

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
            arrays = [np.asarray(flatten_alpha(i) if mode == "RGB" else i.convert(mode), dtype=np.float32) / 255.0
                      for i in image]
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
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = PIL.Image.new("RGBA", rgba.size, tuple(background)[:3] + (255,))
        return PIL.Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path) -> PIL.Image.Image:
    """Open an image file fully (so a truncated or corrupt file fails here, naming the file)."""
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, PIL.UnidentifiedImageError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


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
        small = [m.convert("L").resize((grid_width, grid_height), PIL.Image.LANCZOS) for m in mask]
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


def save_image(image: PIL.Image.Image, path, metadata: dict | None = None) -> None:
    """Write a PNG atomically (temp file + rename: an interrupted run leaves no half-written image), with the
    generation settings stored as PNG text chunks ("amused" holds them as JSON)."""
    import json

    from PIL.PngImagePlugin import PngInfo

    from .loading import atomic_write

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--out {path}: only .png output is supported (it carries the generation settings)")
    info = PngInfo()
    if metadata:
        info.add_text("amused", json.dumps(metadata, sort_keys=True))
        if "prompt" in metadata:
            info.add_text("prompt", str(metadata["prompt"]))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
