"""Our pipelines' own behaviour: save/load round trips, outputs, conditioning inputs and clear errors."""

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

from amused import AmusedImg2ImgPipeline, AmusedInpaintPipeline, AmusedPipeline
from amused.loading import CheckpointError
from conftest import seeded


def test_save_pretrained_round_trip_loads_in_ours_and_diffusers(ours, tmp_path):
    import diffusers

    ours.save_pretrained(tmp_path / "saved")
    again = AmusedPipeline.from_pretrained(tmp_path / "saved")
    ref = diffusers.AmusedPipeline.from_pretrained(tmp_path / "saved")
    ref.set_progress_bar_config(disable=True)
    a = ours("a cat", height=8, width=8, generator=seeded(0), output_type="np").images
    b = again("a cat", height=8, width=8, generator=seeded(0), output_type="np").images
    c = ref("a cat", height=8, width=8, generator=seeded(0), output_type="np").images
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, atol=1e-5)
    assert json.loads((tmp_path / "saved" / "transformer" / "config.json").read_text())["_class_name"] == "UVit2DModel"


def test_fp16_variant_and_dtype(ours, tmp_path):
    ours.save_pretrained(tmp_path / "v", variant="fp16")
    assert (tmp_path / "v" / "transformer" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    pipe = AmusedPipeline.from_pretrained(tmp_path / "v", variant="fp16", torch_dtype=torch.float16)
    assert pipe.transformer.dtype == torch.float16
    assert pipe.vqvae.dtype == torch.float32  # force_upcast: the VQ decoder overflows in fp16
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        AmusedPipeline.from_pretrained(tmp_path / "v")  # no plain file in a variant-only folder: named
    assert AmusedPipeline.from_pretrained(tmp_path / "v", variant="fp16").transformer.dtype == torch.float32


@pytest.mark.parametrize("output_type,check", [
    ("pil", lambda x: isinstance(x[0], PIL.Image.Image) and x[0].size == (16, 8)),
    ("np", lambda x: x.shape == (2, 8, 16, 3) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1),
    ("pt", lambda x: x.shape == (2, 3, 8, 16)),
    ("latent", lambda x: x.shape == (2, 4, 8) and x.dtype == torch.long),
])
def test_output_types(ours, output_type, check):
    out = ours("a cat", height=8, width=16, num_images_per_prompt=2, output_type=output_type, generator=seeded(0))
    assert check(out.images)
    assert ours("a", height=8, width=8, return_dict=False, generator=seeded(0))[0]


def test_output_types_hold_the_same_pixels(ours):
    """"pil" (converted to 8 bits where the images are), "np" and "pt" are one image in three forms."""
    out = {t: ours("a cat", height=8, width=16, num_images_per_prompt=2, output_type=t, generator=seeded(0)).images
           for t in ("pil", "np", "pt")}
    assert np.array_equal(out["np"], out["pt"].permute(0, 2, 3, 1).numpy())
    assert out["np"].flags["C_CONTIGUOUS"]
    expected = (out["np"] * 255).round().astype(np.uint8)
    assert all(np.array_equal(np.asarray(image), e) for image, e in zip(out["pil"], expected))


@pytest.mark.parametrize("model", ["tiny", "embedded"])
def test_one_tokenizer_call_gives_the_truncating_tokenizer_result(ours, model):
    """`TextEncoder.tokenize` tokenizes once, to one token more than it keeps, and warns about exactly the
    prompts a plain `max_length` call cuts (CLIP BPE and the embedded model's WordPiece)."""
    import warnings

    if model == "embedded":
        from amused.embedded import embedded_model_path

        encoder = AmusedPipeline.from_pretrained(embedded_model_path()).prompt_encoder
    else:
        encoder = ours.prompt_encoder
    n = encoder.max_length
    prompts = ["", "a cat", "red apple, google style", " ".join(["cat"] * (n - 2)), " ".join(["cat"] * (n - 1)),
               " ".join(["dog"] * (3 * n)), "x" * 400]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = encoder.tokenize(prompts, "negative_prompt")
    expected = encoder.tokenizer(prompts, padding="max_length", truncation=True, max_length=n, return_tensors="pt")
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["attention_mask"], expected["attention_mask"])
    cut = [p for p in prompts if encoder.count_tokens(p) > n]
    assert cut and len(caught) == len(cut)
    assert all("negative_prompt" in str(w.message) and "cut off" in str(w.message) for w in caught)


def test_precomputed_embeddings_equal_prompt(ours):
    hidden, pooled = ours.prompt_encoder(["a cat"])
    neg_hidden, neg_pooled = ours.prompt_encoder([""])
    a = ours("a cat", height=8, width=8, generator=seeded(4), output_type="latent").images
    b = ours(prompt_embeds=pooled, encoder_hidden_states=hidden, negative_prompt_embeds=neg_pooled,
             negative_encoder_hidden_states=neg_hidden, height=8, width=8, generator=seeded(4),
             output_type="latent").images
    assert torch.equal(a, b)


def test_callback_sees_every_step_with_shrinking_mask(ours):
    seen = []
    ours("a cat", height=16, width=16, num_inference_steps=6, generator=seeded(0),
         callback=lambda step, timestep, tokens: seen.append((step, timestep, int((tokens == 23).sum()))))
    assert [s[0] for s in seen] == list(range(6))
    assert [s[1] for s in seen] == [5, 4, 3, 2, 1, 0]
    masked = [s[2] for s in seen]
    assert masked == sorted(masked, reverse=True) and masked[-1] == 0 and masked[0] > 0


def test_negative_prompt_cache_gives_same_result(ours):
    a = ours(["a", "b"], height=8, width=8, generator=seeded(0), output_type="latent").images
    b = ours(["a", "b"], negative_prompt=["", ""], height=8, width=8, generator=seeded(0), output_type="latent").images
    assert torch.equal(a, b)
    assert len(ours._negative_cache) == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(height=7, width=8), "each side must be a positive multiple of 4 for this model; nearest for 7: 4 or 8"),
    (dict(height=8, width=0), "nearest for 0: 4"),
    (dict(height=8, width=6), "multiple of 4 for this model; nearest for 6: 4 or 8"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_inference_steps=-3), "num_inference_steps"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(guidance_scale=float("inf")), "guidance_scale"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(temperature=(1, 2, 3)), "temperature"),
    (dict(negative_prompt=["x", "y"]), "negative_prompt has 2 entries for 1 prompts"),
    (dict(masking_schedule="exp"), "masking_schedule"),
])
def test_text_to_image_errors_name_the_argument(ours, kwargs, match):
    kwargs = {"height": 8, "width": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        ours("a cat", **kwargs)


def test_unknown_argument_is_refused(ours):
    with pytest.raises(TypeError, match="guidance"):
        ours("a cat", guidance=3)
    with pytest.raises(ValueError, match="prompt"):
        ours(height=8, width=8)


def test_image_task_errors(ours):
    img2img, inpaint = AmusedImg2ImgPipeline.from_pipe(ours), AmusedInpaintPipeline.from_pipe(ours)
    image = PIL.Image.new("RGB", (16, 16), (200, 10, 10))
    with pytest.raises(ValueError, match="strength"):
        img2img("a", image=image, strength=1.5)
    with pytest.raises(ValueError, match="strength"):
        img2img("a", image=image, strength=0.0)
    with pytest.raises(ValueError, match="runs no step"):
        img2img("a", image=image, strength=0.05)
    with pytest.raises(ValueError, match="image 15x16 \(width x height\): each side must be a positive multiple of 4"):
        img2img("a", image=PIL.Image.new("RGB", (15, 16)))
    assert img2img("a", image=PIL.Image.new("RGB", (15, 17)), height=16, width=16, output_type="np").images.shape \
        == (1, 16, 16, 3)  # resizing on request
    with pytest.raises(ValueError, match="mask_image is 8x8 but image is 16x16"):
        inpaint("a", image=image, mask_image=PIL.Image.new("L", (8, 8), 255))
    with pytest.raises(ValueError, match="covers no token"):
        inpaint("a", image=image, mask_image=PIL.Image.new("L", (16, 16), 0))
    with pytest.raises(ValueError, match="needs both"):
        inpaint("a", image=image)
    with pytest.raises(TypeError, match="mask_image must be"):
        inpaint("a", image=image, mask_image="mask.png")
    with pytest.raises(ValueError, match=r"image values must be finite and in \[0, 1\]"):
        img2img("a", image=torch.full((1, 3, 16, 16), 2.0))


def test_inpaint_accepts_tensor_masks_and_keeps_unmasked_tokens(ours):
    inpaint = AmusedInpaintPipeline.from_pipe(ours)
    image = torch.rand(1, 3, 16, 16, generator=seeded(0))
    mask = torch.zeros(16, 16)
    mask[:8] = 1  # top half
    tokens = inpaint("a", image=image, mask_image=mask, output_type="latent", generator=seeded(1)).images
    original = ours.vqvae.encode(image)
    assert torch.equal(tokens[0, 4:], original[0, 4:])


@pytest.fixture()
def ckpt(ref_dir, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(ref_dir, target)
    return target


def test_missing_and_corrupt_files_are_named(ckpt):
    weights = ckpt / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match=r"corrupt or unreadable weight file .*transformer"):
        AmusedPipeline.from_pretrained(ckpt)
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"missing weight file .*transformer"):
        AmusedPipeline.from_pretrained(ckpt)


def test_corrupt_config_and_absurd_sizes_are_refused(ckpt):
    config = ckpt / "vqvae" / "config.json"
    saved = config.read_text()
    config.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"corrupt JSON in .*vqvae"):
        AmusedPipeline.from_pretrained(ckpt)
    config.write_text(saved)
    good = json.loads((ckpt / "transformer" / "config.json").read_text())
    (ckpt / "transformer" / "config.json").write_text(json.dumps({**good, "hidden_size": 10**9}))
    with pytest.raises(CheckpointError, match="hidden_size"):
        AmusedPipeline.from_pretrained(ckpt)
    (ckpt / "transformer" / "config.json").write_text(json.dumps({**good, "hidden_sise": 8}))
    with pytest.raises(CheckpointError, match="unknown config keys"):
        AmusedPipeline.from_pretrained(ckpt)


def test_pickle_weights_are_refused_by_default(ckpt):
    from safetensors.torch import load_file

    path = ckpt / "vqvae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(path), ckpt / "vqvae" / "diffusion_pytorch_model.bin")
    path.unlink()
    with pytest.raises(CheckpointError, match="pickle"):
        AmusedPipeline.from_pretrained(ckpt)
    assert AmusedPipeline.from_pretrained(ckpt, allow_pickle=True).vqvae is not None


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        AmusedPipeline.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="model_index.json"):
        AmusedPipeline.from_pretrained(tmp_path)


def test_return_steps_frames_heatmaps_and_gif(ours, tmp_path):
    from amused.steps import confidence_map, save_gif, step_frames

    out = ours("a cat", height=16, width=16, num_inference_steps=4, generator=seeded(0), return_steps=True)
    assert [s.step for s in out.steps] == [0, 1, 2, 3]
    masked = [int((s.tokens == 23).sum()) for s in out.steps]
    assert masked == sorted(masked, reverse=True) and masked[-1] == 0
    frames = step_frames(ours, out.steps, scale=2)
    assert len(frames) == 4 and frames[0].size == (32, 32)
    first = np.asarray(frames[0], np.float32) / 255
    assert (abs(first - 0.55) < 0.01).all(axis=-1).mean() > 0.5  # mostly undecided (grey) after step 1
    assert np.asarray(frames[-1]).tolist() == np.asarray(out.images[0].resize((32, 32), 0)).tolist()
    heat = confidence_map(out.steps[1], size=64)
    assert heat.size == (64, 64)
    save_gif(frames, tmp_path / "steps.gif")
    gif = PIL.Image.open(tmp_path / "steps.gif")
    assert gif.n_frames == 4
