"""Which pipeline class runs a task for a model family, so that the runtime and the faces need not know the
family: `pipeline_class(pipe.family, "inpaint")`."""

from __future__ import annotations

TASKS = ("text", "img2img", "inpaint")


def pipeline_class(family, task: str) -> type:
    """The pipeline class of `task` ("text", "img2img", "inpaint") for `family` (a `components.Family`)."""
    from .pipeline import AmusedPipeline
    from .pipeline_img2img import AmusedImg2ImgPipeline
    from .pipeline_inpaint import AmusedInpaintPipeline
    from .pipeline_meissonic import MeissonicImg2ImgPipeline, MeissonicInpaintPipeline, MeissonicPipeline

    table = {"amused": (AmusedPipeline, AmusedImg2ImgPipeline, AmusedInpaintPipeline),
             "meissonic": (MeissonicPipeline, MeissonicImg2ImgPipeline, MeissonicInpaintPipeline)}
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return table[family.name][TASKS.index(task)]
