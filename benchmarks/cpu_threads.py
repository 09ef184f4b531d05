"""CPU threads against the time of one image from the embedded model, on an idle machine and with one busy
competitor: the figures behind `amused.runtime.configure_cpu_threads`.

    python benchmarks/cpu_threads.py                                  # 1..cores threads, 7 repeats
    python benchmarks/cpu_threads.py --threads 1 2 --repeats 9 --out docs/results/cpu_threads.json
    OMP_WAIT_POLICY=PASSIVE python benchmarks/cpu_threads.py --out cpu_threads_passive.json  # no spinning

One call = one 64x64 image, 12 steps, seed 0, the model's default guidance (two forward passes a step), decoded
to PIL, on `load_engine("embedded", device="cpu")`. For each thread count (`torch.set_num_threads` in this
process) two loads are timed: "idle" and "busy", where a `python -c "while True: pass"` subprocess spins for
the whole call (started 0.3 s before it, killed after it), as another job on the same machine would. Rounds are
interleaved (every setting once per round), so a drift in the machine's other load touches every setting alike;
the 1-minute load average before each call is recorded (it counts this process and its competitor too).
Environment variables that change threading (OMP_NUM_THREADS, AMUSED_NUM_THREADS, OMP_WAIT_POLICY) are
recorded with the command. Prints a table (median, min, max seconds) and writes JSON. Results and the rule
they support: docs/reliability.md, "CPU threads".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

BUSY = [sys.executable, "-c", "while True: pass"]


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def timed_call(engine, threads: int, busy: bool, steps: int) -> float:
    import torch

    torch.set_num_threads(threads)
    competitor = subprocess.Popen(BUSY) if busy else None
    try:
        if competitor is not None:
            time.sleep(0.3)  # let it get scheduled and spinning
        start = time.perf_counter()
        image = engine.pipe("red apple, google style", num_inference_steps=steps,
                            generator=engine.generator(0)).images[0]
        seconds = time.perf_counter() - start
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    assert image.size == (64, 64), image.size
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default: 1..cores)")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per setting (the median is reported)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out", default="docs/results/cpu_threads.json")
    args = p.parse_args()

    import torch

    from amused.runtime import load_engine

    n_cores = cores()
    thread_counts = args.threads or list(range(1, n_cores + 1))
    settings = [(t, busy) for t in thread_counts for busy in (False, True)]
    engine = load_engine("embedded", device="cpu")
    rule = torch.get_num_threads()  # what load_engine's configure_cpu_threads picked
    for t in thread_counts:  # warm-up: the allocator and each OpenMP pool size once
        timed_call(engine, t, False, args.steps)

    times = {s: [] for s in settings}
    loads = {s: [] for s in settings}
    for _ in range(args.repeats):
        for s in settings:
            loads[s].append(round(os.getloadavg()[0], 2))
            times[s].append(timed_call(engine, *s, args.steps))
            print(f"threads {s[0]:>2} {'busy' if s[1] else 'idle'}: {times[s][-1]:.3f} s", flush=True)

    rows = [{"threads": t, "load": "busy" if busy else "idle", "median_s": round(statistics.median(times[t, busy]), 4),
             "min_s": round(min(times[t, busy]), 4), "max_s": round(max(times[t, busy]), 4),
             "seconds": [round(x, 4) for x in times[t, busy]], "loadavg_1min_before": loads[t, busy]}
            for t, busy in settings]
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "AMUSED_NUM_THREADS", "OMP_WAIT_POLICY")}
    command = [*(f"{k}={v}" for k, v in env.items() if v), "python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]
    result = {"command": " ".join(command), "model": "embedded", "image": "64x64", "steps": args.steps,
              "repeats": args.repeats, "cores": n_cores, "rule_threads": rule, "env": env,
              "torch": torch.__version__, "parallel_info": torch.__config__.parallel_info().splitlines()[:6],
              "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
              "loadavg_end": [round(x, 2) for x in os.getloadavg()], "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")

    print(f"\n{cores()} cores; configure_cpu_threads picks {rule} (env: {result['env']})")
    print(f"{'threads':>7} {'idle median':>12} {'idle min-max':>14} {'busy median':>12} {'busy min-max':>14}")
    for t in thread_counts:
        idle, busy = (next(r for r in rows if r["threads"] == t and r["load"] == load) for load in ("idle", "busy"))
        print(f"{t:>7} {idle['median_s']:>11.3f}s {idle['min_s']:>6.3f}-{idle['max_s']:<6.3f} "
              f"{busy['median_s']:>11.3f}s {busy['min_s']:>6.3f}-{busy['max_s']:<6.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
