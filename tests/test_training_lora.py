"""LoRA: targets that exist, save/load/fuse round trips with identical outputs, and safe loading."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from amused import lora
from amused.loading import CheckpointError
from amused.pipeline import AmusedPipeline
from tiny import tiny_text_encoder
from train_tiny import make_pipeline, one_torch_thread  # noqa: F401


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return make_pipeline(tmp_path_factory.mktemp("lora") / "pipe")


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, 16, (2, 4, 4), generator=g), torch.randn(2, 16, 8, generator=g),
            torch.randn(2, 8, generator=g), torch.tensor([[8.0, 8, 0, 0, 6]] * 2))


def _trained_lora(pipe, ff=False):
    targets = list(lora.TRANSFORMER_TARGETS) + (list(lora.TRANSFORMER_FF_TARGETS) if ff else [])
    cfg = {"transformer": lora.add_lora(pipe.transformer, r=4, alpha=8, target_modules=targets),
           "text_encoder": lora.add_lora(pipe.text_encoder, r=2, alpha=2,
                                         target_modules=lora.text_encoder_targets(pipe.text_encoder))}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero; give the adapters an effect to test
        for model in (pipe.transformer, pipe.text_encoder):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return cfg


def test_clip_lora_targets_exist_and_the_references_do_not():
    from transformers import CLIPTextConfig, CLIPTextModel

    clip = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=8, num_attention_heads=1,
                                        num_hidden_layers=2, vocab_size=100, max_position_embeddings=16))
    names = [n for n, m in clip.named_modules() if isinstance(m, torch.nn.Linear)]
    for target in lora.CLIP_TARGETS:
        assert any(n.endswith("." + target) for n in names), target
    assert lora.text_encoder_targets(clip) == lora.CLIP_TARGETS
    for reference_target in ("to_q", "to_k", "to_v"):  # what diffusers' train_amused.py asks for
        assert not any(n.endswith("." + reference_target) for n in names)
    with pytest.raises(ValueError, match="match no linear layer"):
        lora.add_lora(clip, target_modules=["to_q", "to_k", "to_v"])


def test_lora_round_trip_save_load_fuse_unfuse(pipe_dir, tmp_path):
    trained = AmusedPipeline.from_pretrained(pipe_dir)
    cfg = _trained_lora(trained, ff=True)
    path = lora.save_lora_weights(tmp_path, trained.transformer, trained.text_encoder, cfg)
    assert path.name == lora.LORA_FILE and (tmp_path / lora.CONFIG_FILE).is_file()
    keys = list(load_file(str(path)))
    assert all(k.startswith(("transformer.", "text_encoder.")) and ".lora_" in k for k in keys)
    assert any(k.startswith("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A") for k in keys)
    assert any(".ff.net.2.lora_B" in k for k in keys)

    pipe = AmusedPipeline.from_pretrained(pipe_dir)
    ids, hidden, pooled, micro = _inputs()
    with torch.no_grad():
        base = pipe.transformer(ids, hidden, pooled, micro)
        base_text = pipe.prompt_encoder(["a red square"])[1]
        lora.load_lora_weights(pipe, path)
        loaded = pipe.transformer(ids, hidden, pooled, micro)
        torch.testing.assert_close(loaded, trained.transformer(ids, hidden, pooled, micro))
        torch.testing.assert_close(pipe.prompt_encoder(["a red square"])[1],
                                   trained.prompt_encoder(["a red square"])[1])
        assert (loaded - base).abs().max() > 1e-2
        lora.fuse_lora(pipe)
        torch.testing.assert_close(pipe.transformer(ids, hidden, pooled, micro), loaded, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="unfuse"):
            lora.set_lora_scale(pipe, 0.5)
        lora.unfuse_lora(pipe)
        torch.testing.assert_close(pipe.transformer(ids, hidden, pooled, micro), loaded, rtol=1e-5, atol=1e-5)
        lora.set_lora_scale(pipe, 0.0)
        torch.testing.assert_close(pipe.transformer(ids, hidden, pooled, micro), base, rtol=1e-5, atol=1e-5)
        lora.set_lora_scale(pipe, 1.0)
        lora.unload_lora_weights(pipe)
        torch.testing.assert_close(pipe.transformer(ids, hidden, pooled, micro), base, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pipe.prompt_encoder(["a red square"])[1], base_text, rtol=1e-5, atol=1e-5)
    assert not hasattr(pipe.transformer, "peft_config")


def test_scaled_lora_is_half_way_and_pipeline_generates(pipe_dir, tmp_path):
    trained = AmusedPipeline.from_pretrained(pipe_dir)
    lora.add_lora(trained.transformer, r=4, alpha=4)
    with torch.no_grad():
        for name, p in trained.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_()
    path = lora.save_lora_weights(tmp_path / "one.safetensors", transformer=trained.transformer)
    pipe = AmusedPipeline.from_pretrained(pipe_dir)
    ids, hidden, pooled, micro = _inputs()
    with torch.no_grad():
        lin = pipe.transformer.transformer_layers[0].attn1.to_q
        x = torch.randn(3, lin.in_features)
        before = lin(x)
        lora.load_lora_weights(pipe, path, adapter_scale=0.5)
        lin = pipe.transformer.transformer_layers[0].attn1.to_q
        full = trained.transformer.transformer_layers[0].attn1.to_q(x)
        torch.testing.assert_close(lin(x), before + 0.5 * (full - before), rtol=1e-5, atol=1e-5)
    images = pipe("a red square", num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 8, 8, 3)


def test_lora_loading_is_safe_and_names_the_file(pipe_dir, tmp_path):
    pipe = AmusedPipeline.from_pretrained(pipe_dir)
    (tmp_path / "w.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="safetensors"):
        lora.load_lora_weights(pipe, tmp_path / "w.bin")
    bad = tmp_path / "bad.safetensors"
    save_file({"unet.down.lora_A.weight": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        lora.load_lora_weights(pipe, bad)
    trained = AmusedPipeline.from_pretrained(pipe_dir)
    lora.add_lora(trained.transformer, r=4, alpha=4)
    good = lora.save_lora_weights(tmp_path / "good.safetensors", transformer=trained.transformer)
    state = load_file(str(good))
    key = next(k for k in state if "lora_A" in k)
    state[key] = torch.zeros(4, 99)  # wrong input width
    wrong = tmp_path / "wrong.safetensors"
    save_file(state, str(wrong), metadata={"lora_adapter_metadata": json.dumps({"transformer": {"r": 4,
                                                                                               "lora_alpha": 4}})})
    with pytest.raises(CheckpointError, match="wrong.safetensors.*shape"):
        lora.load_lora_weights(pipe, wrong)
    assert not hasattr(pipe.transformer, "peft_config")  # the half-loaded adapter was removed
    lora.load_lora_weights(pipe, good)  # and the pipeline still takes a good file
    with pytest.raises(CheckpointError, match="already has"):
        lora.load_lora_weights(pipe, good)


def test_text_encoder_targets_for_a_tiny_clip():
    assert lora.text_encoder_targets(tiny_text_encoder()) == lora.CLIP_TARGETS


def test_lora_refuses_fused_projections(pipe_dir, tmp_path):
    trained = AmusedPipeline.from_pretrained(pipe_dir)
    lora.add_lora(trained.transformer, r=2, alpha=2)
    path = lora.save_lora_weights(tmp_path, transformer=trained.transformer)
    pipe = AmusedPipeline.from_pretrained(pipe_dir)
    pipe.transformer.fuse_projections()  # the fast path's layout (FastDecoder with fuse=True)
    with pytest.raises(ValueError, match="unfuse_projections"):
        lora.load_lora_weights(pipe, path)


def test_pipeline_lora_methods_as_diffusers_users_call_them(pipe_dir, tmp_path):
    trained = AmusedPipeline.from_pretrained(pipe_dir)
    path = lora.save_lora_weights(tmp_path, trained.transformer, None, {"transformer": _trained_lora(trained)["transformer"]})
    pipe = AmusedPipeline.from_pretrained(pipe_dir)
    base = pipe("a red square", height=8, width=8, output_type="np", generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(path, scale=1.0)
    with_lora = pipe("a red square", height=8, width=8, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
    pipe.fuse_lora()
    fused = pipe("a red square", height=8, width=8, output_type="np", generator=torch.Generator().manual_seed(0)).images
    pipe.unfuse_lora()
    pipe.set_lora_scale(0.0)
    off = pipe("a red square", height=8, width=8, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert abs(with_lora - base).max() > 1e-3
    assert abs(fused - with_lora).max() < 1e-4
    assert abs(off - base).max() < 1e-4
    pipe.unload_lora_weights()
