"""Opt-in fast inference on CUDA: the whole decode (every step + VQ decode) replayed as one CUDA graph.

Why: the reference spends ~60 ms a step on a transformer whose arithmetic takes ~1 ms; the time goes to
kernel launches and a host sync every step. Our sampler makes no host sync (`sampling.py`), so all steps,
the Gumbel draws and the VQ decode can be captured once per (batch, resolution, steps, settings) and replayed
with a single launch. On top: the per-call conditioning's ~100 projections as a few matmuls and fused Q/K/V
(`UViT.fuse_projections`), one compiled graph per decoding step (`guided_step`: U-ViT, guidance and sampler
fuse), SDPA attention, a compiled text encoder and VQ decoder, channels-last bf16 VQ decoding with a NaN guard.

    pipe = AmusedPipeline.from_pretrained(..., torch_dtype=torch.float16).to("cuda")
    pipe.enable_fast(compile=True)     # graphs are captured lazily, on the first call of each shape
    pipe("a red apple")                # same arguments as always

The graph captures `sampling.decode`, the loop the plain path runs, with a compiled whole step
(`guided_step`: transformer, guidance and sampler). Meissonic's transformer runs the same way: its per-step
timestep is an input of the step, as the other per-step numbers, so one compiled graph serves every step. The
user's generator drives it: its state is copied into the
graph's generator before a replay and the advanced state copied back after, so a generator reused across calls
moves on exactly as on the plain path, and the same generator gives the same tokens on both paths (img2img and
inpainting too). Only a CPU generator, which asks for diffusers' random stream, runs the plain path. Callbacks
and `return_steps` are served from per-step records the graph writes: the callback is called after the replay,
once per step, with that step's tokens.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import sampling
from .group_norm import use_chunked_group_norm
from .guidance import guided_logits


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # static input buffers, copied into before each replay
    tokens: torch.Tensor  # static output buffers
    images: torch.Tensor
    steps: dict[str, torch.Tensor] | None  # per-step records, (num_steps, B, L) each, when recording


@dataclass
class _TextGraph:
    graph: torch.cuda.CUDAGraph | None  # None: this text model could not be captured; run it eagerly
    ids: torch.Tensor
    mask: torch.Tensor
    hidden: torch.Tensor | None = None
    pooled: torch.Tensor | None = None


COMPILE_MODES = ("blocks", "full")


def use_compile_cache() -> str | None:
    """Keep torch.compile's caches on disk across runs (~/.cache/amused/torch_compile unless TORCHINDUCTOR_CACHE_DIR
    is set), so a second start of the same model reuses the first one's compiled kernels."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(base / "amused" / "torch_compile")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def compile_blocks(pipe) -> None:
    """`torch.compile` the U-ViT's repeated blocks one by one rather than the whole model (`UViT.compile_blocks`:
    compilation takes seconds, not minutes; kernels still fuse within each block) and the VQ decoder. The CUDA
    graph removes the launch cost between blocks. (Our own CUDA graph wraps everything, so compile's cudagraph
    modes are not used; max-autotune of the blocks' GEMMs measured no faster: README, Performance.)"""
    pipe.transformer.compile_blocks()
    pipe.vqvae.decoder.compile(dynamic=False)


def guided_step(model, grid: torch.Tensor, ctx, draws: tuple[torch.Tensor, torch.Tensor], total: torch.Tensor,
                ratio: torch.Tensor, temperature: torch.Tensor, last: torch.Tensor,
                guidance_scale: float | torch.Tensor, mask_token_id: int, shape: tuple[int, int, int],
                timestep: torch.Tensor | None = None, priority: torch.Tensor | None = None) -> sampling.StepResult:
    """One decoding step of the graph: transformer forward, guidance and sampling in one function.

    Compiled as one graph (`compile="full"`), the logits never leave it: the guidance mix fuses into the
    sampler's softmax, and the model's last kernels fuse with the sampler's first. The random draws come in
    as tensors (a private generator cannot be traced) and `last` is a bool tensor, so every step, the final
    one included, replays one compiled graph. The same arithmetic as `sampling.decode` over `guided_logits`
    (tests/test_fast.py).

    Args:
        grid: (B, L) current tokens; shape: (B, h, w) of the grid.
        guidance_scale: g, or composed guidance's (K, B) weights (`guidance.guided_logits`), a graph input.
        draws: the step's `sampling.gumbel_draws`.
        last: 0-d bool tensor, True on the final step (every token is committed).
        timestep: 0-d tensor, the step's scheduler timestep (Meissonic reads it, the U-ViT ignores it): an input,
            like `last`, so that one compiled graph serves every step.
        priority: (L,) Halton reveal priority (order="halton"), or None to rank by confidence.
    """
    B, H, W = shape
    logits = guided_logits(model, grid.view(B, H, W), ctx, guidance_scale, timestep)  # (B, V, h, w)
    logits = logits.reshape(B, logits.shape[1], H * W).transpose(1, 2)  # (B, L, V)
    return sampling.unmask_step(logits, grid, total, ratio, temperature, mask_token_id, last, "gumbel", None, draws,
                                priority)


@contextlib.contextmanager
def cudnn_autotune():
    """cuDNN benchmark mode for the warm-up and capture only: the shapes are static, so timing each
    convolution's algorithms once pays off in every replay (the captured graph keeps the chosen kernels);
    the user's global setting is restored afterwards."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _warm_up(fn, runs: int = 2) -> None:
    """Run `fn` on a side stream before capture (compilation, cuBLAS/cuDNN autotuning, allocator pools),
    the last run with host syncs turned into errors, so a sync fails here with its stack instead of
    breaking the capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for i in range(runs):
            if i == runs - 1:
                torch.cuda.set_sync_debug_mode("error")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
    torch.cuda.current_stream().wait_stream(stream)


@dataclass
class FastDecoder:
    """Captures and replays the whole decode (every `guided_step` + VQ decode) for one pipeline.

    Args:
        pipe: the pipeline (its modules must already be on the CUDA device, in their final dtype).
        compile: `torch.compile` before capture. True or "full": the U-ViT's step as one graph, the VQ decoder
            and the text encoder (the fastest replay); "blocks": the U-ViT's blocks one by one and the VQ
            decoder; False: eager kernels in the graph.
        vq_dtype: dtype of the VQ decode in the graph (bf16: float32's range, so no fp16 overflow).
    """

    pipe: object
    compile: bool | str = True
    vq_dtype: torch.dtype = torch.bfloat16
    fuse: bool = True  # UViT.fuse_projections: fused Q/K/V and conditioning matmuls (same math, other rounding)
    vq_group_norm: str = "chunked"  # "chunked": amused.group_norm (fast on channels-last), "native": F.group_norm
    graphs: dict[tuple, _Graph] = field(default_factory=dict)
    generator: torch.Generator | None = None

    def __post_init__(self):
        pipe = self.pipe
        if hasattr(pipe.transformer, "fuse_projections"):  # the U-ViT; Meissonic's transformer runs as it is
            pipe.transformer.fuse_projections() if self.fuse else pipe.transformer.unfuse_projections()
        pipe.vqvae.to(memory_format=torch.channels_last)
        if self.vq_group_norm not in ("chunked", "native"):
            raise ValueError(f"vq_group_norm must be 'chunked' or 'native', got {self.vq_group_norm!r}")
        use_chunked_group_norm(pipe.vqvae.decoder, on=self.vq_group_norm == "chunked")  # either way: a later
        # enable_fast(vq_group_norm="native") undoes an earlier call's switch
        mode = "full" if self.compile is True else self.compile
        if mode and mode not in COMPILE_MODES:
            raise ValueError(f"compile must be True, False or one of {COMPILE_MODES}, got {self.compile!r}")
        self.step = guided_step
        if mode == "blocks":
            compile_blocks(pipe)
        elif mode == "full":
            self.step = torch.compile(guided_step, dynamic=False)
            pipe.vqvae.decoder.compile(dynamic=False)
            pipe.text_encoder.compile(dynamic=False)
        self.generator = torch.Generator(pipe.device)
        self.text_graphs: dict[tuple, _TextGraph] = {}

    def _vq_decode(self, tokens: torch.Tensor) -> torch.Tensor:
        vq = self.pipe.vqvae
        with torch.autocast(tokens.device.type, dtype=self.vq_dtype):  # also when the VQ is in vq_dtype already:
            # the codebook lookup comes out in float32
            quantized = vq.quantize.lookup(tokens).contiguous(memory_format=torch.channels_last)
            return vq.decode_latents(quantized).float().clamp(0, 1)

    def encode(self, prompts: list[str], name: str = "prompt") -> tuple[torch.Tensor, torch.Tensor]:
        """Text encoding replayed from a CUDA graph per batch size (eager if the model cannot be captured)."""
        encoder = self.pipe.prompt_encoder
        batch = encoder.tokenize(list(prompts), name)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        key = tuple(ids.shape)
        entry = self.text_graphs.get(key)
        if entry is None:
            entry = self.text_graphs[key] = self._capture_text(encoder, ids.to(self.pipe.device),
                                                               mask.to(self.pipe.device))
        with torch.inference_mode():  # the static buffers are inference tensors
            entry.ids.copy_(ids, non_blocking=True)
            entry.mask.copy_(mask, non_blocking=True)
            if entry.graph is None:
                return encoder.encode_ids(entry.ids, entry.mask)
            entry.graph.replay()
            return entry.hidden.clone(), entry.pooled.clone()

    def _capture_text(self, encoder, ids, mask) -> _TextGraph:
        try:
            _warm_up(lambda: encoder.encode_ids(ids, mask))
        except RuntimeError as e:  # a text model that syncs (data-dependent masks) cannot be captured
            warnings.warn(f"text encoder not captured as a CUDA graph (it syncs with the host: {e}); running it "
                          f"eagerly")
            return _TextGraph(None, ids, mask)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            hidden, pooled = encoder.encode_ids(ids, mask)
        return _TextGraph(graph, ids, mask, hidden, pooled)

    def supports(self, generator) -> bool:
        """Whether the graph can serve a call drawing from `generator` (None: the device's default generator)."""
        return generator is None or generator.device.type == "cuda"

    def run(self, *, embeds, micro_conds, guidance_scale, start, num_steps, schedule, temperature, generator,
            record: bool = False, order: str = "confidence"
            ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
        """Replay (capturing first if this shape/settings is new), drawing from `generator`'s stream.

        Returns:
            (B, h, w) tokens, (B, 3, H, W) images in [0, 1], and with `record` the per-step records
            {"tokens", "predicted", "confidence"}, (num_steps, B, L) each. All are the graph's own buffers,
            overwritten by the next replay.
        """
        temperature = tuple(temperature) if isinstance(temperature, (tuple, list)) else temperature
        composed = isinstance(guidance_scale, torch.Tensor)  # composed guidance's (K, B) weights: a graph input
        key = (tuple(start.tokens.shape), tuple(embeds.hidden.shape), num_steps, start.start_step, schedule,
               temperature, "composed" if composed else float(guidance_scale), start.total is None, record, order)
        inputs = {"tokens": start.tokens, "hidden": embeds.hidden, "pooled": embeds.pooled, "micro": micro_conds}
        if start.total is not None:
            inputs["total"] = start.total
        if composed:
            inputs["weights"] = guidance_scale
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(inputs, None if composed else guidance_scale, start.start_step,
                                                     num_steps, schedule, temperature, record, order)
        source = generator if generator is not None else torch.cuda.default_generators[self.pipe.device.index or 0]
        with torch.inference_mode():
            for name, value in inputs.items():
                entry.inputs[name].copy_(value, non_blocking=True)
            if self.generator is not None:
                self.generator.set_state(source.get_state())  # the graph draws from the caller's stream...
            entry.graph.replay()
            if self.generator is not None:
                source.set_state(self.generator.get_state())  # ...and the caller's stream moves on past the draws
        return entry.tokens, entry.images, entry.steps

    def _program(self, bufs: dict[str, torch.Tensor], guidance_scale, start_step, num_steps, schedule, temperature,
                 record: bool = False, order: str = "confidence"):
        """What the graph holds: the per-call conditioning, then `sampling.decode` (the plain path's loop) with a
        whole step as one function (`guided_step`, compiled), then the VQ decode."""
        model, mask_id = self.pipe.transformer, self.pipe.scheduler.mask_token_id
        guidance = bufs.get("weights", guidance_scale)  # composed guidance's weights buffer, else the scale
        B, H, W = shape = tuple(bufs["tokens"].shape)
        device = bufs["tokens"].device
        ctx = model.condition(bufs["hidden"], bufs["pooled"], bufs["micro"], grid=(H, W))  # once per call
        draw_shape = (B, H * W, model.config.codebook_size)

        def fused_step(grid, step: sampling.StepInputs):
            draws = sampling.gumbel_draws(draw_shape, self.generator, device)  # in the plain path's stream order
            return self.step(model, grid, ctx, draws, step.total, step.ratio, step.temperature, step.last,
                             guidance, mask_id, shape, step.timestep, step.priority)

        steps = None
        if record:  # per-step records, written inside the graph
            steps = {"tokens": torch.empty((num_steps, B, H * W), dtype=torch.long, device=device),
                     "predicted": torch.empty((num_steps, B, H * W), dtype=torch.long, device=device),
                     "confidence": torch.empty((num_steps, B, H * W), dtype=torch.float32, device=device)}

        def record_step(i, result):
            for name in steps:
                steps[name][i].copy_(getattr(result, name))

        tokens = sampling.decode(None, bufs["tokens"], num_steps=num_steps, mask_token_id=mask_id,
                                 start_step=start_step, schedule=schedule, temperature=temperature,
                                 total=bufs.get("total"), draw="gumbel", generator=self.generator,
                                 callback=record_step if record else None,
                                 fused_step=fused_step, order=order)
        return tokens, self._vq_decode(tokens), steps

    def _capture(self, inputs, *settings) -> _Graph:
        bufs = {name: value.clone() for name, value in inputs.items()}
        with cudnn_autotune():
            _warm_up(lambda: self._program(bufs, *settings))
            graph = torch.cuda.CUDAGraph()
            if hasattr(graph, "register_generator_state"):
                graph.register_generator_state(self.generator)
            else:  # older torch: only the default generator can be captured
                warnings.warn("this torch cannot capture a private generator; seeds use the default CUDA generator")
                self.generator = None
            with torch.cuda.graph(graph), torch.inference_mode():
                tokens, images, steps = self._program(bufs, *settings)
        return _Graph(graph, bufs, tokens, images, steps)
