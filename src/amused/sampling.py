"""MaskGIT iterative decoding (Chang et al., 2022), as aMUSEd uses it.

Start from a grid in which some tokens are the mask token. Each step: predict logits for every position,
sample a token at each masked position, score it (log-probability + temperature-annealed Gumbel noise) and
re-mask the least confident ones so that `floor(total * schedule(step))` stay masked; the last step commits
everything. `total` is the number of tokens the schedule spreads over: the tokens unknown at the start
(the whole grid for text-to-image, the masked region for inpainting) or, for img2img, which enters the
schedule part-way, the whole grid.

The loop takes a `logits_fn(tokens, timestep) -> logits` callable, so guidance, LoRA and compilation wrap the model
without touching it. `timestep` is the scheduler's timestep of the step, N - 1 - i at step i of N (as diffusers'
`AmusedScheduler` and Meissonic's `Scheduler` count): Meissonic's transformer is conditioned on it, aMUSEd's
U-ViT ignores it, so one loop serves both.

It makes no host sync: no `.item()`, no `nonzero()`, no Python branch on a tensor; per-step numbers are
precomputed tensors indexed by the (static) Python step index, so the whole loop can be captured as a CUDA graph.

Which tokens stay revealed after a step (`order`):
- "confidence" (MaskGIT): the most confident samples (log-probability + annealed Gumbel noise);
- "halton" (Besnier et al., 2025, valeoai/Halton-MaskGIT): a fixed low-discrepancy 2-D Halton order of grid
  positions, the same every call, so that revealed tokens spread evenly over the image; the per-step counts
  still follow the masking schedule. No retraining: the model is the same, only the choice differs.

Random draws come in two flavours:
- "reference": `torch.multinomial` then uniform Gumbel noise, drawn in the same order and shapes as diffusers'
  `AmusedScheduler`, so a seeded CPU generator reproduces diffusers' tokens exactly;
- "gumbel": Gumbel-max sampling from one `torch.rand` per step on the device (no sync, graph-capturable);
- "cdf": inverse-CDF sampling, one uniform per position (the CPU's fast draws). Both others draw one random
  number per codebook entry and position (`torch.multinomial` draws exponentials): with a 4096-code VQGAN
  that is a million draws a step, most of a CPU image's time; this draws 256 and does one cumulative sum.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple

import torch

Schedule = Literal["cosine", "linear"]
Draw = Literal["reference", "gumbel", "cdf"]
Order = Literal["confidence", "halton"]
ORDERS = ("confidence", "halton")


def mask_ratios(num_steps: int, schedule: Schedule = "cosine", device=None) -> torch.Tensor:
    """Fraction of the schedule's tokens still masked after each step; (num_steps,) float32, last is 0.

    Computed in float32 exactly as the reference does, so mask counts match it token for token.
    """
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    progress = torch.arange(1, num_steps + 1, device=device) / num_steps  # float32, (i + 1) / T
    if schedule == "cosine":
        ratios = torch.cos(progress * math.pi / 2)
    elif schedule == "linear":
        ratios = 1 - progress
    else:
        raise ValueError(f"masking_schedule must be 'cosine' or 'linear', got {schedule!r}")
    # cos(pi/2) is 6e-17 in float32 arithmetic; the last step commits every token. (torch.where, not an index
    # assignment: that copies a host scalar, a sync on CUDA.)
    return torch.where(progress >= 1, 0.0, ratios)


def temperatures(num_steps: int, temperature: float | tuple[float, float] = (2.0, 0.0), device=None) -> torch.Tensor:
    """Per-step Gumbel temperature: linear from temperature[0] to temperature[1] (a scalar t means t -> 0.01)."""
    if isinstance(temperature, (tuple, list)):
        if len(temperature) != 2:
            raise ValueError(f"temperature must be a number or a (start, end) pair, got {temperature!r}")
        start, end = temperature
    else:
        start, end = temperature, 0.01
    for t in (start, end):
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {temperature!r}")
    return torch.linspace(start, end, num_steps, device=device)


def step_timesteps(num_steps: int, device=None) -> torch.Tensor:
    """The scheduler's timestep at each step, N - 1 - i at step i, float32 (N,) (`models.meissonic.reference_timesteps`
    gives Meissonic's transformer the same numbers). The loop hands `timesteps[i]` to the model, a 0-d tensor
    indexed by the static step: no sync, and one captured step serves every step."""
    return torch.arange(num_steps - 1, -1, -1, device=device, dtype=torch.float32)


def _radical_inverse(k: torch.Tensor, base: int, digits: int) -> torch.Tensor:
    """The base-`base` digits of k (int64) mirrored about the point: phi(k) * base**digits, an exact integer."""
    out = torch.zeros_like(k)
    for _ in range(digits):
        out = out * base + k % base
        k = k // base
    return out


def halton_priority(height: int, width: int, device=None) -> torch.Tensor:
    """Reveal priority of each row-major grid position in the 2-D Halton order; (height * width,) float32.

    Point k = 1, 2, ... of the Halton sequence (base 2 for the row, base 3 for the column, as Halton-MaskGIT)
    falls in one cell of the grid; a cell's rank is the first k landing in it, and its priority is -rank, so
    that it ranks like a confidence (earlier in the order = kept first). 2**a * 3**b points with
    2**a >= 2 * height and 3**b >= 2 * width cover every cell: each cell then holds a whole elementary box of
    the Halton net, which holds one point. Integer device ops only (no host sync, capturable in a CUDA graph).
    """
    a = max(1, math.ceil(math.log2(2 * height)))
    b = 1
    while 3 ** b < 2 * width:
        b += 1
    n = 2 ** a * 3 ** b
    k = torch.arange(1, n + 1, device=device)  # (n,) int64
    digits2, digits3 = (n + 1).bit_length(), 1
    while 3 ** digits3 <= n:
        digits3 += 1
    rows = _radical_inverse(k, 2, digits2) * height // 2 ** digits2  # floor(phi_2(k) * height), exact
    cols = _radical_inverse(k, 3, digits3) * width // 3 ** digits3
    cells = rows * width + cols  # (n,)
    rank = torch.full((height * width,), n, device=device).scatter_reduce(0, cells, k - 1, "amin")
    return -rank.float()  # (L,)


def gumbel(uniform: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise from U(0, 1) draws, clamped as the reference does."""
    return -torch.log((-torch.log(uniform.clamp(1e-20))).clamp(1e-20))


def gumbel_draws(logits_shape: tuple[int, ...], generator: torch.Generator | None,
                 device) -> tuple[torch.Tensor, torch.Tensor]:
    """The uniform draws of one "gumbel" step, in stream order: (B, L, V) for the token choice, then (B, L) for
    the confidence noise. Drawn on every step, the last one included (whose noise goes unused), so that every
    step consumes the same amount of the stream and a captured step is the same graph each time."""
    u = torch.rand(logits_shape, device=device, generator=generator, dtype=torch.float32)
    noise = torch.rand(logits_shape[:-1], device=device, generator=generator, dtype=torch.float32)
    return u, noise


class StepResult(NamedTuple):
    tokens: torch.Tensor  # (B, L) grid after this step (re-masked where not confident)
    predicted: torch.Tensor  # (B, L) every position filled with a sampled token
    confidence: torch.Tensor  # (B, L) float32 score of each position (+inf where the token was known)


def _quiet_on_last(temperature: torch.Tensor, last: bool | torch.Tensor) -> torch.Tensor:
    """No confidence noise on the last step (it re-masks nothing; the noise is still drawn, to keep the random
    stream even): the temperature zeroed there; `last` a Python bool or a 0-d bool tensor (captured steps)."""
    if isinstance(last, bool):
        return temperature * 0 if last else temperature
    return torch.where(last, 0.0, temperature)


def unmask_step(logits: torch.Tensor, tokens: torch.Tensor, total: torch.Tensor, ratio: torch.Tensor,
                temperature: torch.Tensor, mask_token_id: int, last: bool | torch.Tensor, draw: Draw = "reference",
                generator: torch.Generator | None = None,
                draws: tuple[torch.Tensor, torch.Tensor] | None = None,
                priority: torch.Tensor | None = None) -> StepResult:
    """One decoding step.

    Args:
        logits: (B, L, V) logits over the codebook.
        tokens: (B, L) current grid.
        total: (B,) tokens the schedule spreads over.
        ratio: scalar tensor, fraction of `total` to leave masked after this step.
        temperature: scalar tensor, Gumbel temperature of the confidence.
        mask_token_id: id of the mask token.
        last: whether this is the final step (commit everything). For draw="gumbel" it may be a 0-d bool tensor,
            so that one captured or compiled step serves every step; "reference" needs a Python bool (the
            reference draws no confidence noise on the last step).
        draw: "reference" (diffusers' random stream), "gumbel" (on-device, graph-capturable) or "cdf" (one
            uniform per position: the CPU's fast draws).
        generator: torch.Generator for the draws.
        draws: for draw="gumbel", the step's uniform draws `gumbel_draws(...)` made beforehand (the same numbers
            as drawing here); a compiled step takes them as inputs, since `torch.compile` cannot trace a
            draw from a private generator.
        priority: (L,) fixed reveal priority (`halton_priority`) ranking which samples stay revealed instead of
            their confidence (order="halton"); None ranks by confidence. The random draws are the same either way.
    """
    unknown = tokens == mask_token_id  # (B, L)
    if draw == "reference":
        if not isinstance(last, bool):
            raise TypeError("draw='reference' needs `last` as a Python bool")
        probs = logits.softmax(dim=-1)  # (B, L, V)
        flat = probs.to(generator.device if generator is not None else probs.device).reshape(-1, probs.shape[-1])
        if flat.device.type == "cpu" and flat.dtype != torch.float32:
            flat = flat.float()  # multinomial has no CPU half kernel
        try:
            predicted = torch.multinomial(flat, 1, generator=generator).to(tokens.device).view(tokens.shape)
        except RuntimeError as e:  # NaN/inf logits: finite weights that overflow (or a NaN LoRA scale slipped in)
            if "inf" not in str(e) and "nan" not in str(e):
                raise
            raise FloatingPointError("the model's logits are not finite (NaN or inf): its weights overflow in "
                                     f"{logits.dtype}, or are corrupt") from None
        log_p = torch.gather(probs, -1, predicted[..., None])[..., 0].float().clamp(1e-20).log()
        predicted = torch.where(unknown, predicted, tokens)
        if last:
            return StepResult(predicted, predicted, torch.where(unknown, log_p, torch.inf))
        noise = torch.zeros_like(log_p, device=generator.device if generator is not None else log_p.device)
        noise = noise.uniform_(0, 1, generator=generator).to(log_p.device)
    elif draw == "cdf":
        where = generator.device if generator is not None else logits.device
        u = torch.rand(logits.shape[:-1], device=where, generator=generator).to(logits.device)  # (B, L)
        noise = torch.rand(logits.shape[:-1], device=where, generator=generator).to(logits.device)
        log_probs = logits.float().log_softmax(dim=-1)
        cdf = log_probs.exp().cumsum(dim=-1)  # (B, L, V)
        # the first token whose cumulative probability exceeds u * total: token k with probability p_k (a token
        # of probability 0 never does, its cdf equals its predecessor's)
        predicted = torch.searchsorted(cdf, (u * cdf[..., -1])[..., None], right=True)[..., 0]
        predicted = predicted.clamp(max=logits.shape[-1] - 1)
        log_p = torch.gather(log_probs, -1, predicted[..., None])[..., 0].clamp(min=math.log(1e-20))
        predicted = torch.where(unknown, predicted, tokens)
        temperature = _quiet_on_last(temperature, last)
    else:
        if draws is None:
            draws = gumbel_draws(logits.shape, generator, logits.device)
        u, noise = draws
        log_probs = logits.float().log_softmax(dim=-1)
        predicted = (log_probs + gumbel(u)).argmax(dim=-1)  # Gumbel-max: a sample of softmax(logits)
        log_p = torch.gather(log_probs, -1, predicted[..., None])[..., 0].clamp(min=math.log(1e-20))
        predicted = torch.where(unknown, predicted, tokens)
        temperature = _quiet_on_last(temperature, last)

    # Known tokens get +inf confidence so they are never re-masked (the reference's finfo.max is only ~11
    # after the log in fp16, so it could re-mask them).
    score = log_p + temperature * gumbel(noise) if priority is None else priority.expand_as(log_p)
    confidence = torch.where(unknown, score, torch.inf)  # (B, L)
    n_unknown = unknown.sum(dim=-1, keepdim=True)  # (B, 1)
    mask_len = torch.floor(total[:, None].float() * ratio)
    mask_len = torch.minimum(n_unknown - 1, mask_len.long()).clamp(min=1)  # keep >= 1 masked until the end
    cutoff = torch.gather(confidence.sort(dim=-1).values, 1, mask_len)  # (B, 1)
    remask = confidence < cutoff
    kept = torch.where(remask, mask_token_id, predicted)
    if isinstance(last, bool):
        return StepResult(predicted if last else kept, predicted, confidence)
    return StepResult(torch.where(last, predicted, kept), predicted, confidence)


class StepInputs(NamedTuple):
    """What step i hands the model and the sampler: entries of per-call tables indexed by the static step (no sync),
    so that one captured or compiled step serves every step."""

    total: torch.Tensor  # (B,) tokens the schedule spreads over
    ratio: torch.Tensor  # 0-d, fraction of `total` left masked after the step
    temperature: torch.Tensor  # 0-d, confidence-noise temperature
    last: torch.Tensor  # 0-d bool, True on the final step
    timestep: torch.Tensor  # 0-d float32, the scheduler's timestep (`step_timesteps`)
    priority: torch.Tensor | None  # (L,) Halton reveal priority, or None (rank by confidence)


FusedStep = Callable[[torch.Tensor, StepInputs], StepResult]
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def decode(logits_fn: LogitsFn | None, tokens: torch.Tensor, *, num_steps: int, mask_token_id: int,
           start_step: int = 0, schedule: Schedule = "cosine", temperature: float | tuple[float, float] = (2.0, 0.0),
           total: torch.Tensor | None = None, draw: Draw = "reference", generator: torch.Generator | None = None,
           callback: Callable[[int, StepResult], None] | None = None, fused_step: FusedStep | None = None,
           order: Order = "confidence") -> torch.Tensor:
    """Run the MaskGIT loop from `start_step` to the end. The one loop: the plain path runs it eagerly, the
    fast path (`amused.fast`) captures this very loop as a CUDA graph with a compiled `fused_step`.

    Args:
        logits_fn: `logits_fn(tokens (B, h, w), timestep 0-d tensor) -> (B, V, h, w)` logits (guidance already
            applied); `timestep` is `step_timesteps(num_steps)[i]`, which a model may ignore.
        tokens: (B, h, w) starting grid; positions equal to `mask_token_id` are to be generated.
        num_steps: steps of the full schedule.
        mask_token_id: id of the mask token.
        start_step: first step to run (img2img enters the schedule part-way).
        schedule: "cosine" or "linear".
        temperature: (start, end) of the linear temperature ramp, or a scalar.
        total: (B,) tokens the schedule spreads over; defaults to the tokens unknown at the start.
        draw: "reference", "gumbel" or "cdf", see the module docstring.
        generator: torch.Generator for all random draws.
        callback: called as `callback(step, StepResult)` after every step.
        fused_step: instead of `logits_fn` + `unmask_step`, one callable doing a whole "gumbel" step:
            `fused_step(grid (B, L), StepInputs) -> StepResult`, drawing its own `gumbel_draws` from the same
            generator (the fast path passes a compiled one).
        order: which samples stay revealed: "confidence" (MaskGIT) or "halton" (a fixed Halton order of
            positions), see the module docstring.

    Returns:
        (B, h, w) grid with every token decided.
    """
    if not 0 <= start_step < num_steps:
        raise ValueError(f"start_step must be in [0, {num_steps}), got {start_step}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    B, H, W = tokens.shape
    device = tokens.device
    grid = tokens.reshape(B, H * W)
    if total is None:
        total = (grid == mask_token_id).sum(dim=-1)
    ratios = mask_ratios(num_steps, schedule, device)
    temps = temperatures(num_steps, temperature, device)
    lasts = torch.arange(num_steps, device=device) == num_steps - 1
    times = step_timesteps(num_steps, device)
    priority = halton_priority(H, W, device) if order == "halton" else None  # (L,) once per call
    for i in range(start_step, num_steps):
        if fused_step is not None:
            result = fused_step(grid, StepInputs(total, ratios[i], temps[i], lasts[i], times[i], priority))
        else:
            logits = logits_fn(grid.view(B, H, W), times[i])  # (B, V, h, w)
            logits = logits.reshape(B, logits.shape[1], H * W).transpose(1, 2)  # (B, L, V)
            draws = gumbel_draws(logits.shape, generator, logits.device) if draw == "gumbel" else None
            result = unmask_step(logits, grid, total, ratios[i], temps[i], mask_token_id, i == num_steps - 1, draw,
                                 generator, draws, priority)
        grid = result.tokens
        if callback is not None:
            callback(i, result)
    return grid.view(B, H, W)
