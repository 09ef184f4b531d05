"""Tiny training fixtures: a pipeline folder built with our own classes, and small captioned image folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from tiny import CODEBOOK, MASK_ID, UVIT_KWARGS, VQ_KWARGS, tiny_text_encoder, write_clip_tokenizer

# A slightly wider U-ViT than tests/tiny.py's (hidden 8 cannot memorise anything in a few steps).
TRAIN_UVIT = dict(UVIT_KWARGS, hidden_size=32, in_channels=32, block_out_channels=32, intermediate_size=64,
                  micro_cond_encode_dim=2, micro_cond_embed_dim=10, num_attention_heads=2, block_num_heads=2,
                  downsample=False, upsample=False)
WORDS = ["red", "green", "blue", "yellow", "purple", "cyan"]


def make_pipeline(folder: Path, uvit_kwargs: dict | None = None, seed: int = 0) -> Path:
    """Random tiny components saved in the published layout with `AmusedPipeline.save_pretrained`."""
    from amused.models.uvit import UViT, UViTConfig
    from amused.models.vqgan import VQGAN, VQGANConfig
    from amused.pipeline import AmusedPipeline, SchedulerConfig

    torch.manual_seed(seed)
    transformer = UViT(UViTConfig(**(uvit_kwargs or TRAIN_UVIT))).eval()
    vqvae = VQGAN(VQGANConfig(**VQ_KWARGS)).eval()
    with torch.no_grad():  # codes = encoder outputs of random images, so images map onto many codes
        latents = vqvae.encode_latents(torch.rand(4, 3, 16, 16)).permute(0, 2, 3, 1).reshape(-1, 4)
        vqvae.quantize.embedding.weight.copy_(latents[torch.randperm(len(latents))[:CODEBOOK]])
    tokenizer = write_clip_tokenizer(folder / "_tok")
    pipe = AmusedPipeline(vqvae, tokenizer, tiny_text_encoder(), transformer, SchedulerConfig(mask_token_id=MASK_ID))
    pipe.save_pretrained(folder)
    return folder


def make_image_folder(folder: Path, n: int = 4, size: int = 12, seed: int = 0, rgba: bool = False) -> Path:
    """n images of random 2x2-pixel colour blocks (one VQ token each at factor 2), captions in metadata.jsonl."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        blocks = rng.integers(0, 256, (size // 2, size // 2, 3), dtype=np.uint8)
        array = blocks.repeat(2, axis=0).repeat(2, axis=1)
        image = PIL.Image.fromarray(array)
        if rgba:
            image = image.convert("RGBA")
        name = f"img_{i}.png"
        image.save(folder / name)
        rows.append({"file_name": name, "text": f"{WORDS[i % len(WORDS)]} pattern {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def kill_after_checkpoint(cmd: list[str], checkpoint: Path, pause: float, at_checkpoint=None) -> int:
    """Run `cmd`, wait (at most 120 s) for the `checkpoint` folder, call `at_checkpoint()`, let it run `pause`
    seconds more, SIGKILL it; returns the exit status (-SIGKILL)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not checkpoint.is_dir():
            assert proc.poll() is None and time.time() < deadline, "the run ended before the checkpoint"
            time.sleep(0.02)
        if at_checkpoint is not None:
            at_checkpoint()
        time.sleep(pause)  # somewhere past the checkpoint
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    return proc.returncode
