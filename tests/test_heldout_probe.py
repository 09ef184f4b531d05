"""scripts/embedded/heldout_guidance_probe.py measures the pipeline's own composed guidance: its W_FULL,W_NAME,W_STYLE
settings are absolute weights, so at its guidance scale they give uncond + sum_k w_k (c_k - uncond)."""

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("probe", ROOT / "scripts/embedded/heldout_guidance_probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def test_settings_are_absolute_weights(ours):
    captions = ["a cat, ink style", "a dog, ink style"]
    tokens = torch.randint(0, 8, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    micro = torch.tensor([[32.0, 32, 0, 0, 6]])

    def logits(prompts, g, composed=None):
        embeds = ours.encode_prompt(prompts, None, 1, g > 1, composed=composed)
        guidance = g if embeds.weights is None else embeds.weights * g
        return ours.logits_fn(embeds, micro.expand(embeds.hidden.shape[0], -1), guidance, grid=(4, 4))(
            tokens, torch.tensor(0.5))

    assert probe.composed_guidance([1.0, 0.5, 1.5]).weights == (("prompt", 0.5), ("subject", 0.25), ("style", 0.75))
    assert probe.composed_guidance([3.0, 0, 0]).weights == (("prompt", 1.5),)  # zero weights: no pass
    uncond = logits(["", ""], 1.0)
    cond = {"full": logits(captions, 2.0, probe.composed_guidance([1, 0, 0])),
            "name": logits(["a cat", "a dog"], 1.0), "style": logits(["ink style"] * 2, 1.0)}
    torch.testing.assert_close(cond["full"], logits(captions, 1.0))  # w_full 1 alone: the caption's own logits
    mixed = logits(captions, probe.SCALE, probe.composed_guidance([1.0, 0.5, 1.5]))
    torch.testing.assert_close(mixed, uncond + (cond["full"] - uncond) + 0.5 * (cond["name"] - uncond)
                               + 1.5 * (cond["style"] - uncond))
