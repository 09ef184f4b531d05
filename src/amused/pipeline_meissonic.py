"""Meissonic (Bai et al., arXiv 2410.08261; viiika/Meissonic) and Monetico (collovlabs/Monetico) on the same engine
as aMUSEd: the same three tasks, arguments, MaskGIT loop (`sampling.decode`), guidance, fast path and faces.

Only the transformer differs (`models.meissonic`: conditioned on the step's timestep, which the loop hands every
model), so each pipeline here is aMUSEd's with the Meissonic family (`components.MEISSONIC`): the published layout
of MeissonFlow/Meissonic and collovlabs/Monetico (model_index.json `_class_name` "Pipeline", transformer/
`Transformer2DModel`, vqvae/ `VQModel`, text_encoder/ `CLIPTextModelWithProjection`, tokenizer/, scheduler/), and
the reference pipeline's defaults: 48 steps, guidance 9, temperature (2, 0), or the checkpoint's
generation_config.json.

    pipe = MeissonicPipeline.from_pretrained("MeissonFlow/Meissonic", torch_dtype=torch.float16).to("cuda")
    image = pipe("a lighthouse at dusk", negative_prompt="blurry").images[0]      # 1024 px

Differences from the reference pipelines, on purpose (as for aMUSEd, see pipeline.py): img2img and inpainting
default to 48 steps and guidance 9 too (the reference's copies keep aMUSEd's 12 and 10); any size that the VQ
and the 2x downsampler tile works (the reference builds its rotary ids right only at 1024 px for Meissonic);
img2img at strength 1.0 regenerates everything; inpainting spreads the schedule over each sample's own mask.
"""

from __future__ import annotations

from .components import MEISSONIC
from .pipeline import AmusedPipeline
from .pipeline_img2img import AmusedImg2ImgPipeline
from .pipeline_inpaint import AmusedInpaintPipeline


class MeissonicPipeline(AmusedPipeline):
    """Text-to-image with Meissonic / Monetico; arguments as `AmusedPipeline.__call__`."""

    family = MEISSONIC


class MeissonicImg2ImgPipeline(AmusedImg2ImgPipeline):
    """Image-to-image with Meissonic / Monetico; arguments as `AmusedImg2ImgPipeline.__call__`."""

    family = MEISSONIC


class MeissonicInpaintPipeline(AmusedInpaintPipeline):
    """Inpainting (and, with `amused.outpaint.outpaint`, outpainting) with Meissonic / Monetico; arguments as
    `AmusedInpaintPipeline.__call__`."""

    family = MEISSONIC
