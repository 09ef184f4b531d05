"""Property-based tests (hypothesis) over the pipelines' argument space, on the tiny checkpoint.

The property: every call either returns images of the requested shape and dtype, in range and free of NaN, or
raises ValueError/TypeError whose message names an argument that was given a bad value. Never another exception
type, never a silently wrong result. The same for `amused generate`'s flags (exit 2 and one line naming the flag).
Also: determinism for a fixed seed, truncation warnings, and the reduced-precision NaN guard. The tiny model has
VQ factor 2 and a downsampling U-ViT, so sizes must be multiples of 4; its native size is 8x8.
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

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

def arg(valid, bad):
    """(value, is_bad) pairs, bad about one time in eight, so that most calls have every argument valid or
    exactly one bad (the message must then name that one)."""
    return st.integers(0, 7).flatmap(lambda r: bad.map(lambda v: (v, True)) if r == 7 else
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


def _event(name: str) -> None:
    try:
        event(name)
    except hypothesis.errors.InvalidArgument:  # called from a plain (parametrized) test
        pass


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
        _event("refused")
        return
    assert not bad, f"bad arguments {bad} accepted: {values!r}"
    check_images(out.images, values["output_type"], *expected_shape(values))
    _event("generated")


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


IMAGE_KINDS = {"pil": False, "np": False, "pt": False, "pt_batch": False, "u8": False, "f64": False, "f16": False,
               "bool": False, "nan": True, "range": True, "channels": True, "str": True, "complex": True,
               "strarray": True, "meta": True}  # kind: is_bad


def make_image(kind: str, height: int, width: int, seed: int = 0):
    """An image of the given size in one accepted form, or a malformed one (value, is_bad)."""
    pixels = np.random.default_rng(seed).random((height, width, 3), dtype=np.float32)
    chw = torch.from_numpy(pixels).permute(2, 0, 1)
    value = {
        "pil": lambda: PIL.Image.fromarray((pixels * 255).astype(np.uint8)),
        "np": lambda: pixels,
        "pt": lambda: chw,
        "pt_batch": lambda: chw[None],
        "u8": lambda: (chw * 255).to(torch.uint8),  # uint8 is read as 0..255
        "f64": lambda: pixels.astype(np.float64),
        "f16": lambda: chw.half(),
        "bool": lambda: chw > 0.5,
        "nan": lambda: np.where(np.arange(pixels.size).reshape(pixels.shape) == 0, np.nan, pixels),
        "range": lambda: pixels * 3 - 1,
        "channels": lambda: torch.rand(1, 5, height, width),
        "str": lambda: "image.png",
        "complex": lambda: chw.to(torch.complex64),
        "strarray": lambda: np.full((height, width, 3), "x"),
        "meta": lambda: torch.empty(3, height, width, device="meta"),
    }[kind]()
    return value, IMAGE_KINDS[kind]


@st.composite
def image_inputs(draw, height: int, width: int):
    kinds = [k for k, bad in IMAGE_KINDS.items() if not bad] * 2 + [k for k, bad in IMAGE_KINDS.items() if bad]
    return make_image(draw(st.sampled_from(kinds)), height, width, draw(st.integers(0, 2**16)))


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


MASK_KINDS = {"L": False, "1": False, "RGB": False, "np": False, "pt": False, "bool": False, "u8": False,
              "wrong_size": True, "empty": True, "str": True, "complex": True, "meta": True}


def make_mask(kind: str, height: int, width: int):
    """A mask covering the top-left quarter-plus in one accepted form/mode, or a bad one (value, is_bad)."""
    area = np.zeros((height, width), dtype=np.float32)
    area[: height // 2 + 1, : width // 2 + 1] = 1.0
    value = {
        "L": lambda: PIL.Image.fromarray((area * 255).astype(np.uint8)),
        "1": lambda: PIL.Image.fromarray((area * 255).astype(np.uint8)).convert("1"),
        "RGB": lambda: PIL.Image.fromarray((area * 255).astype(np.uint8)).convert("RGB"),
        "np": lambda: area,
        "pt": lambda: torch.from_numpy(area)[None],
        "bool": lambda: torch.from_numpy(area > 0.5),
        "u8": lambda: (area * 255).astype(np.uint8),
        "wrong_size": lambda: PIL.Image.new("L", (width + 4, height), 255),
        "empty": lambda: PIL.Image.new("L", (width, height), 0),
        "str": lambda: 42,
        "complex": lambda: torch.from_numpy(area).to(torch.complex64),
        "meta": lambda: torch.empty(height, width, device="meta"),
    }[kind]()
    return value, MASK_KINDS[kind]


@st.composite
def masks(draw, height: int, width: int):
    kinds = [k for k, bad in MASK_KINDS.items() if not bad] * 2 + [k for k, bad in MASK_KINDS.items() if bad]
    return make_mask(draw(st.sampled_from(kinds)), height, width)


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


@pytest.mark.parametrize("kind", list(IMAGE_KINDS))
def test_every_image_form_is_used_or_refused_by_name(pipes, kind):
    """Each form once, whatever hypothesis happens to draw (it favours the first kinds)."""
    args = {"prompt": ("a", False), "image": make_image(kind, 8, 8), "num_inference_steps": (2, False),
            "output_type": ("np", False)}
    bad = {"image"} if args["image"][1] else set()
    call_and_check(pipes["img2img"], args, bad, lambda v: (1, 8, 8))


@pytest.mark.parametrize("kind", list(MASK_KINDS))
def test_every_mask_form_is_used_or_refused_by_name(pipes, kind):
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    args = {"prompt": ("a", False), "image": (image, False), "mask_image": make_mask(kind, 8, 8),
            "num_inference_steps": (2, False), "output_type": ("np", False)}
    bad = {"mask_image"} if args["mask_image"][1] else set()
    call_and_check(pipes["inpaint"], args, bad, lambda v: (1, 8, 8))


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
        with pytest.warns(UserWarning, match="decoding this call again in float32"):
            images = pipe("a", num_inference_steps=2, output_type="np").images
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1

    broken = AmusedPipeline.from_pretrained(ref_dir)
    with torch.no_grad():
        broken.vqvae.decoder.conv_out.bias.fill_(math.nan)  # corrupt weights: NaN in float32 too
    with pytest.raises(FloatingPointError, match="non-finite"):
        broken("a", num_inference_steps=2, output_type="np")


# ----------------------------------------------------------------------------------------------------------
# The CLI: `amused generate` with random flags exits 0 with complete PNGs, or 2 with one line naming the flag
# ----------------------------------------------------------------------------------------------------------

CLI_FLAGS = {  # flag: (valid values, bad values, names the message may use)
    "--steps": (["1", "2"], ["0", "-3"], ("--steps", "num_inference_steps")),
    "--guidance-scale": (["0", "3.5"], ["nan", "inf", "-inf"], ("--guidance-scale", "guidance_scale")),
    "--height": (["8", "12"], ["6", "0", "-8", "7"], ("--height", "height")),
    "--width": (["8", "4"], ["10", "0"], ("--width", "width")),
    "--num-images": (["1", "2"], ["0", "-1"], ("--num-images",)),
    "--batch-size": (["1", "3"], ["0"], ("--batch-size",)),
    "--temperature": (["1", "2 0"], ["1 2 3", "-1", "nan"], ("--temperature", "temperature")),
    "--out": (["a.png"], ["a.jpg"], ("--out",)),
}


@st.composite
def cli_args(draw):
    chosen, bad = {}, set()
    for flag, (valid, invalid, _) in CLI_FLAGS.items():
        if draw(st.booleans()):
            continue  # flag left at its default
        if draw(st.integers(0, 5)) == 5:
            chosen[flag], _ = draw(st.sampled_from(invalid)), bad.add(flag)
        else:
            chosen[flag] = draw(st.sampled_from(valid))
    return chosen, bad


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(drawn=cli_args(), prompt=st.one_of(st.text(min_size=1, max_size=20).filter(lambda p: not p.startswith("-")),
                                          st.just("x" * 500)))
def test_cli_generate_writes_pngs_or_exits_2_naming_the_flag(ref_dir, tmp_path_factory, drawn, prompt):
    from amused.cli import main

    chosen, bad = drawn
    folder = tmp_path_factory.mktemp("cli")
    argv = ["generate", prompt, "--model", str(ref_dir), "--device", "cpu", "--quiet"]
    if "--out" not in chosen:
        argv += ["--out-dir", str(folder)]
    elif chosen.get("--num-images", "1") != "1":
        bad.discard("--out")  # --out names a single image; several go beside it as NNNN_prompt.png
    if "--height" not in chosen and "--width" not in chosen:
        chosen = {**chosen, "--height": "8", "--width": "8"}
    for flag, value in chosen.items():
        argv += [flag, *value.split()] if flag != "--out" else [flag, str(folder / value)]
    import contextlib
    import io

    stderr = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(stderr):
        warnings.simplefilter("ignore")
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own refusal ("-inf" reads as a flag): usage, then one error line
            code, usage = e.code, True
        else:
            usage = False
    if code == 0:
        assert not bad, f"{argv} accepted bad {bad}"
        pngs = sorted(folder.glob("*.png"))
        assert len(pngs) == int(chosen.get("--num-images", "1"))
        for p in pngs:
            with PIL.Image.open(p) as image:
                image.load()
        event("generated")
        return
    event("refused by argparse" if usage else "refused")
    message = stderr.getvalue().strip()
    assert code == 2 and bad, f"{argv} refused: {message}"
    if usage:
        message = message.splitlines()[-1]
        assert "error: argument" in message, message
    assert message.startswith("amused generate: error:") and "\n" not in message or usage, message
    names = {n for flag in bad for n in CLI_FLAGS[flag][2]}
    assert any(n in message for n in names), f"{message!r} names none of {bad}"
