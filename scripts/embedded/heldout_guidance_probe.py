"""Can sampling compose a known emoji with a style it was never drawn in? Captions drawn with the guidance split
into three directions, the full caption's, the emoji name's and the style's:

    logits = uncond + w_full * (c_full - uncond) + w_name * (c_name - uncond) + w_style * (c_style - uncond)

where c_full is the caption ("princess, google style"), c_name the caption without its style ("princess"),
c_style the style alone ("google style") and uncond the empty prompt (up to four U-ViT passes a step): the pipeline's
composed guidance (amused.guidance.ComposedGuidance, which a model's generation_config.json can set). w_full = g with
the others 0 is ordinary guidance g; w_name and w_style alone are the composition of Liu et al., "Compositional
Visual Generation with Composable Diffusion Models" (2022), which needs a model trained on style-only captions
(`add_styleless_captions.py --style-only`). Weights that sum to 1 give the unconditional prediction weight 0: the
pipeline then runs no unconditional rows (a product of the terms' predictions). Session 11's split guidance
`uncond + g_name (c_name - uncond) + g_style (c_full - c_name)` is w_full = g_style, w_name = g_name - g_style.

Scored as `amused eval` scores them (seed 0, batches of 32, the model's steps and temperature, top-1 retrieval of the
emoji and the style): the held-out pairs and the same 200 training captions as the eval (`--num-train`). A probe for
docs/embedded_model.md: it sets `pipe.composed_guidance` for each setting.

    python scripts/embedded/heldout_guidance_probe.py --data data/emoji --settings 1.5,0,0 0,1.5,1.5 \
        --out docs/results/heldout_composed_probe.json
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from amused import AmusedPipeline
from amused import evaluate as ev
from amused.embedded import embedded_model_path
from amused import guidance
from amused.guidance import ComposedGuidance
from amused.loading import atomic_write
from amused.runtime import make_generator, pick_dtype, pick_device

TERMS = ("full", "name", "style")  # the probe's names for amused.guidance's "prompt", "subject", "style"
SCALE = 2.0  # any scale > 1 (guided); the weights are divided by it


def composed_guidance(values: list[float]) -> ComposedGuidance:
    """W_FULL,W_NAME,W_STYLE -> the pipeline's composed guidance at guidance_scale SCALE."""
    return ComposedGuidance.from_config({"weights": {term: v / SCALE for term, v in zip(guidance.TERMS, values)}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="pipeline folder (default: the embedded model)")
    ap.add_argument("--data", default="data/emoji")
    ap.add_argument("--settings", nargs="+", required=True, help="W_FULL,W_NAME,W_STYLE triples")
    ap.add_argument("--num-train", type=int, default=200, help="training captions, sampled as `amused eval` does")
    ap.add_argument("--limit", type=int, default=None, help="only the first N captions of each set (a dry run)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    device = pick_device(args.device)
    dtype = pick_dtype("auto", device)  # what `amused eval` uses here
    pipe = AmusedPipeline.from_pretrained(args.model or embedded_model_path(), torch_dtype=dtype).to(device)
    rows = ev.load_rows(args.data)
    db = ev.features(ev.load_images(args.data, rows))
    train = [r for r in rows if r["split"] == "train"]
    sets = {"heldout": [r for r in rows if r["split"] == "heldout"],
            "train": [train[k] for k in ev.sample_rows(train, args.num_train, 0)]}
    sets = {k: v[:args.limit] for k, v in sets.items()}
    results = {"what": __doc__.split("\n\n")[0], "model": args.model or "embedded", "device": device.type,
               "dtype": str(dtype).removeprefix("torch."), "n": {k: len(v) for k, v in sets.items()}, "settings": {}}
    print(f"{'w_full':>7}{'w_name':>7}{'w_style':>8} | held-out emoji  style   both | train emoji  style", flush=True)
    for setting in args.settings:
        values = [float(v) for v in setting.split(",")]
        if len(values) != 3 or not any(values):
            ap.error(f"--settings: {setting!r} is not three weights W_FULL,W_NAME,W_STYLE, not all 0")
        pipe.composed_guidance = composed_guidance(values)  # every caption here has a style part
        entry = dict(zip(TERMS, values))
        for name, chosen in sets.items():
            started, generator, images = time.perf_counter(), make_generator(device, 0), []
            for i in range(0, len(chosen), args.batch_size):
                batch = [r["text"] for r in chosen[i:i + args.batch_size]]
                out = pipe(batch, guidance_scale=SCALE, generator=generator, output_type="np").images
                images.append(torch.from_numpy(np.asarray(out)).permute(0, 3, 1, 2).float())
            scores = ev.retrieval_scores(ev.nearest(ev.features(torch.cat(images)), db), chosen, rows)
            entry[name] = {k: scores[k] for k in ("emoji_accuracy", "style_accuracy", "both_accuracy")}
            entry[name]["seconds"] = round(time.perf_counter() - started, 1)
        results["settings"][setting] = entry
        print(f"{values[0]:>7}{values[1]:>7}{values[2]:>8} | {entry['heldout']['emoji_accuracy']:>13.1%}"
              f"{entry['heldout']['style_accuracy']:>7.1%}{entry['heldout']['both_accuracy']:>7.1%} | "
              f"{entry['train']['emoji_accuracy']:>11.1%}"
              f"{entry['train']['style_accuracy']:>7.1%}", flush=True)
        atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(results, indent=1) + "\n"))


if __name__ == "__main__":
    main()
