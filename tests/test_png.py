"""amused.png.encode_png: standard PNG files (Pillow reads back the exact pixels and the text chunks)."""

import io

import numpy as np
import PIL.Image
import pytest

from amused.png import encode_png


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "I;16"])
@pytest.mark.parametrize("size", [(1, 1), (7, 3), (64, 33)])
def test_pixels_and_mode_round_trip(mode, size):
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA").convert(mode)
    back = PIL.Image.open(io.BytesIO(encode_png(image)))
    back.load()
    assert back.mode == image.mode and back.size == image.size
    assert np.array_equal(np.asarray(back), np.asarray(image))


def test_text_chunks_latin1_and_unicode():
    image = PIL.Image.new("RGB", (4, 4), (10, 20, 30))
    text = {"amused": '{"prompt": "caf\\u00e9"}', "prompt": "café 🍎 — 猫"}
    back = PIL.Image.open(io.BytesIO(encode_png(image, text)))
    assert back.text == text


def test_smooth_image_is_compressed():
    """A smooth picture (what models draw) comes out well under its raw size; noise cannot be compressed."""
    y, x = np.mgrid[0:256, 0:256]
    smooth = np.stack([x, y, (x + y) // 2], -1).astype(np.uint8)
    data = encode_png(PIL.Image.fromarray(smooth))
    assert len(data) < smooth.nbytes / 4


def test_bad_text_key_is_refused():
    with pytest.raises(ValueError, match="PNG text key"):
        encode_png(PIL.Image.new("RGB", (2, 2)), {"": "x"})
