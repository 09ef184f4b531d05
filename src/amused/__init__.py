"""amused: aMUSEd masked-token text-to-image generation (arXiv 2401.01808) in plain PyTorch."""

from .images import load_image, make_image_grid
from .components import SchedulerConfig
from .embedded import embedded_model_path
from .pipeline import AmusedPipeline, AmusedPipelineOutput
from .pipeline_img2img import AmusedImg2ImgPipeline
from .pipeline_inpaint import AmusedInpaintPipeline

__version__ = "0.1.0"

__all__ = ["AmusedPipeline", "AmusedImg2ImgPipeline", "AmusedInpaintPipeline", "AmusedPipelineOutput",
           "SchedulerConfig", "embedded_model_path", "load_image", "make_image_grid", "__version__"]
