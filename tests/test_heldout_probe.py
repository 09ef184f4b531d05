"""scripts/embedded/heldout_guidance_probe.py: the composed guidance it measures is ordinary guidance on whichever
of the caption, its name or its style carries the only weight, and adds the directions when several do."""

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("probe", ROOT / "scripts/embedded/heldout_guidance_probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def test_split_caption():
    assert probe.split_caption("waving hand, medium skin tone, twitter style") == (
        "waving hand, medium skin tone", "twitter style")
    assert probe.split_caption("red apple, google style") == ("red apple", "google style")
    assert probe.split_caption("red apple") == ("red apple", "")


def test_composed_guidance_reduces_to_ordinary_guidance(ours):
    ordinary = ours.logits_fn
    tokens = torch.randint(0, 8, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    timestep = torch.tensor(0.5)
    micro = torch.tensor([[32.0, 32, 0, 0, 6]] * 4)
    captions = ["a cat, ink style", "a dog, ink style"]
    names, styles = ["a cat", "a dog"], ["ink style", "ink style"]

    def logits(fn, prompts, g):
        return fn(ours.encode_prompt(prompts, None, 1, True), micro, g, grid=(4, 4))(tokens, timestep)

    weights = {}
    composed = probe.composed_guidance(ours, weights, {"name": names, "style": styles})
    reference = {"full": logits(ordinary, captions, 3.0), "name": logits(ordinary, names, 3.0),
                 "style": logits(ordinary, styles, 3.0)}
    for term in probe.TERMS:
        weights.update(dict.fromkeys(probe.TERMS, 0.0), **{term: 3.0})
        torch.testing.assert_close(logits(composed, captions, 2.0), reference[term])
    # two directions at once: their sum, each measured from the same uncond
    weights.update(full=0.0, name=3.0, style=3.0)
    torch.testing.assert_close(logits(composed, captions, 2.0),
                               reference["name"] + reference["style"] - logits(probe_uncond(ours), captions, 2.0))
    # the references differ, so each assertion above tells the directions apart
    assert not torch.allclose(reference["full"], reference["name"])
    assert not torch.allclose(reference["name"], reference["style"])


def probe_uncond(pipe):
    """A logits_fn giving the unconditional logits of a guided call (its negative half)."""
    def fn(embeds, micro_conds, guidance_scale, model=None, grid=None):
        ctx = pipe.transformer.condition(embeds.hidden, embeds.pooled, micro_conds, grid=grid)
        return lambda tokens, t: pipe.transformer.forward_tokens(torch.cat([tokens, tokens]), ctx, t).chunk(2)[0]
    return fn
