"""What users get: the commands themselves, timed as whole processes, side by side with diffusers on the same weights.

On a CUDA machine, with amused-512's published architecture and random weights saved in the published layout
(fp16), in one process tree:
- startup: `amused generate "PROMPT" --model CKPT --out x.png` as a whole process, one image, under each
  `--fast` mode (off, graph, compile with an empty compile cache, compile again with the cache warm), the old
  behaviour (`--reference-stream --fast off`) and the default; against a plain diffusers script that does the same
  (import, load, generate one image, save);
- prompts: 64 prompts from a file (`--prompts-file`, batch 8) under the default and `--fast graph`, images/s
  after the first batch from the command's own --json timings; the diffusers script over the same file;
- server: `benchmarks/load_test.py` against `amused serve --model CKPT` at 1, 8 and 32 concurrent clients;
- engine: `amused.bench.run` on the same checkpoint, batch 1 and 8 (ours compiled + graphs vs diffusers eager).
Prints a table per part and writes JSON.

Startup also runs with the text encoder loaded by transformers (`AMUSED_TEXT_BACKEND=transformers`, what every run
did before amused had its own CLIP), and, with `--before DIR` (a checkout of older code, e.g. `git worktree add
DIR main`), that code's default. `--device cpu` runs the startup part on the CPU (float32 weights; `--steps` and
`--size` keep the image part short) to compare loading side by side on a machine without a GPU; `--rounds N` runs
each case N times, interleaved, and reports the medians of wall and CPU time (on a shared machine single runs vary
by seconds).

    python benchmarks/user_facing.py --out docs/results/user_facing_h200.json
    python benchmarks/user_facing.py --parts prompts server --ckpt /tmp/amused-512   # reuse a checkpoint
    python benchmarks/user_facing.py --device cpu --preset amused-256 --parts startup --steps 1 --size 64 \
        --rounds 5 --before /tmp/main --out docs/results/user_facing_startup_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DIFFUSERS_SCRIPT = '''
import os, sys, time
t0 = time.perf_counter()
import torch
from diffusers import AmusedPipeline
ckpt, out, prompts_file = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None
device, steps = os.environ.get("BENCH_DEVICE", "cuda"), int(os.environ.get("BENCH_STEPS", "12"))
side = int(os.environ.get("BENCH_SIZE") or 0)
size = {"height": side, "width": side} if side else {}
dtype = torch.float16 if device == "cuda" else torch.float32
pipe = AmusedPipeline.from_pretrained(ckpt, torch_dtype=dtype).to(device)
pipe.set_progress_bar_config(disable=True)
t1 = time.perf_counter()
prompts = [l.strip() for l in open(prompts_file) if l.strip()] if prompts_file else ["a cat"]
first = rest = 0.0
for b in range(0, len(prompts), 8):
    s = time.perf_counter()
    images = pipe(prompts[b:b + 8], generator=torch.Generator(device).manual_seed(b), num_inference_steps=steps,
                  **size).images
    for i, image in enumerate(images):
        image.save(f"{out}_{b + i}.png")
    if b == 0: first = time.perf_counter() - s
    else: rest += time.perf_counter() - s
n_rest = len(prompts) - min(8, len(prompts))
print({"load_s": t1 - t0, "first_batch_s": first, "images_per_s_after_first_batch": n_rest / rest if rest else None})
'''
PROMPTS = ["a red apple", "a cat wearing sunglasses", "a lighthouse at dusk", "a bowl of ramen", "a watercolor fox",
           "a robot reading a book", "a snowy mountain village", "an astronaut riding a horse"]


def make_checkpoint(folder: Path, preset: str, device: str = "cuda") -> Path:
    import torch

    from amused.bench import random_pipeline

    if (folder / "model_index.json").is_file():
        return folder
    pipe = random_pipeline(preset, device, torch.float16 if device == "cuda" else torch.float32)
    pipe.save_pretrained(folder)
    return folder


def timed_process(cmd: list[str], env: dict | None = None, timeout: float = 900) -> dict:
    """Wall time and CPU time (user + system, every thread; steadier than wall time on a shared machine)."""
    import resource

    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - used.ru_utime - used.ru_stime
    row = {"command": " ".join(cmd[1:] if cmd[0] == sys.executable else cmd), "wall_s": round(wall, 2),
           "cpu_s": round(cpu, 2), "returncode": r.returncode}
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    if r.returncode:
        row["error"] = (r.stderr or r.stdout)[-1500:]
    elif last.startswith("{"):
        try:
            row["reported"] = json.loads(last)
        except json.JSONDecodeError:
            import ast

            row["reported"] = ast.literal_eval(last)
    return row


def amused_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "amused.cli", *args]


def startup(ckpt: Path, work: Path, cache: Path, quick: bool = False, device: str = "cuda", steps: int = 12,
            rounds: int = 1, before: Path | None = None, size: int | None = None) -> list[dict]:
    base = ["generate", "a cat", "--model", str(ckpt), "--seed", "0", "--json", "--device", device, "--steps",
            str(steps), *(["--height", str(size), "--width", str(size)] if size else [])]
    env = {"TORCHINDUCTOR_CACHE_DIR": str(cache), "BENCH_DEVICE": device, "BENCH_STEPS": str(steps),
           "BENCH_SIZE": str(size or "")}
    script = work / "diffusers_one.py"
    script.write_text(DIFFUSERS_SCRIPT)
    transformers_text = {"AMUSED_TEXT_BACKEND": "transformers"}
    cases = [("diffusers script", [sys.executable, str(script), str(ckpt), str(work / "d")]),
             ("amused default", amused_cmd(*base, "--out", str(work / "a.png"))),
             ("amused default, transformers text encoder", amused_cmd(*base, "--out", str(work / "t.png")),
              transformers_text),
             ("--fast off", amused_cmd(*base, "--out", str(work / "b.png"), "--fast", "off")),
             ("--fast graph", amused_cmd(*base, "--out", str(work / "c.png"), "--fast", "graph")),
             ("--fast compile (cold cache)", amused_cmd(*base, "--out", str(work / "e.png"), "--fast", "compile")),
             ("--fast compile (warm cache)", amused_cmd(*base, "--out", str(work / "f.png"), "--fast", "compile")),
             ("--reference-stream --fast off (before)", amused_cmd(*base, "--out", str(work / "g.png"), "--fast", "off",
                                                                   "--reference-stream")),
             ("diffusers script (again)", [sys.executable, str(script), str(ckpt), str(work / "d2")]),
             ("import amused.cli", [sys.executable, "-c", "import amused.cli"]),
             ("import torch", [sys.executable, "-c", "import torch"])]
    if before is not None:
        cases.insert(3, (f"amused default, {before}", amused_cmd(*base, "--out", str(work / "b4.png")),
                         {"PYTHONPATH": str(before / "src")}))
    keep = {"diffusers script", "amused default", "amused default, transformers text encoder", "--fast graph",
            "import torch", "import amused.cli"} | ({f"amused default, {before}"} if before else set())
    if device != "cuda":  # the --fast rows need CUDA
        keep -= {"--fast graph"}
        cases = [c for c in cases if c[0] in keep]
    elif quick:  # the defaults, graph and diffusers only (the compile and reference rows take minutes)
        cases = [c for c in cases if c[0] in keep]
    else:
        shutil.rmtree(cache, ignore_errors=True)
    runs: dict[str, list[dict]] = {}
    for _ in range(rounds):  # interleaved, so that a slow minute on a shared machine hits every case alike
        for name, cmd, *extra in cases:
            row = timed_process(cmd, {**env, **(extra[0] if extra else {})})
            runs.setdefault(name, []).append(row)
            print(json.dumps({"case": name, **row})[:400], flush=True)
    rows = []
    for name, cmd, *_ in cases:
        row = {"case": name, **runs[name][len(runs[name]) // 2]}
        if rounds > 1:
            for key in ("wall_s", "cpu_s"):
                row[key] = round(statistics.median(r[key] for r in runs[name]), 2)
                row[f"{key}_runs"] = [r[key] for r in runs[name]]
            loads = [load_seconds(r) for r in runs[name] if load_seconds(r) is not None]
            if loads:
                row["load_s_median"] = round(statistics.median(loads), 2)
        rows.append(row)
    return rows


def load_seconds(row: dict) -> float | None:
    """The load time a run reported: amused's `seconds.load` (imports included), the diffusers script's load_s."""
    rep = row.get("reported") or {}
    return rep.get("seconds", {}).get("load", rep.get("load_s"))


def prompts(ckpt: Path, work: Path, cache: Path, n: int = 64, quick: bool = False) -> list[dict]:
    env = {"TORCHINDUCTOR_CACHE_DIR": str(cache)}
    file = work / "prompts.txt"
    file.write_text("\n".join((PROMPTS * (n // len(PROMPTS) + 1))[:n]) + "\n")
    script = work / "diffusers_one.py"
    script.write_text(DIFFUSERS_SCRIPT)
    rows = []
    for name, cmd in [
            ("amused default (auto: compile)", amused_cmd("generate", "--prompts-file", str(file), "--model", str(ckpt),
                                                         "--out-dir", str(work / "p1"), "--json")),
            ("amused --fast graph", amused_cmd("generate", "--prompts-file", str(file), "--model", str(ckpt),
                                               "--out-dir", str(work / "p2"), "--json", "--fast", "graph")),
            ("diffusers script", [sys.executable, str(script), str(ckpt), str(work / "p3"), str(file)])][:1 if quick else 3]:
        row = {"case": name, "images": n, **timed_process(cmd, env)}
        rows.append(row)
        print(json.dumps(row)[:400], flush=True)
    return rows


def server(ckpt: Path, work: Path, cache: Path, duration: float, levels=(1, 8, 32)) -> dict:
    out = work / "load.json"
    cmd = [sys.executable, str(HERE / "load_test.py"), "--model", str(ckpt), "--device", "cuda", "--levels",
           *map(str, levels), "--duration", str(duration), "--max-requests", "100000", "--startup-timeout", "600",
           "--out", str(out)]
    row = timed_process(cmd, {"TORCHINDUCTOR_CACHE_DIR": str(cache)}, timeout=1200)
    result = json.loads(out.read_text()) if out.is_file() else {"error": row.get("error")}
    result["wall_s"] = row["wall_s"]
    print(json.dumps(result)[:1500], flush=True)
    return result


def engine(ckpt: Path, repeats: int, reference: bool = True) -> list[dict]:
    from amused.bench import run

    return run(batches=(1, 8), repeats=repeats, device="cuda", dtype="fp16", model=str(ckpt), out=None,
               reference=reference)


def print_summary(result: dict) -> None:
    print("\n== startup: one image, whole process ==")
    for r in result.get("startup", []):
        rep = r.get("reported") or {}
        secs = rep.get("seconds", {})
        load = r.get("load_s_median", secs.get("load", rep.get("load_s", float("nan"))))
        print(f"{r['case']:<42} {r['wall_s']:>7.2f} s  cpu {r['cpu_s']:>7.2f} s  load {load:.2f}  "
              f"{'FAILED' if r['returncode'] else ''}")
    print("\n== 64 prompts ==")
    for r in result.get("prompts", []):
        rep = r.get("reported") or {}
        print(f"{r['case']:<42} {r['wall_s']:>7.2f} s  after first batch: "
              f"{rep.get('images_per_s_after_first_batch')} images/s")
    if "server" in result and "levels" in result["server"]:
        print("\n== server ==")
        for lv in result["server"]["levels"]:
            print(f"{lv['clients']:>3} clients: {lv['requests_per_s']:.2f} images/s, p50 {lv['p50_s']}, "
                  f"p99 {lv['p99_s']}, 503s {lv['rejected_503']}, errors {lv['other_errors']}, "
                  f"batch {lv['mean_batch_images']}, server p50 ms {lv.get('server_p50_ms')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["startup", "prompts", "server", "engine"],
                        choices=["startup", "prompts", "server", "engine"])
    parser.add_argument("--preset", default="amused-512")
    parser.add_argument("--ckpt", type=Path, default=None, help="checkpoint folder (made here if missing)")
    parser.add_argument("--cache", type=Path, default=None, help="torch.compile cache folder for the runs")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per server load level")
    parser.add_argument("--repeats", type=int, default=10, help="engine timings: calls per row")
    parser.add_argument("--quick", action="store_true", help="fewer cases: the defaults against diffusers")
    parser.add_argument("--out", type=Path, default=Path("user_facing.json"))
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32], help="server: concurrent clients")
    parser.add_argument("--no-engine-reference", action="store_true",
                        help="engine: skip diffusers' timings (the server's targets compare with the engine only)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the startup part only")
    parser.add_argument("--steps", type=int, default=12, help="startup: steps of the one image")
    parser.add_argument("--rounds", type=int, default=1, help="startup: runs of each case (median reported)")
    parser.add_argument("--before", type=Path, default=None, help="startup: also time this checkout's code")
    parser.add_argument("--size", type=int, default=None, help="startup: image side in pixels (default: native)")
    args = parser.parse_args()
    import torch

    if args.device == "cpu" and set(args.parts) != {"startup"}:
        parser.error("--device cpu runs the startup part only: pass --parts startup")
    work = Path(tempfile.mkdtemp(prefix="amused-user-"))
    ckpt = make_checkpoint(args.ckpt or work / args.preset, args.preset, args.device)
    cache = args.cache or work / "compile-cache"
    dtype = "fp16" if args.device == "cuda" else "fp32"
    result = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else
              f"cpu: {os.cpu_count()} cores, {platform.processor() or platform.machine()}",
              "torch": torch.__version__, "preset": args.preset, "steps": args.steps, "rounds": args.rounds,
              "size": args.size,
              "checkpoint": f"published architecture, random weights, {dtype}, saved by amused save_pretrained"}
    try:
        import diffusers

        result["diffusers"] = diffusers.__version__
    except ImportError:
        result["diffusers"] = None
    for part in args.parts:
        if part == "startup":
            result["startup"] = startup(ckpt, work, cache, args.quick, args.device, args.steps, args.rounds,
                                        args.before, args.size)
        elif part == "prompts":
            result["prompts"] = prompts(ckpt, work, cache, quick=args.quick)
        elif part == "server":
            result["server"] = server(ckpt, work, cache, args.duration, args.levels)
        else:  # compiles into the same on-disk cache as the server, so a server part after it starts sooner
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
            result["engine"] = engine(ckpt, args.repeats, reference=not args.no_engine_reference)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print_summary(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
