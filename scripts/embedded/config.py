"""Architecture of the embedded model (amused-emoji-64): 64x64 px, 16x16 tokens, 1024 codes, MiniLM text.

Sized to the issue's budget: the shipped VQGAN + U-ViT weights in fp16 under 24 MB, and a 12-step image in
well under a second on 2 CPU cores.
"""

import dataclasses
import json
from pathlib import Path

from amused.models.uvit import UViTConfig
from amused.models.vqgan import VQGANConfig

CODEBOOK = 1024
TEXT_MAX_LENGTH = 24  # MiniLM tokens per caption (emoji captions need ~16)

VQ = VQGANConfig(block_out_channels=[64, 128, 128], layers_per_block=1, latent_channels=32,
                 num_vq_embeddings=CODEBOOK, norm_num_groups=32, sample_size=64)

UVIT = UViTConfig(hidden_size=256, cond_embed_dim=384, micro_cond_encode_dim=32, micro_cond_embed_dim=160,
                  encoder_hidden_size=384, vocab_size=CODEBOOK + 8, codebook_size=CODEBOOK, in_channels=128,
                  block_out_channels=192, num_res_blocks=1, downsample=True, upsample=True, block_num_heads=4,
                  num_hidden_layers=4, num_attention_heads=4, intermediate_size=640, sample_size=16)

# The same U-ViT without the 16x16 -> 8x8 downsampling around the transformer (as the published amused-256 does
# on its 16x16 grid): the transformer sees every token, at 4x the arithmetic and 0.3 M fewer parameters (no
# resampling convolutions).
UVIT_FLAT = dataclasses.replace(UVIT, downsample=False, upsample=False)
# Six transformer layers instead of four, wider MLPs: 12.3 M parameters with 4096 codes (8.9 M for UVIT), whose
# fp16 weights (24.7 MB) fit the 32 MiB budget beside a 4096-code VQGAN (7.7 MB).
UVIT_L6 = dataclasses.replace(UVIT, num_hidden_layers=6, intermediate_size=768)
# Ten layers, MLP 1024: 20.3 M parameters with 4096 codes; only int8 storage (amused.int8, ~19.4 MiB) fits the
# budget. 1.38x UVIT_L6's CPU image time at 8 steps (docs/results/cpu_draws_embedded_session9.json: the
# transformer runs on 8x8 tokens; the convolution stages and the head are unchanged).
UVIT_L10 = dataclasses.replace(UVIT, num_hidden_layers=10, intermediate_size=1024)
VARIANTS = {"uvit": UVIT, "uvit_flat": UVIT_FLAT, "uvit_l6": UVIT_L6, "uvit_l10": UVIT_L10}


def uvit_for_text(hidden_size: int, pooled_size: int, base: UViTConfig = UVIT) -> UViTConfig:
    """`base` reading a text encoder of other sizes: per-token states of `hidden_size` (cross-attention input,
    `encoder_hidden_size`) and a pooled vector of `pooled_size` (`cond_embed_dim`); nothing else changes."""
    return dataclasses.replace(base, encoder_hidden_size=hidden_size, cond_embed_dim=pooled_size)


def write_transformer_json(text_encoder_path: str | Path, path: str | Path, variant: str = "uvit",
                           codebook: int = CODEBOOK) -> UViTConfig:
    """Write the transformer.json that `amused train --transformer_config` accepts with the text encoder in
    `text_encoder_path` (a transformers folder): sizes read the way training reads them; `variant` names
    the base architecture in `VARIANTS`; `codebook`: the VQGAN's number of codes (8 more token ids: the mask
    and spares, as the shipped model).

    Returns:
        The config written.
    """
    from amused.models.text_encoder import TextEncoder
    from amused.training.train import load_text

    tokenizer, model = load_text(None, str(text_encoder_path))
    text = TextEncoder(model, tokenizer)
    cfg = uvit_for_text(text.hidden_size, text.pooled_size, VARIANTS[variant])
    cfg = dataclasses.replace(cfg, codebook_size=codebook, vocab_size=codebook + 8)
    Path(path).write_text(json.dumps(dataclasses.asdict(cfg)))
    return cfg
