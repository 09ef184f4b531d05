"""Image-to-image with aMUSEd (diffusers' `AmusedImg2ImgPipeline`, same arguments): the image's tokens with a
`strength` fraction re-masked, entering the shared MaskGIT loop part-way. Unlike the reference, strength=1.0
regenerates the whole image (the reference masks almost nothing)."""

from __future__ import annotations

import torch

from . import sampling
from .images import ImageInput, image_size, preprocess_image, resize
from .pipeline import AmusedPipeline, CallOptions, StartGrid, broadcast, start_step_for


class AmusedImg2ImgPipeline(AmusedPipeline):
    """Image-to-image: re-generate a `strength` fraction of an image's tokens."""

    task = "img2img"

    def __call__(self, prompt: str | list[str] | None = None, image: ImageInput = None, strength: float = 0.5,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | None = None, prompt_embeds: torch.Tensor | None = None,
                 encoder_hidden_states: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 negative_encoder_hidden_states: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, callback=None, callback_steps: int = 1, return_steps: bool = False,
                 micro_conditioning_aesthetic_score: float = 6,
                 micro_conditioning_crop_coord: tuple[int, int] = (0, 0),
                 temperature: float | tuple[float, float] | None = None, masking_schedule: str | None = None,
                 height: int | None = None, width: int | None = None, sampler: str | None = None):
        """Like `AmusedPipeline.__call__`, plus:

        Args:
            image: the starting image(s), PIL / numpy / tensor in [0, 1]; its size must be a multiple of the VQ
                factor unless `height` and `width` are given (PIL images are then resized).
            strength: fraction of the schedule to run, in (0, 1]; 1.0 regenerates the whole image (0.5).
        """
        if image is None:
            raise ValueError("img2img needs `image`")
        num_inference_steps, guidance_scale, temperature = self.resolve_defaults(num_inference_steps,
                                                                                 guidance_scale, temperature)
        start_step = start_step_for(num_inference_steps, strength)
        schedule = masking_schedule or self.scheduler.masking_schedule
        if height is not None or width is not None:
            image = resize(image, height or image_size(image)[0], width or image_size(image)[1])
        pixels = preprocess_image(image, "image")
        self.check_size(pixels.shape[-2], pixels.shape[-1], "image")
        height, width = pixels.shape[-2:]

        def tokens_fn(batch, h, w):
            with torch.inference_mode():
                tokens = self._image_tokens(pixels)  # (Bi, h, w)
            if start_step > 0:
                ratio = sampling.mask_ratios(num_inference_steps, schedule)[start_step - 1]
                draw = torch.rand(tokens.shape, generator=generator,
                                  device=generator.device if generator is not None else tokens.device)
                tokens = torch.where(draw.to(tokens.device) < ratio.to(tokens.device),
                                     self.scheduler.mask_token_id, tokens)
            else:
                tokens = torch.full_like(tokens, self.scheduler.mask_token_id)
            tokens = broadcast(tokens.repeat(num_images_per_prompt, 1, 1), batch, "image")
            total = torch.full((batch,), h * w, device=tokens.device)  # img2img enters the full-grid schedule
            return StartGrid(tokens, start_step, total)

        return self._generate(CallOptions.of(locals()), tokens_fn=tokens_fn, height=height, width=width,
                              schedule=schedule)
