"""Web demo: `amused demo` serves text to image, inpainting with a mask drawn in the browser and image to image
(Gradio), with a view into masked decoding: the token grid filling in step by step beside a heat map of how
confident the model was of each token it kept (masked image modeling's interpretability, MUSE arXiv 2301.00704).

    amused demo                                   # the embedded emoji model on http://127.0.0.1:7860
    amused demo --model amused/amused-256 --port 8000

The module reads top to bottom: plain handler functions of (pipeline, form values) that return images and
frames (unit-tested without a browser), then `build_demo(pipe)` wiring them into a `gr.Blocks`, then `launch`
and the CLI command. Gradio is imported inside functions, so `amused --help` stays fast and gradio stays an
optional dependency (`pip install 'amused-mim[demo]'`). Pipeline errors (ValueError naming the argument) become
`gr.Error`, which the page shows as a message instead of failing the request.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import numpy as np
import PIL.Image
import torch

from .images import flatten_alpha
from .runtime import add_runtime_args, make_generator
from .steps import MASK_GREY, confidence_map, save_gif, step_frames

EXAMPLES = ["red apple, openmoji style", "grinning face, google style", "face with tears of joy, google style",
            "red heart, twitter style", "smiling face with sunglasses, google style", "cat face, twitter style"]
INPAINT_START = ("grinning face, google style", 0)  # (prompt, seed) of the image the edit tabs start with
INPAINT_EXAMPLES = ["face with tears of joy, google style", "smiling face with sunglasses, google style",
                    "grinning face, twitter style"]
IMG2IMG_EXAMPLES = ["face with tears of joy, google style", "grinning face, twitter style",
                    "smiling face with sunglasses, google style"]
DISPLAY_SIZE = 256  # small models' images are shown (and drawn on) upscaled to at least this many pixels
GIVEN_TINT = (215, 228, 250)  # heat-map colour of tokens given before decoding (inpainting, img2img)
FRAME_DELAY = 0.12  # seconds between streamed decoding frames

EPILOG = """examples:
  amused demo                                  # the embedded emoji model on http://127.0.0.1:7860
  amused demo --model amused/amused-256 --device cuda --port 8000
  amused demo --host 0.0.0.0 --share           # reachable from other machines / a public gradio.live link
"""


# ---------------------------------------------------------------------------------------------------------------
# Handlers: plain functions of the pipeline and the form values
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Options:
    """The settings every tab shares, in the order of the settings panel's components."""

    negative_prompt: str = ""
    num_inference_steps: int = 12
    guidance_scale: float = 3.0
    temperature_start: float = 1.0  # the confidence-noise temperature ramps from start to end over the steps
    temperature_end: float = 0.0
    seed: int = 0
    num_images: int = 1
    size: int | None = None  # side of the (square) output in pixels; None: the model's native size
    reference_stream: bool = False  # seeds draw diffusers' stream (a CPU generator) instead of on-device draws

    def pipe_kwargs(self, device) -> dict[str, Any]:
        """The pipeline arguments these settings stand for (a ValueError names a bad one)."""
        return dict(negative_prompt=self.negative_prompt or None,
                    num_inference_steps=_integer(self.num_inference_steps, "num_inference_steps"),
                    guidance_scale=_number(self.guidance_scale, "guidance_scale"),
                    temperature=(_number(self.temperature_start, "temperature start"),
                                 _number(self.temperature_end, "temperature end")),
                    num_images_per_prompt=_integer(self.num_images, "num_images_per_prompt"),
                    generator=make_generator(device, _integer(self.seed, "seed"), self.reference_stream))


def default_options(pipe) -> Options:
    """Settings prefilled from the checkpoint's generation defaults."""
    steps, guidance, temperature = pipe.resolve_defaults(None, None, None)
    t_start, t_end = temperature if isinstance(temperature, (tuple, list)) else (temperature, temperature)
    return Options(num_inference_steps=steps, guidance_scale=guidance, temperature_start=t_start,
                   temperature_end=t_end, size=native_size(pipe))


def native_size(pipe) -> int:
    return pipe.transformer.config.sample_size * pipe.vae_scale_factor


def _integer(value, name: str) -> int:
    if value is None or isinstance(value, bool) or float(value) != int(float(value)):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(float(value))


def _number(value, name: str) -> float:
    if value is None:
        raise ValueError(f"{name} must be a number, got nothing")
    return float(value)


@contextlib.contextmanager
def surface_errors() -> Iterator[None]:
    """Turn the pipeline's argument errors into `gr.Error`: a message on the page, not a failed request."""
    import gradio as gr

    try:
        yield
    except (ValueError, TypeError) as e:
        raise gr.Error(str(e), print_exception=False) from e


@dataclass
class Decoding:
    """What the decoding view shows; one per browser session (a gr.State)."""

    steps: list  # StepState of every decoding step (the pipeline's `return_steps=True` output)
    images: list[PIL.Image.Image]  # the finished images, for the "send to" buttons
    index: int = 0  # which image of the batch is shown
    show: str = "kept"  # "kept": decided tokens, undecided grey; "predicted": the model's full guess
    frames: list[PIL.Image.Image] = field(default_factory=list)  # step_frames for (index, show), made on demand


def decoding_frames(pipe, view: Decoding) -> list[PIL.Image.Image]:
    """One image per step of the token grid, upscaled for small models (cached on the view)."""
    if not view.frames:
        scale = max(1, DISPLAY_SIZE // view.images[view.index].width)
        view.frames = step_frames(pipe, view.steps, index=view.index, show=view.show, scale=scale)
    return view.frames


def step_view(pipe, view: Decoding, step: int) -> tuple[PIL.Image.Image, PIL.Image.Image, str]:
    """(token grid, confidence heat map, caption) of step `step` (1-based, as the slider counts)."""
    frames = decoding_frames(pipe, view)
    i = min(max(int(step), 1), len(frames)) - 1
    frame = frames[i]
    status = token_status(pipe, view.steps[:i + 1], view.index)
    caption = (f"**Step {i + 1} of {len(frames)}** (image {view.index + 1}): {int(status.kept.sum())} of "
               f"{status.kept.numel()} tokens decided, {int(status.new.sum())} of them at this step. Grey: still "
               f"masked. Heat map: each token's confidence when it was decided, dark = unsure, yellow = sure; "
               f"pale blue = given, not generated.")
    return frame, heat_map(status, frame), caption


@dataclass
class TokenStatus:
    """Where each token of one image stands after some steps (all (h, w) tensors)."""

    confidence: torch.Tensor  # confidence at the step that decided the token; +inf where given, 0 if undecided
    kept: torch.Tensor  # bool: decided (or given)
    new: torch.Tensor  # bool: decided at the last step
    given: torch.Tensor  # bool: known before decoding (inpainting outside the mask, img2img's kept tokens)


def token_status(pipe, steps: list, index: int) -> TokenStatus:
    """Fold the first k steps' StepStates into each token's status (the confidence that got it kept)."""
    mask_id = pipe.scheduler.mask_token_id
    first = steps[0]
    given = torch.isinf(first.confidence[index]) & (first.tokens[index] != mask_id)
    confidence = torch.where(given, float("inf"), 0.0)  # (h, w)
    new = given
    for state in steps:
        new = (state.tokens[index] != mask_id) & torch.isfinite(state.confidence[index])  # kept at this step
        confidence[new] = state.confidence[index][new].float()
    return TokenStatus(confidence, steps[-1].tokens[index] != mask_id, new, given)


def heat_map(status: TokenStatus, frame: PIL.Image.Image) -> PIL.Image.Image:
    """The confidences as a heat map the size of `frame`: undecided tokens grey, given ones `frame` faded to pale
    blue (a colour the heat ramp does not use)."""
    heat = np.array(confidence_map(SimpleNamespace(confidence=status.confidence[None]), 0))  # (h, w, 3) uint8
    heat[~status.kept.numpy()] = round(MASK_GREY * 255)
    heat = PIL.Image.fromarray(heat).resize(frame.size, PIL.Image.NEAREST)
    if not status.given.any():
        return heat
    faded = PIL.Image.blend(frame.convert("RGB"), PIL.Image.new("RGB", frame.size, GIVEN_TINT), 0.7)
    given = PIL.Image.fromarray(status.given.numpy().astype(np.uint8) * 255).resize(frame.size, PIL.Image.NEAREST)
    return PIL.Image.composite(faded, heat, given)


def write_gif(pipe, view: Decoding, folder: Path) -> str:
    """The current decoding as a looping GIF in `folder`; returns its path."""
    path = folder / uuid.uuid4().hex[:8] / "amused-decoding.gif"
    path.parent.mkdir()
    save_gif(decoding_frames(pipe, view), path)
    return str(path)


def _stream(pipe, images: list[PIL.Image.Image], steps: list, folder: Path, frame_delay: float):
    """Yield the outputs (gallery, grid frame, heat map, step slider, caption, GIF, view) frame by frame: the
    decoding replayed step by step, then the finished images and the GIF."""
    import gradio as gr

    view = Decoding(steps=steps, images=images)
    n = len(steps)
    for step in range(1, n + 1):
        frame, heat, caption = step_view(pipe, view, step)
        slider = gr.Slider(minimum=1, maximum=n, value=step, step=1, interactive=step == n)
        if step < n:
            yield gr.skip(), frame, heat, slider, caption, gr.skip(), gr.skip()
            time.sleep(frame_delay)
        else:
            yield images, frame, heat, slider, caption, write_gif(pipe, view, folder), view


def _progress_callback(progress: Callable | None, num_steps: int):
    if progress is None:
        return None
    return lambda i, _t, _tokens: progress((i + 1, num_steps), desc="decoding")


def text_to_image_call(pipe, prompt: str, options: Options, progress: Callable | None = None):
    """The text-to-image tab's pipeline call (images and every decoding step), without the page."""
    kwargs = options.pipe_kwargs(pipe.device)
    size = native_size(pipe) if options.size is None else _integer(options.size, "size")
    return pipe(prompt, height=size, width=size, return_steps=True,
                callback=_progress_callback(progress, kwargs["num_inference_steps"]), **kwargs)


def text_to_image(pipe, prompt: str, options: Options, folder: Path, frame_delay: float = 0.0,
                  progress: Callable | None = None):
    """Generate `options.num_images` images of `prompt`; yields the outputs of the decoding stream."""
    with surface_errors():
        out = text_to_image_call(pipe, prompt, options, progress)
    yield from _stream(pipe, out.images, out.steps, folder, frame_delay)


def fit_square(image: PIL.Image.Image, size: int, resample=PIL.Image.LANCZOS) -> PIL.Image.Image:
    """Centre-crop to a square and resize to size x size."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    if side > size and resample == PIL.Image.LANCZOS:
        resample = PIL.Image.BOX  # exact for images we upscaled for display, an area average otherwise
    return square.resize((size, size), resample)


def as_image(value, name: str, mode: str | None = "RGB") -> PIL.Image.Image | None:
    """An uploaded image as gradio hands it over (a file path, with type="filepath") or a PIL image (the tabs'
    own outputs, tests), through the one image reader: PNG, JPEG or WebP, size checked before decoding."""
    from .images import load_image

    if value is None or isinstance(value, PIL.Image.Image):
        return value
    return load_image(value, mode=mode, name=name)


def editor_to_inputs(value: dict | None, size: int, grid: int) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """An ImageEditor value -> (image, mask): the background as the image and every drawn layer, united, as the
    mask (white = regenerate). The mask is snapped to the token grid: a token is regenerated when the strokes
    cover a twentieth of its cell, so a thin stroke still marks the tokens it crosses.

    Args:
        value: gr.ImageEditor's value: {"background", "layers", "composite"}, file paths (type="filepath") or
            PIL images.
        size: side of the square image the pipeline gets, in pixels.
        grid: tokens per side at that size (size // VQ factor).
    """
    background = as_image((value or {}).get("background"), "image", mode=None)
    if background is None:
        raise ValueError("image: upload an image to edit (or send one from the Text to image tab) first")
    layers = [as_image(layer, "mask layer", mode=None) for layer in value.get("layers") or [] if layer is not None]
    drawn = np.zeros((background.height, background.width), dtype=np.float32)
    for layer in layers:
        alpha = layer.convert("RGBA").resize(background.size, PIL.Image.NEAREST).getchannel("A")
        drawn = np.maximum(drawn, np.asarray(alpha, dtype=np.float32) / 255.0)  # (H, W)
    if not drawn.any():
        raise ValueError("mask_image: draw over the part of the image to regenerate with the brush first")
    image = fit_square(background.convert("RGB"), size)
    coverage = fit_square(PIL.Image.fromarray(drawn, mode="F"), grid, PIL.Image.BOX)  # (grid, grid) cell cover
    cells = PIL.Image.fromarray(((np.asarray(coverage) > 0.05) * 255).astype(np.uint8), mode="L")
    return image, cells.resize((size, size), PIL.Image.NEAREST)


def inpaint(pipe, prompt: str, editor: dict | None, options: Options, folder: Path, frame_delay: float = 0.0,
            progress: Callable | None = None):
    """Regenerate the tokens under the strokes drawn on the editor's image."""
    from .pipeline_inpaint import AmusedInpaintPipeline

    with surface_errors():
        kwargs = options.pipe_kwargs(pipe.device)
        size = native_size(pipe) if options.size is None else _integer(options.size, "size")
        pipe.check_size(size, size, "size")
        image, mask = editor_to_inputs(editor, size, size // pipe.vae_scale_factor)
        out = AmusedInpaintPipeline.from_pipe(pipe)(
            prompt, image=image, mask_image=mask, return_steps=True,
            callback=_progress_callback(progress, kwargs["num_inference_steps"]), **kwargs)
    yield from _stream(pipe, out.images, out.steps, folder, frame_delay)


def image_to_image(pipe, prompt: str, image: PIL.Image.Image | str | None, strength: float, options: Options,
                   folder: Path, frame_delay: float = 0.0, progress: Callable | None = None):
    """Re-generate a `strength` fraction of the image's tokens, guided by `prompt`."""
    from .pipeline_img2img import AmusedImg2ImgPipeline

    with surface_errors():
        image = as_image(image, "image")
        if image is None:
            raise ValueError("image: upload an image (or send one from the Text to image tab) first")
        kwargs = options.pipe_kwargs(pipe.device)
        size = native_size(pipe) if options.size is None else _integer(options.size, "size")
        pipe.check_size(size, size, "size")
        out = AmusedImg2ImgPipeline.from_pipe(pipe)(
            prompt, image=fit_square(flatten_alpha(image), size), strength=_number(strength, "strength"),
            return_steps=True, callback=_progress_callback(progress, kwargs["num_inference_steps"]), **kwargs)
    yield from _stream(pipe, out.images, out.steps, folder, frame_delay)


def for_display(image: PIL.Image.Image) -> PIL.Image.Image:
    """Nearest-upscale a small image (64 px emoji) so it can be seen and drawn on."""
    scale = max(1, DISPLAY_SIZE // max(image.size))
    return image.resize((image.width * scale, image.height * scale), PIL.Image.NEAREST)


# ---------------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------------

CSS = """
.pixelated img, .pixelated canvas { image-rendering: pixelated; }
.decoding-caption { min-height: 3em; }
"""


def theme():
    """Gradio's Soft theme with system fonts (the default theme fetches Google fonts; the demo works offline)."""
    import gradio as gr

    return gr.themes.Soft(primary_hue="orange", font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])


def _settings_panel(gr, pipe, defaults: Options, tab: str, expanded: bool = False):
    """The shared settings, in Options' field order."""
    f = pipe.vae_scale_factor
    native = native_size(pipe)
    with gr.Accordion("Settings", open=expanded):
        negative = gr.Textbox(label="Negative prompt", value=defaults.negative_prompt, placeholder="what to avoid")
        with gr.Row():
            steps = gr.Slider(1, 48, value=defaults.num_inference_steps, step=1, label="Steps")
            guidance = gr.Slider(0, 20, value=defaults.guidance_scale, step=0.5, label="Guidance")
        with gr.Row():
            t_start = gr.Slider(0, 5, value=defaults.temperature_start, step=0.1, label="Temperature start")
            t_end = gr.Slider(0, 5, value=defaults.temperature_end, step=0.1, label="Temperature end")
        with gr.Row():
            seed = gr.Number(value=defaults.seed, precision=0, label="Seed", elem_id=f"{tab}-seed")
            num_images = gr.Slider(1, 8, value=defaults.num_images, step=1, label="Images",
                                   elem_id=f"{tab}-images")
        size = gr.Slider(4 * f, 2 * native, value=native, step=f, label="Size (pixels, square)",
                         info=f"a multiple of the VQ factor {f}; the model was trained at {native}")
    return [negative, steps, guidance, t_start, t_end, seed, num_images, size]


@dataclass
class DecodingPanel:
    gallery: Any
    frame: Any
    heat: Any
    slider: Any
    caption: Any
    gif: Any
    show: Any
    view: Any

    @property
    def outputs(self) -> list:
        """The order `_stream` yields in."""
        return [self.gallery, self.frame, self.heat, self.slider, self.caption, self.gif, self.view]


def _decoding_panel(gr, tab: str) -> DecodingPanel:
    with gr.Group():
        with gr.Row():
            frame = gr.Image(label="Token grid, step by step", type="pil", format="png", interactive=False,
                             height=DISPLAY_SIZE + 48, elem_id=f"{tab}-grid", elem_classes=["pixelated"])
            heat = gr.Image(label="Confidence of each token", type="pil", format="png", interactive=False,
                            height=DISPLAY_SIZE + 48, elem_id=f"{tab}-heat", elem_classes=["pixelated"])
        slider = gr.Slider(1, 2, value=1, step=1, label="Decoding step", interactive=False, elem_id=f"{tab}-step")
    caption = gr.Markdown("Generate to watch the token grid fill in.", elem_id=f"{tab}-caption",
                          elem_classes=["decoding-caption"])
    gr.Markdown("**Results**: pick one to see its decoding")
    gallery = gr.Gallery(label="Results", show_label=False, columns=6, fit_columns=False, height=170,
                         object_fit="contain", format="png", elem_id=f"{tab}-gallery", elem_classes=["pixelated"],
                         interactive=False)
    with gr.Row():
        show = gr.Radio([("decided tokens", "kept"), ("model's full guess", "predicted")], value="kept",
                        label="Token grid shows", scale=2)
        gif = gr.DownloadButton("Download the decoding (GIF)", size="sm", scale=1, elem_id=f"{tab}-gif")
    return DecodingPanel(gallery, frame, heat, slider, caption, gif, show, gr.State(None))


def _wire_panel(gr, pipe, panel: DecodingPanel, folder: Path) -> None:
    """Scrub the steps, pick another image of the batch, switch kept/predicted."""

    def scrub(view, step):
        if view is None:
            return gr.skip(), gr.skip(), gr.skip()
        return step_view(pipe, view, step)

    def select(view, show, evt):
        if view is None:
            return (gr.skip(),) * 6
        view.index, view.show, view.frames = evt.index, show, []
        n = len(view.steps)
        return (*step_view(pipe, view, n), gr.Slider(value=n), write_gif(pipe, view, folder), view)

    select.__annotations__["evt"] = gr.SelectData  # a real class, not a string: gradio injects by annotation

    def switch(view, show, step):
        if view is None:
            return (gr.skip(),) * 5
        view.show, view.frames = show, []
        return (*step_view(pipe, view, step), write_gif(pipe, view, folder), view)

    panel.slider.input(scrub, [panel.view, panel.slider], [panel.frame, panel.heat, panel.caption])
    panel.gallery.select(select, [panel.view, panel.show],
                         [panel.frame, panel.heat, panel.caption, panel.slider, panel.gif, panel.view])
    panel.show.input(switch, [panel.view, panel.show, panel.slider],
                     [panel.frame, panel.heat, panel.caption, panel.gif, panel.view])


def build_demo(pipe, model_name: str = "the embedded emoji model", frame_delay: float = FRAME_DELAY,
               start_image: PIL.Image.Image | None = None, reference_stream: bool = False):
    """The demo page for `pipe` (not launched; see `launch`).

    Args:
        pipe: an `AmusedPipeline` (`amused.runtime.load_engine(...).pipe`); the inpainting and image-to-image tabs
            share its weights and its fast path.
        reference_stream: seeds draw diffusers' random stream (a CPU generator) rather than on-device draws.
        model_name: shown in the page header.
        frame_delay: seconds between streamed decoding frames (0 in tests).
        start_image: the image the inpainting and image-to-image tabs start with (default: generated now, with
            `INPAINT_START`).

    Returns:
        a `gr.Blocks`.
    """
    import gradio as gr

    defaults = default_options(pipe)
    if start_image is None:
        prompt, seed = INPAINT_START
        start_image = pipe(prompt, generator=make_generator(pipe.device, seed, reference_stream)).images[0]
    start = for_display(start_image)
    folder = Path(tempfile.mkdtemp(prefix="amused-demo-"))  # GIFs; gradio copies outputs into its cache

    with gr.Blocks(title="aMUSEd demo", analytics_enabled=False) as demo:
        gr.Markdown(f"# aMUSEd\nMasked-token text to image with {model_name} "
                    f"({native_size(pipe)} px, {defaults.num_inference_steps} steps by default). Every result comes "
                    f"with a view of its decoding: which tokens were decided at each step, and how sure the model "
                    f"was of them.")
        with gr.Tabs() as tabs:
            with gr.Tab("Text to image", id="text2image"):
                with gr.Row():
                    with gr.Column(scale=2):
                        t2i_prompt = gr.Textbox(label="Prompt", value=EXAMPLES[0], elem_id="text2image-prompt")
                        t2i_button = gr.Button("Generate", variant="primary", elem_id="text2image-run")
                        t2i_settings = _settings_panel(gr, pipe, defaults, "text2image", expanded=True)
                        gr.Examples([[e] for e in EXAMPLES], inputs=[t2i_prompt], label="Emoji prompts")
                        with gr.Row():
                            to_inpaint = gr.Button("Inpaint the selected image", size="sm",
                                                   elem_id="text2image-to-inpaint")
                            to_img2img = gr.Button("Image to image from it", size="sm",
                                                   elem_id="text2image-to-img2img")
                    with gr.Column(scale=3):
                        t2i_panel = _decoding_panel(gr, "text2image")
            with gr.Tab("Inpainting", id="inpaint"):
                with gr.Row():
                    with gr.Column(scale=2):
                        editor = gr.ImageEditor(
                            value=start, type="filepath", image_mode="RGBA", sources=["upload", "clipboard"],
                            label="Paint over what to regenerate", height=DISPLAY_SIZE + 150,
                            brush=gr.Brush(default_size=24, colors=["#ff00ff"], color_mode="fixed"),
                            eraser=gr.Eraser(default_size=24), transforms=[], layers=False,
                            elem_id="inpaint-editor", elem_classes=["pixelated"])
                        inp_prompt = gr.Textbox(label="Prompt for the painted region", value=INPAINT_EXAMPLES[0],
                                                elem_id="inpaint-prompt")
                        inp_button = gr.Button("Inpaint", variant="primary", elem_id="inpaint-run")
                        inp_settings = _settings_panel(gr, pipe, defaults, "inpaint")
                        gr.Examples([[e] for e in INPAINT_EXAMPLES], inputs=[inp_prompt], label="Emoji prompts")
                    with gr.Column(scale=3):
                        inp_panel = _decoding_panel(gr, "inpaint")
            with gr.Tab("Image to image", id="img2img"):
                with gr.Row():
                    with gr.Column(scale=2):
                        i2i_image = gr.Image(value=start, type="filepath", sources=["upload", "clipboard"],
                                             label="Starting image", height=DISPLAY_SIZE, elem_id="img2img-image",
                                             elem_classes=["pixelated"])
                        i2i_prompt = gr.Textbox(label="Prompt", value=IMG2IMG_EXAMPLES[0], elem_id="img2img-prompt")
                        strength = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="Strength",
                                             info="fraction of the tokens regenerated; 1 ignores the image")
                        i2i_button = gr.Button("Transform", variant="primary", elem_id="img2img-run")
                        i2i_settings = _settings_panel(gr, pipe, defaults, "img2img")
                        gr.Examples([[e] for e in IMG2IMG_EXAMPLES], inputs=[i2i_prompt], label="Emoji prompts")
                    with gr.Column(scale=3):
                        i2i_panel = _decoding_panel(gr, "img2img")

        # Explicit signatures: gradio passes the inputs positionally and finds gr.Progress by its default.
        def run_t2i(prompt, negative, steps, guidance, t_start, t_end, seed, n, size, progress=gr.Progress()):
            opts = Options(negative, steps, guidance, t_start, t_end, seed, n, size, reference_stream)
            yield from text_to_image(pipe, prompt, opts, folder, frame_delay, progress)

        def run_inpaint(prompt, value, negative, steps, guidance, t_start, t_end, seed, n, size,
                        progress=gr.Progress()):
            opts = Options(negative, steps, guidance, t_start, t_end, seed, n, size, reference_stream)
            yield from inpaint(pipe, prompt, value, opts, folder, frame_delay, progress)

        def run_img2img(prompt, image, strength_, negative, steps, guidance, t_start, t_end, seed, n, size,
                        progress=gr.Progress()):
            opts = Options(negative, steps, guidance, t_start, t_end, seed, n, size, reference_stream)
            yield from image_to_image(pipe, prompt, image, strength_, opts, folder, frame_delay, progress)

        # One generation at a time across all tabs and sessions: they share the model and the cores. The
        # progress bar sits on the gallery so the streamed frames stay visible.
        run = dict(concurrency_limit=1, concurrency_id="generate")
        t2i_button.click(run_t2i, [t2i_prompt, *t2i_settings], t2i_panel.outputs, api_name="text_to_image",
                         show_progress_on=t2i_panel.gallery, **run)
        t2i_prompt.submit(run_t2i, [t2i_prompt, *t2i_settings], t2i_panel.outputs, api_visibility="private",
                          show_progress_on=t2i_panel.gallery, **run)
        inp_button.click(run_inpaint, [inp_prompt, editor, *inp_settings], inp_panel.outputs, api_name="inpaint",
                         show_progress_on=inp_panel.gallery, **run)
        i2i_button.click(run_img2img, [i2i_prompt, i2i_image, strength, *i2i_settings], i2i_panel.outputs,
                         api_name="image_to_image", show_progress_on=i2i_panel.gallery, **run)
        for panel in (t2i_panel, inp_panel, i2i_panel):
            _wire_panel(gr, pipe, panel, folder)

        def send(view):
            if view is None:
                raise gr.Error("generate an image first")
            return for_display(view.images[view.index])

        to_inpaint.click(send, [t2i_panel.view], [editor]).then(lambda: gr.Tabs(selected="inpaint"), None, [tabs])
        to_img2img.click(send, [t2i_panel.view], [i2i_image]).then(lambda: gr.Tabs(selected="img2img"), None, [tabs])
    return demo


def launch(demo, host: str = "127.0.0.1", port: int | None = None, share: bool = False, block: bool = True):
    """Serve the page; with `block=False` return (app, local_url) and keep serving from a background thread."""
    app, local_url, _ = demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                                    show_error=True, quiet=not block, theme=theme(), css=CSS,
                                    footer_links=["api", "settings"])
    return app, local_url


# ---------------------------------------------------------------------------------------------------------------
# amused demo
# ---------------------------------------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    import os
    import sys

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    try:
        import gradio  # noqa: F401
    except ModuleNotFoundError:
        print("amused demo: error: the demo needs gradio: pip install 'amused-mim[demo]'", file=sys.stderr)
        return 2
    from .runtime import engine_from_args

    engine = engine_from_args(args, expected_images=10**6)  # a long-lived page: "auto" compiles
    print(f"amused demo: {engine.model_name} on {engine.device} (fast path: {engine.fast}); warming up", flush=True)
    engine.warm_up((1,))
    demo = build_demo(engine.pipe, model_name="the embedded emoji model (amused-emoji-64)"
                      if engine.model_name == "embedded" else engine.model_name,
                      reference_stream=engine.reference_stream)
    launch(demo, args.host, args.port, args.share)
    return 0


def add_command(subparsers) -> None:
    """Register `amused demo`."""
    p = subparsers.add_parser("demo", help="web demo (Gradio): text to image, inpainting, img2img, decoding view",
                              description="Serve the web demo: text to image, inpainting with a mask drawn in\n"
                                          "the browser, image to image, and a step-by-step view of the decoding.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the embedded model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                                                      "only; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    add_runtime_args(p)
    p.set_defaults(func=cmd_demo)
