"""A view into masked decoding: frames of the token grid filling in, per-token confidence heat maps, GIFs.

    out = pipe("red apple", return_steps=True)
    frames = step_frames(pipe, out.steps)          # one image per step; undecided tokens shown grey
    save_gif(frames, "apple.gif")
    heat = confidence_map(out.steps[5])            # how sure the model was of each token at step 6
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import PIL.Image
import torch

from .images import postprocess
from .loading import atomic_write

MASK_GREY = 0.55  # pixel value drawn over undecided tokens


@torch.inference_mode()
def step_frames(pipe, steps, index: int = 0, show: str = "kept", scale: int = 1) -> list[PIL.Image.Image]:
    """Decode every step's grid to an image.

    Args:
        pipe: the pipeline that produced `steps` (its VQGAN decodes them).
        steps: `AmusedPipelineOutput.steps`.
        index: which image of the batch.
        show: "kept" (decided tokens; undecided ones greyed out) or "predicted" (the model's full guess).
        scale: integer upscaling of the frames (nearest), for small models.
    """
    if show not in ("kept", "predicted"):
        raise ValueError(f"show must be 'kept' or 'predicted', got {show!r}")
    mask_id = pipe.scheduler.mask_token_id
    f = pipe.vae_scale_factor
    frames = []
    for state in steps:
        tokens = state.tokens[index] if show == "kept" else state.predicted[index]
        undecided = tokens == mask_id
        ids = torch.where(undecided, state.predicted[index], tokens)  # decode something everywhere
        image = pipe.vqvae.decode(ids[None].to(pipe.device)).float().cpu()[0]  # (3, H, W)
        if show == "kept":
            grey = undecided.repeat_interleave(f, 0).repeat_interleave(f, 1)  # (H, W)
            image = torch.where(grey[None], MASK_GREY, image)
        frame = postprocess(image[None], "pil")[0]
        frames.append(frame.resize((frame.width * scale, frame.height * scale), PIL.Image.NEAREST))
    return frames


def confidence_map(state, index: int = 0, size: int | None = None) -> PIL.Image.Image:
    """Heat map of one step's per-token confidence: dark = unsure, bright yellow = sure, white = known before.

    Confidence is the sampled token's log-probability plus the temperature-scaled Gumbel noise that ranks
    tokens for keeping; it is mapped to [0, 1] with a sigmoid of the log-probability scale.
    """
    conf = state.confidence[index].float()  # (h, w)
    known = torch.isinf(conf)
    value = torch.sigmoid((conf.clamp(-20, 20) + 2.0))  # log p of 0 -> 0.88, log p of -4 -> 0.12
    rgb = _inferno(value.numpy())
    rgb[known.numpy()] = 255
    image = PIL.Image.fromarray(rgb)
    if size:
        image = image.resize((size, size), PIL.Image.NEAREST)
    return image


def _inferno(v: np.ndarray) -> np.ndarray:
    """A small dark-purple -> orange -> yellow colour ramp (no matplotlib needed)."""
    stops = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)
    x = np.clip(v, 0, 1) * (len(stops) - 1)
    lo = np.floor(x).astype(int).clip(0, len(stops) - 2)
    t = (x - lo)[..., None]
    return (stops[lo] * (1 - t) + stops[lo + 1] * t).astype(np.uint8)


def save_gif(frames: Sequence[PIL.Image.Image], path: str | Path, duration_ms: int = 250, hold_last_ms: int = 1500
             ) -> None:
    """Write frames as a looping GIF (atomically)."""
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    durations = [duration_ms] * (len(frames) - 1) + [hold_last_ms]
    atomic_write(Path(path), lambda tmp: frames[0].save(tmp, format="GIF", save_all=True,
                                                        append_images=list(frames[1:]), duration=durations, loop=0))
