"""Peak GPU memory and images/s of `amused finetune` itself: the figures of the README's training table.

Each setting is one `amused finetune` process on the amused-512 architecture (random weights, a CLIP-L-sized
text encoder; `train_memory.py --make_synthetic`), 512 px, batch 1, and the recipe the README gives:

    full-pre     --use_8bit_adam --weights_dtype bf16 --gradient_checkpointing --fused_optimizer_step,
                 pre-encoded data (token ids + text states from `amused preencode`)
    full-enc     the same on images: the VQGAN encoder and the text encoder run in every step
    lora-pre     --use_lora --lora_r 16 --weights_dtype bf16 --gradient_checkpointing, pre-encoded
    lora-enc     the same on images

Peak memory is train_log.jsonl's `max_memory_allocated_gib` at the last step (torch.cuda.max_memory_allocated
since the process started: weights, optimizer states, gradients, activations, encoders; everything); images/s is
the median of the logged rates after the first `--warmup` steps. Beside them, in the same run,
`train_memory.py --only ref-full` / `ref-lora16`: diffusers' UVit2DModel stepped as its train_amused.py does (fp32
weights, fp16 autocast, AdamW8bit / LoRA r16), its U-ViT only.

    python benchmarks/finetune_memory.py --out $OUT/finetune_memory.json     # CUDA + bitsandbytes (+ diffusers)
    python benchmarks/finetune_memory.py --tiny --out /tmp/f.json            # CPU smoke test, tiny configs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPES = {
    "full": ["--use_8bit_adam", "--weights_dtype", "bf16", "--gradient_checkpointing", "--fused_optimizer_step"],
    "lora": ["--use_lora", "--lora_r", "16", "--weights_dtype", "bf16", "--gradient_checkpointing"],
}


def make_images(folder: Path, n: int, size: int) -> None:
    """n random RGB PNGs with captions (metadata.jsonl): the 'on images' data."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a random picture number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def run_finetune(work: Path, name: str, recipe: str, data: list[str], steps: int, tiny: bool) -> dict:
    out = work / name
    cmd = [sys.executable, "-m", "amused.cli", "finetune", "--pretrained_model_name_or_path", str(work / "pipe"),
           *data, *RECIPES[recipe], "--train_batch_size", "1", "--max_train_steps", str(steps), "--learning_rate",
           "1e-5", "--mixed_precision", "no" if tiny else "bf16", "--logging_steps", "1", "--checkpointing_steps",
           "0", "--output_dir", str(out)]
    if tiny:
        cmd = [c for c in cmd if c not in ("--use_8bit_adam", "--fused_optimizer_step")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        return {"setting": name, "error": proc.stderr.strip().splitlines()[-1:] or ["?"], "command": cmd[2:]}
    rows = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    return {"setting": name, "command": " ".join(cmd[2:]), "steps": steps, "wall_s": round(wall, 1),
            "peak_gib": rows[-1]["max_memory_allocated_gib"], "rows": len(rows), "last_loss": rows[-1]["loss"],
            "images_per_s": statistics.median(r["images_per_s"] for r in rows[len(rows) // 3:])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/amused-finetune-memory")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (smoke test)")
    p.add_argument("--skip_reference", action="store_true")
    args = p.parse_args()
    work = Path(args.work)
    # the subprocesses (amused finetune, train_memory.py) import this checkout's amused
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])
    if not (work / "pipe").is_dir():
        subprocess.run([sys.executable, str(HERE / "train_memory.py"), "--make_synthetic", str(work), "--out",
                        str(work / "synthetic.json"), *(["--tiny"] if args.tiny else [])], check=True)
        make_images(work / "images", 8, 32 if args.tiny else 512)
    res = "32" if args.tiny else "512"
    pre, imgs = ["--preencoded_data_dir", str(work / "enc")], ["--train_data_dir", str(work / "images"),
                                                               "--resolution", res, "--center_crop"]
    results = [run_finetune(work, f"{recipe}-{kind}", recipe, data, args.steps, args.tiny)
               for recipe in ("full", "lora") for kind, data in (("pre", pre), ("enc", imgs))]
    reference = []
    if not args.skip_reference and not args.tiny:
        for name in ("ref-full", "ref-lora16"):
            path = work / f"{name}.json"
            proc = subprocess.run([sys.executable, str(HERE / "train_memory.py"), "--only", name, "--out", str(path)],
                                  capture_output=True, text=True)
            reference += json.loads(path.read_text()).get("rows", []) if path.is_file() else [
                {"setting": name, "error": proc.stderr.strip().splitlines()[-1:]}]
    info = json.loads((work / "synthetic.json").read_text()) if (work / "synthetic.json").is_file() else {}
    result = {**{k: v for k, v in info.items() if k != "synthetic"}, "finetune": results, "reference": reference}
    print(f"{'setting':<12}{'peak GiB':>10}{'images/s':>10}   (amused finetune, {res} px, batch 1)")
    def fmt(x, spec):
        return "n/a" if x is None else format(x, spec)

    for r in results:
        print(f"{r['setting']:<12}" + (f"{fmt(r['peak_gib'], '.2f'):>10}{fmt(r['images_per_s'], '.2f'):>10}"
                                       if "peak_gib" in r else f"  failed: {r['error']}"))
    for r in reference:  # train_memory.py's rows: diffusers' U-ViT alone
        print(f"{r.get('name', r.get('setting', '?')):<12}{fmt(r.get('peak_gib'), '.2f'):>10}"
              f"{fmt(r.get('images_per_s'), '.2f'):>10}   {r.get('note', r.get('error', ''))}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
