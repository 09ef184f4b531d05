"""Optimizers and learning-rate schedules for training, including the memory-saving ones.

- AdamW, or bitsandbytes' 8-bit AdamW (`--use_8bit_adam`, CUDA only): the two moments take 2 bytes a
  parameter instead of 8 (Dettmers et al., 2022).
- `FusedStepOptimizer` (`--fused_optimizer_step`): one optimizer per parameter, stepped from that parameter's
  post-accumulate-grad hook, after which its gradient is freed. The full set of gradients never exists at once
  (the PyTorch "optimizer step in backward" recipe), so a full fine-tune needs weights + optimizer states +
  one layer's gradients. Global-norm clipping is impossible there (no moment at which every gradient exists).
- Stochastic rounding for bfloat16 weights: with pure bf16 weights, an update smaller than half a bf16 ulp
  (1/256 relative) rounds away, so norm gains near 1.0 never move at lr 1e-4. The fused step can apply the
  update to a float32 copy of one parameter at a time and round back stochastically (unbiased in expectation;
  cf. Zamirai et al., 2020), at no persistent memory cost.
- Warmup then constant / cosine / linear decay, as a `LambdaLR` (`set_learning_rate` re-bases it on resume).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Iterable

import torch

SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear")


def adamw_factory(use_8bit: bool, device: torch.device, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                  weight_decay: float = 0.01, eps: float = 1e-8) -> Callable[[list], torch.optim.Optimizer]:
    """A function params -> AdamW (or bitsandbytes AdamW8bit) with these hyper-parameters.

    Raises:
        RuntimeError: `use_8bit` without a CUDA device or without bitsandbytes installed.
    """
    if not use_8bit:  # on CUDA the fused kernel: one launch a step instead of foreach's several per tensor group
        return lambda params: torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps,
                                                fused=device.type == "cuda" or None)
    if device.type != "cuda":
        raise RuntimeError(f"--use_8bit_adam needs a CUDA GPU (bitsandbytes' 8-bit optimizer kernels); this run is on "
                           f"{device.type}. Drop --use_8bit_adam to use torch AdamW")
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise RuntimeError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from e
    return lambda params: bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)


def stochastic_round_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16, rounding up or down with probability given by the distance (unbiased)."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # low 16 bits cleared: exact cast


class FusedStepOptimizer(torch.optim.Optimizer):
    """Steps each parameter as soon as its gradient is complete, then frees the gradient.

    Args:
        params: the trainable parameters.
        make_optimizer: params -> optimizer (e.g. from `adamw_factory`), called once per parameter.
        stochastic_rounding: bf16 parameters are updated through a transient float32 copy and rounded back
            stochastically.

    Set `sync = False` for the micro-batches of a gradient-accumulation cycle that must only accumulate.
    `step()` and `zero_grad()` do nothing: the work happens inside backward. LR schedulers drive the per-
    parameter optimizers through `param_groups`, which are theirs.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], make_optimizer: Callable[[list], torch.optim.Optimizer],
                 stochastic_rounding: bool = False):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameters")
        super().__init__(self.params, {})
        self.stochastic_rounding = stochastic_rounding
        self.sync = True
        self.optimizers = []
        for p in self.params:
            target = p
            if stochastic_rounding and p.dtype == torch.bfloat16:  # the optimizer sees a float32 stand-in
                target = torch.nn.Parameter(torch.empty(0, device=p.device))
            self.optimizers.append(make_optimizer([target]))
        self._collect_groups()
        for i, p in enumerate(self.params):  # the hooks live as long as the parameters
            p.register_post_accumulate_grad_hook(self._hook(i))

    def _collect_groups(self) -> None:
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]
        self.defaults = self.optimizers[0].defaults
        self.state = defaultdict(dict)

    def _hook(self, i: int):
        def hook(p: torch.Tensor) -> None:
            if not self.sync:
                return
            opt = self.optimizers[i]
            target = opt.param_groups[0]["params"][0]
            if target is p:
                opt.step()
            else:
                target.data = p.detach().float().contiguous()
                target.grad = p.grad.float().contiguous()  # bitsandbytes kernels want dense tensors
                opt.step()
                p.detach().copy_(stochastic_round_bf16(target.data))
                target.data, target.grad = torch.empty(0, device=p.device), None
            p.grad = None

        return hook

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - the steps ran in backward
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        states = state_dict["optimizers"]
        if len(states) != len(self.optimizers):
            raise ValueError(f"optimizer state has {len(states)} parameters, the model {len(self.optimizers)}")
        for opt, state in zip(self.optimizers, states):
            opt.load_state_dict(state)
        self._collect_groups()  # loading replaced the group dicts


def lr_lambda(name: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base LR at each step: linear warmup, then constant / cosine / linear to 0."""
    if name not in SCHEDULES:
        raise ValueError(f"--lr_scheduler must be one of {SCHEDULES}, got {name!r}")

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if name in ("constant", "constant_with_warmup"):
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress)) if name == "cosine" else 1.0 - progress

    return fn


def make_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int,
                      total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(name, warmup_steps, total_steps))


def set_learning_rate(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float,
                      **group_settings) -> None:
    """Give a resumed optimizer a new base learning rate (and other param-group settings: betas, weight_decay,
    eps), which loading a checkpoint would otherwise restore to the saved values. The schedule keeps its
    position and the optimizer its moments."""
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, fn in zip(optimizer.param_groups, scheduler.lr_lambdas):  # LambdaLR: one function per group
        group.update(initial_lr=lr, lr=lr * fn(scheduler.last_epoch), **group_settings)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
