"""scripts/embedded/grow_layers.py: a deeper U-ViT that starts out computing exactly what the trained one does, and
that training then changes (how the shipped embedded U-ViT went from 6 to 12 layers)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amused.loading import load_model, save_model
from amused.models.uvit import UViT, UViTConfig

ROOT = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("grow_layers", ROOT / "scripts/embedded/grow_layers.py")
grow_layers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(grow_layers)

CFG = UViTConfig(hidden_size=32, cond_embed_dim=16, micro_cond_encode_dim=2, micro_cond_embed_dim=10,
                 encoder_hidden_size=16, vocab_size=72, codebook_size=64, in_channels=16, block_out_channels=24,
                 num_res_blocks=1, downsample=True, upsample=True, block_num_heads=2, num_hidden_layers=3,
                 num_attention_heads=2, intermediate_size=48, sample_size=8)


def inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, 72, (batch, 8, 8), generator=g), torch.randn(batch, 5, 16, generator=g),
            torch.randn(batch, 16, generator=g), torch.tensor([[64, 64, 0, 0, 6.0]] * batch))


def test_plan_spreads_new_layers_between_old_ones():
    assert grow_layers.layer_plan(6, 12) == [0, None, 1, None, 2, None, 3, None, 4, None, 5, None]
    assert grow_layers.layer_plan(6, 8) == [0, 1, None, 2, 3, None, 4, 5]
    assert grow_layers.layer_plan(3, 3) == [0, 1, 2]
    assert grow_layers.layer_plan(2, 6).count(None) == 4
    with pytest.raises(ValueError, match="fewer than"):
        grow_layers.layer_plan(6, 4)


def test_grown_model_starts_with_the_same_logits_and_learns(tmp_path):
    torch.manual_seed(0)
    model = UViT(CFG)
    for p in model.parameters():  # trained-looking weights: nothing zero, so the test sees every branch
        torch.nn.init.normal_(p, std=0.05)
    save_model(model, tmp_path / "pipe" / "transformer", "UVit2DModel")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    subprocess.run([sys.executable, str(ROOT / "scripts/embedded/grow_layers.py"), str(tmp_path / "pipe"),
                    str(tmp_path / "grown"), "--layers", "5"], check=True, capture_output=True)
    assert (tmp_path / "grown" / "model_index.json").exists()
    grown = load_model(UViT, UViTConfig, tmp_path / "grown" / "transformer")
    assert grown.config.num_hidden_layers == 5
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(grown(*x), model(*x), rtol=0, atol=1e-6)

    # one optimiser step moves the new layers off the identity: their zeroed outputs get gradients
    grown.train()
    opt = torch.optim.SGD(grown.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(grown(*x), torch.randint(0, 64, (2, 8, 8)))
    loss.backward()
    opt.step()
    new = [layer for layer, source in zip(grown.transformer_layers, grow_layers.layer_plan(3, 5)) if source is None]
    assert all(layer.ff.net[-1].weight.abs().sum() > 0 for layer in new)
