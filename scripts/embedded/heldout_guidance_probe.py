"""Can sampling alone compose a known emoji with a style it was never drawn in? Held-out (emoji, style) pairs
drawn with the guidance split in two directions, the emoji's and the style's:

    logits = uncond + g_name * (c_name - uncond) + g_style * (c_full - c_name)

where c_full is the caption ("princess, google style"), c_name the caption without its style ("princess") and
uncond the empty prompt (three U-ViT passes a step). g_name = g_style = g is ordinary guidance g. Retrieval as
`amused eval` scores the held-out pairs (seed 0, batches of 32, the model's steps and temperature; emoji and style
top-1). A probe for docs/embedded_model.md, not a face: it swaps the pipeline's logits function.

    python scripts/embedded/heldout_guidance_probe.py --data data/emoji --settings 1.5,1.5 2,1.5 3,1.5 \
        --out docs/results/heldout_guidance_probe.json
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
from amused.loading import atomic_write
from amused.runtime import native_cpu_bf16


def split_guidance(pipe, weights: dict):
    """A `pipe.logits_fn` replacement for calls made with prompt=captions, negative_prompt=their names: the
    negative half of the guided batch is c_name; the empty prompt is added as a third pass."""
    def logits_fn(embeds, micro_conds, guidance_scale, model=None, grid=None):
        model = pipe.transformer
        n = embeds.hidden.shape[0] // 2
        u_hidden, u_pooled = pipe._encode_negative([""] * n)
        ctx = model.condition(torch.cat([u_hidden, embeds.hidden]), torch.cat([u_pooled, embeds.pooled]),
                              torch.cat([micro_conds[:n], micro_conds]), grid=grid)

        def logits(tokens, timestep):
            uncond, c_name, c_full = model.forward_tokens(torch.cat([tokens] * 3), ctx, timestep).chunk(3)
            return uncond + weights["name"] * (c_name - uncond) + weights["style"] * (c_full - c_name)
        return logits
    return logits_fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/emoji")
    ap.add_argument("--settings", nargs="+", required=True, help="G_NAME,G_STYLE pairs")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    dtype = torch.bfloat16 if native_cpu_bf16() else torch.float32  # what `--dtype auto` picks on this CPU
    pipe = AmusedPipeline.from_pretrained(embedded_model_path(), torch_dtype=dtype)
    rows = ev.load_rows(args.data)
    db = ev.features(ev.load_images(args.data, rows))
    held = [r for r in rows if r["split"] == "heldout"]
    captions = [r["text"] for r in held]
    names = [t.rsplit(", ", 1)[0] for t in captions]  # the caption without ", STYLE style"
    weights = {}
    pipe.logits_fn = split_guidance(pipe, weights)
    results = {"what": __doc__.split("\n\n")[0], "n": len(held), "dtype": str(dtype).removeprefix("torch."),
               "settings": {}}
    print(f"{'g_name':>7}{'g_style':>8}{'emoji':>8}{'style':>8}")
    for setting in args.settings:
        weights["name"], weights["style"] = map(float, setting.split(","))
        started, generator, images = time.perf_counter(), torch.Generator().manual_seed(0), []
        for i in range(0, len(captions), args.batch_size):
            out = pipe(captions[i:i + args.batch_size], negative_prompt=names[i:i + args.batch_size],
                       guidance_scale=2.0, generator=generator, output_type="np").images  # > 1: the guided batch
            images.append(torch.from_numpy(np.asarray(out)).permute(0, 3, 1, 2).float())
        scores = ev.retrieval_scores(ev.nearest(ev.features(torch.cat(images)), db), held, rows)
        results["settings"][setting] = {"g_name": weights["name"], "g_style": weights["style"],
                                        "emoji_accuracy": scores["emoji_accuracy"],
                                        "style_accuracy": scores["style_accuracy"],
                                        "seconds": round(time.perf_counter() - started, 1)}
        print(f"{weights['name']:>7}{weights['style']:>8}{scores['emoji_accuracy']:>8.1%}{scores['style_accuracy']:>8.1%}",
              flush=True)
    atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(results, indent=1) + "\n"))


if __name__ == "__main__":
    main()
