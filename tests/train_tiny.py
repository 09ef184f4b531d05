"""Tiny training fixtures: a pipeline folder built with our own classes, small captioned image folders, killing
runs, and launching several CPU processes through accelerate."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from amused.training.shards import tar_bytes
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


def make_tar_shards(folder: Path, shards: int = 2, per_shard: int = 5, size: int = 8, seed: int = 0) -> str:
    """Webdataset tar shards of `make_image_folder`-style images (`key.png` + `key.txt`, every caption different);
    returns the brace pattern that --train_shards takes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        members = []
        for i in range(per_shard):
            blocks = rng.integers(0, 256, (size // 2, size // 2, 3), dtype=np.uint8)
            buf = io.BytesIO()
            PIL.Image.fromarray(blocks.repeat(2, axis=0).repeat(2, axis=1)).save(buf, format="PNG")
            caption = f"{WORDS[(s * per_shard + i) % len(WORDS)]} {s}-{i}".encode()  # fits 16 tokens
            members += [(f"{s:03d}_{i:04d}.png", buf.getvalue()), (f"{s:03d}_{i:04d}.txt", caption)]
        (folder / f"shard-{s:03d}.tar").write_bytes(tar_bytes(members))
    return str(folder / f"shard-{{000..{shards - 1:03d}}}.tar")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Imported by the training test modules: one intra-op thread while they run. Their models are tiny, and on
    a shared 2-core machine OpenMP's spinning worker threads made a step's backward 25x slower (0.84 s against
    0.033 s, measured). Launched processes get OMP_NUM_THREADS=1 for the same reason (and so that they compute
    exactly as the in-process runs they are compared with)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def kill_after_checkpoint(cmd: list[str], checkpoint: Path, pause: float, at_checkpoint=None,
                          env: dict | None = None) -> int:
    """Run `cmd`, wait (at most 120 s) for the `checkpoint` folder, call `at_checkpoint()`, let it run `pause`
    seconds more, SIGKILL it and every process it started; returns the exit status (-SIGKILL)."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            deadline = time.time() + 120
            while not checkpoint.is_dir():
                if proc.poll() is not None or time.time() > deadline:
                    err.seek(0)
                    raise AssertionError(f"the run ended before {checkpoint.name}: {err.read()[-3000:].decode()}")
                time.sleep(0.02)
            if at_checkpoint is not None:
                at_checkpoint()
            time.sleep(pause)  # somewhere past the checkpoint
            kill_tree(proc.pid)
        finally:
            proc.wait()
    return proc.returncode


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a crashed machine would stop them (torchrun starts
    its workers in sessions of their own: a kill of the launcher alone would leave them training)."""
    import psutil

    root = psutil.Process(pid)
    descendants = root.children(recursive=True)
    for p in [*descendants, root]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(descendants, timeout=30)  # not the root: its parent reaps it and reads its exit status


# ----------------------------------------------------------------------------------------------------------
# Launching several CPU processes through accelerate
# ----------------------------------------------------------------------------------------------------------


def accelerate_config(folder: Path, fsdp: bool, processes: int = 2) -> Path:
    """An `accelerate launch --config_file` for `processes` CPU processes on this machine.

    DDP: distributed_type MULTI_GPU, which makes accelerate start the processes with torchrun; the launching
    environment's ACCELERATE_USE_CPU=1 then makes each one a gloo (MULTI_CPU) process. (`use_cpu: true` would
    start a single process: accelerate expects mpirun for several CPU processes.) FSDP: distributed_type FSDP,
    FSDP2, no wrapping policy, sharded checkpoints; `sync_module_states` off (on, accelerate asks for a GPU).
    """
    lines = ["compute_environment: LOCAL_MACHINE", f"distributed_type: {'FSDP' if fsdp else 'MULTI_GPU'}",
             f"num_processes: {processes}", "num_machines: 1", "machine_rank: 0", "mixed_precision: 'no'",
             "use_cpu: false", "rdzv_backend: static", "main_process_port: 0"]
    if fsdp:
        lines += ["fsdp_config:", "  fsdp_version: 2", "  fsdp_auto_wrap_policy: NO_WRAP",
                  "  fsdp_state_dict_type: SHARDED_STATE_DICT", "  fsdp_reshard_after_forward: true",
                  "  fsdp_offload_params: false", "  fsdp_sync_module_states: false",
                  "  fsdp_cpu_ram_efficient_loading: false"]
    path = folder / ("fsdp.yaml" if fsdp else "ddp.yaml")
    path.write_text("\n".join(lines) + "\n")
    return path


def fsdp_on_cpu() -> None:
    """Let accelerate run FSDP in CPU (gloo) processes, for tests.

    accelerate 1.15 makes `DistributedType.FSDP` out of its FSDP configuration only on GPU-like backends
    (`AcceleratorState.__init__` lists MULTI_GPU, MULTI_XPU, ...; not MULTI_CPU): a CPU process stays MULTI_CPU
    and would train unsharded (amused refuses that). PyTorch's FSDP2 (`fully_shard`) itself runs on gloo, so this
    switches the state to FSDP right after `Accelerator.__init__`, with the plugin accelerate built from the
    launcher's FSDP_* variables; everything after that (prepare, clipping, sharded checkpoints, the full state
    dict) is accelerate's and torch's own FSDP code.
    """
    import accelerate
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    init = accelerate.Accelerator.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:
            plugin = FullyShardedDataParallelPlugin()  # reads FSDP_VERSION, FSDP_STATE_DICT_TYPE, ...
            for state in (PartialState(), AcceleratorState()):
                state.distributed_type = DistributedType.FSDP
            AcceleratorState().fsdp_plugin = plugin

    accelerate.Accelerator.__init__ = patched


if __name__ == "__main__":  # `accelerate launch tests/train_tiny.py --fsdp_on_cpu finetune ...`
    import sys

    argv = sys.argv[1:]
    if argv[:1] == ["--fsdp_on_cpu"]:
        fsdp_on_cpu()
        argv = argv[1:]
    from amused.training.cli import main

    main(argv)
