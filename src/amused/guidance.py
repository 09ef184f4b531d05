"""Classifier-free guidance next to the model (as DiT's `forward_with_cfg`): one forward over the doubled batch,
then uncond + g * (cond - uncond). Model-agnostic: any model with `forward_tokens(tokens, ctx, timestep)` whose
conditioning `ctx` holds [negatives..., positives...] (aMUSEd's U-ViT, which ignores the timestep; Meissonic's
transformer, which is conditioned on it)."""

from __future__ import annotations

import torch


def guided_logits(model, tokens: torch.Tensor, ctx, guidance_scale: float,
                  timestep: torch.Tensor | None = None) -> torch.Tensor:
    """(B, h, w) tokens -> (B, V, h, w) logits, classifier-free guided when guidance_scale > 1 (the conditioning
    `ctx` then holds [negatives..., positives...]): uncond + g * (cond - uncond). `timestep`: the step's
    scheduler timestep, a 0-d tensor (`sampling.step_timesteps`), shared by both halves."""
    if guidance_scale <= 1.0:
        return model.forward_tokens(tokens, ctx, timestep)
    uncond, cond = model.forward_tokens(torch.cat([tokens, tokens]), ctx, timestep).chunk(2)  # (B, V, h, w) each
    return uncond + guidance_scale * (cond - uncond)
