"""Property-based tests (hypothesis) over the pipelines' argument space, on the tiny checkpoint.

The property: every call either returns images of the requested shape and dtype, in range and free of NaN, or
raises ValueError/TypeError whose message names an argument that was given a bad value. Never another exception
type, never a silently wrong result. The tiny model has VQ factor 2 and a downsampling U-ViT, so sizes must be
multiples of 4; its native size is 8x8.
"""

import math
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from amused import AmusedImg2ImgPipeline, AmusedInpaintPipeline, AmusedPipeline  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

def arg(valid, bad):
    """(value, is_bad) pairs, bad about one time in eight, so that most calls have every argument valid or
    exactly one bad (the message must then name that one)."""
    return st.integers(0, 7).flatmap(lambda r: bad.map(lambda v: (v, True)) if r == 0 else
                                     valid.map(lambda v: (v, False)))


# Each strategy draws (value, is_bad). A bad value must make the call fail naming its argument.
GOOD_SIZES = st.sampled_from([4, 8, 12, 16])
SIZES = arg(GOOD_SIZES, st.sampled_from([0, -4, 2, 6, 7, 10, 13]))
STEPS = arg(st.one_of(st.integers(1, 4), st.none()), st.sampled_from([0, -1, -12, 2.5, "3"]))
GUIDANCE = arg(st.one_of(st.floats(-5, 20, allow_nan=False), st.sampled_from([0, 1, 3])),
               st.sampled_from([math.nan, math.inf, -math.inf, "10"]))
TEMPERATURE = arg(st.one_of(st.floats(0, 5), st.tuples(st.floats(0, 5), st.floats(0, 5))),
                  st.sampled_from([-1.0, math.nan, math.inf, (1, 2, 3), (math.nan, 0.0), "hot"]))
STRENGTH = arg(st.sampled_from([0.25, 0.5, 0.75, 1.0]), st.sampled_from([0.0, -0.5, 1.5, math.nan, math.inf, "0.5"]))
IMAGES_PER_PROMPT = arg(st.integers(1, 3), st.sampled_from([0, -2, 1.5]))
PROMPTS = arg(st.one_of(st.text(max_size=30), st.just(""),
                        st.just("a very long prompt " * 40),  # over the encoder's 16 tokens: cut, with a warning
                        st.lists(st.text(max_size=10), min_size=1, max_size=2)),
              st.sampled_from([[], 3, [1, "a"], b"bytes"]))
OUTPUT = arg(st.sampled_from(["pil", "np", "pt", "latent"]), st.sampled_from(["jpeg", "", None]))


@pytest.fixture(scope="module")
def pipes(ref_dir):
    base = AmusedPipeline.from_pretrained(ref_dir)
    return {"t2i": base, "img2img": AmusedImg2ImgPipeline.from_pipe(base),
            "inpaint": AmusedInpaintPipeline.from_pipe(base)}


def n_prompts(prompt) -> int:
    return 1 if isinstance(prompt, str) else len(prompt)


def check_images(images, output_type: str, batch: int, height: int, width: int) -> None:
    if output_type == "pil":
        assert len(images) == batch and all(im.size == (width, height) and im.mode == "RGB" for im in images)
    elif output_type == "np":
        assert images.shape == (batch, height, width, 3) and images.dtype == np.float32
        assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    elif output_type == "pt":
        assert images.shape == (batch, 3, height, width) and images.dtype == torch.float32
        assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    else:  # token ids
        assert images.shape == (batch, height // 2, width // 2) and images.dtype == torch.long
        assert images.min() >= 0 and images.max() < 16  # real codes, no mask token left


def call_and_check(fn, args: dict, bad: set[str], expected_shape) -> None:
    """Run fn(**values); a failure must be ValueError/TypeError naming a bad argument, success needs none bad."""
    values = {k: v for k, (v, _) in args.items()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn(**values)
    except (ValueError, TypeError) as e:
        msg = str(e)
        assert bad, f"valid arguments {values!r} were refused: {msg}"
        assert any(name in msg for name in _aliases(bad)), f"{msg!r} names none of the bad arguments {bad}"
        event("refused")
        return
    assert not bad, f"bad arguments {bad} accepted: {values!r}"
    check_images(out.images, values["output_type"], *expected_shape(values))
    event("generated")


def _aliases(bad: set[str]) -> set[str]:
    names = set(bad)
    if bad & {"height", "width"}:
        names.add("height/width")
    return names


@SETTINGS
@given(prompt=PROMPTS, height=SIZES, width=SIZES, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
       temperature=TEMPERATURE, num_images_per_prompt=IMAGES_PER_PROMPT, output_type=OUTPUT)
def test_text_to_image_returns_valid_images_or_names_the_bad_argument(pipes, **args):
    bad = {k for k, (_, is_bad) in args.items() if is_bad}
    call_and_check(lambda **kw: pipes["t2i"](generator=torch.Generator().manual_seed(0), **kw), args, bad,
                   lambda v: (n_prompts(v["prompt"]) * v["num_images_per_prompt"], v["height"], v["width"]))


IMAGE_SIZES = st.sampled_from([(8, 8), (8, 16), (16, 8)] * 3 + [(6, 8), (7, 9)])


@st.composite
def image_inputs(draw, height: int, width: int):
    """An image of the given size in one of the accepted forms, or a malformed one (value, is_bad)."""
    kind = draw(st.sampled_from(["pil", "np", "pt", "pt_batch"] * 3 + ["nan", "range", "channels", "str"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    pixels = rng.random((height, width, 3), dtype=np.float32)
    if kind == "pil":
        return PIL.Image.fromarray((pixels * 255).astype(np.uint8)), False
    if kind == "np":
        return pixels, False
    if kind == "pt":
        return torch.from_numpy(pixels).permute(2, 0, 1), False
    if kind == "pt_batch":
        return torch.from_numpy(pixels).permute(2, 0, 1)[None], False
    if kind == "nan":
        pixels[0, 0, 0] = np.nan
        return pixels, True
    if kind == "range":
        return pixels * 3 - 1, True
    if kind == "channels":
        return torch.rand(1, 5, height, width), True
    return "image.png", True


@SETTINGS
@given(data=st.data(), size=IMAGE_SIZES, strength=STRENGTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
       num_images_per_prompt=IMAGES_PER_PROMPT, output_type=OUTPUT, prompt=PROMPTS)
def test_img2img_returns_valid_images_or_names_the_bad_argument(pipes, data, size, **args):
    h, w = size
    args["image"] = data.draw(image_inputs(h, w))
    bad = {k for k, (_, is_bad) in args.items() if is_bad}
    if h % 4 or w % 4:
        bad.add("image")
    steps = args["num_inference_steps"][0]
    strength = args["strength"][0]
    if not ({"strength", "num_inference_steps"} & bad) and int((steps or 12) * strength) < 1:
        bad.add("strength")  # the combination runs no step; the message names strength
    call_and_check(lambda **kw: pipes["img2img"](generator=torch.Generator().manual_seed(0), **kw), args, bad,
                   lambda v: (n_prompts(v["prompt"]) * v["num_images_per_prompt"], h, w))


@st.composite
def masks(draw, height: int, width: int):
    """A mask in one of the accepted forms/modes, or a wrong-sized/empty/malformed one (value, is_bad)."""
    kind = draw(st.sampled_from(["L", "1", "RGB", "np", "pt"] * 2 + ["wrong_size", "empty", "str"]))
    area = np.zeros((height, width), dtype=np.float32)
    area[: height // 2 + 1, : width // 2 + 1] = 1.0
    if kind in ("L", "1", "RGB"):
        return PIL.Image.fromarray((area * 255).astype(np.uint8)).convert(kind), False
    if kind == "np":
        return area, False
    if kind == "pt":
        return torch.from_numpy(area)[None], False
    if kind == "wrong_size":
        return PIL.Image.new("L", (width + 4, height), 255), True
    if kind == "empty":
        return PIL.Image.new("L", (width, height), 0), True
    return 42, True


@SETTINGS
@given(data=st.data(), size=st.sampled_from([(8, 8), (8, 16), (16, 16)]), strength=STRENGTH,
       num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type=OUTPUT, prompt=PROMPTS)
def test_inpaint_returns_valid_images_or_names_the_bad_argument(pipes, data, size, **args):
    h, w = size
    image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(1))
    args["image"] = (image, False)
    args["mask_image"] = data.draw(masks(h, w))
    bad = {k for k, (_, is_bad) in args.items() if is_bad}
    steps = args["num_inference_steps"][0]
    strength = args["strength"][0]
    if not ({"strength", "num_inference_steps"} & bad) and int((steps or 12) * strength) < 1:
        bad.add("strength")
    call_and_check(lambda **kw: pipes["inpaint"](generator=torch.Generator().manual_seed(0), **kw), args, bad,
                   lambda v: (n_prompts(v["prompt"]), h, w))


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), prompt=st.text(max_size=20), steps=st.integers(1, 4),
       guidance_scale=st.sampled_from([0.0, 3.0]), task=st.sampled_from(["t2i", "img2img", "inpaint"]))
def test_same_seed_same_device_gives_identical_output(pipes, seed, prompt, steps, guidance_scale, task):
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed % 1000))
    extra = {"t2i": {}, "img2img": {"image": image, "strength": 1.0},
             "inpaint": {"image": image, "mask_image": torch.ones(8, 8)}}[task]

    def run():
        return pipes[task](prompt, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt",
                           generator=torch.Generator().manual_seed(seed), **extra).images

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # over-long random prompts are announced; not the point here
        first, second = run(), run()
    assert torch.equal(first, second)


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.integers(1, 40))
def test_truncation_is_announced_exactly_when_the_prompt_is_cut(pipes, words):
    pipe = pipes["t2i"]
    prompt = " ".join(["cat"] * words)
    over = pipe.prompt_encoder.count_tokens(prompt) > pipe.prompt_encoder.max_length
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe(prompt, num_inference_steps=1, output_type="latent")
    announced = any("cut off" in str(w.message) for w in caught)
    assert announced == over


# ----------------------------------------------------------------------------------------------------------
# Numerics: a reduced-precision decode never hands out NaN images
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_decode_that_overflows_falls_back_to_float32(ref_dir, dtype):
    pipe = AmusedPipeline.from_pretrained(ref_dir)
    pipe.vqvae.to(dtype)
    decode = type(pipe.vqvae).decode

    def overflowing(self, ids):  # what an fp16 activation overflow looks like after the clamp: NaN pixels
        images = decode(self, ids)
        return torch.full_like(images, math.nan) if self.dtype != torch.float32 else images

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(pipe.vqvae), "decode", overflowing)
        with pytest.warns(UserWarning, match="decoding again in float32"):
            images = pipe("a", num_inference_steps=2, output_type="np").images
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1

    broken = AmusedPipeline.from_pretrained(ref_dir)
    with torch.no_grad():
        broken.vqvae.decoder.conv_out.bias.fill_(math.nan)  # corrupt weights: NaN in float32 too
    with pytest.raises(FloatingPointError, match="non-finite"):
        broken("a", num_inference_steps=2, output_type="np")
