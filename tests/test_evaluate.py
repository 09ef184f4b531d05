"""`amused eval`: the metrics on synthetic data whose answers are known, and the command end to end on a tiny model."""

import argparse
import json

import numpy as np
import PIL.Image
import pytest
import torch

from amused import evaluate as ev

STYLES = ("google", "twitter", "openmoji")


def drawings(num_emoji: int, seed: int = 0, size: int = 8) -> np.ndarray:
    """(num_emoji, size, size, 3) uint8: one random blocky picture per emoji."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(num_emoji, 3, size // 2, size // 2, generator=g)
    return (torch.nn.functional.interpolate(blocks, scale_factor=2).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)


def write_data(root, num_emoji: int = 6, heldout: int = 2, size: int = 8):
    """A data folder in `amused build-emoji-data`'s layout: every emoji in three near-identical styles (one
    style of the last `heldout` emoji held out), a skin-tone variant, and a noto image to be filtered out."""
    base = drawings(num_emoji, size=size)
    rng = np.random.default_rng(1)
    records = {"train": [], "heldout": []}
    for k in range(num_emoji):
        for s, style in enumerate(STYLES + ("noto",)):
            split = "heldout" if k >= num_emoji - heldout and style == "twitter" else "train"
            pixels = np.clip(base[k].astype(int) + rng.integers(-3, 4, base[k].shape), 0, 255).astype(np.uint8)
            name = f"{style}_{k}.png"
            (root / split).mkdir(parents=True, exist_ok=True)
            PIL.Image.fromarray(pixels).save(root / split / name)
            records[split].append({"file_name": name, "text": f"emoji {k}, {style} style", "emoji": f"emoji {k}",
                                   "style": style, "skin_tone": None})
    PIL.Image.fromarray(base[0]).save(root / "train" / "google_0_tone.png")
    records["train"].append({"file_name": "google_0_tone.png", "text": "emoji 0, dark skin tone, google style",
                             "emoji": "emoji 0", "style": "google", "skin_tone": "dark skin tone"})
    for split, rows in records.items():
        (root / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def parser():
    p = argparse.ArgumentParser()
    ev.add_command(p.add_subparsers(dest="command"))
    return p


# ----------------------------------------------------------------------------------------------------------
# Metrics


def test_psnr_identical_is_inf_and_noise_is_low():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g)
    assert torch.isinf(ev.psnr(x, x)).all()
    assert (ev.psnr(x, torch.rand(4, 3, 16, 16, generator=g)) < 10).all()  # uniform noise: ~7.8 dB
    assert ev.psnr(x, (x + 0.01).clamp(0, 1)).min() > 39  # a 1% offset: ~40 dB


def test_features_ignore_size_and_brightness_offset():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.8
    big = torch.nn.functional.interpolate(x, scale_factor=4)  # a 64x64 drawing of the same 16x16 thumbnail
    torch.testing.assert_close(ev.features(big), ev.features(x))
    torch.testing.assert_close(ev.features(x + 0.1), ev.features(x))  # centred on its own mean
    torch.testing.assert_close(ev.features(x).norm(dim=1), torch.ones(3))


def test_retrieval_finds_the_same_emoji_in_another_near_identical_style():
    base = torch.from_numpy(drawings(20, size=16)).permute(0, 3, 1, 2).float() / 255
    other = (base + 0.02 * torch.randn(base.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    images = torch.cat([base, other])
    rows = [{"emoji": f"e{k}", "style": s, "text": f"e{k}, {s}"} for s in ("google", "twitter") for k in range(20)]
    db = ev.features(images)
    same = torch.eye(40, dtype=torch.bool)  # each query excludes only itself
    scores = ev.retrieval_scores(ev.nearest(db, db, same), rows, rows, same)
    assert scores["emoji_accuracy"] == 1.0  # its twin in the other style is nearest
    assert scores["style_accuracy"] == 0.0
    assert scores["both_accuracy"] == 0.0  # the right emoji, in the wrong style: not both
    assert scores["chance"] == pytest.approx(1 / 39)
    # without excluding itself each query finds itself: emoji and style both right
    assert ev.retrieval_scores(ev.nearest(db, db), rows, rows)["both_accuracy"] == 1.0
    half = [dict(r, style="google") for r in rows]  # half the queries name the other style than found
    assert ev.retrieval_scores(ev.nearest(db, db), half, rows)["both_accuracy"] == 0.5


def test_retrieval_of_noise_is_near_chance():
    base = torch.from_numpy(drawings(40, size=16)).permute(0, 3, 1, 2).float() / 255
    rows = [{"emoji": f"e{k}", "style": "google", "text": f"e{k}"} for k in range(40)]
    g = torch.Generator().manual_seed(2)
    noise = torch.rand(400, 3, 16, 16, generator=g)
    queries = [rows[k] for k in torch.randint(0, 40, (400,), generator=g).tolist()]
    scores = ev.retrieval_scores(ev.nearest(ev.features(noise), ev.features(base)), queries, rows)
    assert scores["chance"] == pytest.approx(1 / 40)
    assert scores["emoji_accuracy"] < 0.07  # chance is 2.5%; 400 draws put 7% beyond 3 standard deviations


# ----------------------------------------------------------------------------------------------------------
# Data and the command


def test_load_rows_keeps_three_styles_and_names_data_when_missing(tmp_path):
    rows = ev.load_rows(write_data(tmp_path / "emoji"))
    assert {r["style"] for r in rows} == set(STYLES)  # noto dropped
    assert sum(r["split"] == "heldout" for r in rows) == 2
    with pytest.raises(FileNotFoundError, match="--data .*amused build-emoji-data"):
        ev.load_rows(tmp_path / "nothing")


def test_grid_layout_has_a_row_per_style_then_held_out(tmp_path):
    rows = ev.load_rows(write_data(tmp_path / "emoji", num_emoji=6, heldout=2))
    layout = ev.grid_captions(rows, seed=0)
    assert [{r["style"] for r in row} for row in layout[:4]] == [{None}] + [{s} for s in STYLES]
    assert [r["text"] for r in layout[0]] == [r["emoji"] for r in layout[1]]  # the names alone, then styled
    assert [r["emoji"] for r in layout[1]] == [r["emoji"] for r in layout[2]]  # same emoji down each column
    assert len(layout[1]) == 4  # the emoji drawn in all three styles in training, without a skin tone
    assert all(r["split"] == "heldout" for r in layout[4]) and len(layout[4]) == 2


@pytest.mark.filterwarnings("ignore:prompt .* is longer")  # the tiny text encoder holds 16 characters
def test_eval_command_writes_results_and_grid(ref_dir, tmp_path, capsys):
    data = write_data(tmp_path / "emoji")
    out, grid = tmp_path / "res" / "eval.json", tmp_path / "grid.png"
    args = parser().parse_args(["eval", "--model", str(ref_dir), "--data", str(data), "--num-train", "5",
                                "--steps", "2", "--batch-size", "4", "--out", str(out), "--grid", str(grid),
                                "--device", "cpu"])
    assert args.func(args) == 0
    results = json.loads(out.read_text())
    assert set(results["retrieval"]) == {"generated_train", "generated_heldout", "generated_names", "random",
                                         "real_train", "real_heldout", "real_other_styles"}
    names = results["retrieval"]["generated_names"]
    assert names["n"] == 6 and names["style_accuracy"] is None  # every training emoji's name, no style
    assert [q for q, _ in names["neighbours"]] == [f"emoji {k}" for k in range(6)]
    assert results["psnr"]["heldout"]["n"] == 2 and results["psnr"]["train"]["n"] == 5
    assert results["retrieval"]["generated_train"]["n"] == 5 and results["retrieval"]["random"]["n"] == 7
    # the real image of each caption: another style's near-identical drawing is always nearest
    assert results["retrieval"]["real_other_styles"]["emoji_accuracy"] == 1.0
    for r in results["retrieval"].values():
        assert 0 <= r["emoji_accuracy"] <= 1 and len(r["neighbours"]) == r["n"]
        assert r["style_accuracy"] is None or 0 <= r["style_accuracy"] <= 1
    # settings not given are the checkpoint's defaults (this one has no generation_config.json: diffusers')
    assert results["settings"]["temperature"] == [2.0, 0.0] and results["settings"]["guidance_scale"] == 10.0
    assert results["settings"]["steps"] == 2
    assert results["settings"]["device"] == "cpu" and results["settings"]["dtype"] in ("float32", "bfloat16")
    assert PIL.Image.open(grid).size[0] > 0 and len(results["grid"]["prompts"]) == 5
    breakdown = results["heldout_breakdown"]  # 2 held-out pairs (emoji 4 and 5 in twitter style)
    assert breakdown["pairs"] == 2 and breakdown["names_of_heldout_emoji"]["n"] == 2
    assert breakdown["heldout_hits_in_prompted_style"] + breakdown["heldout_hits_in_other_style"] == round(
        2 * results["retrieval"]["generated_heldout"]["emoji_accuracy"])
    printed = capsys.readouterr().out
    assert "held-out" in printed and "random token grids" in printed and "dB" in printed and "names" in printed
    assert "pairs hit" in printed


def test_eval_command_names_missing_data(tmp_path):
    args = parser().parse_args(["eval", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "e.json")])
    with pytest.raises(FileNotFoundError, match="--data .*absent.*amused build-emoji-data"):
        args.func(args)
    assert not (tmp_path / "e.json").exists()


def test_names_are_every_training_emoji_once_and_any_style_is_a_hit(tmp_path):
    rows = ev.load_rows(write_data(tmp_path / "emoji", num_emoji=5, heldout=2))
    names = ev.name_rows(rows)
    assert [r["text"] for r in names] == [f"emoji {k}" for k in range(5)]  # skin tones and styles folded
    assert len(ev.name_rows(rows, 2)) == 2
    db_rows = [{"emoji": e, "style": s, "text": f"{e}, {s} style"}  # emoji 0 in two styles, emoji 1
               for e, s in (("emoji 0", "google"), ("emoji 0", "twitter"), ("emoji 1", "google"))]
    scores = ev.retrieval_scores(torch.tensor([1, 0]), names[:2], db_rows)  # neighbours of "emoji 0", "emoji 1"
    assert scores["emoji_accuracy"] == 0.5 and scores["style_accuracy"] is None  # emoji 0 hit via twitter


def test_heldout_breakdown_separates_knowing_the_emoji_from_composing_it():
    rows = [{"text": f"{e}{t}, {s} style", "emoji": e, "style": s} for e in ("a", "b", "c")
            for s in ("google", "twitter") for t in ("", ", dark skin tone")]
    held = ["a, twitter style", "a, dark skin tone, twitter style", "b, twitter style", "c, twitter style"]
    retrieval = {
        "generated_heldout": {"neighbours": [[held[0], "a, dark skin tone, twitter style"],  # own style: sibling
                                             [held[1], "a, google style"],  # right emoji, another style
                                             [held[2], "c, twitter style"],  # wrong emoji
                                             [held[3], "c, google style"]]},
        "generated_names": {"neighbours": [["a", "a, google style"], ["b", "b, twitter style"],
                                           ["c", "a, google style"], ["d", "d, google style"]]}}
    b = ev.heldout_breakdown(retrieval, rows + [{"text": "d, google style", "emoji": "d", "style": "google"}])
    assert b == {"names_of_heldout_emoji": {"n": 3, "emoji_accuracy": 2 / 3},  # "d" is no held-out emoji
                 "heldout_hits_in_prompted_style": 1, "heldout_hits_in_other_style": 2, "pairs": 3, "pairs_hit": 2}
    assert ev.heldout_breakdown({"generated_heldout": retrieval["generated_heldout"]}, rows) is None
