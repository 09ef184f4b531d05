"""Text-to-image, img2img and inpainting with aMUSEd, as drop-in replacements of diffusers' deprecated
`AmusedPipeline`, `AmusedImg2ImgPipeline` and `AmusedInpaintPipeline` (same argument names and defaults).

Each task only prepares a starting token grid; all three run the same MaskGIT loop (`sampling.decode`):
    text-to-image: every token masked;
    img2img: the image's tokens with a `strength` fraction masked, entering the schedule part-way;
    inpainting: the image's tokens with those under the mask masked (linear schedule by default).

Differences from the reference, on purpose (shared/REFERENCE.md lists its defects):
    - img2img at strength=1.0 regenerates the whole image (the reference masks almost nothing);
    - the inpainting pipeline does not switch the shared scheduler to the linear schedule for everyone;
    - already-decided tokens are never re-masked, whatever the dtype;
    - mask counts follow each sample's own unknown tokens;
    - one negative prompt applies to every prompt of a batch.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

import torch

from . import sampling
from .guidance import ComposedGuidance, guided_logits, unconditional_weight
from .images import from_device, output_tensor, to_host
from .components import AMUSED, SAMPLERS, Family, SchedulerConfig, load_components, save_components
from .models.text_encoder import TextEncoder
from .models.uvit import MAX_SAMPLE_SIZE, UViT
from .models.vqgan import VQGAN


@dataclass
class StepState:
    """The token grid after one decoding step (with `return_steps=True`), on the CPU."""

    step: int
    tokens: torch.Tensor  # (B, h, w) kept tokens; the mask token where still undecided
    predicted: torch.Tensor  # (B, h, w) the sampled token at every position this step
    confidence: torch.Tensor  # (B, h, w) float32 log-prob (+ noise) of each sample; +inf where already known


@dataclass
class CallOptions:
    """The `__call__` arguments every task shares (documented on `AmusedPipeline.__call__`), as one object on
    their way to `_generate`; each task adds its own (its image, mask, strength, start grid)."""

    prompt: str | list[str] | None
    negative_prompt: str | list[str] | None
    num_inference_steps: int | None
    guidance_scale: float | None
    num_images_per_prompt: int
    generator: torch.Generator | None
    prompt_embeds: torch.Tensor | None
    encoder_hidden_states: torch.Tensor | None
    negative_prompt_embeds: torch.Tensor | None
    negative_encoder_hidden_states: torch.Tensor | None
    output_type: str
    return_dict: bool
    callback: Callable[[int, int, torch.Tensor], None] | None
    callback_steps: int
    return_steps: bool
    micro_conditioning_aesthetic_score: float
    micro_conditioning_crop_coord: tuple[int, int]
    temperature: float | tuple[float, float] | None
    sampler: str | None

    @classmethod
    def of(cls, call: dict[str, Any]) -> "CallOptions":
        """The shared options out of a task's `__call__` namespace (`locals()`)."""
        return cls(**{f.name: call[f.name] for f in fields(cls)})


@dataclass
class AmusedPipelineOutput:
    images: Any  # list of PIL images, (B, H, W, 3) numpy array, (B, 3, H, W) tensor, or (B, h, w) token ids
    steps: list[StepState] | None = None  # every decoding step, when called with return_steps=True


@dataclass
class PromptEmbeddings:
    """Text conditioning for one call, in guidance order: [negatives..., positives...] when guided; with composed
    guidance [negatives..., term 1..., ..., term K...] and the terms' weights, or, when the unconditional
    prediction's weight is 0 (`guidance.unconditional_weight`), [term 1..., ..., term K...] and the
    weights of terms 2..K (`guidance.guided_logits`: the first rows are the base the others mix around)."""

    hidden: torch.Tensor  # (rows, S, D): B rows, 2B guided, (1 + K) B composed (K B without the negatives)
    pooled: torch.Tensor  # (rows, P)
    weights: torch.Tensor | None = None  # (K, B) composed guidance weights (times the guidance scale), else None

    @property
    def parts(self) -> int:
        """Rows per sample of a guided call: 2, or 1 + K with composed guidance's K weights (an unguided call has
        1)."""
        return 1 + (self.weights.shape[0] if self.weights is not None else 1)


class AmusedPipeline:
    """Text-to-image; `AmusedImg2ImgPipeline` and `AmusedInpaintPipeline` add the image tasks.

    Args:
        vqvae: the VQGAN tokenizer.
        tokenizer: the text tokenizer (transformers).
        text_encoder: the text model (transformers; CLIPTextModelWithProjection for published checkpoints).
        transformer: the U-ViT.
        scheduler: mask token id and masking schedule.
    """

    default_schedule: str | None = None  # None: the scheduler's own
    default_strength: float | None = None
    family: Family = AMUSED  # the transformer and layout (components.py); Meissonic's pipelines set MEISSONIC
    task: str = "text"  # "text", "img2img" or "inpaint" (tasks.py)
    # Which random draws a seed selects. None (the default): diffusers' stream with a CPU generator or on the CPU,
    # so that a seeded CPU generator gives diffusers' images; on-device draws otherwise. False: always the fast
    # draws (on the CPU, inverse-CDF sampling: much faster with large codebooks). True: always diffusers' stream.
    # Every face sets it from its engine (`--reference-stream`).
    reference_stream: bool | None = None
    # How prompts "SUBJECT, STYLE style" are guided (amused.guidance.ComposedGuidance), from the checkpoint's
    # generation_config.json; None (every published checkpoint): ordinary guidance. Set it to None to turn it off.
    composed_guidance: ComposedGuidance | None = None

    def __init__(self, vqvae: VQGAN, tokenizer, text_encoder, transformer: UViT, scheduler: SchedulerConfig):
        if not isinstance(transformer, self.family.transformer):
            raise ValueError(f"transformer is a {type(transformer).__name__}; {type(self).__name__} runs a "
                             f"{self.family.transformer.__name__}")
        self.vqvae = vqvae
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.transformer = transformer
        self.scheduler = scheduler
        self.prompt_encoder = TextEncoder(text_encoder, tokenizer)
        self._negative_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._fast = None  # a FastDecoder once enable_fast() is called
        self.generation_defaults: dict[str, Any] = {}  # from generation_config.json, see resolve_defaults
        if scheduler.mask_token_id != transformer.config.mask_token_id:
            raise ValueError(f"scheduler mask_token_id {scheduler.mask_token_id} differs from the transformer's "
                             f"({transformer.config.mask_token_id} = vocab_size - 1)")

    # ------------------------------------------------------------------------------------------------------
    # Loading, saving, moving
    # ------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                        variant: str | None = None, allow_pickle: bool = False, cache_dir: str | None = None,
                        local_files_only: bool = False, device: str | torch.device | None = None,
                        **unused) -> "AmusedPipeline":
        """Load a checkpoint in the published layout from a folder or a hub id.

        Args:
            path_or_id: folder holding model_index.json, or a hub id such as "amused/amused-256".
            torch_dtype: dtype of the weights (float16 VQGAN weights are upcast when its config says
                force_upcast, as the reference decodes in float32).
            variant: weight-file variant, e.g. "fp16" for `*.fp16.safetensors`.
            allow_pickle: accept pickle weight files (.bin/.pt); off by default, they can run code.
            device: where to load the weights (straight from the files, no copy through the CPU); default the CPU.
        """
        if unused:
            raise TypeError(f"from_pretrained got unexpected arguments: {sorted(unused)}")
        parts, defaults = load_components(path_or_id, torch_dtype, variant, allow_pickle, cache_dir, local_files_only,
                                          device, cls.family)
        pipe = cls(**parts)
        pipe.generation_defaults = defaults
        if "composed_guidance" in defaults:  # checked by load_components
            pipe.composed_guidance = ComposedGuidance.from_config(defaults["composed_guidance"])
        return pipe

    def save_pretrained(self, folder: str | os.PathLike, variant: str | None = None) -> None:
        """Write the published layout (diffusers can read it too)."""
        save_components(self, folder, variant)

    @classmethod
    def from_pipe(cls, pipe: "AmusedPipeline") -> "AmusedPipeline":
        """The same components (shared, not copied) behind another task's entry point, in `pipe`'s model family:
        `AmusedInpaintPipeline.from_pipe(a Meissonic pipeline)` is a `MeissonicInpaintPipeline` (a subclass), so
        callers need not know the family."""
        if pipe.family is not cls.family:
            from .tasks import pipeline_class

            cls = pipeline_class(pipe.family, cls.task)
        new = cls(pipe.vqvae, pipe.tokenizer, pipe.text_encoder, pipe.transformer, pipe.scheduler)
        new.generation_defaults = pipe.generation_defaults
        new._fast = pipe._fast  # the same modules, so the same graphs serve every task
        new.reference_stream = pipe.reference_stream
        new.composed_guidance = pipe.composed_guidance
        return new

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def vae_scale_factor(self) -> int:
        return self.vqvae.config.scale_factor

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "AmusedPipeline":
        """Move every component; float16 keeps the VQGAN in float32 when its config says force_upcast."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        for module in (self.transformer, self.text_encoder):
            module.to(device=device, dtype=dtype)
        vq_dtype = torch.float32 if dtype == torch.float16 and self.vqvae.config.force_upcast else dtype
        self.vqvae.to(device=device, dtype=vq_dtype)
        self._negative_cache.clear()
        self._fast = None  # graphs hold device buffers: capture again after enable_fast()
        return self

    # ------------------------------------------------------------------------------------------------------
    # Conditioning
    # ------------------------------------------------------------------------------------------------------

    def _encode(self, prompts: list[str], name: str = "prompt") -> tuple[torch.Tensor, torch.Tensor]:
        """Text states and pooled vectors; warns about prompts cut to the encoder's length (`name`: the argument)."""
        encode = self._fast.encode if self._fast is not None else self.prompt_encoder
        hidden, pooled = encode(prompts, name)
        return hidden.to(self.dtype), pooled.to(self.dtype)

    def _encode_negative(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Negative prompts; the all-empty case (the default) is encoded once and cached."""
        if any(prompts):
            return self._encode(prompts, "negative_prompt")
        key = (self.device, self.dtype)
        if key not in self._negative_cache:
            self._negative_cache[key] = self._encode([""])
        hidden, pooled = self._negative_cache[key]
        return hidden.expand(len(prompts), -1, -1), pooled.expand(len(prompts), -1)

    def encode_prompt(self, prompt: str | list[str] | None, negative_prompt: str | list[str] | None,
                      num_images_per_prompt: int, guided: bool, prompt_embeds=None, encoder_hidden_states=None,
                      negative_prompt_embeds=None, negative_encoder_hidden_states=None,
                      composed: ComposedGuidance | None = None, guidance_scale: float | None = None
                      ) -> PromptEmbeddings:
        """Text conditioning in the order the guided batch uses: [negatives..., positives...]; with `composed`
        (guided text prompts only) [negatives..., term 1..., ..., term K...] and the terms' weights, unless no
        prompt has a style part; without the negatives when the unconditional prediction's weight is 0 at
        `guidance_scale` (`guidance.unconditional_weight`; a negative prompt then has no effect)."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` or `prompt_embeds`")
        if (prompt_embeds is None) != (encoder_hidden_states is None):
            raise ValueError("pass both `prompt_embeds` and `encoder_hidden_states`, or neither")
        if (negative_prompt_embeds is None) != (negative_encoder_hidden_states is None):
            raise ValueError("pass both `negative_prompt_embeds` and `negative_encoder_hidden_states`, or neither")
        split = None  # composed guidance's (texts, weights) of the terms
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else []
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise ValueError("`prompt` must be a string or a non-empty list of strings")
            hidden, pooled = self._encode(prompts)
            split = composed.terms(prompts) if composed is not None and guided else None
            if split is not None:  # each term's states (the whole prompt's are already encoded), in one batch
                others = [t for (term, _), t in zip(composed.weights, split[0]) if term != "prompt"]
                n = len(prompts)
                flat = [t for texts in others for t in texts]
                more = self._encode(flat) if flat else (hidden[:0], pooled[:0])
                parts = iter(zip(more[0].split(n), more[1].split(n)))
                terms = [(hidden, pooled) if term == "prompt" else next(parts) for term, _ in composed.weights]
                hidden, pooled = torch.cat([h for h, _ in terms]), torch.cat([p for _, p in terms])
        else:
            hidden, pooled = encoder_hidden_states.to(self.device, self.dtype), prompt_embeds.to(self.device, self.dtype)
        k = 1 if split is None else split[1].shape[0]
        n = hidden.shape[0] // k
        # Tiled (p1, p2, p1, p2, ...) as the reference repeats them, so seeds give the same images; each term alike.
        if num_images_per_prompt > 1:
            hidden = hidden.reshape(k, n, *hidden.shape[1:]).repeat(1, num_images_per_prompt, 1, 1).flatten(0, 1)
            pooled = pooled.reshape(k, n, -1).repeat(1, num_images_per_prompt, 1).flatten(0, 1)
        if not guided:
            return PromptEmbeddings(hidden, pooled)
        weights = None if split is None else split[1].repeat(1, num_images_per_prompt)  # (K, images)
        if weights is not None and guidance_scale is not None and \
                unconditional_weight(weights, guidance_scale).abs().max() < 1e-6:
            named = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt or [])
            if any(named) or negative_prompt_embeds is not None:  # "" (the faces' "none") is the unconditional
                warnings.warn("the negative prompt has no effect here: this checkpoint's composed guidance gives "
                              "the unconditional prediction weight 0 at this guidance_scale", stacklevel=3)
            return PromptEmbeddings(hidden, pooled, weights[1:].to(self.device))
        if negative_prompt_embeds is not None:
            neg_hidden = negative_encoder_hidden_states.to(self.device, self.dtype)
            neg_pooled = negative_prompt_embeds.to(self.device, self.dtype)
        else:
            negatives = [""] * n if negative_prompt is None else (
                [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt))
            if len(negatives) != n:
                raise ValueError(f"negative_prompt has {len(negatives)} entries for {n} prompts; give one string "
                                 f"for all, or one per prompt")
            neg_hidden, neg_pooled = self._encode_negative(negatives)
        if neg_hidden.shape[0] == 1 and n > 1:
            neg_hidden, neg_pooled = neg_hidden.expand(n, -1, -1), neg_pooled.expand(n, -1)
        if neg_hidden.shape[0] != n:
            raise ValueError(f"negative embeddings have batch {neg_hidden.shape[0]}, prompts have {n}")
        if num_images_per_prompt > 1:
            neg_hidden = neg_hidden.repeat(num_images_per_prompt, 1, 1)
            neg_pooled = neg_pooled.repeat(num_images_per_prompt, 1)
        return PromptEmbeddings(torch.cat([neg_hidden, hidden]), torch.cat([neg_pooled, pooled]),
                                None if weights is None else weights.to(self.device))

    # ------------------------------------------------------------------------------------------------------
    # The shared generation path
    # ------------------------------------------------------------------------------------------------------

    def logits_fn(self, embeds: PromptEmbeddings, micro_conds: torch.Tensor, guidance_scale: float | torch.Tensor,
                  model: Callable | None = None, grid: tuple[int, int] | None = None
                  ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """(tokens (B, h, w), timestep) -> guided logits (B, V, h, w), through `model` (default: the transformer);
        `guidance_scale`: g, or composed guidance's (K, B) weights (`guidance.guided_logits`); `grid`: the (h, w)
        token grid of the call (Meissonic builds its rotary table for it once)."""
        model = model or self.transformer
        ctx = model.condition(embeds.hidden, embeds.pooled, micro_conds, grid=grid)  # once per call, not per step
        return lambda tokens, timestep: guided_logits(model, tokens, ctx, guidance_scale, timestep)

    def resolve_defaults(self, num_inference_steps, guidance_scale, temperature):
        """Arguments left as None take the checkpoint's `generation_config.json` values, else the family's
        reference pipeline's (diffusers' aMUSEd: 12 steps, guidance 10; Meissonic: 48 steps, guidance 9)."""
        d = {**self.family.defaults, **self.generation_defaults}
        return (d["num_inference_steps"] if num_inference_steps is None else num_inference_steps,
                d["guidance_scale"] if guidance_scale is None else guidance_scale,
                tuple(d["temperature"]) if temperature is None else temperature)

    def resolve_sampler(self, sampler: str | None) -> str:
        """`sampler` checked, or the checkpoint's default (generation_config.json), else "confidence"."""
        sampler = {**self.family.defaults, **self.generation_defaults}["sampler"] if sampler is None else sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        return sampler

    def _check_common(self, num_inference_steps, guidance_scale, num_images_per_prompt, output_type):
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if not isinstance(guidance_scale, (int, float)) or guidance_scale != guidance_scale \
                or guidance_scale in (float("inf"), float("-inf")):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")

    @property
    def size_multiple(self) -> int:
        """Pixel sizes must be multiples of this: the VQ factor, twice it when the U-ViT halves the token grid."""
        return self.vae_scale_factor * (2 if self.transformer.config.downsample else 1)

    def check_size(self, height: int, width: int, name: str) -> None:
        """Refuse pixel sizes the VQ-GAN and the U-ViT cannot tile; `name` is the argument the size came from.
        One rule, stated once, with the nearest sizes that work."""
        f = self.size_multiple
        bad = [v for v in (height, width) if not isinstance(v, int) or v < f or v % f]
        if bad:
            v = bad[0]
            near = sorted({max(f, (v // f) * f), max(f, -(-v // f) * f)}) if isinstance(v, int) else [f]
            raise ValueError(f"{name} {width}x{height} (width x height): each side must be a positive multiple of {f} "
                             f"for this model; nearest for {v!r}: {' or '.join(map(str, near))}")
        limit = MAX_SAMPLE_SIZE * self.vae_scale_factor  # memory grows with the token count (attention: its square)
        if max(height, width) > limit:
            raise ValueError(f"{name} {width}x{height} (width x height): at most {limit} pixels a side for this model "
                             f"({MAX_SAMPLE_SIZE} tokens of {self.vae_scale_factor} px)")

    @torch.inference_mode()
    def _generate(self, o: CallOptions, *, tokens_fn, height: int, width: int, schedule: str | None):
        """The decode every task shares: `o` carries the task's `__call__` options, `tokens_fn(batch, h, w)` gives
        the starting grid (`StartGrid`), `schedule` the masking schedule (None: the scheduler's)."""
        num_inference_steps, guidance_scale, temperature = self.resolve_defaults(o.num_inference_steps,
                                                                                 o.guidance_scale, o.temperature)
        sampler = self.resolve_sampler(o.sampler)
        output_type, generator, callback, callback_steps = o.output_type, o.generator, o.callback, o.callback_steps
        self._check_common(num_inference_steps, guidance_scale, o.num_images_per_prompt, output_type)
        self.check_size(height, width, "height/width")
        guided = guidance_scale > 1.0
        embeds = self.encode_prompt(o.prompt, o.negative_prompt, o.num_images_per_prompt, guided, o.prompt_embeds,
                                    o.encoder_hidden_states, o.negative_prompt_embeds,
                                    o.negative_encoder_hidden_states, self.composed_guidance, guidance_scale)
        batch = embeds.hidden.shape[0] // embeds.parts if guided else embeds.hidden.shape[0]
        guidance = guidance_scale if embeds.weights is None else embeds.weights * guidance_scale
        crop_top, crop_left = o.micro_conditioning_crop_coord
        micro_conds = torch.tensor([width, height, crop_top, crop_left, o.micro_conditioning_aesthetic_score],
                                   dtype=embeds.hidden.dtype).to(self.device, non_blocking=True)  # not blocking:
        # the host goes on preparing the decode while the text encoder's kernels run
        micro_conds = micro_conds[None].expand(embeds.hidden.shape[0], -1)  # (B or 2B, 5)

        f = self.vae_scale_factor
        start = tokens_fn(batch, height // f, width // f)
        draw = _draw_for(generator, self.device, self.reference_stream)
        steps: list[StepState] | None = [] if o.return_steps else None

        def on_step(i, result):  # the loop's hook: record steps and/or call the user's callback
            shape = start.tokens.shape
            if steps is not None:
                steps.append(StepState(i, result.tokens.view(shape).cpu(), result.predicted.view(shape).cpu(),
                                       result.confidence.view(shape).float().cpu()))
            if callback is not None and ((i - start.start_step) % callback_steps == 0 or i == num_inference_steps - 1):
                callback(i, num_inference_steps - 1 - i, result.tokens.view(shape))

        user_callback = on_step if (callback is not None or o.return_steps) else None
        schedule = schedule or self.scheduler.masking_schedule
        images = None
        if self._fast is not None and draw == "gumbel" and self._fast.supports(generator):
            tokens, images, records = self._fast.run(
                embeds=embeds, micro_conds=micro_conds, guidance_scale=guidance, start=start,
                num_steps=num_inference_steps, schedule=schedule, temperature=temperature, generator=generator,
                record=user_callback is not None, order=sampler)
            tokens = tokens.clone()  # graph outputs are overwritten by the next replay (images: by _finish)
            if records is not None:  # the graph recorded every step; hand them out now, in order
                B = start.tokens.shape[0]
                for i in range(start.start_step, num_inference_steps):
                    on_step(i, sampling.StepResult(*(records[k][i].view(B, -1).clone()
                                                     for k in ("tokens", "predicted", "confidence"))))
        else:
            logits_fn = self.logits_fn(embeds, micro_conds, guidance, grid=tuple(start.tokens.shape[1:]))
            tokens = sampling.decode(logits_fn, start.tokens, num_steps=num_inference_steps,
                                     mask_token_id=self.scheduler.mask_token_id, start_step=start.start_step,
                                     schedule=schedule, temperature=temperature, total=start.total, draw=draw,
                                     generator=generator, callback=user_callback, order=sampler)
        images = tokens if output_type == "latent" else self._finish(tokens, images, output_type)
        return AmusedPipelineOutput(images, steps) if o.return_dict else (images,)

    def _finish(self, tokens: torch.Tensor, images: torch.Tensor | None, output_type: str):
        """VQ-decode (unless done already) and convert to `output_type`, never handing out NaN/inf pixels: a
        reduced-precision decode that overflowed is redone in float32. The finiteness flag and the output come
        to the host together, so a call waits for the device once."""
        if images is None:
            images = self.vqvae.decode(tokens)
        for attempt in range(2):
            output = output_tensor(images, output_type)
            if output_type == "pt":
                output = output.clone() if output is images else output  # never the graph's own buffer
                finite = bool(torch.isfinite(output).all())
            else:
                output, finite = to_host(output, torch.isfinite(images).all())
                finite = bool(finite)
            if finite:
                return from_device(output, output_type)
            if attempt == 0:
                warnings.warn(f"the {self.vqvae.dtype} / reduced-precision VQ decode overflowed; decoding this call "
                              f"again in float32")
                images = self._decode_float32(tokens)
        raise FloatingPointError("the VQ decoder gives non-finite pixels even in float32: corrupt weights?")

    def _decode_float32(self, tokens: torch.Tensor) -> torch.Tensor:
        """VQ-decode in float32 for this call only: the shared VQGAN goes back to its dtype afterwards (a server's
        later calls keep their fast decode)."""
        dtype = self.vqvae.dtype
        try:
            with torch.autocast(self.device.type, enabled=False):
                return self.vqvae.float().decode(tokens).float()
        finally:
            self.vqvae.to(dtype)

    # ------------------------------------------------------------------------------------------------------
    # LoRA (amused.lora does the work; peft underneath)
    # ------------------------------------------------------------------------------------------------------

    def load_lora_weights(self, path: str | os.PathLike, scale: float = 1.0, adapter_name: str = "default") -> None:
        """Add the LoRA adapters of a safetensors file (from `amused finetune --use_lora`) at `scale`."""
        from . import lora

        lora.load_lora_weights(self, path, adapter_scale=scale, adapter_name=adapter_name)

    def set_lora_scale(self, scale: float) -> None:
        from . import lora

        lora.set_lora_scale(self, scale)

    def fuse_lora(self) -> None:
        """Merge the adapters into the weights (no LoRA cost per step; needed before enable_fast)."""
        from . import lora

        lora.fuse_lora(self)

    def unfuse_lora(self) -> None:
        from . import lora

        lora.unfuse_lora(self)

    def unload_lora_weights(self) -> None:
        from . import lora

        lora.unload_lora_weights(self)

    def enable_fast(self, compile: bool | str = True, vq_dtype: torch.dtype = torch.bfloat16, fuse: bool = True,
                    warmup: Sequence[int] = (), vq_group_norm: str = "chunked") -> "AmusedPipeline":
        """Serve calls from CUDA graphs of the whole decode (see `amused.fast`). Call after `.to("cuda")`.

        Args:
            compile: torch.compile before capture: True / "full" (a decoding step, U-ViT + guidance +
                sampling, as one graph, the text encoder and the VQ decoder; 15-50 s of warm-up per new shape at
                full size), "blocks" (the U-ViT's repeated blocks one by one: slower, 32.0 against 30.6 ms at
                amused-256 batch 1 on one H100 in session 3), or False.
            vq_dtype: dtype of the VQ decode inside the graph (bf16: no fp16 overflow).
            fuse: `UViT.fuse_projections` (fused Q/K/V; the per-call conditioning's projections as a few matmuls).
            warmup: batch sizes to capture now, at the native size with default settings, so that the
                first calls of a server or benchmark do not pay for compilation and capture.
            vq_group_norm: "chunked" computes the VQ decoder's group norms with `amused.group_norm` (same
                statistics, a parallel two-level reduction that compiles to fast kernels on channels-last
                activations); "native" keeps F.group_norm.
        """
        from .fast import FastDecoder, use_compile_cache

        if compile:
            use_compile_cache()  # compiled kernels kept on disk: a second start of the same model reuses them
        if self.device.type != "cuda":
            raise ValueError("enable_fast needs the pipeline on a CUDA device; call .to('cuda') first")
        for module in self.transformer.modules():
            if getattr(module, "merged", True) is False and hasattr(module, "lora_A"):
                raise ValueError("unfused LoRA adapters: call pipe.fuse_lora() before enable_fast() (the graph "
                                 "bakes fused projection weights)")
        self._fast = FastDecoder(self, compile=compile, vq_dtype=vq_dtype, fuse=fuse, vq_group_norm=vq_group_norm)
        for batch in warmup:
            self([""] * batch, output_type="latent")
        return self

    def _image_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, h, w) token ids."""
        return self.vqvae.encode(image.to(self.device, self.vqvae.dtype))

    # ------------------------------------------------------------------------------------------------------
    # Text-to-image
    # ------------------------------------------------------------------------------------------------------

    def __call__(self, prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 negative_encoder_hidden_states: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, callback: Callable[[int, int, torch.Tensor], None] | None = None,
                 callback_steps: int = 1, return_steps: bool = False,
                 micro_conditioning_aesthetic_score: float = 6,
                 micro_conditioning_crop_coord: tuple[int, int] = (0, 0),
                 temperature: float | tuple[float, float] | None = None, masking_schedule: str | None = None,
                 sampler: str | None = None):
        """Generate images from text.

        Args:
            prompt: a prompt or a list of prompts.
            height, width: output size in pixels, multiples of the VQ factor (default: the model's native size).
            num_inference_steps: decoding steps (12, or the checkpoint's generation_config.json).
            guidance_scale: classifier-free guidance weight; > 1 turns guidance on (10, or the checkpoint's).
            negative_prompt: one string for all prompts, or one per prompt ("" by default).
            num_images_per_prompt: images for each prompt.
            generator: seeds every random draw; a CPU generator reproduces diffusers' images.
            latents: (B, h, w) starting token grid (mask token where to generate).
            prompt_embeds, encoder_hidden_states: precomputed pooled / per-token text embeddings.
            negative_prompt_embeds, negative_encoder_hidden_states: the same for the negative prompt.
            output_type: "pil", "np", "pt" or "latent" (token ids).
            callback: `callback(step, timestep, tokens)` every `callback_steps` steps.
            return_steps: also return every step's tokens and confidences (`.steps`; see amused.steps for
                frames, heat maps and GIFs).
            micro_conditioning_aesthetic_score: aesthetic score to condition on (6).
            micro_conditioning_crop_coord: (top, left) crop to condition on.
            temperature: (start, end) of the confidence-noise temperature ramp ((2, 0), or the checkpoint's).
            masking_schedule: "cosine" or "linear" (default: the scheduler's).
            sampler: which samples stay revealed each step: "confidence" (MaskGIT) or "halton" (a fixed Halton
                order of positions, Besnier et al. 2025); default: the checkpoint's, else "confidence".

        Returns:
            `AmusedPipelineOutput` with `.images`, or a 1-tuple when `return_dict=False`.
        """
        native = self.transformer.config.sample_size * self.vae_scale_factor
        height = native if height is None else height
        width = native if width is None else width

        def tokens_fn(batch, h, w):
            if latents is not None:
                if tuple(latents.shape) != (batch, h, w):
                    raise ValueError(f"latents must have shape {(batch, h, w)}, got {tuple(latents.shape)}")
                return StartGrid(latents.to(self.device, torch.long), 0, None)
            return StartGrid(torch.full((batch, h, w), self.scheduler.mask_token_id, device=self.device), 0, None)

        return self._generate(CallOptions.of(locals()), tokens_fn=tokens_fn, height=height, width=width,
                              schedule=masking_schedule)


@dataclass
class StartGrid:
    tokens: torch.Tensor  # (B, h, w) with mask tokens where to generate
    start_step: int  # first step of the schedule to run
    total: torch.Tensor | None  # (B,) tokens the schedule spreads over; None: those unknown at the start


def _draw_for(generator: torch.Generator | None, device: torch.device, reference_stream: bool | None) -> str:
    """The random draws of a call (sampling.py): diffusers' stream ("reference") when `reference_stream` is True,
    or when it is None and the generator or the device is the CPU; otherwise the fast draws: on-device Gumbel
    draws ("gumbel", no host sync) on an accelerator with a generator there (or none), inverse-CDF draws
    ("cdf") on the CPU or from a CPU generator."""
    on_cpu = device.type == "cpu" or (generator is not None and generator.device.type == "cpu")
    if reference_stream or (reference_stream is None and on_cpu):
        return "reference"
    return "cdf" if on_cpu else "gumbel"


def start_step_for(num_inference_steps: int, strength: float) -> int:
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:  # checked before it is used here
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    if not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    steps = int(num_inference_steps * strength)
    if steps < 1:
        raise ValueError(f"strength {strength} with num_inference_steps {num_inference_steps} runs no step; raise "
                         f"either")
    return num_inference_steps - steps


def broadcast(tokens: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Image batch -> prompt batch: one image serves every prompt; otherwise one image per prompt."""
    if tokens.shape[0] == batch:
        return tokens
    if batch % tokens.shape[0]:
        raise ValueError(f"{name} has batch {tokens.shape[0]}, which does not divide the {batch} images to make")
    return tokens.repeat(batch // tokens.shape[0], *([1] * (tokens.ndim - 1)))
