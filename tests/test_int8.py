"""amused.int8: compact weight files that every loader reads back as floating point."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from amused import AmusedPipeline
from amused.embedded import embedded_model_path
from amused.int8 import MIN_NUMEL, SCALE_SUFFIX, quantize
from amused.loading import CheckpointError, load_model, save_model
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


def test_embedded_transformer_round_trip(tmp_path):
    """The shipped U-ViT saved compact: about half the file, and nearly the same predictions."""
    folder = embedded_model_path() / "transformer"
    model = load_model(UViT, UViTConfig, folder)
    save_model(model, tmp_path, "UVit2DModel", int8_weights=True)
    fp16_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))  # shipped in shards
    int8_bytes = (tmp_path / "diffusion_pytorch_model.safetensors").stat().st_size
    assert int8_bytes < 0.56 * fp16_bytes
    compact = load_model(UViT, UViTConfig, tmp_path)
    assert all(p.dtype == torch.float32 for p in compact.parameters())

    # the logits of one step from the same input: close, and the same most likely token almost everywhere
    # (sampled images are not compared token by token: MaskGIT's draws amplify any difference)
    pipe = AmusedPipeline.from_pretrained(embedded_model_path())
    embeds = pipe.encode_prompt(["red apple", "dog face", "hot beverage, google style"], None, 1, False)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.codebook_size, (3, 16, 16))
    ids[:, ::2] = pipe.scheduler.mask_token_id  # half the grid still masked
    micro = torch.tensor([[64, 64, 0, 0, 6.0]]).expand(3, -1)
    with torch.no_grad():
        a = model(ids, embeds.hidden, embeds.pooled, micro)
        b = compact(ids, embeds.hidden, embeds.pooled, micro)
    pa, pb = a.softmax(dim=1), b.softmax(dim=1)
    kl = (pa * (pa.clamp_min(1e-12).log() - pb.clamp_min(1e-12).log())).sum(dim=1).mean()
    assert kl < 0.01  # measured: 0.002 nats a position
    assert (a.argmax(dim=1) == b.argmax(dim=1)).float().mean() > 0.9  # measured: 94.5%


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
