"""The web demo (`amused demo`): its handlers as plain functions, then the page end to end in headless Chromium.

The browser test needs Debian's chromium and chromium-driver (CI installs them); without them it fails
with the command to run, rather than skipping. Set AMUSED_UPDATE_SCREENSHOTS=1 to also refresh
docs/images/demo_*.png from it.
"""

import json
import os
import re
import socket
import time
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
try:
    import gradio as gr
    import selenium  # noqa: F401
except ModuleNotFoundError as e:
    pytest.fail(f"the demo tests need {e.name}: pip install -e '.[test,demo]'", pytrace=False)

from amused import AmusedPipeline
from amused.demo import (DISPLAY_SIZE, Options, build_demo, editor_to_inputs, image_to_image, inpaint,
                         launch, text_to_image, token_status)
from amused.embedded import embedded_model_path
from browser.chromium import INSTALL, draw_stroke, find_chromium, images_in, start_chromium, toasts, wait_for

DOCS_IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"


@pytest.fixture(scope="module")
def pipe():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI box has 2 shared cores; two threads oversubscribe them badly
    yield AmusedPipeline.from_pretrained(embedded_model_path())
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def start_image(pipe):
    return pipe("grinning face, google style", generator=torch.Generator().manual_seed(0)).images[0]


def run(handler, *args, **kwargs) -> list[tuple]:
    """Every update a streaming handler yields: (gallery, grid frame, heat map, slider, caption, gif, view)."""
    return list(handler(*args, **kwargs))


def editor_value(image: PIL.Image.Image, box: tuple[int, int, int, int] | None) -> dict:
    """What gr.ImageEditor hands the inpaint handler: the background shown upscaled, one layer of strokes."""
    background = image.resize((DISPLAY_SIZE, DISPLAY_SIZE), PIL.Image.NEAREST).convert("RGBA")
    layer = PIL.Image.new("RGBA", background.size, (0, 0, 0, 0))
    if box is not None:
        PIL.ImageDraw.Draw(layer).rectangle(box, fill=(255, 0, 255, 255))
    return {"background": background, "layers": [layer], "composite": background}


# --------------------------------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------------------------------

def test_text_to_image_streams_every_step(pipe, tmp_path):
    updates = run(text_to_image, pipe, "red apple, openmoji style", Options(num_inference_steps=4, num_images=2),
                  tmp_path)
    assert len(updates) == 4  # one frame per decoding step
    for step, (gallery, frame, heat, slider, caption, gif, view) in enumerate(updates, start=1):
        assert frame.size == heat.size == (DISPLAY_SIZE, DISPLAY_SIZE)  # 64 px upscaled 4x
        assert f"Step {step} of 4" in caption
        assert slider.value == step
    gallery, frame, heat, slider, caption, gif, view = updates[-1]
    assert [im.size for im in gallery] == [(64, 64), (64, 64)]
    assert PIL.Image.open(gif).n_frames == 4
    first, last = token_status(pipe, view.steps[:1], 0), token_status(pipe, view.steps, 0)
    assert 0 < int(first.kept.sum()) < first.kept.numel() and bool(last.kept.all())
    # undecided tokens are grey in the first frame, none are in the last
    grey = round(0.55 * 255)
    assert (np.asarray(updates[0][1]) == grey).all(-1).any() and not (np.asarray(frame) == grey).all(-1).any()


def test_size_setting_and_scaling(pipe, tmp_path):
    updates = run(text_to_image, pipe, "red heart, twitter style", Options(num_inference_steps=2, size=32), tmp_path)
    gallery, frame, heat = updates[-1][:3]
    assert gallery[0].size == (32, 32) and frame.size == heat.size == (DISPLAY_SIZE, DISPLAY_SIZE)


def test_mask_drawn_in_editor_snaps_to_tokens():
    image = PIL.Image.new("RGB", (64, 64), "yellow")
    value = editor_value(image, (100, 0, 101, 255))  # a 2 px vertical stroke on the 256 px canvas
    pixels, mask = editor_to_inputs(value, size=64, grid=16)
    assert pixels.size == mask.size == (64, 64) and pixels.mode == "RGB"
    cells = np.asarray(mask.resize((16, 16), PIL.Image.NEAREST)) > 0  # (16, 16)
    assert cells[:, 6].all() and cells.sum() == 16  # the thin stroke still marks the column of tokens it crosses


def test_inpaint_regenerates_only_the_painted_tokens(pipe, start_image, tmp_path):
    value = editor_value(start_image, (64, 128, 191, 191))  # lower middle: 8 x 4 tokens of 16
    updates = run(inpaint, pipe, "face with tears of joy, google style", value,
                  Options(num_inference_steps=4, num_images=2), tmp_path)
    gallery, frame, heat, slider, caption, gif, view = updates[-1]
    assert [im.size for im in gallery] == [(64, 64), (64, 64)] and heat.size == frame.size
    status = token_status(pipe, view.steps, 1)
    assert int((~status.given).sum()) == 8 * 4 and bool(status.kept.all())


def test_image_to_image_runs_the_strength_fraction(pipe, start_image, tmp_path):
    updates = run(image_to_image, pipe, "face with tears of joy, google style", start_image.resize((200, 150)), 0.5,
                  Options(num_inference_steps=8), tmp_path)
    assert len(updates) == 4  # strength 0.5 of 8 steps
    assert updates[-1][0][0].size == (64, 64)


@pytest.mark.parametrize("task, options, match", [
    ("text", Options(size=63), "positive multiple of 8 for this model; nearest for 63: 56 or 64"),
    ("text", Options(num_inference_steps=0), "num_inference_steps"),
    ("text", Options(seed=1.5), "seed"),
    ("inpaint-no-mask", Options(), "mask_image: draw over"),
    ("inpaint-no-image", Options(), "image: upload"),
    ("img2img-no-image", Options(), "image: upload"),
    ("img2img-strength", Options(), "strength"),
])
def test_errors_reach_the_page_as_messages(pipe, start_image, tmp_path, task, options, match):
    calls = {"text": lambda: run(text_to_image, pipe, "x", options, tmp_path),
             "inpaint-no-mask": lambda: run(inpaint, pipe, "x", editor_value(start_image, None), options, tmp_path),
             "inpaint-no-image": lambda: run(inpaint, pipe, "x", None, options, tmp_path),
             "img2img-no-image": lambda: run(image_to_image, pipe, "x", None, 0.5, options, tmp_path),
             "img2img-strength": lambda: run(image_to_image, pipe, "x", start_image, 0.0, options, tmp_path)}
    with pytest.raises(gr.Error, match=match):  # gr.Error: shown on the page, the request does not fail
        calls[task]()


def test_amused_demo_serves_the_named_model_on_this_machine_only(ref_dir, monkeypatch, capsys):
    """`amused demo` loads the model it is given, names it in the page header, and serves the page on
    127.0.0.1:7860 with no public link unless told otherwise."""
    import amused.demo
    from amused.cli import main

    launched = []
    monkeypatch.setattr(amused.demo, "launch", lambda demo, *where: launched.append((demo, where)))
    monkeypatch.setenv("AMUSED_NUM_THREADS", "1")  # 2 shared cores: see docs/reliability.md, CPU threads
    threads = torch.get_num_threads()
    try:
        assert main(["demo", "--model", str(ref_dir), "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)  # loading sets the CPU threads for the process
    [(demo, where)] = launched
    assert where == ("127.0.0.1", 7860, False)
    header = [b.value for b in demo.blocks.values() if isinstance(b, gr.Markdown)][0]
    assert str(ref_dir) in header
    assert f"amused demo: {ref_dir} on cpu" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------
# End to end, in a real browser
# --------------------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(pipe, start_image):
    demo = build_demo(pipe, frame_delay=0.02, start_image=start_image)
    _, url = launch(demo, "127.0.0.1", free_port(), block=False)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def chromium() -> tuple[str, str]:
    found = find_chromium()
    if found is None:  # a failure, not a skip: CI installs them, and the demo is otherwise untested
        pytest.fail(f"the browser test needs Debian's chromium and chromium-driver: {INSTALL}", pytrace=False)
    return found


def test_browser_text_to_image_img2img_and_inpaint(chromium, server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def css(selector):
        return driver.find_element(By.CSS_SELECTOR, selector)

    def caption(tab):
        return lambda d: d.find_element(By.CSS_SELECTOR, f"#{tab}-caption").text

    from amused.embedded import embedded_model_path

    steps = json.loads((embedded_model_path() / "generation_config.json").read_text())["num_inference_steps"]
    driver = start_chromium(*chromium, tmp_path / "profile", size=(1280, 1100))
    try:
        # Text to image (the model's default steps): type a prompt, ask for 4 images, generate; the decoding view
        # follows the picked image.
        driver.get(server)
        prompt = wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#text2image-prompt textarea"), 30,
                          "the page")[0]
        prompt.clear()
        prompt.send_keys("red heart, twitter style")
        css("#text2image-images input[type=number]").send_keys(Keys.CONTROL, "a", Keys.NULL, "4", Keys.TAB)
        css("#text2image-run").click()
        wait_for(driver, lambda d: len(images_in(d, "#text2image-gallery")) == 4, 60, "4 images in the gallery")
        wait_for(driver, lambda d: f"Step {steps} of {steps} (image 1)" in caption("text2image")(d), 10,
                 "the decoding view")
        assert images_in(driver, "#text2image-grid") and images_in(driver, "#text2image-heat")
        driver.find_elements(By.CSS_SELECTOR, "#text2image-gallery .thumbnail-item")[1].click()
        wait_for(driver, lambda d: "(image 2)" in caption("text2image")(d), 10, "the second image's decoding")
        ActionChains(driver).send_keys(Keys.ESCAPE).perform()  # leave the gallery's preview
        css("#text2image-step input[type=number]").send_keys(Keys.CONTROL, "a", Keys.NULL, "7", Keys.TAB)
        wait_for(driver, lambda d: f"Step 7 of {steps}" in caption("text2image")(d), 10, "step 7 after scrubbing")
        kept_src = images_in(driver, "#text2image-grid")[0]
        driver.find_element(By.XPATH, "//label[normalize-space()=\"model's full guess\"]").click()
        wait_for(driver, lambda d: images_in(d, "#text2image-grid")[0] != kept_src, 10, "the predicted-tokens grid")
        driver.find_element(By.XPATH, "//label[normalize-space()='decided tokens']").click()
        wait_for(driver, lambda d: images_in(d, "#text2image-grid")[0] == kept_src, 10, "the decided-tokens grid")
        shot(driver, tmp_path, "demo_text2image.png")

        # Image to image from the picked result.
        css("#text2image-to-img2img").click()
        wait_for(driver, lambda d: images_in(d, "#img2img-image"), 10, "the result sent to image to image")
        prompt = css("#img2img-prompt textarea")
        prompt.clear()
        prompt.send_keys("red heart, openmoji style")
        css("#img2img-run").click()
        wait_for(driver, lambda d: images_in(d, "#img2img-gallery"), 60, "an image to image result")
        wait_for(driver, lambda d: f"Step {steps // 2} of {steps // 2}" in caption("img2img")(d), 10,
                 "the img2img decoding (strength 0.5)")
        shot(driver, tmp_path, "demo_img2img.png")

        # Inpainting: no stroke yet is a message on the page; then draw across the mouth and inpaint.
        driver.find_element(By.XPATH, "//button[@role='tab'][normalize-space()='Inpainting']").click()
        canvas = wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#inpaint-editor canvas"), 10,
                          "the inpainting canvas")[-1]
        css("#inpaint-run").click()
        wait_for(driver, lambda d: any("draw over" in t for t in toasts(d)), 20, "the no-mask message")
        for close in driver.find_elements(By.CSS_SELECTOR, ".toast-close"):
            close.click()
        css("#inpaint-editor button[aria-label='Brush']").click()
        draw_stroke(driver, canvas, [(-60, 40), (-20, 50), (20, 50), (60, 40)])
        css("#inpaint-run").click()
        wait_for(driver, lambda d: images_in(d, "#inpaint-gallery"), 60, "an inpainted image in the gallery")
        wait_for(driver, lambda d: f"Step {steps} of {steps}" in caption("inpaint")(d), 10, "the inpainting decoding")
        assert "256 of 256 tokens decided" in caption("inpaint")(driver)
        shot(driver, tmp_path, "demo_inpaint.png")
        css("#inpaint-step input[type=number]").send_keys(Keys.CONTROL, "a", Keys.NULL, "1", Keys.TAB)
        wait_for(driver, lambda d: f"Step 1 of {steps}" in caption("inpaint")(d), 10, "step 1 after scrubbing")
        decided, new = map(int, re.search(r"(\d+) of 256 tokens decided, (\d+) of them", caption("inpaint")(driver)
                                          ).groups())
        assert 0 < 256 - (decided - new) < 128  # the stroke masked some tokens, not the whole image
    finally:
        driver.quit()


def shot(driver, tmp_path: Path, name: str) -> None:
    """Screenshot into the test's folder (and into docs/images with AMUSED_UPDATE_SCREENSHOTS=1)."""
    time.sleep(0.5)  # let the last streamed frame and the gallery thumbnails paint
    driver.save_screenshot(str(tmp_path / name))
    assert PIL.Image.open(tmp_path / name).size[0] > 0
    if os.environ.get("AMUSED_UPDATE_SCREENSHOTS") == "1":
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(DOCS_IMAGES / name))
