"""VQGAN training: reconstruction improves, PSNR and codebook usage are reported, dead codes restart, the
result loads in the published layout, and the adversarial term runs."""

import json

import pytest
import torch

from amused.loading import load_model
from amused.models.vqgan import VQGAN, VQGANConfig
from amused.training.cli import main
from amused.training.vqgan_train import PatchDiscriminator, restart_dead_codes, usage
from tiny import VQ_KWARGS
from train_tiny import make_image_folder, one_torch_thread  # noqa: F401


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vq")
    config = root / "vq.json"
    config.write_text(json.dumps(VQ_KWARGS))
    return make_image_folder(root / "imgs", n=24, size=16), config


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_vqgan_training_reduces_reconstruction_loss_and_reports_psnr_and_usage(data, tmp_path):
    images, config = data
    out = tmp_path / "run"
    main(["train-vqgan", "--vqgan_config", str(config), "--train_data_dir", str(images), "--resolution", "16",
          "--train_batch_size", "4", "--max_train_steps", "60", "--learning_rate", "2e-3", "--logging_steps", "10",
          "--eval_steps", "30", "--restart_dead_codes_every", "10", "--disc_weight", "0.1", "--disc_start_step",
          "40", "--checkpointing_steps", "30", "--output_dir", str(out)])
    log, evals = read(out / "logs" / "train_log.jsonl"), read(out / "logs" / "eval_log.jsonl")
    assert log[-1]["rec_loss"] < 0.8 * log[0]["rec_loss"]
    assert [e["step"] for e in evals] == [0, 30, 60] and evals[-1]["psnr"] > evals[0]["psnr"] + 1.0
    for row in log:
        assert 1.0 <= row["perplexity"] <= 16 and 0 < row["codes_used"] <= 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"psnr", "perplexity", "codes_used", "eval_codes_used"} <= set(metrics)
    vq = load_model(VQGAN, VQGANConfig, out / "vqvae")  # the published vqvae/ layout
    assert vq.encode(torch.rand(1, 3, 16, 16)).shape == (1, 8, 8)

    main(["train-vqgan", "--vqgan_config", str(config), "--train_data_dir", str(images), "--resolution", "16",
          "--train_batch_size", "4", "--max_train_steps", "62", "--learning_rate", "1e-3", "--logging_steps", "1",
          "--eval_steps", "30", "--restart_dead_codes_every", "10", "--disc_weight", "0.1", "--disc_start_step",
          "40", "--checkpointing_steps", "30", "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert [(r["step"], r["lr"]) for r in read(out / "logs" / "train_log.jsonl")[-2:]] == [(61, 1e-3), (62, 1e-3)]


def test_dead_codes_restart_onto_encoder_outputs():
    from accelerate import Accelerator
    from accelerate.utils import broadcast

    torch.manual_seed(0)
    vq = VQGAN(VQGANConfig(**VQ_KWARGS))
    with torch.no_grad():
        vq.quantize.embedding.weight.fill_(100.0)  # far from every encoder output: all dead but the winner
    opt = torch.optim.AdamW(vq.parameters())
    x = torch.rand(4, 3, 16, 16)
    z = vq.encode_latents(x)
    counts = torch.bincount(vq.quantize(z).ids.flatten(), minlength=16).float()
    assert usage(counts)["codes_used"] == 1 / 16
    n = restart_dead_codes(Accelerator(), vq, opt, counts, z, broadcast)
    assert n == 15
    after = torch.bincount(vq.quantize(z).ids.flatten(), minlength=16).float()
    assert usage(after)["codes_used"] > 0.5 and usage(after)["perplexity"] > usage(counts)["perplexity"]


def test_patch_discriminator_shapes():
    for resolution in (16, 64, 256):
        logits = PatchDiscriminator(resolution, channels=8)(torch.rand(2, 3, resolution, resolution))
        assert logits.shape[:2] == (2, 1) and logits.shape[-1] >= 2


def test_perceptual_loss_needs_lpips(data, tmp_path):
    import importlib.util

    if importlib.util.find_spec("lpips") is not None:
        pytest.skip("lpips installed")
    images, config = data
    with pytest.raises(RuntimeError, match="lpips"):
        main(["train-vqgan", "--vqgan_config", str(config), "--train_data_dir", str(images), "--resolution", "16",
              "--max_train_steps", "1", "--perceptual_weight", "1", "--output_dir", str(tmp_path)])


def test_train_decoder_only_keeps_token_ids_and_improves_reconstruction(data, tmp_path):
    images, config = data
    base = tmp_path / "base"
    common = ["--train_data_dir", str(images), "--resolution", "16", "--train_batch_size", "4", "--logging_steps",
              "10", "--checkpointing_steps", "0"]
    main(["train-vqgan", "--vqgan_config", str(config), "--max_train_steps", "20", "--learning_rate", "2e-3",
          "--eval_steps", "20", "--output_dir", str(base), *common])
    out = tmp_path / "decoder"
    main(["train-vqgan", "--pretrained_model_name_or_path", str(base / "vqvae"), "--train_decoder_only",
          "--max_train_steps", "40", "--learning_rate", "2e-3", "--eval_steps", "40", "--output_dir", str(out), *common])
    before = load_model(VQGAN, VQGANConfig, base / "vqvae")
    after = load_model(VQGAN, VQGANConfig, out / "vqvae")
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(before.encode(x), after.encode(x))  # the same tokens: transformers trained on them stay valid
    for name, value in before.state_dict().items():
        changed = not torch.equal(value, after.state_dict()[name])
        assert changed == name.startswith(("decoder.", "post_quant_conv.")) or "norm" in name and not changed, name
    # the decoder alone keeps learning where the base run stopped
    assert read(out / "logs" / "train_log.jsonl")[-1]["rec_loss"] < read(base / "logs" / "train_log.jsonl")[-1]["rec_loss"]


def test_train_decoder_only_refuses_a_new_vqgan_and_code_restarts(data, tmp_path):
    images, config = data
    common = ["--train_data_dir", str(images), "--resolution", "16", "--max_train_steps", "1", "--output_dir",
              str(tmp_path / "x"), "--train_decoder_only"]
    with pytest.raises(ValueError, match="--pretrained_model_name_or_path"):
        main(["train-vqgan", "--vqgan_config", str(config), *common])
