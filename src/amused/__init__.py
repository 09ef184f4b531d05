"""amused: aMUSEd masked-token text-to-image generation (arXiv 2401.01808) in plain PyTorch, and its successors
Meissonic / Monetico on the same engine."""

import os

# OpenMP threads sleep at barriers instead of spinning (read once, when torch loads its OpenMP runtime): spinning
# threads made a CPU call 7-9x slower on two cores that another job shared (docs/reliability.md, CPU threads).
# A value the user set wins; without effect if torch was imported before amused.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .images import load_image, make_image_grid
from .components import SchedulerConfig
from .embedded import embedded_model_path
from .outpaint import outpaint
from .pipeline import AmusedPipeline, AmusedPipelineOutput
from .pipeline_img2img import AmusedImg2ImgPipeline
from .pipeline_inpaint import AmusedInpaintPipeline
from .pipeline_meissonic import MeissonicImg2ImgPipeline, MeissonicInpaintPipeline, MeissonicPipeline

__version__ = "0.1.0"

__all__ = ["AmusedPipeline", "AmusedImg2ImgPipeline", "AmusedInpaintPipeline", "AmusedPipelineOutput",
           "MeissonicPipeline", "MeissonicImg2ImgPipeline", "MeissonicInpaintPipeline", "SchedulerConfig",
           "embedded_model_path", "load_image", "make_image_grid", "outpaint", "__version__"]
