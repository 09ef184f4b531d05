"""The Meissonic transformer (amused.models.meissonic): published layout, shapes, conditioning, static graph.

Logit parity with the reference implementation is checked by scripts/meissonic_parity.py (it needs a checkout of
viiika/Meissonic); its result is docs/results/meissonic_parity.json.
"""

import dataclasses
import json

import pytest
import torch

from amused.loading import CheckpointError, config_from_dict, load_model, save_model
from amused.models.meissonic import (CLASS_NAME, MeissonicConfig, MeissonicTransformer, joint_rotary,
                                     meissonic_config, reference_timesteps)

# MeissonFlow/Meissonic transformer/config.json as published (HF commit a3c384a).
PUBLISHED_MEISSONIC = {
    "_class_name": "Transformer2DModel", "_diffusers_version": "0.30.2", "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56], "codebook_size": 8192, "downsample": True, "guidance_embeds": False,
    "in_channels": 64, "joint_attention_dim": 1024, "num_attention_heads": 8, "num_layers": 14,
    "num_single_layers": 28, "patch_size": 1, "pooled_projection_dim": 1024, "upsample": True, "vocab_size": 8256,
}


def tiny(**overrides) -> MeissonicTransformer:
    torch.manual_seed(0)
    model = MeissonicTransformer(meissonic_config("tiny", **overrides)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norm weights off 1 too, so that a swapped key would change outputs
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def inputs(cfg: MeissonicConfig, batch=2, grid=(4, 6), text_len=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.codebook_size, (batch, *grid), generator=g)
    ids[0, :2] = cfg.mask_token_id
    micro = torch.tensor([[1024.0, 1024, 0, 0, 6]]).expand(batch, -1)
    return (ids, torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g),
            torch.randn(batch, cfg.pooled_projection_dim, generator=g), micro)


def test_published_config_loads_as_the_meissonic_preset(tmp_path):
    cfg = config_from_dict(MeissonicConfig, PUBLISHED_MEISSONIC, tmp_path / "config.json")
    assert cfg == meissonic_config("meissonic")
    assert (cfg.inner_dim, cfg.mask_token_id, cfg.sample_size) == (1024, 8255, 64)
    assert meissonic_config("monetico").sample_size == 32
    published = {k for k in PUBLISHED_MEISSONIC if not k.startswith("_")}
    assert {f.name for f in dataclasses.fields(MeissonicConfig)} == published
    with torch.device("meta"):  # sizes only
        n = sum(p.numel() for p in MeissonicTransformer(cfg).parameters())
    assert n == 1_006_946_304  # "1B parameters" (the paper)


def test_save_load_round_trip_in_the_published_layout(tmp_path):
    model = tiny()
    save_model(model, tmp_path / "transformer", CLASS_NAME)
    written = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert written["_class_name"] == "Transformer2DModel"
    assert set(written) == set(PUBLISHED_MEISSONIC)
    loaded = load_model(MeissonicTransformer, MeissonicConfig, tmp_path / "transformer")
    assert loaded.config == model.config
    state, back = model.state_dict(), loaded.state_dict()
    assert state.keys() == back.keys() and all(torch.equal(state[k], back[k]) for k in state)
    x = inputs(model.config)
    with torch.no_grad():  # equal weights; loaded ones sit at other alignments, where CPU GEMMs round apart ~1e-7
        torch.testing.assert_close(model(*x, torch.tensor(3.0)), loaded(*x, torch.tensor(3.0)), rtol=1e-5, atol=1e-5)


def test_weights_of_another_config_are_refused(tmp_path):
    save_model(tiny(), tmp_path / "transformer", CLASS_NAME)
    path = tmp_path / "transformer" / "config.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "num_layers": 2}))
    with pytest.raises(CheckpointError, match="missing"):
        load_model(MeissonicTransformer, MeissonicConfig, tmp_path / "transformer")
    path.write_text(json.dumps({**data, "sample_size": 64}))
    with pytest.raises(CheckpointError, match="unknown config keys"):
        load_model(MeissonicTransformer, MeissonicConfig, tmp_path / "transformer")


@pytest.mark.parametrize("overrides,grid", [({}, (4, 6)), ({"downsample": False, "upsample": False}, (5, 3))])
def test_forward_shapes_and_condition_split(overrides, grid):
    model = tiny(**overrides)
    ids, text, pooled, micro = inputs(model.config, grid=grid)
    t = torch.tensor(7.0)
    with torch.no_grad():
        logits = model(ids, text, pooled, micro, t)
        ctx = model.condition(text, pooled, micro, grid=grid)
        stepped = model.forward_tokens(ids, ctx, t)
        again = model.forward_tokens(ids, ctx, t)
    assert logits.shape == (2, model.config.codebook_size, *grid) and logits.dtype == torch.float32
    assert torch.equal(logits, stepped) and torch.equal(stepped, again)  # deterministic
    assert ctx.text.shape == (2, 5, model.config.inner_dim) and ctx.text_temb.shape == (2, model.config.inner_dim)


def test_timestep_reaches_every_block_and_may_be_per_row():
    model = tiny()
    ids, text, pooled, micro = inputs(model.config)
    with torch.no_grad():
        ctx = model.condition(text, pooled, micro, grid=(4, 6))
        a = model.forward_tokens(ids, ctx, torch.tensor(5.0))
        b = model.forward_tokens(ids, ctx, torch.tensor([5.0, 5.0]))
        c = model.forward_tokens(ids, ctx, torch.tensor(4.0))
        d = model.forward_tokens(ids, ctx, torch.tensor([5.0, 4.0]))
    close = dict(rtol=1e-5, atol=1e-5)  # a (1, 256) and a (2, 256) timestep matmul may round apart
    torch.testing.assert_close(a, b, **close)
    torch.testing.assert_close(d[0], a[0], **close)
    torch.testing.assert_close(d[1], c[1], **close)
    assert (a - c).abs().max() > 1e-3
    assert reference_timesteps(4).tolist() == [3.0, 2.0, 1.0, 0.0]


def test_rotary_ids_text_unrotated_image_row_major():
    cos, sin = joint_rotary(3, 2, 4, (2, 2, 4))
    assert cos.shape == sin.shape == (3 + 8, 8)
    assert torch.equal(cos[:3], torch.ones(3, 8)) and torch.equal(sin[:3], torch.zeros(3, 8))
    # image token (row 1, col 2) is index 3 + 1*4 + 2: axis 0 (2 dims) unrotated, axis 1 angle 1, axis 2 angle 2
    row = 3 + 1 * 4 + 2
    assert torch.allclose(cos[row, :2], torch.ones(2)) and torch.allclose(cos[row, 2:4], torch.cos(torch.ones(2)))
    assert torch.allclose(sin[row, 4:6], torch.sin(torch.full((2,), 2.0)))


def test_a_grid_other_than_the_conditioned_one_builds_its_own_table():
    model = tiny()
    ids, text, pooled, micro = inputs(model.config, grid=(6, 4))
    with torch.no_grad():
        native = model.condition(text, pooled, micro)  # the native 64x64 grid's table (tiny: downsample on)
        exact = model.condition(text, pooled, micro, grid=(6, 4))
        assert native.grid == (64, 64)
        assert torch.equal(model.forward_tokens(ids, native, torch.tensor(1.0)),
                           model.forward_tokens(ids, exact, torch.tensor(1.0)))
        with pytest.raises(ValueError, match="cannot be downsampled"):
            model.forward_tokens(ids[:, :5], exact, torch.tensor(1.0))


def test_forward_tokens_is_one_static_graph():
    """No graph break (a host sync such as .item(), or a branch on tensor data, would make one)."""
    model = tiny()
    ids, text, pooled, micro = inputs(model.config)
    with torch.no_grad():
        ctx = model.condition(text, pooled, micro, grid=(4, 6))
        expected = model.forward_tokens(ids, ctx, torch.tensor(2.0))
        torch._dynamo.reset()
        compiled = torch.compile(model.forward_tokens, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(ids, ctx, torch.tensor(2.0)), expected, rtol=0, atol=0)


def test_bfloat16_runs():
    model = tiny().to(torch.bfloat16)
    ids, text, pooled, micro = inputs(model.config)
    with torch.no_grad():
        logits = model(ids, text.bfloat16(), pooled.bfloat16(), micro.bfloat16(), torch.tensor(3.0))
    assert model.dtype == torch.bfloat16 and logits.dtype == torch.bfloat16 and logits.isfinite().all()


@pytest.mark.parametrize("overrides,message", [
    (dict(pooled_projection_dim=12), "pooled_projection_dim 12 must equal"),
    (dict(axes_dims_rope=(2, 2, 2)), "must be even numbers summing to attention_head_dim 8"),
    (dict(axes_dims_rope=(3, 1, 4)), "must be even numbers"),
    (dict(downsample=False), "must agree"),
    (dict(guidance_embeds=True), "guidance_embeds=True"),
    (dict(patch_size=2), "patch_size must be 1"),
    (dict(codebook_size=24), "must be smaller than vocab_size"),
    (dict(num_attention_heads=0), "num_attention_heads must be >= 1"),
    (dict(num_layers=-1), "must be >= 0"),
])
def test_bad_configs_are_refused_in_one_line(overrides, message):
    with pytest.raises(ValueError, match=message) as err:
        meissonic_config("tiny", **overrides)
    assert "\n" not in str(err.value)


def test_bad_config_file_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json: pooled_projection_dim 768"):
        config_from_dict(MeissonicConfig, {**PUBLISHED_MEISSONIC, "pooled_projection_dim": 768},
                         tmp_path / "config.json")
    with pytest.raises(ValueError, match="unknown preset"):
        meissonic_config("meissonic-2")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_forward_tokens_captures_in_a_cuda_graph_without_syncs():
    model = tiny().cuda()
    ids, text, pooled, micro = (x.cuda() for x in inputs(model.config))
    timesteps = reference_timesteps(4, device="cuda")
    with torch.no_grad():
        ctx = model.condition(text, pooled, micro, grid=(4, 6))
        # the graph reads the step's timestep from a static 0-d input, refilled before each replay (as the fast
        # path does); indexing `timesteps` with a CUDA step tensor would be a host sync
        timestep = timesteps[0].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture wants
            model.forward_tokens(ids, ctx, timestep)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.graph(graph):
                out = model.forward_tokens(ids, ctx, timestep)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        for i in range(4):
            timestep.copy_(timesteps[i])
            graph.replay()
            torch.testing.assert_close(out, model.forward_tokens(ids, ctx, timesteps[i]), rtol=1e-5, atol=1e-5)
