"""Inpainting with aMUSEd (diffusers' `AmusedInpaintPipeline`, same arguments): the tokens under the mask start
masked, the rest are kept and never re-masked; the schedule spreads over each sample's own masked region. Linear
schedule by default, as the reference's inpainting, without switching the shared scheduler for everyone."""

from __future__ import annotations

import torch

from .images import ImageInput, image_size, preprocess_image, preprocess_mask
from .pipeline import AmusedPipeline, CallOptions, StartGrid, broadcast, start_step_for


class AmusedInpaintPipeline(AmusedPipeline):
    """Inpainting: re-generate the tokens under a mask, keep the rest. Linear schedule by default, as the
    reference uses for this task, without changing the shared scheduler."""

    task = "inpaint"

    def __call__(self, prompt: str | list[str] | None = None, image: ImageInput = None,
                 mask_image: ImageInput = None, strength: float = 1.0, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, negative_prompt: str | list[str] | None = None,
                 num_images_per_prompt: int = 1, generator: torch.Generator | None = None,
                 prompt_embeds: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 negative_encoder_hidden_states: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, callback=None, callback_steps: int = 1, return_steps: bool = False,
                 micro_conditioning_aesthetic_score: float = 6,
                 micro_conditioning_crop_coord: tuple[int, int] = (0, 0),
                 temperature: float | tuple[float, float] | None = None, masking_schedule: str = "linear",
                 sampler: str | None = None):
        """Like `AmusedPipeline.__call__`, plus:

        Args:
            image: the image(s) to edit, PIL / numpy / tensor in [0, 1], size a multiple of the VQ factor.
            mask_image: white (>= 0.5) where to regenerate; same size as `image`.
            strength: fraction of the schedule to run, in (0, 1] (1.0).
            masking_schedule: "linear" (default, as the reference's inpainting) or "cosine".
        """
        if image is None or mask_image is None:
            raise ValueError("inpainting needs both `image` and `mask_image`")
        num_inference_steps, guidance_scale, temperature = self.resolve_defaults(num_inference_steps,
                                                                                 guidance_scale, temperature)
        start_step = start_step_for(num_inference_steps, strength)
        pixels = preprocess_image(image, "image")
        height, width = pixels.shape[-2:]
        self.check_size(height, width, "image")
        mask_h, mask_w = image_size(mask_image, "mask_image")
        if (mask_h, mask_w) != (height, width):
            raise ValueError(f"mask_image is {mask_w}x{mask_h} but image is {width}x{height} (width x height); "
                             f"they must match")
        f = self.vae_scale_factor
        mask = preprocess_mask(mask_image, height // f, width // f)  # (Bm, h, w) bool

        def tokens_fn(batch, h, w):
            with torch.inference_mode():
                tokens = self._image_tokens(pixels)  # (Bi, h, w)
            n = max(tokens.shape[0], mask.shape[0])
            tokens = broadcast(tokens, n, "image")
            region = broadcast(mask.to(tokens.device), n, "mask_image")
            if not region.any(dim=(1, 2)).all():  # one check before decoding, not in the loop
                raise ValueError(f"mask_image covers no token at the VQ resolution ({f}x{f} px per token, a token "
                                 f"counts when the mask covers about half of it); mark a larger area")
            tokens = torch.where(region, self.scheduler.mask_token_id, tokens)
            tokens = broadcast(tokens.repeat(num_images_per_prompt, 1, 1), batch, "image")
            return StartGrid(tokens, start_step, None)  # the schedule spreads over each sample's own region

        return self._generate(CallOptions.of(locals()), tokens_fn=tokens_fn, height=height, width=width,
                              schedule=masking_schedule)
