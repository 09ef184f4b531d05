"""`amused serve`: an HTTP API over the pipelines, with dynamic batching (FastAPI + uvicorn).

    amused serve                              # the embedded model on http://127.0.0.1:8000, docs at /docs
    curl -s http://127.0.0.1:8000/v1/generate -H 'content-type: application/json' \
         -d '{"prompt": "red apple, openmoji style", "seed": 0, "response_format": "png"}' -o apple.png

This module holds the settings, the command and the `create_app` factory; it imports nothing heavy, so
`amused --help` stays fast and works without the serving extras. The work is in `amused.serving`:
    serving/batcher.py: the worker thread that owns the pipeline and groups queued requests into batches;
    serving/api.py: request/response schemas, routes, error mapping, the body-size limit.
docs/http_api.md describes the API, the batching and seed rules, and the load-test figures.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

EXAMPLES = """examples:
  amused serve                                    # embedded model, http://127.0.0.1:8000 (docs: /docs)
  amused serve --model amused/amused-256 --device cuda --max-batch 16 --batch-window-ms 20
  curl -s 127.0.0.1:8000/v1/generate -H 'content-type: application/json' \\
       -d '{"prompt": "red apple, openmoji style", "seed": 0}' -H 'accept: image/png' -o apple.png
  curl -s 127.0.0.1:8000/health

The server binds to 127.0.0.1 unless --host says otherwise; it has no authentication, so put it behind a
proxy that has before exposing it.
"""


@dataclass
class ServerSettings:
    """Knobs of the API and its batching worker (the `amused serve` flags set them)."""

    model_name: str = "embedded"  # reported by /health and in image metadata
    max_batch: int = 8  # images per pipeline call; a request for more runs alone
    batch_window_ms: float = 15.0  # how long the oldest batchable request waits for others to join it
    max_queue: int = 64  # requests waiting to start; one more is answered 503 with Retry-After
    timeout_s: float = 120.0  # per request, queueing included: 504 after it (and dropped if not started)
    max_body_bytes: int = 10 * 2**20  # larger request bodies are answered 413
    max_side: int = 1024  # largest height/width in pixels (generated or uploaded)

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_body_bytes", "max_side"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not self.batch_window_ms >= 0:
            raise ValueError(f"batch_window_ms must be >= 0, got {self.batch_window_ms!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")


def create_app(pipe, settings: ServerSettings | None = None):
    """The FastAPI app serving `pipe` (an `AmusedPipeline`, or anything with its call signature and
    attributes). The batching worker starts and stops with the app's lifespan (`with TestClient(app)`,
    or uvicorn)."""
    from .serving.api import build_app

    return build_app(pipe, settings or ServerSettings())


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .cli import load_pipeline

    settings = ServerSettings(model_name=args.model or "embedded", max_batch=args.max_batch,
                              batch_window_ms=args.batch_window_ms, max_queue=args.max_queue,
                              timeout_s=args.timeout_s, max_body_bytes=int(args.max_body_mb * 2**20),
                              max_side=args.max_side)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"amused serve: warning: listening on {args.host}; the API has no authentication")
    pipe = load_pipeline(None if args.model in (None, "embedded") else args.model, args.device, args.dtype)
    if not args.no_warmup:  # the first call pays one-off costs (allocator, kernels); not the first client
        pipe(["warm-up"], num_inference_steps=1)
    app = create_app(pipe, settings)
    print(f"amused serve: {settings.model_name} on {pipe.device}, http://{args.host}:{args.port} (docs: /docs)",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log)
    return 0


def add_command(subparsers) -> None:
    """Register `amused serve` on the CLI's subparsers."""
    d = ServerSettings()
    p = subparsers.add_parser("serve", help="HTTP API with dynamic batching (FastAPI)", epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the embedded model)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=d.max_batch, help=f"images per pipeline call ({d.max_batch})")
    p.add_argument("--batch-window-ms", type=float, default=d.batch_window_ms,
                   help=f"how long a request waits for others to batch with ({d.batch_window_ms:g} ms)")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"requests waiting to start before new ones get 503 ({d.max_queue})")
    p.add_argument("--timeout-s", type=float, default=d.timeout_s,
                   help=f"per-request limit, queueing included; 504 after it ({d.timeout_s:g} s)")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20,
                   help=f"request body limit, 413 above it ({d.max_body_bytes / 2**20:g} MiB)")
    p.add_argument("--max-side", type=int, default=d.max_side, help=f"largest height/width in pixels ({d.max_side})")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="weights dtype (default: fp16 on GPU, fp32 on CPU)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="log every request (default: on)")
    p.add_argument("--no-warmup", action="store_true", help="skip the one-step warm-up generation at start")
    p.set_defaults(func=cmd_serve)


def main(argv: list[str] | None = None) -> int:
    """`python -m amused.server ...`: the same as `amused serve ...`."""
    parser = argparse.ArgumentParser(prog="amused")
    add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"amused serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
