"""Training data: preprocessing and micro-conditioning, the sources, resumable ordering, pre-encoded shards."""

import argparse
import io
import json
import random

import numpy as np
import PIL.Image
import pytest
import torch

from amused.training.data import (EpochSampler, ImageFolder, PreencodedDataset, Records, TrainDataset, make_dataset,
                                  preprocess)
from amused.training.shards import TarShardStream, expand_shards, tar_bytes
from train_tiny import make_image_folder, make_pipeline, one_torch_thread  # noqa: F401


def test_preprocess_micro_conds_use_real_size_and_crop():
    image = PIL.Image.new("RGB", (40, 20), (10, 20, 30))  # width 40, height 20
    out = preprocess(image, 10, random.Random(0), center_crop=True)
    assert out["pixels"].shape == (3, 10, 10)
    # shorter side 20 -> 10: resized 20x10, centre crop left (20 - 10) // 2 = 5, top 0
    assert out["micro_conds"].tolist() == [40.0, 20.0, 0.0, 5.0, 6.0]
    lefts = {preprocess(image, 10, random.Random(s))["micro_conds"][3].item() for s in range(30)}
    assert lefts <= set(range(11)) and len(lefts) > 3  # random crops move


def test_flip_mirrors_crop_left_and_pixels():
    array = np.zeros((10, 30, 3), np.uint8)
    array[:, :10] = 255  # white left third
    image = PIL.Image.fromarray(array)
    for seed in range(20):
        plain = preprocess(image, 10, random.Random(seed), random_flip=False)
        maybe = preprocess(image, 10, random.Random(seed), random_flip=True)
        left = plain["micro_conds"][3].item()
        if not torch.equal(plain["pixels"], maybe["pixels"]):
            assert torch.equal(maybe["pixels"], plain["pixels"].flip(-1))
            assert maybe["micro_conds"][3].item() == 30 - left - 10
            return
    pytest.fail("no flip in 20 draws")


def test_random_resized_crop_zooms_into_a_random_square_and_is_off_by_default():
    grid = np.zeros((40, 40, 3), np.uint8)
    grid[:20, 20:] = 255  # white top-right quadrant on black
    image = PIL.Image.fromarray(grid)
    assert torch.equal(preprocess(image, 20, random.Random(5))["pixels"],
                       preprocess(image, 20, random.Random(5), min_crop=1.0)["pixels"])  # off: the same draws
    sides, whites = set(), set()
    for seed in range(40):
        out = preprocess(image, 20, random.Random(seed), min_crop=0.5)
        side = 40 * random.Random(seed).uniform(0.5, 1.0)  # the first draw is the crop's side
        scale = 20 / side
        resized = max(20, round(40 * scale))
        top, left = out["micro_conds"][2].item(), out["micro_conds"][3].item()
        assert out["pixels"].shape == (3, 20, 20) and 0 <= top <= resized - 20 and 0 <= left <= resized - 20
        assert out["micro_conds"][:2].tolist() == [40.0, 40.0]  # the real size, as without the zoom
        expected = image.resize((resized, resized), PIL.Image.BILINEAR).crop((left, top, left + 20, top + 20))
        assert torch.equal(out["pixels"], torch.from_numpy(np.asarray(expected, np.float32) / 255).permute(2, 0, 1))
        sides.add(resized)
        whites.add(round(out["pixels"].mean().item(), 2))
    assert min(sides) == 20 and max(sides) > 35 and len(sides) > 10  # zoomed from 1x to nearly 2x
    assert len(whites) > 10  # the crops show different parts


def test_rgba_is_composited_on_white():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (255, 0, 0)  # garbage colour under fully transparent pixels
    rgba[:4, :, 3] = 255  # top half opaque red
    out = preprocess(PIL.Image.fromarray(rgba, "RGBA"), 8, random.Random(0), center_crop=True)["pixels"]
    assert torch.allclose(out[:, :4], torch.tensor([1.0, 0, 0])[:, None, None].expand(3, 4, 8))
    assert torch.allclose(out[:, 4:], torch.ones(3, 4, 8))


def test_image_folder_metadata_jsonl_csv_and_errors(tmp_path):
    folder = make_image_folder(tmp_path / "a", n=3, size=8)
    src = ImageFolder(folder)
    assert len(src) == 3 and src[1]["caption"] == "green pattern 1" and src[1]["image"].size == (8, 8)
    (folder / "metadata.jsonl").unlink()
    (folder / "metadata.csv").write_text("file_name,caption\nimg_0.png,hello\n")
    assert ImageFolder(folder, caption_column="caption")[0]["caption"] == "hello"
    with pytest.raises(ValueError, match="lacks"):
        ImageFolder(folder)  # no "text" column
    (folder / "metadata.csv").unlink()
    assert ImageFolder(folder, instance_prompt="sks style")[2]["caption"] == "sks style"
    assert ImageFolder(folder)[0]["caption"] == "img 0"  # the file stem, as diffusers' script
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "nope.png", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="nope.png"):
        ImageFolder(folder)


def test_records_accept_a_list_of_dicts_and_a_datasets_dataset(tmp_path):
    images = [PIL.Image.new("RGB", (8, 8), (i * 50, 0, 0)) for i in range(3)]
    records = [{"image": im, "text": f"c{i}"} for i, im in enumerate(images)]
    data = TrainDataset(Records(records), resolution=8)
    assert data[(0, 2)]["caption"] == "c2" and data[(0, 2)]["pixels"].shape == (3, 8, 8)
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"image": images, "prompt": ["a", "b", "c"]})
    args = argparse.Namespace(resolution=8, prompt_key="prompt", image_key="image")
    assert make_dataset(args, dataset=ds)[(0, 1)]["caption"] == "b"
    ds.save_to_disk(str(tmp_path / "saved"))  # --instance_data_dataset reads save_to_disk folders offline
    args.instance_data_dataset = str(tmp_path / "saved")
    item = make_dataset(args)[(0, 2)]
    assert item["caption"] == "c" and item["pixels"][0].mean() > 0.3


def test_epoch_sampler_is_seeded_disjoint_across_ranks_and_resumable():
    a = list(EpochSampler(10, 2, epoch=0, seed=1, rank=0, world=2))
    b = list(EpochSampler(10, 2, epoch=0, seed=1, rank=1, world=2))
    assert len(a) == len(b) == 4 and not {i for _, i in a} & {i for _, i in b}  # 10 // 4 = 2 batches each
    assert a == list(EpochSampler(10, 2, epoch=0, seed=1, rank=0, world=2))
    assert a != list(EpochSampler(10, 2, epoch=1, seed=1, rank=0, world=2))
    assert list(EpochSampler(10, 2, epoch=0, seed=1, rank=0, world=2, start_batch=1)) == a[2:]
    single = list(EpochSampler(1, 4, epoch=3, seed=0))  # one image fills a batch of 4
    assert single == [(3, 0)] * 4


def _write_tar(path, items):
    members = []
    for key, colour, caption in items:
        buf = io.BytesIO()
        PIL.Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
        members += [(f"{key}.png", buf.getvalue()), (f"{key}.txt", caption.encode())]
    path.write_bytes(tar_bytes(members))


def test_tar_shards_stream_and_resume_in_order(tmp_path):
    for s in range(3):
        _write_tar(tmp_path / f"shard-{s:03d}.tar", [(f"s{s}_{i}", (s * 80, i * 40, 0), f"shard {s} item {i}")
                                                    for i in range(4)])
    shards = expand_shards(str(tmp_path / "shard-{000..002}.tar"))
    assert len(shards) == 3 and expand_shards(str(tmp_path / "*.tar")) == shards

    def captions(start, workers):
        stream = TarShardStream(shards, resolution=8, batch_size=2, seed=0)
        stream.set_position(epoch=0, start_batch=start)
        loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=workers)
        return [tuple(b["caption"]) for b in loader]

    full = captions(0, 0)
    assert sorted(c for b in full for c in b) == sorted(f"shard {s} item {i}" for s in range(3) for i in range(4))
    assert captions(3, 0) == full[3:]
    two = captions(0, 2)
    assert captions(1, 2)[:2] == two[1:3]  # resumed with workers: the uninterrupted order


def test_preencode_round_trip(tmp_path):
    from amused.training.cli import main

    pipe = make_pipeline(tmp_path / "pipe")
    images = make_image_folder(tmp_path / "imgs", n=5, size=8)
    main(["preencode", "--pretrained_model_name_or_path", str(pipe), "--train_data_dir", str(images),
          "--resolution", "8", "--center_crop", "--output_dir", str(tmp_path / "enc"), "--batch_size", "2",
          "--shard_size", "2"])
    data = PreencodedDataset(tmp_path / "enc")
    assert len(data) == 5 and len(data.shards) == 3
    item = data[(0, 4)]
    assert item["ids"].shape == (4, 4) and item["ids"].dtype == torch.long
    assert item["hidden"].dtype == torch.float16 and item["hidden"].shape == (16, 8) and item["pooled"].shape == (8,)
    assert item["caption"] == "purple pattern 4" and item["micro_conds"].tolist() == [8, 8, 0, 0, 6]
    from amused.pipeline import AmusedPipeline

    p = AmusedPipeline.from_pretrained(pipe)
    pixels = TrainDataset(ImageFolder(images), 8, center_crop=True)[(0, 4)]["pixels"]
    assert torch.equal(p.vqvae.encode(pixels[None])[0], item["ids"])
    hidden, pooled = data.empty_prompt()
    assert hidden.shape == (1, 16, 8) and pooled.shape == (1, 8)

    # Whole-batch gathers (in memory, or per item from the files) give exactly the per-item rows, in order,
    # through the loader the trainer builds (workers included).
    keys = [(0, 4), (0, 1), (0, 2), (0, 0)]
    expected = [data[k] for k in keys]
    for in_memory in (True, False):
        batched = PreencodedDataset(tmp_path / "enc", in_memory=in_memory)
        batch = batched.__getitems__(keys)
        assert batch["caption"] == [e["caption"] for e in expected]
        for name in ("ids", "hidden", "pooled", "micro_conds"):
            assert torch.equal(batch[name], torch.stack([e[name] for e in expected])), (in_memory, name)
        assert batch["ids"].dtype == torch.long
    assert PreencodedDataset(tmp_path / "enc").in_memory  # small: read once
    from types import SimpleNamespace

    from amused.training.train import make_loader

    args = SimpleNamespace(train_batch_size=2, dataloader_num_workers=2, seed=0)
    loaded = [b["caption"] for b in make_loader(PreencodedDataset(tmp_path / "enc"), args, 0, 0, 0, 1)]
    per_item = [b["caption"] for b in make_loader(PreencodedDataset(tmp_path / "enc", in_memory=False), args, 0, 0,
                                                  0, 1)]
    assert loaded == per_item and len(loaded) == 2 and all(len(c) == 2 for c in loaded)
