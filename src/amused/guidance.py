"""Classifier-free guidance next to the model (as DiT's `forward_with_cfg`): one forward over the stacked batch,
then uncond + g * (cond - uncond). Model-agnostic: any model with `forward_tokens(tokens, ctx, timestep)` whose
conditioning `ctx` holds [negatives..., positives...] (aMUSEd's U-ViT, which ignores the timestep; Meissonic's
transformer, which is conditioned on it).

Composed guidance (Liu et al., "Compositional Visual Generation with Composable Diffusion Models", 2022) mixes
several conditions' directions: uncond + sum_k w_k (cond_k - uncond), with `ctx` holding [negatives..., term 1...,
term 2..., ...]. When the weights sum to 1, the unconditional prediction's weight (1 - sum_k w_k) is 0: the mix is
then cond_1 + sum_{k>1} w_k (cond_k - cond_1), a product of the terms' distributions, and `ctx` holds only the
terms (one U-ViT row fewer per image). `ComposedGuidance` says how a checkpoint splits its prompts into terms
("dog face, google style" -> the prompt, "dog face" and "google style"); the embedded emoji model sets it in
generation_config.json, so that an (emoji, style) pair it never saw is drawn from the emoji's direction as well as
the pair's."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TERMS = ("prompt", "subject", "style")  # the whole prompt, the prompt without its style, the style alone
SEPARATOR = ", "


def guided_logits(model, tokens: torch.Tensor, ctx, guidance: float | torch.Tensor,
                  timestep: torch.Tensor | None = None) -> torch.Tensor:
    """(B, h, w) tokens -> (B, V, h, w) logits.

    `guidance`: a float g, classifier-free guidance when g > 1 (`ctx` then holds [negatives..., positives...]):
    uncond + g * (cond - uncond); or a (K, B) tensor of per-sample weights w, composed guidance over K terms (`ctx`
    holds [base..., term 1..., ..., term K...]): base + sum_k w_k * (cond_k - base), the base being the
    unconditional prediction (the negatives' rows) or, where that has weight 0, the first of the composed terms
    (see the module docstring). `timestep`: the step's scheduler timestep, a 0-d tensor
    (`sampling.step_timesteps`), shared by every part."""
    if isinstance(guidance, torch.Tensor):
        k = guidance.shape[0]
        base, *conds = model.forward_tokens(torch.cat([tokens] * (k + 1)), ctx, timestep).chunk(k + 1)
        weights = guidance.to(base.dtype)[:, :, None, None, None]  # (K, B, 1, 1, 1)
        out = base
        for w, cond in zip(weights, conds):
            out = out + w * (cond - base)
        return out
    if guidance <= 1.0:
        return model.forward_tokens(tokens, ctx, timestep)
    uncond, cond = model.forward_tokens(torch.cat([tokens, tokens]), ctx, timestep).chunk(2)  # (B, V, h, w) each
    return uncond + guidance * (cond - uncond)


@dataclass(frozen=True)
class ComposedGuidance:
    """How prompts of the form "SUBJECT, STYLE<style_suffix>" are guided: the guidance scale g is shared out as
    uncond + g * (w_prompt (c_prompt - uncond) + w_subject (c_subject - uncond) + w_style (c_style - uncond)).
    A prompt of another form gets ordinary guidance g. generation_config.json:
    `"composed_guidance": {"weights": {"prompt": 0.5, "subject": 0.5, "style": 1.0}, "style_suffix": " style"}`."""

    weights: tuple[tuple[str, float], ...]  # (term, weight) for the terms with a weight, in TERMS order
    style_suffix: str = " style"

    @classmethod
    def from_config(cls, data) -> "ComposedGuidance":
        """From generation_config.json's value, checked (a checkpoint is untrusted); ValueError names the key."""
        if not isinstance(data, dict) or set(data) - {"weights", "style_suffix"} or "weights" not in data:
            raise ValueError(f"composed_guidance must be {{\"weights\": {{...}}, \"style_suffix\": \"...\"}}, "
                             f"got {data!r:.80}")
        weights, suffix = data["weights"], data.get("style_suffix", " style")
        if not isinstance(weights, dict) or set(weights) - set(TERMS):
            raise ValueError(f"composed_guidance.weights must map some of {', '.join(TERMS)} to numbers, "
                             f"got {weights!r:.80}")
        for term, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ValueError(f"composed_guidance.weights.{term} must be a finite number, got {w!r:.80}")
        if not any(weights.values()):
            raise ValueError("composed_guidance.weights: at least one weight must be non-zero")
        if not isinstance(suffix, str) or not suffix.strip() or len(suffix) > 64 or SEPARATOR in suffix:
            raise ValueError(f"composed_guidance.style_suffix must be a short non-empty string without "
                             f"{SEPARATOR!r}, got {suffix!r:.80}")
        return cls(tuple((t, float(weights[t])) for t in TERMS if weights.get(t)), suffix)

    def to_config(self) -> dict:
        return {"weights": dict(self.weights), "style_suffix": self.style_suffix}

    def split(self, prompt: str) -> dict[str, str] | None:
        """"waving hand, medium skin tone, twitter style" -> {"prompt": ..., "subject": "waving hand, medium skin
        tone", "style": "twitter style"}; None for a prompt without a style part."""
        subject, _, style = prompt.rpartition(SEPARATOR)
        if not subject.strip() or not style.endswith(self.style_suffix) or not style[:-len(self.style_suffix)].strip():
            return None
        return {"prompt": prompt, "subject": subject, "style": style}

    def terms(self, prompts: list[str]) -> tuple[list[list[str]], torch.Tensor] | None:
        """The texts of each term (K lists of len(prompts)) and (K, len(prompts)) weights, to be multiplied by
        the guidance scale; None when no prompt has a style part (ordinary guidance, one pass fewer per term).
        A prompt without one, in a batch with others, takes its own text for every term, each at 1/K: ordinary
        guidance."""
        parts = [self.split(p) for p in prompts]
        if all(p is None for p in parts):
            return None
        k = len(self.weights)
        texts = [[p[term] if p is not None else prompt for p, prompt in zip(parts, prompts)]
                 for term, _ in self.weights]
        weights = torch.tensor([[w if p is not None else 1.0 / k for p in parts] for _, w in self.weights])
        return texts, weights


def unconditional_weight(weights: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The unconditional prediction's weight in composed guidance, 1 - g * sum_k w_k, per image: (B,) from the
    (K, B) weights of `ComposedGuidance.terms`. Where it is 0 for every image, its rows need not run (see the module
    docstring); a prompt without a style part (weights 1/K each) has 1 - g."""
    return 1.0 - guidance_scale * weights.double().sum(dim=0)
