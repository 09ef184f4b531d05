"""Named architectures: the published amused-256 / amused-512 and the small embedded model, as one-line
factories (random weights), for benchmarks, training from scratch and tests."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .models.uvit import UViTConfig
from .models.vqgan import VQGANConfig

# The published U-ViTs differ only in grid size and the 2x down/upsampling around the transformer.
UVIT_PRESETS = {
    "amused-256": lambda: UViTConfig(sample_size=16),
    "amused-512": lambda: UViTConfig(sample_size=32, downsample=True, upsample=True),
}
VQ_PRESETS = {
    "amused": lambda: VQGANConfig(),  # 16x, 8192 codes, [128, 256, 256, 512, 768]
}
# CLIP-L/14 text tower (the published text encoder's shape).
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")

# OpenCLIP ViT-H/14 text tower (laion/CLIP-ViT-H-14-laion2B-s32B-b79K: Meissonic's and Monetico's text encoder).
CLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
              max_position_embeddings=77, projection_dim=1024, hidden_act="gelu")
# A tiny CLIP for CPU tests of Meissonic's tiny preset (text width 12 = its joint_attention_dim, pooled 16).
CLIP_TINY_MEISSONIC = dict(vocab_size=516, hidden_size=12, intermediate_size=16, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=77, projection_dim=16, bos_token_id=514,
                           eos_token_id=515, pad_token_id=515)


def uvit_config(name: str, **overrides) -> UViTConfig:
    if name not in UVIT_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(UVIT_PRESETS)}")
    return dataclasses.replace(UVIT_PRESETS[name](), **overrides)


def write_clip_tokenizer(folder: Path, max_length: int = 16):
    """A character-level CLIP tokenizer (CLIP's byte-to-unicode alphabet, no merges), for random-weight
    benchmarks and tests where no real CLIP vocabulary can be downloaded. 514 tokens."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    # CLIP's byte-to-unicode table: printable bytes map to themselves, the rest to chars above 255.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = {}
    for tok in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab[tok] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return tok
