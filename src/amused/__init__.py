"""amused: aMUSEd masked-token text-to-image generation (arXiv 2401.01808) in plain PyTorch."""

from .images import load_image, make_image_grid
from .pipeline import (AmusedImg2ImgPipeline, AmusedInpaintPipeline, AmusedPipeline, AmusedPipelineOutput,
                       SchedulerConfig)

__version__ = "0.1.0"

__all__ = ["AmusedPipeline", "AmusedImg2ImgPipeline", "AmusedInpaintPipeline", "AmusedPipelineOutput",
           "SchedulerConfig", "load_image", "make_image_grid", "__version__"]
