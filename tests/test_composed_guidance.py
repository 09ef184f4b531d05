"""Composed guidance (amused.guidance.ComposedGuidance), set by a checkpoint's generation_config.json: prompts
"SUBJECT, STYLE style" are guided by the prompt's, the subject's and the style's directions; any other prompt, and
every call of a checkpoint without it, keeps ordinary guidance."""

import json
import warnings

import numpy as np
import pytest
import torch

from amused import AmusedPipeline
from amused.guidance import ComposedGuidance
from amused.loading import CheckpointError

MICRO = torch.tensor([[32.0, 32, 0, 0, 6]])
TOKENS = torch.randint(0, 8, (2, 4, 4), generator=torch.Generator().manual_seed(0))


def composed(**weights):
    return ComposedGuidance.from_config({"weights": weights})


def logits(pipe, prompts, g, spec=None):
    """The first decoding step's logits of `prompts`, guided (g > 1) as a call composes them."""
    embeds = pipe.encode_prompt(prompts, None, 1, g > 1, composed=spec, guidance_scale=g)
    guidance = g if embeds.weights is None else embeds.weights * g
    fn = pipe.logits_fn(embeds, MICRO.expand(embeds.hidden.shape[0], -1), guidance, grid=(4, 4))
    return fn(TOKENS[:len(prompts)], torch.tensor(0.5))


def test_split():
    spec = composed(prompt=1.0)
    assert spec.split("waving hand, medium skin tone, twitter style") == {
        "prompt": "waving hand, medium skin tone, twitter style", "subject": "waving hand, medium skin tone",
        "style": "twitter style"}
    for plain in ("red apple", "red apple, shiny", ", google style", "apple,  style", "google style"):
        assert spec.split(plain) is None, plain


@pytest.mark.parametrize("bad, needle", [
    ({"weights": {"prompt": 1, "colour": 1}}, "weights must map"),
    ({"weights": {"prompt": float("nan")}}, "weights.prompt must be a finite number"),
    ({"weights": {"prompt": 0, "style": 0}}, "at least one weight"),
    ({"weights": {"prompt": True}}, "finite number"),
    ({"weights": {"prompt": 1}, "style_suffix": ""}, "style_suffix"),
    ({"weights": {"prompt": 1}, "style_suffix": "a, b"}, "style_suffix"),
    ({"prompt": 1}, "composed_guidance must be"),
    ([1, 2], "composed_guidance must be"),
])
def test_config_checked(bad, needle):
    with pytest.raises(ValueError, match=needle):
        ComposedGuidance.from_config(bad)


def test_each_term_alone_is_ordinary_guidance_on_its_text(ours):
    prompts = ["a cat, ink style", "a dog, ink style"]
    texts = {"prompt": prompts, "subject": ["a cat", "a dog"], "style": ["ink style", "ink style"]}
    reference = {term: logits(ours, t, 3.0) for term, t in texts.items()}
    for term in texts:
        torch.testing.assert_close(logits(ours, prompts, 3.0, composed(**{term: 1.0})), reference[term])
    assert not torch.allclose(reference["prompt"], reference["subject"])  # the texts tell the terms apart
    assert not torch.allclose(reference["subject"], reference["style"])
    # several terms: uncond + g * sum_k w_k (c_k - uncond)
    uncond = logits(ours, ["", ""], 1.0)  # the empty negative prompt, unguided
    mixed = logits(ours, prompts, 3.0, composed(prompt=0.5, subject=0.5, style=1.0))
    expected = uncond + sum(w * (reference[t] - uncond) for t, w in (("prompt", 0.5), ("subject", 0.5), ("style", 1.0)))
    torch.testing.assert_close(mixed, expected)


def test_prompts_without_a_style_keep_ordinary_guidance(ours):
    spec = composed(prompt=0.5, subject=0.5, style=1.0)
    embeds = ours.encode_prompt(["a cat", "a dog"], None, 1, True, composed=spec)
    assert embeds.weights is None and embeds.hidden.shape[0] == 4  # no extra passes
    # in a batch with a styled prompt, the plain one is guided as ordinary guidance would
    mixed = logits(ours, ["a cat, ink style", "a dog"], 3.0, spec)
    torch.testing.assert_close(mixed[1], logits(ours, ["a cat, ink style", "a dog"], 3.0)[1])


def test_images_per_prompt_tile_every_term(ours):
    spec = composed(subject=1.0, style=1.0)
    embeds = ours.encode_prompt(["a cat, ink style", "a dog, oil style"], None, 2, True, composed=spec)
    assert embeds.weights.shape == (2, 4) and embeds.hidden.shape[0] == 3 * 4
    expected = ours.encode_prompt(["a cat", "a dog", "a cat", "a dog", "ink style", "oil style", "ink style",
                                   "oil style"], None, 1, False)
    torch.testing.assert_close(embeds.hidden[4:], expected.hidden)


def test_checkpoint_sets_it_and_every_call_uses_it(ours, tmp_path):
    prompt = "a cat, ink style"
    plain = np.asarray(ours(prompt, generator=torch.Generator().manual_seed(0), guidance_scale=3.0,
                            num_inference_steps=4).images[0])
    ours.generation_defaults = {"composed_guidance": {"weights": {"subject": 1.0}}}
    ours.save_pretrained(tmp_path / "m")
    loaded = AmusedPipeline.from_pretrained(tmp_path / "m")
    assert loaded.composed_guidance == composed(subject=1.0)

    def image(pipe, p):
        return np.asarray(pipe(p, generator=torch.Generator().manual_seed(0), guidance_scale=3.0,
                               num_inference_steps=4).images[0])
    # subject alone: the image of the prompt without its style, through __call__
    np.testing.assert_array_equal(image(loaded, prompt), image(ours, "a cat"))
    assert not np.array_equal(image(loaded, prompt), plain)
    loaded.composed_guidance = None  # turned off: ordinary guidance again
    np.testing.assert_array_equal(image(loaded, prompt), plain)


def test_bad_config_names_the_file(ours, tmp_path):
    ours.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "generation_config.json"
    path.write_text(json.dumps({"composed_guidance": {"weights": {"prompt": "x"}}}))
    with pytest.raises(CheckpointError, match="generation_config.json.*weights.prompt must be a finite number"):
        AmusedPipeline.from_pretrained(tmp_path / "m")


def test_weights_summing_to_one_run_no_unconditional_rows(ours):
    """1 - g * sum(w) is the unconditional prediction's weight: at 0 its rows are not run, and the mix is the
    same (c_1 + sum_k>1 w_k (c_k - c_1) == uncond + sum_k w_k (c_k - uncond) when sum_k w_k = 1)."""
    prompts = ["a cat, ink style", "a dog, oil style"]
    spec = composed(prompt=0.4, subject=0.2)  # at g = 2.5: 1.0 and 0.5, sum 1.5 != 1; at g = 1 / 0.6: sum 1
    g = 1 / 0.6
    embeds = ours.encode_prompt(prompts, None, 2, True, composed=spec, guidance_scale=g)
    assert embeds.parts == 2 and embeds.hidden.shape[0] == 2 * 4 and embeds.weights.shape == (1, 4)
    texts = {"prompt": prompts, "subject": ["a cat", "a dog"]}
    reference = {term: logits(ours, t, 1.0) for term, t in texts.items()}  # unguided: the conditional predictions
    uncond = logits(ours, ["", ""], 1.0)
    expected = uncond + sum(w * g * (reference[t] - uncond) for t, w in spec.weights)
    torch.testing.assert_close(logits(ours, prompts, g, spec), expected)
    # not at another scale, nor in a batch with a prompt without a style (it needs the unconditional rows)
    assert ours.encode_prompt(prompts, None, 1, True, composed=spec, guidance_scale=2.5).parts == 3
    assert ours.encode_prompt(["a cat, ink style", "a dog"], None, 1, True, composed=spec,
                              guidance_scale=g).parts == 3
    with pytest.warns(UserWarning, match="negative prompt has no effect"):
        ours.encode_prompt(prompts, "blurry", 1, True, composed=spec, guidance_scale=g)
    with warnings.catch_warnings():  # empty negatives (what the server sends for "none") are the unconditional
        warnings.simplefilter("error")
        ours.encode_prompt(prompts, ["", ""], 1, True, composed=spec, guidance_scale=g)


def test_a_call_without_unconditional_rows_runs_fewer_rows(ours):
    rows, forward = [], ours.transformer.forward_tokens

    def counting(tokens, *args):
        rows.append(tokens.shape[0])
        return forward(tokens, *args)
    ours.composed_guidance = composed(prompt=0.4, subject=0.2)
    ours.transformer.forward_tokens = counting
    try:
        for g in (2.5, 1 / 0.6):
            ours("a cat, ink style", generator=torch.Generator().manual_seed(0), guidance_scale=g,
                 num_inference_steps=2, output_type="latent")
    finally:
        del ours.transformer.forward_tokens
        ours.composed_guidance = None
    assert rows == [3, 3, 2, 2]
