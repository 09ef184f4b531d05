"""Caption augmentation for the embedded model: append to a metadata.jsonl a copy of every row captioned
without its style ("red apple, google style" -> "red apple"), pointing at the same image, so that a prompt
without a style draws the emoji in one of the styles instead of falling outside what the model was trained on.

    python scripts/embedded/add_styleless_captions.py DATA/train/metadata.jsonl
"""

import json
import sys
from pathlib import Path

path = Path(sys.argv[1])
rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
suffix = lambda r: f", {r['style']} style"  # noqa: E731
extra = [{**r, "text": r["text"][:-len(suffix(r))]} for r in rows if r["text"].endswith(suffix(r))]
tmp = path.with_suffix(".tmp")
tmp.write_text("".join(json.dumps(r) + "\n" for r in rows + extra))
tmp.replace(path)
print(f"{path}: {len(rows)} rows + {len(extra)} without the style")
