"""amused.int8: compact weight files that every loader reads back as floating point."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from amused.embedded import embedded_model_path
from amused.int8 import MIN_NUMEL, SCALE_SUFFIX, dequantize, quantize
from amused.loading import CheckpointError, load_model, save_model, save_sharded
from amused.models.uvit import UViT, UViTConfig


def test_quantize_error_is_within_half_a_step_per_row():
    torch.manual_seed(0)
    state = {"w": torch.randn(64, 32, 3, 3), "b": torch.randn(64), "small": torch.randn(8, 8)}
    q, meta = quantize(state)
    assert q["w"].dtype == torch.int8 and q["b"].dtype == torch.float32 and q["small"].dtype == torch.float32
    assert state["small"].numel() < MIN_NUMEL
    scale = q["w" + SCALE_SUFFIX]
    error = (q["w"].float() * scale.view(-1, 1, 1, 1) - state["w"]).abs().reshape(64, -1).amax(dim=1)
    assert torch.all(error <= scale / 2 + 1e-7)
    assert meta == {"amused_weights": "int8-per-channel"}


def test_embedded_transformer_ships_compact():
    """The shipped U-ViT is stored as int8 shards: read back as float32, and storing what was read gives the same
    int8 values again (nothing is lost after the first quantization)."""
    folder = embedded_model_path() / "transformer"
    shards = sorted(folder.glob("*.safetensors"))
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            assert f.metadata()["amused_weights"] == "int8-per-channel"
    stored = {}
    for shard in shards:
        stored.update(load_file(shard))
    model = load_model(UViT, UViTConfig, folder)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    assert sum(f.stat().st_size for f in shards) < 0.55 * 2 * n  # fp16 would be 2 bytes a parameter
    again, _ = quantize(model.state_dict())
    for key, tensor in stored.items():
        if tensor.dtype == torch.int8:
            assert torch.equal(again[key], tensor), key
            torch.testing.assert_close(again[key + SCALE_SUFFIX], stored[key + SCALE_SUFFIX])


def test_sharded_compact_files_keep_each_scale_with_its_matrix(tmp_path):
    """save_sharded(int8_weights=True): however small the shards, a matrix and its scale share a file (each shard is
    read back on its own), and the folder loads as the model quantized."""
    torch.manual_seed(0)
    model = UViT(UViTConfig(hidden_size=32, cond_embed_dim=8, micro_cond_encode_dim=2, micro_cond_embed_dim=10,
                            encoder_hidden_size=8, vocab_size=136, codebook_size=128, in_channels=32,
                            block_out_channels=32, num_res_blocks=1, block_num_heads=1, num_hidden_layers=2,
                            num_attention_heads=1, intermediate_size=64, sample_size=4))
    save_model(model, tmp_path, "UVit2DModel")  # config.json (and float weights, replaced below)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    files = save_sharded(model.state_dict(), tmp_path, max_shard_bytes=6000, int8_weights=True)
    shards = [f for f in files if f.suffix == ".safetensors"]
    assert len(shards) > 3
    for shard in shards:
        tensors = load_file(shard)
        assert {k + SCALE_SUFFIX for k, v in tensors.items() if v.dtype == torch.int8} <= set(tensors), shard
    loaded = load_model(UViT, UViTConfig, tmp_path)
    expected = dequantize(quantize(model.state_dict())[0], "test")
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected[key].float(), rtol=0, atol=0, msg=key)


def test_broken_compact_files_are_refused_by_name(tmp_path):
    model = UViT(UViTConfig(hidden_size=8, cond_embed_dim=8, micro_cond_encode_dim=2, micro_cond_embed_dim=10,
                            encoder_hidden_size=8, vocab_size=72, codebook_size=64, in_channels=64,
                            block_out_channels=8, num_res_blocks=1, block_num_heads=1, num_hidden_layers=1,
                            num_attention_heads=1, intermediate_size=16, sample_size=4))
    save_model(model, tmp_path, "UVit2DModel", int8_weights=True)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    key = next(k for k in state if k.endswith(SCALE_SUFFIX))[:-len(SCALE_SUFFIX)]
    del state[key + SCALE_SUFFIX]
    save_file(state, path, metadata={"format": "pt", "amused_weights": "int8-per-channel"})
    with pytest.raises(CheckpointError, match=f"{key} is int8 without"):
        load_model(UViT, UViTConfig, tmp_path)
    save_file(state, path, metadata={"format": "pt"})  # int8 without the metadata: not weights
    with pytest.raises(CheckpointError, match="weights must be floating point|does not fit"):
        load_model(UViT, UViTConfig, tmp_path)
