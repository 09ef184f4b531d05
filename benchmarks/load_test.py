"""Load test of `amused serve` on loopback: requests/s, latency percentiles, 503s and the server's memory.

Starts the server (`python -m amused.server`, the embedded model on the CPU by default) on 127.0.0.1 as a
subprocess, then drives it with 1, 8 and 32 concurrent clients in turn. Each level is bounded in time and in
count (--duration seconds or --max-requests, whichever comes first; requests in flight are then awaited).
Clients send text-to-image requests without a seed (so the server may batch them), with varied prompts; a
client that gets 503 waits for Retry-After (at most 1 s) and tries a new request. The server's RSS is sampled
before, during (peak) and after each level. At the end, one more request checks that the server recovered.
Prints a table and writes JSON.

The same figures for `amused serve --replicas N` (Ray Serve, docs/serving_ray.md): the RSS is then that of the
server's whole process tree (Ray's processes and the replicas), and each answer's `X-Amused-Replica` header
counts the requests per replica. `--url` drives a server that is already running (no RSS figures).

    python benchmarks/load_test.py                                   # 1, 8, 32 clients, 20 s / 200 each
    python benchmarks/load_test.py --levels 32 --server-args "--max-queue 8" --out overload.json
    python benchmarks/load_test.py --device cuda --server-args "--replicas 8"     # one replica per GPU
    python benchmarks/load_test.py --url http://gpu-box:8000 --levels 8 32 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = ["red apple", "smiling cat face", "rocket", "sun with rays", "green tree", "blue heart", "pizza slice",
           "snowman", "yellow star", "grinning face", "umbrella with rain", "watermelon", "guitar", "ghost",
           "crescent moon", "hot beverage"]


def rss_bytes(pid: int | None) -> int | None:
    """RSS of the server and everything under it (with --replicas: Ray's processes and the replicas)."""
    if pid is None:
        return None
    try:
        import psutil
    except ImportError:  # Linux without psutil: the server process alone
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise
    total = 0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:  # ended meanwhile
            pass
    return total


def mib(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float) -> dict:
    end = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < end:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {proc.returncode}")
            try:
                r = await client.get(url + "/health", timeout=2)
                if r.status_code == 200:
                    return r.json()
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"the server was not ready within {timeout:g} s")


async def run_level(url: str, pid: int | None, clients: int, duration: float, max_requests: int,
                    request_timeout: float) -> dict:
    """`clients` concurrent loops of requests until the time or count bound; returns the figures."""
    records: list[tuple[int, float]] = []  # (status, seconds)
    shares: list[float] = []  # 1 / requests in the pipeline call, per answered request: their sum counts the calls
    replicas: dict[str, int] = {}  # X-Amused-Replica -> requests answered
    server_ms: dict[str, list[float]] = {"queue_ms": [], "run_ms": [], "total_ms": []}  # the server's own timing
    issued = 0
    end = time.monotonic() + duration
    peak = rss_bytes(pid)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(client: httpx.AsyncClient, index: int):
        nonlocal issued
        while issued < max_requests and time.monotonic() < end:
            issued += 1
            payload = {"prompt": f"{PROMPTS[(issued + index) % len(PROMPTS)]}, openmoji style"}
            t0 = time.monotonic()
            try:
                r = await client.post(url + "/v1/generate", json=payload, timeout=request_timeout)
                status = r.status_code
                if status == 200:
                    body = r.json()
                    shares.append(1 / body["batch_size"])
                    for key, values in server_ms.items():
                        values.append(body.get("timing", {}).get(key, float("nan")))
                    replica = r.headers.get("x-amused-replica", "one process")
                    replicas[replica] = replicas.get(replica, 0) + 1
            except httpx.HTTPError:
                status = -1  # transport error or client timeout
            records.append((status, time.monotonic() - t0))
            if status == 503:
                await asyncio.sleep(min(1.0, float(r.headers.get("retry-after", 1))))

    async def sample_memory():
        nonlocal peak
        while pid is not None:
            peak = max(peak, rss_bytes(pid))
            await asyncio.sleep(0.25)

    async with httpx.AsyncClient(limits=limits) as client:
        rss_before = rss_bytes(pid)
        sampler = asyncio.create_task(sample_memory())
        t0 = time.monotonic()
        await asyncio.gather(*(client_loop(client, i) for i in range(clients)))
        elapsed = time.monotonic() - t0
        sampler.cancel()
    ok = [s for status, s in records if status == 200]
    # one image per request: images per call = requests / calls (from the answers, so it holds across replicas)
    calls = sum(shares)
    return {"clients": clients, "requests": len(records), "ok": len(ok),
            "rejected_503": sum(status == 503 for status, _ in records),
            "other_errors": {str(c): sum(status == c for status, _ in records)
                             for c in sorted({status for status, _ in records} - {200, 503})},
            "seconds": round(elapsed, 2), "requests_per_s": round(len(ok) / elapsed, 3),
            "p50_s": percentile(ok, 0.5), "p90_s": percentile(ok, 0.9), "p99_s": percentile(ok, 0.99),
            "mean_batch_images": round(len(ok) / calls, 2) if calls else None, "replicas": replicas,
            # where a request's time goes (medians, ms): waiting in the queue, the pipeline call, the whole
            # request inside the server (adds PNG encoding); the client's p50 adds HTTP and JSON on both ends
            "server_p50_ms": {k: percentile(v, 0.5) for k, v in server_ms.items()},
            "rss_before_mib": mib(rss_before), "rss_peak_mib": mib(peak), "rss_after_mib": mib(rss_bytes(pid))}


def print_table(rows: list[dict]) -> None:
    header = (f"{'clients':>7} {'ok':>5} {'503':>5} {'err':>4} {'req/s':>7} {'p50 s':>7} {'p90 s':>7} {'p99 s':>7} "
              f"{'batch':>6} {'replicas':>8} {'RSS before/peak/after MiB':>26} {'server queue/run/total ms':>26}")
    print(header)
    print("-" * len(header))
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        rss = "-" if r["rss_before_mib"] is None else \
            f"{r['rss_before_mib']:.0f} / {r['rss_peak_mib']:.0f} / {r['rss_after_mib']:.0f}"
        print(f"{r['clients']:>7} {r['ok']:>5} {r['rejected_503']:>5} {sum(r['other_errors'].values()):>4} "
              f"{r['requests_per_s']:>7.2f} {fmt(r['p50_s']):>7} {fmt(r['p90_s']):>7} {fmt(r['p99_s']):>7} "
              f"{fmt(r['mean_batch_images']):>6} {len(r['replicas']):>8} {rss:>26} "
              f"{' / '.join(fmt(r['server_p50_ms'][k]) for k in ('queue_ms', 'run_ms', 'total_ms')):>26}")


async def main_async(args) -> dict:
    proc, command = None, None
    if args.url:  # a server that is already running: no process of ours to measure
        url = args.url.rstrip("/")
    else:
        port = args.port or free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "amused.server", "--host", "127.0.0.1", "--port", str(port), "--device",
                   args.device, "--no-access-log", "--log-level", "warning", *shlex.split(args.server_args)]
        if args.model:
            command += ["--model", args.model]
        log = tempfile.NamedTemporaryFile("w+", prefix="amused-serve-", suffix=".log", delete=False)
        print(f"starting: {shlex.join(command)}  (log: {log.name})", flush=True)
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    pid = None if proc is None else proc.pid
    try:
        health = await wait_ready(url, proc, args.startup_timeout)
        rss_start = rss_bytes(pid)
        async with httpx.AsyncClient() as client:  # warm-up, not measured: one batch of the largest size
            await asyncio.gather(*(client.post(url + "/v1/generate", json={"prompt": p}, timeout=args.request_timeout)
                                   for p in PROMPTS[:health["max_batch"]]))
        rows = []
        for clients in args.levels:
            print(f"level: {clients} clients (<= {args.duration:g} s or {args.max_requests} requests)", flush=True)
            rows.append(await run_level(url, pid, clients, args.duration, args.max_requests, args.request_timeout))
        async with httpx.AsyncClient() as client:  # recovery: the queue drained, a new request is served
            t0 = time.monotonic()
            recovery = await client.post(url + "/v1/generate", json={"prompt": "red apple", "seed": 0},
                                         timeout=args.request_timeout)
            final = (await client.get(url + "/health")).json()
        return {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "url": url,
                "server_command": command and shlex.join(command),
                "device": health["device"], "model": health["model"], "max_batch": health["max_batch"],
                "batch_window_ms": health["batch_window_ms"], "max_queue": health["max_queue"],
                "cpu_count": os.cpu_count(), "platform": platform.platform(), "loadavg_end": os.getloadavg(),
                "duration_bound_s": args.duration, "max_requests": args.max_requests,
                "rss_start_mib": mib(rss_start), "levels": rows,
                "recovery": {"status": recovery.status_code, "seconds": round(time.monotonic() - t0, 3),
                             "queue_depth": final["queue_depth"], "stats": final["stats"]}}
    finally:
        if proc is not None:
            proc.terminate()  # with --replicas the server then takes its Ray instance down
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients per level")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per level (new requests stop then)")
    parser.add_argument("--max-requests", type=int, default=200, help="requests per level at most")
    parser.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--port", type=int, default=0, help="default: a free one")
    parser.add_argument("--url", default=None,
                        help="drive a server that is already running (http://gpu-box:8000) instead of starting one")
    parser.add_argument("--server-args", default="", help="extra `amused serve` flags, e.g. '--max-queue 8'")
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--request-timeout", type=float, default=180.0)
    parser.add_argument("--out", type=Path, default=Path("load_test.json"))
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    print()
    rss = "-" if result["rss_start_mib"] is None else f"{result['rss_start_mib']:.0f}"
    print(f"{result['model']} on {result['device']} ({result['cpu_count']} CPUs), max batch {result['max_batch']}, "
          f"window {result['batch_window_ms']:g} ms, max queue {result['max_queue']}; RSS at start {rss} MiB")
    print_table(result["levels"])
    rec = result["recovery"]
    print(f"after the load: a new request -> {rec['status']} in {rec['seconds']:.2f} s, queue depth "
          f"{rec['queue_depth']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
