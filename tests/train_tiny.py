"""Tiny training fixtures: a pipeline folder built with our own classes, and small captioned image folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from tiny import MASK_ID, UVIT_KWARGS, VQ_KWARGS, tiny_text_encoder, write_clip_tokenizer

# A slightly wider U-ViT than tests/tiny.py's (hidden 8 cannot memorise anything in a few steps).
TRAIN_UVIT = dict(UVIT_KWARGS, hidden_size=32, in_channels=32, block_out_channels=32, intermediate_size=64,
                  micro_cond_encode_dim=2, micro_cond_embed_dim=10, num_attention_heads=2, block_num_heads=2,
                  downsample=False, upsample=False)
COLOURS = [(230, 40, 40), (40, 200, 60), (40, 70, 230), (240, 220, 30), (160, 40, 200), (30, 200, 220)]
WORDS = ["red", "green", "blue", "yellow", "purple", "cyan"]


def make_pipeline(folder: Path, uvit_kwargs: dict | None = None, seed: int = 0) -> Path:
    """Random tiny components saved in the published layout with `AmusedPipeline.save_pretrained`."""
    from amused.models.uvit import UViT, UViTConfig
    from amused.models.vqgan import VQGAN, VQGANConfig
    from amused.pipeline import AmusedPipeline, SchedulerConfig

    torch.manual_seed(seed)
    transformer = UViT(UViTConfig(**(uvit_kwargs or TRAIN_UVIT))).eval()
    vqvae = VQGAN(VQGANConfig(**VQ_KWARGS)).eval()
    with torch.no_grad():  # spread the codebook so images map onto many codes
        vqvae.quantize.embedding.weight.normal_(0, 1)
    tokenizer = write_clip_tokenizer(folder / "_tok")
    pipe = AmusedPipeline(vqvae, tokenizer, tiny_text_encoder(), transformer, SchedulerConfig(mask_token_id=MASK_ID))
    pipe.save_pretrained(folder)
    return folder


def make_image_folder(folder: Path, n: int = 4, size: int = 12, seed: int = 0, rgba: bool = False) -> Path:
    """n patterned images (colour blocks) with captions in metadata.jsonl (the "imagefolder" layout)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        array = np.zeros((size, size, 3), np.uint8)
        array[:] = COLOURS[i % len(COLOURS)]
        half = size // 2
        array[:half, :half] = 255 - np.array(COLOURS[i % len(COLOURS)])  # a distinct corner block
        array = np.clip(array.astype(int) + rng.integers(-10, 10, array.shape), 0, 255).astype(np.uint8)
        image = PIL.Image.fromarray(array)
        if rgba:
            image = image.convert("RGBA")
        name = f"img_{i}.png"
        image.save(folder / name)
        rows.append({"file_name": name, "text": f"a {WORDS[i % len(WORDS)]} square number {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
