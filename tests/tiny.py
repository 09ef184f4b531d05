"""Tiny random aMUSEd checkpoints in the published layout, built with diffusers (the reference) or with ours.

Sizes follow diffusers' own aMUSEd tests (hidden 8, one layer, a handful of codes) so everything runs on a CPU
in milliseconds. The CLIP tokenizer is a character-level BPE vocabulary written here (no hub access).
"""

from __future__ import annotations

from pathlib import Path

import torch

from amused.presets import write_clip_tokenizer

CODEBOOK = 16
VOCAB = 24  # codebook + mask token, padded; mask id = 23
MASK_ID = VOCAB - 1

UVIT_KWARGS = dict(hidden_size=8, use_bias=False, hidden_dropout=0.0, cond_embed_dim=8, micro_cond_encode_dim=2,
                   micro_cond_embed_dim=10, encoder_hidden_size=8, vocab_size=VOCAB, codebook_size=CODEBOOK,
                   in_channels=8, block_out_channels=8, num_res_blocks=1, downsample=True, upsample=True,
                   block_num_heads=1, num_hidden_layers=1, num_attention_heads=1, attention_dropout=0.0,
                   intermediate_size=8, layer_norm_eps=1e-12, ln_elementwise_affine=True, sample_size=4)
VQ_KWARGS = dict(act_fn="silu", block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                 up_block_types=["UpDecoderBlock2D"] * 2, in_channels=3, latent_channels=4, layers_per_block=1,
                 norm_num_groups=4, num_vq_embeddings=CODEBOOK, out_channels=3, sample_size=8,
                 mid_block_add_attention=False, lookup_from_codebook=True, force_upcast=True)
IMAGE_SIZE = 8  # pixels; VQ factor 2 -> 4x4 tokens -> 2x2 after the U-ViT's downsample


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.5) -> None:
    """Replace every parameter with seeded noise, so parity tests exercise every weight (zero-init ones too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def tiny_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(bos_token_id=514, eos_token_id=515, pad_token_id=515, hidden_size=8, intermediate_size=8,
                            layer_norm_eps=1e-5, num_attention_heads=1, num_hidden_layers=2, vocab_size=516,
                            projection_dim=8, max_position_embeddings=16)
    return CLIPTextModelWithProjection(config).eval()


def save_reference_checkpoint(folder: Path, seed: int = 0) -> Path:
    """Build tiny random diffusers aMUSEd components and `save_pretrained` them (the published layout)."""
    from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel, VQModel

    transformer = UVit2DModel(**UVIT_KWARGS)
    vqvae = VQModel(**VQ_KWARGS)
    randomize(transformer, seed)
    randomize(vqvae, seed + 1, scale=0.3)
    tokenizer = write_clip_tokenizer(folder / "_tok")
    pipe = AmusedPipeline(vqvae=vqvae, tokenizer=tokenizer, text_encoder=tiny_text_encoder(),
                          transformer=transformer, scheduler=AmusedScheduler(mask_token_id=MASK_ID))
    pipe.save_pretrained(folder)
    return folder


def load_reference(folder: Path, cls_name: str = "AmusedPipeline"):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe
