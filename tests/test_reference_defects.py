"""The reference's known defects 2-6 (shared/REFERENCE.md) do not occur in ours.

Each test also runs the reference on the same inputs where that shows the defect, so the test is known to
look at the right thing.
"""

import numpy as np
import PIL.Image
import pytest
import torch

from amused import AmusedImg2ImgPipeline, AmusedInpaintPipeline, AmusedPipeline
from amused.sampling import unmask_step
from conftest import seeded
from tiny import MASK_ID, load_reference


def _image(seed, size=(16, 16)):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _image_tokens(pipe, image):
    pixels = torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)[None]
    return pipe.vqvae.encode(pixels)[0]


def test_2_img2img_strength_one_regenerates_everything(ref_pipes, ours):
    image = _image(3)
    kwargs = dict(prompt="a cat", image=image, strength=1.0, output_type="latent")
    input_tokens = _image_tokens(ours, image)

    ref_tokens = ref_pipes["AmusedImg2ImgPipeline"](generator=seeded(0), **kwargs).images[0]
    assert (ref_tokens == input_tokens).float().mean() > 0.9  # the defect: the input comes back

    steps = []
    got = AmusedImg2ImgPipeline.from_pipe(ours)(generator=seeded(0), callback=lambda i, t, x: steps.append(x.clone()),
                                                **kwargs).images[0]
    # Strength 1 starts from an all-masked grid, exactly as text-to-image does with the same seed.
    t2i = ours("a cat", height=16, width=16, generator=seeded(0), output_type="latent").images[0]
    assert torch.equal(got, t2i)
    assert (got == input_tokens).float().mean() < 0.5
    assert (steps[0] == MASK_ID).sum() > 0.8 * got.numel()  # after step 1 of 12, most tokens still masked


def test_3_inpainting_leaves_the_shared_scheduler_alone(ref_dir):
    ref = load_reference(ref_dir, "AmusedPipeline")
    import diffusers

    diffusers.AmusedInpaintPipeline(**ref.components)
    assert ref.scheduler.config.masking_schedule == "linear"  # the defect: text-to-image changed behind its back

    ours = AmusedPipeline.from_pretrained(ref_dir)
    before = ours("a cat", height=8, width=8, generator=seeded(1), output_type="latent").images
    inpaint = AmusedInpaintPipeline.from_pipe(ours)
    mask = PIL.Image.new("L", (16, 16), 255)
    inpaint("a cat", image=_image(0), mask_image=mask, generator=seeded(2), output_type="latent")
    assert ours.scheduler.masking_schedule == "cosine"
    after = ours("a cat", height=8, width=8, generator=seeded(1), output_type="latent").images
    assert torch.equal(before, after)


@pytest.mark.parametrize("draw", ["reference", "gumbel"])
def test_4_decided_tokens_are_never_remasked_in_fp16(draw):
    """Known tokens must keep their place whatever the noise; the reference's finfo.max confidence is only
    log(65504) = 11.1 in fp16, below a confident new token plus temperature-scaled Gumbel noise. Both of our
    random streams ("reference": diffusers' draws, "gumbel": on-device) are checked."""
    from diffusers import AmusedScheduler

    g = torch.Generator().manual_seed(0)
    B, L, V = 4, 64, 16
    tokens = torch.randint(0, V, (B, L), generator=g)
    tokens[:, ::2] = MASK_ID  # half unknown
    logits = torch.full((B, L, V), -20.0)
    logits[..., 3] = 20.0  # peaked: log p ~ 0 for the sampled token
    logits = logits.half()

    scheduler = AmusedScheduler(mask_token_id=MASK_ID)
    scheduler.set_timesteps(12, temperature=(30, 30))
    ref_out = scheduler.step(logits.permute(0, 2, 1).reshape(B, V, 8, 8), scheduler.timesteps[2],
                             tokens.reshape(B, 8, 8), generator=torch.Generator().manual_seed(1)).prev_sample
    known = tokens != MASK_ID
    assert (ref_out.reshape(B, L)[known] == MASK_ID).any()  # the defect

    for seed in range(20):
        out = unmask_step(logits, tokens, torch.full((B,), L), torch.tensor(0.7), torch.tensor(30.0), MASK_ID,
                          last=False, draw=draw, generator=torch.Generator().manual_seed(seed)).tokens
        assert torch.equal(out[known], tokens[known])
        assert (out[~known] != MASK_ID).any()  # the step did unmask something: the check is not vacuous


def _masked_counts(pipe, **kwargs):
    counts = []
    pipe(callback=lambda i, t, x: counts.append((x == MASK_ID).flatten(1).sum(1).tolist()), **kwargs)
    return counts


def test_5_mask_counts_follow_each_samples_unknown_tokens(ref_pipes, ours):
    """A batch with a whole-image mask and a 16-token mask: the small region must be spread over the steps
    (12, 8, 4 then 0 left masked with 4 linear steps), not committed one token per step until the end."""
    big = PIL.Image.new("L", (32, 32), 255)
    small = PIL.Image.new("L", (32, 32), 0)
    small.paste(255, (0, 0, 8, 8))  # 4x4 = 16 tokens at the VQ factor 2
    kwargs = dict(prompt=["a", "b"], image=[_image(0, (32, 32))] * 2, mask_image=[big, small],
                  num_inference_steps=4, output_type="latent")

    ref_counts = _masked_counts(ref_pipes["AmusedInpaintPipeline"], generator=seeded(0), **kwargs)
    assert [c[1] for c in ref_counts] == [15, 14, 13, 0]  # the defect: one token a step, the rest at the end

    counts = _masked_counts(AmusedInpaintPipeline.from_pipe(ours), generator=seeded(0), **kwargs)
    assert [c[1] for c in counts] == [12, 8, 4, 0]
    assert [c[0] for c in counts] == [192, 128, 64, 0]  # 256 tokens: floor(256 * (1 - (i+1)/4))


def test_6_one_negative_prompt_serves_a_batch(ref_pipes, ours):
    kwargs = dict(prompt=["a cat", "a dog", "a fish"], height=8, width=8, output_type="latent")
    # the defect: 3 prompts but 1 negative embedding, so the guided batch has 4 pooled embeddings and 6 micro-conds
    with pytest.raises(RuntimeError, match="Expected size 4 but got size 6"):
        ref_pipes["AmusedPipeline"](negative_prompt="blurry", generator=seeded(0), **kwargs)
    one = ours(negative_prompt="blurry", generator=seeded(0), **kwargs).images
    each = ours(negative_prompt=["blurry"] * 3, generator=seeded(0), **kwargs).images
    assert one.shape == (3, 4, 4)
    assert torch.equal(one, each)
    ref_each = ref_pipes["AmusedPipeline"](negative_prompt=["blurry"] * 3, generator=seeded(0), **kwargs).images
    assert torch.equal(each, ref_each)
