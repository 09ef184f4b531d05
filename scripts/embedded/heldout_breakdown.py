"""Where the held-out pairs' hits come from, for `amused eval` result files written before `amused eval` reported
it itself (`evaluate.heldout_breakdown`: the names accuracy on the held-out pairs' emoji alone, hits in the
prompted style or another, pairs hit), from the files' neighbour lists; nothing is generated again.

    python scripts/embedded/heldout_breakdown.py --data data/emoji docs/results/eval_embedded_session10.json \
        docs/results/eval_embedded_session11.json --out docs/results/heldout_breakdown.json
"""

import argparse
import json
from pathlib import Path

from amused.evaluate import heldout_breakdown, load_rows
from amused.loading import atomic_write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("evals", nargs="+", type=Path, help="amused eval result files (with names and held-out sets)")
    ap.add_argument("--data", default="data/emoji", help="the emoji data they were measured on")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = load_rows(args.data)
    out = {}
    print(f"{'eval file':<40}{'names of held-out emoji':>25}{'held-out':>10}{'own style':>11}{'other':>7}{'pairs hit':>11}")
    for path in args.evals:
        result = json.loads(path.read_text())
        b = heldout_breakdown(result["retrieval"], rows)
        if b is None:
            raise SystemExit(f"{path}: has no held-out pairs or no names set (run amused eval with both)")
        out[path.name] = {"heldout_emoji_accuracy": result["retrieval"]["generated_heldout"]["emoji_accuracy"], **b}
        known = b["names_of_heldout_emoji"]
        print(f"{path.name:<40}{known['emoji_accuracy']:>18.1%} of {known['n']:<4}"
              f"{out[path.name]['heldout_emoji_accuracy']:>10.1%}{b['heldout_hits_in_prompted_style']:>11}"
              f"{b['heldout_hits_in_other_style']:>7}{b['pairs_hit']:>6} of {b['pairs']}")
    atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(out, indent=1) + "\n"))


if __name__ == "__main__":
    main()
