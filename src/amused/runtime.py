"""The one generation runtime under every face: `amused generate / img2img / inpaint / variations`, `amused serve`,
`amused demo`, `amused eval` and `amused bench` all load and run models through here, and so does Python code
that wants what the command line gets:

    from amused.runtime import load_engine
    engine = load_engine("embedded")                      # or a folder / hub id; device and dtype picked here
    image = engine.task("text")("red apple", generator=engine.generator(0)).images[0]

What it decides, once, for every face:
- the device (`auto`: CUDA when present) and the weights' dtype (fp16 on CUDA; on the CPU bf16 where it is done in
  hardware, else float32, and float32 for diffusers' random stream), with a one-line error for a device this
  machine does not have;
- the model: `embedded` (or nothing) names the model shipped in the package, anything else a folder or hub id;
- the random stream: by default the fast draws: on a GPU, on-device draws from a CUDA generator (no host
  sync; what the fast path replays), on the CPU inverse-CDF draws (one uniform per token instead of one per
  codebook entry: 0.35-0.42 s less an image with the embedded model's 4096 codes,
  docs/results/cpu_draws_embedded.json); with `reference_stream=True`
  (`--reference-stream`), diffusers' own random stream from a CPU generator, so seeds give diffusers' images
  (on a GPU that runs the slow plain loop: about 10x the time of a call, see README, Performance);
- the fast path (`fast`): "off" (the plain loop), "graph" (the whole decode as a CUDA graph, eager kernels:
  a second or so of capture per new shape), "compile" (also `torch.compile`d: the fastest replay, tens of
  seconds of compilation per new shape, cached on disk across runs: `fast.use_compile_cache`), or "auto", which picks by the number of
  images the face expects to make (`expected_images`; measured, see `COMPILE_FROM_IMAGES`);
- CPU threads (`configure_cpu_threads`).

A face never imports another face: this module is what they share.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any

from .tasks import TASKS, pipeline_class

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
FAST_MODES = ("auto", "off", "graph", "compile")
# With fast="auto": the plain loop (on-device draws) below GRAPH_FROM_IMAGES images (capturing a graph costs two
# eager warm-up calls, so one call gains nothing), CUDA graphs of eager kernels below COMPILE_FROM_IMAGES, and
# compiled graphs from there on (tens of seconds of compilation pay for themselves only over many calls).
# Measured by benchmarks/user_facing.py (docs/results/user_facing_*.json).
GRAPH_FROM_IMAGES = 9
COMPILE_FROM_IMAGES = 32


def pick_device(name: str = "auto"):
    """`auto` -> CUDA when present, else the CPU; anything else is checked against this machine."""
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: only cpu and cuda devices are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this machine has no CUDA device that torch {torch.__version__} can "
                             f"use; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def native_cpu_bf16() -> bool:
    """Whether this CPU does bfloat16 arithmetic in hardware (AVX512-BF16 or AMX; torch's own probe). Elsewhere
    bf16 is emulated and no faster than float32."""
    import torch

    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe is not None and probe() for probe in probes)


def pick_dtype(name: str, device, reference_stream: bool = False):
    """`auto` -> float16 on CUDA (the published weights' dtype); on the CPU bfloat16 where the CPU does it in
    hardware (a CPU image of the embedded model in ~0.7x the float32 time, docs/results/cpu_dtype_embedded.json),
    else float32, and float32 always with `reference_stream` (diffusers' images, which it computes in float32)."""
    import torch

    if name in (None, "auto"):
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if not reference_stream and native_cpu_bf16() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: choose auto, {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def configure_cpu_threads() -> int:
    """Threads torch uses on the CPU. A setting the user gave in the environment wins (AMUSED_NUM_THREADS, else
    OMP_NUM_THREADS); otherwise one thread per core this process may use, less one when there are more than two.
    `import amused` also makes OpenMP threads wait passively: spinning threads made a call 7-9x slower on two
    cores another job shared (benchmarks/cpu_threads.py, docs/results/cpu_threads*.json)."""
    import torch

    from .env import positive_int_env

    threads = positive_int_env("AMUSED_NUM_THREADS", "OMP_NUM_THREADS", unit="threads")
    if threads is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = cores if cores <= 2 else cores - 1
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def resolve_fast(fast: str, device, expected_images: int = 1) -> str:
    """The fast-path mode a run gets: "off" on the CPU; "auto" picks by `expected_images` (see
    `GRAPH_FROM_IMAGES`, `COMPILE_FROM_IMAGES`)."""
    if fast not in FAST_MODES:
        raise ValueError(f"--fast {fast!r}: choose one of {', '.join(FAST_MODES)}")
    if device.type != "cuda":
        if fast in ("graph", "compile"):
            raise ValueError(f"--fast {fast} needs a CUDA device; this run is on {device}")
        return "off"
    if fast == "auto":
        if expected_images >= COMPILE_FROM_IMAGES:
            return "compile"
        return "graph" if expected_images >= GRAPH_FROM_IMAGES else "off"
    return fast


@dataclass
class Engine:
    """A loaded model and how it runs: what every face holds.

    Attributes:
        pipe: the text-to-image pipeline; `task()` gives the image tasks over the same weights.
        model_name: what the user named ("embedded", a folder, a hub id).
        fast: the fast-path mode in force ("off", "graph", "compile").
        reference_stream: seeds draw diffusers' random stream (CPU generator) rather than on-device draws.
        state: "loading", "warming" (capturing / compiling the shapes it was asked to warm up) or "ready".
    """

    pipe: Any
    model_name: str
    fast: str
    reference_stream: bool
    state: str = "loading"
    warmed: list[int] = field(default_factory=list)  # batch sizes captured ahead of the first request
    _tasks: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def device(self):
        return self.pipe.device

    def __post_init__(self):
        if self.pipe is not None:  # the engine's stream, on the CPU too (pipeline.py)
            self.pipe.reference_stream = self.reference_stream

    def generator(self, seed: int | None = None):
        """The generator a call draws from. A CUDA generator on a GPU (on-device draws: the fast path); a CPU
        generator on the CPU or with `reference_stream`. Which draws it feeds follows `reference_stream`:
        diffusers' stream, or the fast draws (on the CPU, inverse-CDF sampling). The same seed and settings give
        the same image through every face on the same device, batch and stream."""
        return make_generator(self.device, seed, self.reference_stream)

    def task(self, name: str = "text"):
        """The pipeline of a task ("text", "img2img", "inpaint"), sharing the weights and the fast path."""
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
        if name == "text":
            return self.pipe
        if name not in self._tasks:
            self._tasks[name] = pipeline_class(self.pipe.family, name).from_pipe(self.pipe)
        return self._tasks[name]

    @classmethod
    def wrap(cls, pipe, model_name: str = "embedded", reference_stream: bool = False) -> "Engine":
        """An engine over a pipeline built elsewhere (Python code, tests): its fast path as it was set."""
        fast = "off" if getattr(pipe, "_fast", None) is None else ("graph" if pipe._fast.compile is False
                                                                 else "compile")
        return cls(pipe, model_name=model_name, fast=fast, reference_stream=reference_stream, state="ready")

    def bucket(self, batch: int) -> int:
        """The smallest warmed batch size that holds `batch` images (a batched call is padded up to it, so it
        replays a graph captured at start instead of capturing a new one); `batch` itself when none does, and on
        the plain loop, where padding would only add work."""
        if self.fast == "off":
            return batch
        return min((b for b in self.warmed if b >= batch), default=batch)

    def warm_up(self, batch_sizes=(1,)) -> float:
        """Capture (and compile) the fast path for these batch sizes at the native size and the model's default
        settings now, so that requests do not pay for it. Returns the seconds it took."""
        import time

        started = time.perf_counter()
        self.state = "warming"
        try:
            for batch in batch_sizes:
                if self.fast != "off" or batch == batch_sizes[0]:  # on the plain path one call warms the allocator
                    self.pipe(["warm-up"] * batch, generator=self.generator(0), output_type="latent")
                self.warmed.append(batch)
        finally:
            self.state = "ready"
        return time.perf_counter() - started


def make_generator(device, seed: int | None = None, reference_stream: bool = False):
    """A generator on `device` (on-device draws), or on the CPU when `device` is the CPU or `reference_stream`
    asks for diffusers' stream; seeded with `seed`, or randomly when it is None."""
    import torch

    generator = torch.Generator("cpu" if reference_stream or torch.device(device).type == "cpu" else device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(check_seed(seed))
    return generator


def check_seed(seed, name: str = "seed") -> int:
    """A seed as torch takes it: a whole number in [0, 2**64); `name` is the argument it came from."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"{name} must be a whole number in [0, 2**64), got {seed!r}")
    return seed


def load_engine(model: str | None = None, device: str = "auto", dtype: str = "auto", fast: str = "auto",
                reference_stream: bool = False, expected_images: int = 1, lora: str | None = None,
                lora_scale: float = 1.0) -> Engine:
    """Load `model` ("embedded"/None, a folder or a hub id) ready to generate, with the pipeline class its
    model_index.json names (aMUSEd, or Meissonic / Monetico: `components.family_of`).

    Args:
        device, dtype: "auto" or a device / "fp32" | "fp16" | "bf16".
        fast: "auto" | "off" | "graph" | "compile" (see the module docstring).
        reference_stream: draw from diffusers' random stream (CPU generator) even on a GPU.
        expected_images: images this run will make; "auto" compiles only when that pays.
        lora, lora_scale: LoRA weights to load (fused into the weights when the fast path is on).
    """
    from .components import family_of
    from .embedded import EMBEDDED_NAME, resolve_model_name

    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device, reference_stream)
    mode = resolve_fast(fast, torch_device, expected_images)
    if torch_device.type == "cpu":
        configure_cpu_threads()
    name = resolve_model_name(model)
    pipe = pipeline_class(family_of(name), "text").from_pretrained(name, torch_dtype=torch_dtype, device=torch_device)
    if lora:
        pipe.load_lora_weights(lora, scale=lora_scale)
    if mode != "off":
        if lora:
            pipe.fuse_lora()  # the graph bakes the (fused) projection weights
        pipe.enable_fast(compile=mode == "compile")
    return Engine(pipe, model_name=EMBEDDED_NAME if model in (None, EMBEDDED_NAME) else str(model), fast=mode,
                  reference_stream=reference_stream, state="ready")


def add_runtime_args(p: argparse.ArgumentParser, fast_default: str = "auto") -> None:
    """The flags every generating command shares."""
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weights dtype (default: fp16 on GPU; on the CPU bf16 where the CPU does it in hardware "
                        "(AVX512-BF16, AMX), else fp32; fp32 with --reference-stream)")
    p.add_argument("--fast", default=fast_default, choices=FAST_MODES,
                   help="GPU fast path: off (plain loop), graph (CUDA graphs), compile (CUDA graphs of "
                        "torch.compile'd kernels; slow first start, cached on disk), auto: by the number of images "
                        f"(default: {fast_default})")
    p.add_argument("--reference-stream", action="store_true",
                   help="draw from diffusers' random stream (a CPU generator), so a seed gives diffusers' image; "
                        "on a GPU this runs the plain loop, about 10x slower")


def add_output_args(p: argparse.ArgumentParser) -> None:
    """--quiet and --json, for commands that print results."""
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--json", action="store_true", help="print a JSON result line")


def engine_from_args(args: argparse.Namespace, expected_images: int = 1, lora: str | None = None,
                     lora_scale: float = 1.0) -> Engine:
    """`load_engine` with the shared command-line flags (`add_runtime_args`) and `--model`."""
    return load_engine(getattr(args, "model", None), device=args.device, dtype=args.dtype,
                       fast=getattr(args, "fast", "auto"), reference_stream=getattr(args, "reference_stream", False),
                       expected_images=expected_images, lora=lora, lora_scale=lora_scale)
