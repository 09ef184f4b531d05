"""The MUSE / MaskGIT training objective: mask a cosine-scheduled fraction of tokens, predict them.

Per sample, u ~ U(0, 1) and the mask rate is r = cos(pi/2 * u) (optionally floored at `min_masking_rate`):
round(r * L) of the L tokens (at least one) become the mask token, and the loss is cross-entropy with label
smoothing on the masked positions only (Chang et al., 2022; Chang et al., 2023).

Classifier-free guidance needs the model to also see the empty prompt: `drop_text` replaces a sample's text
conditioning, both the per-token states and the pooled vector, with the embedding of "" with probability p.
It acts on the embeddings once they exist (the reference drops with probability 1 - p, and in diffusers'
train_amused.py before the embeddings are computed, so nothing is dropped).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


class MaskedBatch(NamedTuple):
    input_ids: torch.Tensor  # (B, h, w) token ids with the mask token where `mask`
    mask: torch.Tensor  # (B, h, w) bool, True where the model must predict


class MaskedLoss(NamedTuple):
    loss: torch.Tensor  # scalar, mean cross-entropy over masked tokens
    accuracy: torch.Tensor  # scalar, fraction of masked tokens whose argmax is right (no grad)


def mask_tokens(ids: torch.Tensor, mask_token_id: int, min_masking_rate: float = 0.0,
                generator: torch.Generator | None = None) -> MaskedBatch:
    """Mask a cosine-scheduled random fraction of each sample's tokens.

    Args:
        ids: (B, h, w) token ids.
        mask_token_id: id written where tokens are masked.
        min_masking_rate: floor on the per-sample mask rate.
        generator: source of randomness (the global RNG when None).

    Returns:
        `MaskedBatch(input_ids, mask)`.
    """
    B = ids.shape[0]
    L = ids[0].numel()
    u = torch.rand(B, device=ids.device, generator=generator)
    rate = torch.cos(u * math.pi / 2).clamp(min=min_masking_rate)  # (B,)
    count = (rate * L).round().clamp(1, L)  # tokens to mask per sample
    order = torch.rand(B, L, device=ids.device, generator=generator).argsort(dim=1).argsort(dim=1)  # random ranks
    mask = (order < count[:, None]).view_as(ids)  # exactly `count` positions per sample
    return MaskedBatch(torch.where(mask, mask_token_id, ids), mask)


def masked_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                label_smoothing: float = 0.1) -> MaskedLoss:
    """Cross-entropy over the masked positions only.

    Args:
        logits: (B, V, h, w) model output.
        labels: (B, h, w) true token ids.
        mask: (B, h, w) bool, positions that count.
        label_smoothing: as in `torch.nn.functional.cross_entropy` (0.1 as the reference).

    Returns:
        `MaskedLoss(loss, accuracy)`.
    """
    picked = logits.permute(0, 2, 3, 1)[mask].float()  # (M, V): only the masked rows are materialised in fp32
    targets = labels[mask]
    loss = F.cross_entropy(picked, targets, label_smoothing=label_smoothing)
    with torch.no_grad():
        accuracy = (picked.argmax(dim=-1) == targets).float().mean()
    return MaskedLoss(loss, accuracy)


def drop_text(hidden: torch.Tensor, pooled: torch.Tensor, empty_hidden: torch.Tensor, empty_pooled: torch.Tensor,
              p: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace each sample's text conditioning by the empty prompt's with probability `p`.

    Args:
        hidden: (B, S, D) per-token text states.
        pooled: (B, P) pooled text embedding.
        empty_hidden: (1, S, D) states of "".
        empty_pooled: (1, P) pooled embedding of "".
        p: drop probability (0 keeps everything, 1 drops everything).
        generator: source of randomness (the global RNG when None).

    Returns:
        (hidden, pooled, dropped) where dropped is (B,) bool.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"cond_dropout_prob must be in [0, 1], got {p}")
    B = hidden.shape[0]
    dropped = torch.rand(B, device=hidden.device, generator=generator) < p
    hidden = torch.where(dropped[:, None, None], empty_hidden.to(hidden.dtype), hidden)
    pooled = torch.where(dropped[:, None], empty_pooled.to(pooled.dtype), pooled)
    return hidden, pooled, dropped
