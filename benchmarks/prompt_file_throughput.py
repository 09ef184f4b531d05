"""Images/s of `amused generate --prompts-file` at batch 1 against batch 8, same prompts, same process.

    python benchmarks/prompt_file_throughput.py --n 100 [--model PATH] [--device cpu]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from amused.cli import main

WORDS = ["red apple", "cat face", "grinning face", "pizza", "rocket", "sun", "red heart", "dog face", "thumbs up",
         "pear", "fire", "star"]
STYLES = ["google", "twitter", "openmoji"]


def run(n: int, batch: int, model: str | None, device: str, folder: Path) -> float:
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(f"{WORDS[i % len(WORDS)]}, {STYLES[i % len(STYLES)]} style" for i in range(n)))
    argv = ["generate", "--prompts-file", str(prompts), "--batch-size", str(batch), "--out-dir",
            str(folder / f"b{batch}"), "--device", device, "--quiet"] + (["--model", model] if model else [])
    start = time.perf_counter()
    main(argv)
    return time.perf_counter() - start


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = {b: run(args.n, b, args.model, args.device, Path(tmp)) for b in (1, 8)}
    print(f"{'batch':>5} {'seconds':>8} {'images/s':>9}")
    for b, s in rows.items():
        print(f"{b:>5} {s:8.1f} {args.n / s:9.2f}")
    print(json.dumps({"n": args.n, "seconds": rows}))
