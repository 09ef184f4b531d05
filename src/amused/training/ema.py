"""Exponential moving average of the trainable weights (Polyak averaging), as aMUSEd pretraining uses (0.9999).

The average is kept in float32 whatever the weights' dtype. The decay ramps up as min(decay, (1 + n) / (10 + n))
after n updates (diffusers' `EMAModel` default), so early averages are not dominated by the random init.
"""

from __future__ import annotations

from typing import Iterable

import torch


class EMA:
    """EMA of a fixed list of named parameters.

    Args:
        named_params: (name, parameter) pairs to average (the trainable ones).
        decay: the asymptotic decay.
        update_after_step: updates before this count copy the weights instead of averaging.
        warmup: ramp the decay up as described in the module docstring.
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], decay: float = 0.9999,
                 update_after_step: int = 0, warmup: bool = True):
        pairs = list(named_params)
        self.names = [n for n, _ in pairs]
        self.params = [p for _, p in pairs]
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.decay, self.update_after_step, self.warmup = decay, update_after_step, warmup
        self.num_updates = 0

    def current_decay(self) -> float:
        n = self.num_updates - self.update_after_step
        if n <= 0:
            return 0.0
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """Average the current weights in (call after each optimizer step)."""
        self.num_updates += 1
        weight = 1.0 - self.current_decay()
        # shadow += (1 - decay) * (p - shadow), one fused launch per device/dtype group instead of one per tensor
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], weight)

    @torch.no_grad()
    def copy_to(self, params: Iterable[torch.nn.Parameter] | None = None) -> None:
        """Write the averaged weights into the parameters (the tracked ones by default)."""
        for shadow, p in zip(self.shadow, self.params if params is None else params):
            p.copy_(shadow.to(p.dtype))

    def state_dict(self) -> dict:
        return {"shadow": dict(zip(self.names, self.shadow)), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        missing = [n for n in self.names if n not in state["shadow"]]
        if missing:
            raise ValueError(f"EMA state lacks {missing[:3]}... ({len(missing)} parameters)")
        self.shadow = [state["shadow"][n].to(p.device, torch.float32) for n, p in zip(self.names, self.params)]
        self.num_updates = int(state["num_updates"])
