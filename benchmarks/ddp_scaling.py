"""DDP scaling of `amused finetune`: images/s on 1, 2, ... GPUs of one host, same per-GPU batch.

    python benchmarks/ddp_scaling.py --gpus 1 2 --out ddp.json

Published amused-512 architecture, random weights, random pre-encoded 512 px samples
(`benchmarks/train_memory.py --make_synthetic`), full fine-tuning in bf16 mixed precision with gradient
checkpointing, launched with `accelerate launch --num_processes N -m amused.cli finetune ...` exactly as a
user would. images/s is what the trainer logs (global images over wall time between logs); the first logging
window (compilation of cuDNN/cuBLAS plans, allocator warm-up) is left out. Peak GiB is the trainer's
`max_memory_allocated_gib` at the last log (peak `torch.cuda.max_memory_allocated` of the run, the largest over
processes). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def finetune_command(n: int, syn: Path, out: Path, args) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1",
           "--mixed_precision", "bf16", "--dynamo_backend", "no"]
    if n > 1:
        cmd += ["--multi_gpu"]
    if args.tiny:
        cmd += ["--cpu"]
    cmd += ["-m", "amused.cli", "finetune", "--pretrained_model_name_or_path", str(syn / "pipe"),
            "--preencoded_data_dir", str(syn / "enc"), "--train_batch_size", str(args.batch),
            "--gradient_checkpointing", "--mixed_precision", "bf16", "--resolution", str(32 if args.tiny else 512),
            "--max_train_steps", str(args.steps),
            "--logging_steps", str(args.log_every), "--checkpointing_steps", "0", "--dataloader_num_workers", "2",
            "--output_dir", str(out)]
    if args.use_8bit_adam:
        cmd += ["--use_8bit_adam"]
    return cmd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=8, help="per GPU")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--use_8bit_adam", action="store_true", help="needs bitsandbytes")
    p.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test, one process)")
    p.add_argument("--work", default="/tmp/ddp_scaling")
    p.add_argument("--out", default="ddp_scaling.json")
    args = p.parse_args()
    work = Path(args.work)
    syn = work / "syn"
    if not (syn / "pipe").is_dir():
        subprocess.run([sys.executable, str(HERE / "train_memory.py"), "--make_synthetic", str(syn),
                        "--out", str(work / "syn.json"), *(["--tiny"] if args.tiny else [])], check=True)
    rows = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for n in args.gpus:
        out = work / f"run{n}"
        log = out / "logs" / "train_log.jsonl"
        log.unlink(missing_ok=True)
        done = subprocess.run(finetune_command(n, syn, out, args), env=env, capture_output=True, text=True)
        if done.returncode:
            rows.append({"gpus": n, "error": done.stderr[-3000:]})
            print(f"{n} GPU(s): failed\n{done.stderr[-3000:]}", flush=True)
            continue
        logs = [json.loads(line) for line in log.read_text().splitlines()]
        timed = logs[1:] or logs
        ips = sum(r["images_per_s"] for r in timed) / len(timed)
        peak = logs[-1].get("max_memory_allocated_gib")  # None on the CPU
        rows.append({"gpus": n, "per_gpu_batch": args.batch, "images_per_s": ips, "peak_gib": peak, "windows": logs})
        print(f"{n} GPU(s): {ips:.2f} images/s", flush=True)
    base = next((r["images_per_s"] for r in rows if r.get("gpus") == 1 and "images_per_s" in r), None)
    print(f"\n{'GPUs':>4} {'batch/GPU':>9} {'images/s':>9} {'speed-up':>9} {'efficiency':>10} {'peak GiB':>9}")
    for r in rows:
        if "images_per_s" not in r:
            print(f"{r['gpus']:>4} failed")
            continue
        up = r["images_per_s"] / base if base else float("nan")
        r["speedup"], r["efficiency"] = up, up / r["gpus"]
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        print(f"{r['gpus']:>4} {r['per_gpu_batch']:>9} {r['images_per_s']:>9.2f} {up:>9.2f} {up / r['gpus']:>10.0%} "
              f"{peak:>9}")
    import torch

    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "model": "amused-512 (random init)", "resolution": 512,
            "setting": "full fine-tune, bf16 autocast, gradient checkpointing, pre-encoded data, "
                       + ("AdamW8bit" if args.use_8bit_adam else "torch AdamW")}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
