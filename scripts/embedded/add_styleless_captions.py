"""Caption augmentation for the embedded model: append to a metadata.jsonl a copy of every row captioned
without its style ("red apple, google style" -> "red apple"), pointing at the same image, so that a prompt
without a style draws the emoji in one of the styles instead of falling outside what the model was trained on.
With --style-only, also a copy captioned with the style alone ("google style"), so that the model learns the
style apart from any emoji (what composed guidance, `heldout_guidance_probe.py`, needs).

    python scripts/embedded/add_styleless_captions.py DATA/train/metadata.jsonl [--style-only]
"""

import argparse
import json
from pathlib import Path

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("metadata", type=Path)
ap.add_argument("--style-only", action="store_true", help="also add a copy captioned 'STYLE style' alone")
args = ap.parse_args()
path = args.metadata
rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
suffix = lambda r: f", {r['style']} style"  # noqa: E731
styled = [r for r in rows if r["text"].endswith(suffix(r))]
extra = [{**r, "text": r["text"][:-len(suffix(r))]} for r in styled]
if args.style_only:
    extra += [{**r, "text": f"{r['style']} style"} for r in styled]
tmp = path.with_suffix(".tmp")
tmp.write_text("".join(json.dumps(r) + "\n" for r in rows + extra))
tmp.replace(path)
print(f"{path}: {len(rows)} rows + {len(styled)} without the style" + (f" + {len(styled)} with the style alone"
                                                                        if args.style_only else ""))
