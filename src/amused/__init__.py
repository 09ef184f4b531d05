"""amused: aMUSEd masked-token text-to-image generation (arXiv 2401.01808) in plain PyTorch, and its successors
Meissonic / Monetico on the same engine."""

from .images import load_image, make_image_grid
from .components import SchedulerConfig
from .outpaint import outpaint
from .pipeline import AmusedPipeline, AmusedPipelineOutput
from .pipeline_img2img import AmusedImg2ImgPipeline
from .pipeline_inpaint import AmusedInpaintPipeline
from .pipeline_meissonic import MeissonicImg2ImgPipeline, MeissonicInpaintPipeline, MeissonicPipeline

__version__ = "0.1.0"

__all__ = ["AmusedPipeline", "AmusedImg2ImgPipeline", "AmusedInpaintPipeline", "AmusedPipelineOutput",
           "MeissonicPipeline", "MeissonicImg2ImgPipeline", "MeissonicInpaintPipeline", "SchedulerConfig",
           "load_image", "make_image_grid", "outpaint", "__version__"]
