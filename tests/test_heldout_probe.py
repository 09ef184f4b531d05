"""scripts/embedded/heldout_guidance_probe.py: the split guidance it measures is ordinary guidance when its two
weights are equal, and guidance towards the name alone when the style weight is 0."""

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("probe", ROOT / "scripts/embedded/heldout_guidance_probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def test_split_guidance_reduces_to_ordinary_guidance(ours):
    ordinary = ours.logits_fn
    tokens = torch.randint(0, 8, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    timestep = torch.tensor(0.5)
    micro = torch.tensor([[32.0, 32, 0, 0, 6]] * 4)

    def logits(fn, prompts, negatives, g):
        embeds = ours.encode_prompt(prompts, negatives, 1, True)
        return fn(embeds, micro, g, grid=(4, 4))(tokens, timestep)

    captions, names = ["a cat, ink style", "a dog, ink style"], ["a cat", "a dog"]
    weights = {"name": 3.0, "style": 3.0}
    split = probe.split_guidance(ours, weights)
    torch.testing.assert_close(logits(split, captions, names, 2.0), logits(ordinary, captions, None, 3.0))
    weights["style"] = 0.0  # the caption's style direction off: guidance towards the names alone
    torch.testing.assert_close(logits(split, captions, names, 2.0), logits(ordinary, names, None, 3.0))
    # the two references differ, so each assertion above tells the directions apart
    assert not torch.allclose(logits(ordinary, captions, None, 3.0), logits(ordinary, names, None, 3.0))
