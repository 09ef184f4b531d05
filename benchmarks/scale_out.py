"""Images/s against the number of workers, for bulk generation and for serving, one process beside them.

- bulk: `amused generate --prompts-file P --out-dir D` as one process, then as N processes through
  `accelerate launch` (one per GPU on CUDA; gloo CPU processes with ACCELERATE_USE_CPU=1 on the CPU); the wall
  clock of the whole command, so start-up is counted as a user pays it;
- serving: `benchmarks/load_test.py` against the one-process `amused serve`, then `amused serve --replicas N`
  (Ray Serve), at the given client levels; images/s of each level.

    python benchmarks/scale_out.py --device cpu --workers 2 --out docs/results/scale_out_cpu.json
    python benchmarks/scale_out.py --device cuda --workers 2 4 --model CKPT --out scale_out_cuda.json

On the CPU each of N processes gets cores/N threads (amused.runtime's default when AMUSED_NUM_THREADS is set
per process); the one process uses all cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS = ["red apple", "cat face", "grinning face", "pizza", "rocket", "sun", "red heart", "dog face"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bulk(n_images: int, workers: int, args, folder: Path) -> dict:
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(WORDS[i % len(WORDS)] for i in range(n_images)) + "\n")
    out = folder / f"bulk{workers}"
    common = ["-m", "amused.cli", "generate", "--prompts-file", str(prompts), "--out-dir", str(out), "--device",
              args.device, "--batch-size", str(args.batch_size), "--seed", "0", "--quiet",
              *(["--model", args.model] if args.model else [])]
    env = dict(os.environ)
    cores = os.cpu_count() or 1
    if workers == 1:
        cmd = [sys.executable, *common]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(workers),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), *common]
        if args.device == "cpu":
            env.update(ACCELERATE_USE_CPU="1", AMUSED_NUM_THREADS=str(max(1, cores // workers)))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    written = len(list(out.glob("*.png")))
    row = {"part": "bulk", "workers": workers, "images": n_images, "written": written, "wall_s": round(wall, 2),
           "images_per_s": round(written / wall, 3), "returncode": proc.returncode}
    if proc.returncode:
        row["error"] = proc.stderr.strip().splitlines()[-3:]
    return row


def serving(workers: int, args, folder: Path) -> list[dict]:
    path = folder / f"load{workers}.json"
    cmd = [sys.executable, str(HERE / "load_test.py"), "--device", args.device, "--levels", *map(str, args.levels),
           "--duration", str(args.duration), "--max-requests", "100000", "--out", str(path),
           "--startup-timeout", "600", *(["--model", args.model] if args.model else [])]
    if workers > 1:
        cmd += ["--server-args", f"--replicas {workers}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode or not path.is_file():
        return [{"part": "serve", "workers": workers, "error": proc.stderr.strip().splitlines()[-3:]}]
    result = json.loads(path.read_text())
    return [{"part": "serve", "workers": workers, "clients": lv["clients"], "ok": lv["ok"],
             "rejected_503": lv["rejected_503"], "other_errors": lv["other_errors"],
             "images_per_s": lv["requests_per_s"], "p50_s": lv["p50_s"], "replicas": lv.get("replicas")}
            for lv in result["levels"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--workers", type=int, nargs="+", default=[2], help="process / replica counts beside 1")
    p.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    p.add_argument("--images", type=int, default=64, help="bulk: prompts in the file")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--levels", type=int, nargs="+", default=[8, 32], help="serving: concurrent clients")
    p.add_argument("--duration", type=float, default=15.0, help="serving: seconds per level")
    p.add_argument("--parts", nargs="+", default=["bulk", "serve"], choices=["bulk", "serve"])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="amused-scale-") as tmp:
        for workers in [1, *args.workers]:
            if "bulk" in args.parts:
                rows.append(bulk(args.images, workers, args, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
            if "serve" in args.parts:
                rows += serving(workers, args, Path(tmp))
                print(json.dumps(rows[-1]), flush=True)
    base = {(r["part"], r.get("clients")): r["images_per_s"] for r in rows if r["workers"] == 1 and "images_per_s" in r}
    print(f"\n{'part':<6}{'workers':>8}{'clients':>8}{'images/s':>10}{'x one':>7}")
    for r in rows:
        if "images_per_s" not in r:
            print(f"{r['part']:<6}{r['workers']:>8}   failed: {r.get('error')}")
            continue
        one = base.get((r["part"], r.get("clients")))
        print(f"{r['part']:<6}{r['workers']:>8}{str(r.get('clients', '-')):>8}{r['images_per_s']:>10.2f}"
              f"{(r['images_per_s'] / one if one else float('nan')):>7.2f}")
    meta = {"device": args.device, "cpu_count": os.cpu_count(), "model": args.model or "embedded",
            "images": args.images, "batch_size": args.batch_size, "levels": args.levels, "duration_s": args.duration}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
