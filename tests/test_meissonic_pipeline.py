"""Meissonic / Monetico pipelines on the shared engine: the published layout, the three tasks and outpainting, seeds,
the fast path's program against the plain loop, the runtime's choice of class and the CLI.

A tiny random Meissonic (models.meissonic's "tiny" preset: 1 dual + 1 single block, 2 heads of 8; a 2-stage VQ,
2 px a token; a 2-layer CLIP of width 12) saved in the published layout by our own `save_pretrained`. Whole-
generation parity with the reference pipeline is scripts/meissonic_parity.py (it needs a checkout).
"""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from amused import (AmusedInpaintPipeline, AmusedPipeline, MeissonicImg2ImgPipeline, MeissonicInpaintPipeline,
                    MeissonicPipeline, outpaint, sampling)
from amused.bench_meissonic import random_pipeline
from amused.loading import CheckpointError
from conftest import seeded

SIDE = 16  # pixels: 8x8 tokens, 4x4 after the 2x downsampler
MASK = 23  # the tiny preset's mask token


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("meissonic")
    random_pipeline("meissonic-tiny", vq="tiny").save_pretrained(folder)  # the layout the reference writes
    return folder


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return MeissonicPipeline.from_pretrained(tiny_dir)


def call(p, prompt="a cat", **kwargs):
    args = dict(height=SIDE, width=SIDE, num_inference_steps=4, generator=seeded(0), output_type="latent")
    return p(prompt, **{**args, **kwargs}).images


def test_layout_round_trip_and_class_names(pipe, tiny_dir, tmp_path):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "Pipeline" and index["transformer"] == ["src.transformer", "Transformer2DModel"]
    assert index["scheduler"] == ["src.scheduler", "Scheduler"] and index["vqvae"] == ["diffusers", "VQModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModelWithProjection"]
    assert json.loads((tiny_dir / "transformer" / "config.json").read_text())["_class_name"] == "Transformer2DModel"
    assert json.loads((tiny_dir / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "Scheduler"
    pipe.save_pretrained(tmp_path / "again")
    again = MeissonicPipeline.from_pretrained(tmp_path / "again")
    state, back = pipe.transformer.state_dict(), again.transformer.state_dict()
    assert state.keys() == back.keys() and all(torch.equal(state[k], back[k]) for k in state)
    assert torch.equal(call(pipe), call(again))
    assert (pipe.resolve_defaults(None, None, None), pipe.resolve_sampler(None)) == ((48, 9.0, (2, 0)), "confidence")


def test_the_other_family_is_refused_by_name(pipe, tiny_dir, ref_dir):
    with pytest.raises(CheckpointError, match="MeissonicPipeline"):
        AmusedPipeline.from_pretrained(tiny_dir)
    with pytest.raises(CheckpointError, match="AmusedPipeline"):
        MeissonicPipeline.from_pretrained(ref_dir)
    with pytest.raises(ValueError, match="transformer is a MeissonicTransformer"):
        AmusedPipeline(pipe.vqvae, pipe.tokenizer, pipe.text_encoder, pipe.transformer, pipe.scheduler)


def test_family_from_model_index(tiny_dir, ref_dir, tmp_path):
    """The published Meissonic names its pipeline "Pipeline"; an unknown name falls back to the transformer entry."""
    import shutil

    from amused.components import AMUSED, MEISSONIC, family_of

    assert family_of(tiny_dir) is MEISSONIC and family_of(ref_dir) is AMUSED
    copy = shutil.copytree(tiny_dir, tmp_path / "copy")
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "SomethingElse"}))
    assert family_of(copy) is MEISSONIC
    (copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "X", "transformer": ["a", "B"]}))
    with pytest.raises(CheckpointError, match="not a pipeline amused can run"):
        family_of(copy)


def test_text_to_image_runs_and_seeds_reproduce(pipe):
    images = pipe("a cat", height=SIDE, width=SIDE, num_inference_steps=3, generator=seeded(1), output_type="np",
                  negative_prompt="blurry").images
    assert images.shape == (1, SIDE, SIDE, 3) and np.isfinite(images).all()
    tokens = call(pipe, ["a cat", "a dog"], generator=seeded(5))
    assert tokens.shape == (2, 8, 8) and (tokens < 16).all()  # every token decided, codes only
    assert torch.equal(tokens, call(pipe, ["a cat", "a dog"], generator=seeded(5)))
    assert not torch.equal(tokens, call(pipe, ["a cat", "a dog"], generator=seeded(6)))
    unguided = call(pipe, guidance_scale=1.0)
    assert unguided.shape == (1, 8, 8)


def test_the_model_sees_each_steps_timestep(pipe):
    """The loop hands the model N - 1 - i at step i of N (the reference pipeline's timestep): img2img from its
    start step on, as the reference."""
    seen = []
    model = pipe.transformer
    original = model.forward_tokens

    def spy(ids, ctx, timestep):
        seen.append(float(timestep))
        return original(ids, ctx, timestep)

    model.forward_tokens = spy
    try:
        call(pipe, num_inference_steps=5)
        assert seen == [4.0, 3.0, 2.0, 1.0, 0.0]
        seen.clear()
        img2img = MeissonicImg2ImgPipeline.from_pipe(pipe)
        img2img("a cat", image=PIL.Image.new("RGB", (SIDE, SIDE), (200, 30, 30)), strength=0.6,
                num_inference_steps=5, generator=seeded(0), output_type="latent")
        assert seen == [2.0, 1.0, 0.0]
    finally:
        del model.forward_tokens


def test_img2img_inpaint_and_outpaint_keep_known_tokens(pipe):
    image = PIL.Image.fromarray((np.random.default_rng(0).random((SIDE, SIDE, 3)) * 255).astype(np.uint8))
    known = pipe._image_tokens(torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255)
    img2img = MeissonicImg2ImgPipeline.from_pipe(pipe)
    out = img2img("a cat", image=image, strength=0.5, num_inference_steps=4, generator=seeded(2),
                  output_type="latent").images
    assert out.shape == (1, 8, 8) and (out < 16).all()
    inpaint = MeissonicInpaintPipeline.from_pipe(pipe)
    assert isinstance(AmusedInpaintPipeline.from_pipe(pipe), MeissonicInpaintPipeline)  # faces need not know
    mask = PIL.Image.new("L", (SIDE, SIDE), 0)
    mask.paste(255, (0, 0, SIDE, SIDE // 2))  # top half
    out = inpaint("a cat", image=image, mask_image=mask, num_inference_steps=4, generator=seeded(3),
                  output_type="latent").images
    assert torch.equal(out[:, 4:], known[:, 4:]) and (out < 16).all()
    assert torch.equal(out, inpaint("a cat", image=image, mask_image=mask, num_inference_steps=4,
                                    generator=seeded(3), output_type="latent").images)
    wide, border = outpaint(image, left=4, right=4, top=0, bottom=8)  # 24x24 px: 12x12 tokens
    assert wide.size == border.size == (24, 24)
    out = inpaint("a cat", image=wide, mask_image=border, num_inference_steps=4, generator=seeded(4),
                  output_type="latent").images
    inner = pipe._image_tokens(torch.from_numpy(np.array(wide)).permute(2, 0, 1)[None].float() / 255)
    assert out.shape == (1, 12, 12) and torch.equal(out[:, :8, 2:10], inner[:, :8, 2:10])  # the original's tokens


def test_outpaint_errors_name_the_argument():
    image = PIL.Image.new("RGB", (8, 8))
    for kwargs, message in (({"left": -1}, "left"), ({"top": 1.5}, "top"), ({}, "at least one"),
                            ({"right": 10**6, "bottom": 10**6}, "limit")):
        with pytest.raises(ValueError, match=message):
            outpaint(image, **kwargs)
    with pytest.raises(ValueError, match="image must be a PIL image"):
        outpaint(np.zeros((8, 8, 3)), left=2)


def test_halton_sampler_runs_and_is_checked(pipe):
    a = call(pipe, sampler="halton", num_inference_steps=3)
    assert a.shape == (1, 8, 8) and (a < 16).all()
    assert torch.equal(a, call(pipe, sampler="halton", num_inference_steps=3))
    with pytest.raises(ValueError, match="sampler must be one of confidence, halton"):
        call(pipe, sampler="random")


@pytest.mark.parametrize("task", ["text", "img2img", "inpaint", "halton", "unguided"])
def test_fast_program_equals_the_plain_loop(tiny_dir, task):
    """What the fast path captures (`FastDecoder._program`, run eagerly on the CPU) gives the plain loop's tokens
    and images for the same noise: the step's timestep goes in as a tensor."""
    from amused.fast import FastDecoder

    plain = MeissonicPipeline.from_pretrained(tiny_dir)
    fast = FastDecoder(MeissonicPipeline.from_pretrained(tiny_dir), compile=False, vq_dtype=torch.float32)
    guidance = 1.0 if task == "unguided" else 9.0
    order = "halton" if task == "halton" else "confidence"
    with torch.inference_mode():
        embeds = plain.encode_prompt(["a cat", "a dog"], None, 1, guidance > 1)
        micro = torch.tensor([[16.0, 16, 0, 0, 6]]).expand(embeds.hidden.shape[0], -1)
        start = torch.full((2, 8, 8), MASK)
        start_step, total = 0, None
        if task in ("img2img", "inpaint"):
            start = torch.randint(0, 16, (2, 8, 8), generator=seeded(1))
            start[:, 2:6, 1:7] = MASK
            start_step, total = (2, torch.tensor([64, 64])) if task == "img2img" else (0, None)
        expected = sampling.decode(plain.logits_fn(embeds, micro, guidance, grid=(8, 8)), start, num_steps=6,
                                   mask_token_id=MASK, start_step=start_step, total=total, draw="gumbel",
                                   generator=seeded(5), order=order)
        fast.generator = seeded(5)
        bufs = {"tokens": start.clone(), "hidden": embeds.hidden, "pooled": embeds.pooled, "micro": micro}
        if total is not None:
            bufs["total"] = total
        tokens, images, _ = fast._program(bufs, guidance, start_step, 6, "cosine", (2, 0), order=order)
        expected_images = plain.vqvae.decode(expected)
    assert torch.equal(tokens, expected)
    torch.testing.assert_close(images, expected_images, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens[start != MASK], start[start != MASK])


def test_runtime_and_cli_pick_the_class_from_model_index(tiny_dir, tmp_path, capsys):
    from amused.cli import main
    from amused.runtime import load_engine

    engine = load_engine(str(tiny_dir), device="cpu")
    assert type(engine.pipe) is MeissonicPipeline
    assert type(engine.task("inpaint")) is MeissonicInpaintPipeline
    assert type(engine.task("img2img")) is MeissonicImg2ImgPipeline
    out = tmp_path / "m.png"
    assert main(["generate", "a cat", "--model", str(tiny_dir), "--out", str(out), "--steps", "3", "--height", "16",
                 "--width", "16", "--device", "cpu", "--sampler", "halton", "--quiet"]) == 0
    meta = json.loads(PIL.Image.open(out).info["amused"])
    assert PIL.Image.open(out).size == (SIDE, SIDE) and meta["steps"] == 3 and meta["guidance_scale"] == 9
    assert meta["sampler"] == "halton"
    again = tmp_path / "again.png"
    assert main(["generate", "--from-image", str(out), "--model", str(tiny_dir), "--out", str(again), "--device",
                 "cpu", "--quiet"]) == 0
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(PIL.Image.open(again)))
    wide = tmp_path / "wide.png"
    assert main(["inpaint", str(out), "a cat", "--extend", "4", "4", "0", "0", "--model", str(tiny_dir), "--out",
                 str(wide), "--steps", "2", "--device", "cpu", "--quiet"]) == 0
    assert PIL.Image.open(wide).size == (24, 16)
    assert main(["inpaint", str(out), "a cat", "--extend", "4", "4", "0", "0", "--rect", "0", "0", "4", "4",
                 "--model", str(tiny_dir), "--out", str(wide), "--device", "cpu", "--quiet"]) == 2
    assert "exactly one of --mask, --rect or --extend" in capsys.readouterr().err


def test_bench_runs_on_cpu_with_the_tiny_preset(tmp_path, capsys):
    """`amused bench --preset monetico-tiny`: a table and JSON; against the reference pipeline when
    AMUSED_MEISSONIC_REFERENCE names a checkout of viiika/Meissonic (timed in the same run, same weights)."""
    import os

    from amused.cli import main

    reference = os.environ.get("AMUSED_MEISSONIC_REFERENCE")
    args = ["bench", "--preset", "monetico-tiny", "--device", "cpu", "--steps", "2", "--batch", "1", "--repeats", "1",
            "--out", str(tmp_path / "b.json")] + (["--reference-path", reference] if reference else [])
    assert main(args) == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [(r["model"], r["steps"], r["batch"], r["dtype"]) for r in rows] == [("monetico-tiny", 2, 1, "fp32")]
    assert rows[0]["ours"]["ms_median"] > 0 and rows[0]["step_gflops"] > 0
    assert ("reference" in rows[0]) == bool(reference)
    assert "monetico-tiny" in capsys.readouterr().out
    assert main(["bench", "--preset", "monetico-tiny", "amused-256", "--device", "cpu"]) == 2
    assert "not both in one run" in capsys.readouterr().err
    assert main(["bench", "--preset", "amused-256", "--steps", "4", "8", "--device", "cpu"]) == 2
    assert "--steps takes one value" in capsys.readouterr().err


def test_server_runs_meissonic_with_a_sampler(pipe):
    """`amused serve` over a Meissonic pipeline: the same API; `sampler` is a request field (echoed when given),
    and a seeded request equals the Python call."""
    import base64
    import io

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from amused.server import ServerSettings, create_app

    body = {"prompt": "a cat", "seed": 3, "num_inference_steps": 2, "height": SIDE, "width": SIDE,
            "sampler": "halton"}
    with TestClient(create_app(pipe, ServerSettings()), base_url="http://127.0.0.1:8000") as client:
        r = client.post("/v1/generate", json=body)
        bad = client.post("/v1/generate", json={**body, "sampler": "random"})
    assert r.status_code == 200, r.text
    assert r.json()["settings"]["sampler"] == "halton" and r.json()["settings"]["guidance_scale"] == 9.0
    got = np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    want = pipe("a cat", num_inference_steps=2, height=SIDE, width=SIDE, sampler="halton",
                generator=torch.Generator().manual_seed(3)).images[0]
    assert np.array_equal(got, np.asarray(want))
    assert bad.status_code == 422 and "sampler" in bad.text


def test_demo_handlers_run_meissonic(pipe, tmp_path):
    """`amused demo`'s three tabs over a Meissonic pipeline, unchanged: the image tasks follow the pipeline's family."""
    pytest.importorskip("gradio")
    from amused.demo import DISPLAY_SIZE, Options, image_to_image, inpaint, text_to_image

    options = Options(num_inference_steps=2, size=SIDE)
    updates = list(text_to_image(pipe, "a cat", options, tmp_path))
    image = updates[-1][0][0]
    assert len(updates) == 2 and image.size == (SIDE, SIDE)
    assert list(image_to_image(pipe, "a dog", image, 1.0, options, tmp_path))[-1][0][0].size == (SIDE, SIDE)
    background = image.resize((DISPLAY_SIZE, DISPLAY_SIZE)).convert("RGBA")
    layer = PIL.Image.new("RGBA", background.size, (0, 0, 0, 0))
    layer.paste((255, 0, 255, 255), (0, 0, DISPLAY_SIZE // 2, DISPLAY_SIZE))
    editor = {"background": background, "layers": [layer], "composite": background}
    assert list(inpaint(pipe, "a dog", editor, options, tmp_path))[-1][0][0].size == (SIDE, SIDE)


def test_compiled_meissonic_step_is_one_graph(pipe):
    """`torch.compile` traces a whole Meissonic step (transformer with its timestep, guidance, Halton sampling)
    without a graph break, so the fast path's "full" mode compiles one graph for every step."""
    import torch._dynamo

    from amused.fast import guided_step

    with torch.inference_mode():
        embeds = pipe.encode_prompt(["a cat"], None, 1, True)
        micro = torch.tensor([[16.0, 16, 0, 0, 6]] * 2)
        ctx = pipe.transformer.condition(embeds.hidden, embeds.pooled, micro, grid=(8, 8))
        draws = sampling.gumbel_draws((1, 64, 16), seeded(0), "cpu")
        explained = torch._dynamo.explain(guided_step)(
            pipe.transformer, torch.full((1, 64), MASK), ctx, draws, torch.tensor([64]), torch.tensor(0.5),
            torch.tensor(1.0), torch.tensor(False), 9.0, MASK, (1, 8, 8), torch.tensor(3.0),
            sampling.halton_priority(8, 8))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
