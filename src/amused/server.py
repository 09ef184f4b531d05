"""`amused serve`: an HTTP API over the pipelines, with dynamic batching (FastAPI + uvicorn).

    amused serve                              # the embedded model on http://127.0.0.1:8000, docs at /docs
    curl -s http://127.0.0.1:8000/v1/generate -H 'content-type: application/json' \
         -d '{"prompt": "red apple, openmoji style", "seed": 0, "response_format": "png"}' -o apple.png

This module holds the settings, the command and the `create_app` factory; it imports nothing heavy, so
`amused --help` stays fast and works without the serving extras. The work is in `amused.serving`:
    serving/batcher.py: the worker thread that owns the pipeline and groups queued requests into batches;
    serving/api.py: request/response schemas, routes, error mapping, the body-size limit.
    serving/ray_app.py: `amused serve --replicas N`, the same app on N Ray Serve replicas (docs/serving_ray.md).
docs/http_api.md describes the API, the batching and seed rules, and the load-test figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass

from .runtime import add_runtime_args

EXAMPLES = """examples:
  amused serve                                    # embedded model, http://127.0.0.1:8000 (docs: /docs)
  amused serve --model amused/amused-256 --device cuda --max-batch 16 --batch-window-ms 20
  curl -s 127.0.0.1:8000/v1/generate -H 'content-type: application/json' \\
       -d '{"prompt": "red apple, openmoji style", "seed": 0}' -H 'accept: image/png' -o apple.png
  curl -s 127.0.0.1:8000/health
  amused serve --replicas 8                       # the same API on Ray Serve: one replica per GPU

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
    max_work: int | None = None  # largest height x width x images x (steps + 4) of one request (the 4: each image's
    # VQ decode, counted as steps); None: twice a full default batch at the native size
    warmup: tuple[int, ...] = ()  # batch sizes captured before the first request (/health says "warming")
    host: str = "127.0.0.1"  # the bound address: Host headers must name it (or a loopback name)
    allowed_hosts: tuple[str, ...] = ()  # other names clients may use in the Host header
    allowed_origins: tuple[str, ...] = ()  # web origins allowed to call the API from a browser

    def host_names(self) -> tuple[str, ...] | None:
        """Names the Host header may carry; None (any) when bound to every interface and no list was given."""
        if self.host in ("0.0.0.0", "::") and not self.allowed_hosts:
            return None
        return ("127.0.0.1", "localhost", "::1", self.host, *self.allowed_hosts)

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_body_bytes", "max_side"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not self.batch_window_ms >= 0:
            raise ValueError(f"batch_window_ms must be >= 0, got {self.batch_window_ms!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        if self.max_work is not None and (not isinstance(self.max_work, int) or self.max_work < 1):
            raise ValueError(f"max_work must be an integer >= 1, got {self.max_work!r}")


def create_app(engine, settings: ServerSettings | None = None):
    """The FastAPI app serving `engine` (an `amused.runtime.Engine`, or a pipeline, which is wrapped in one as it
    is). The batching worker starts and stops with the app's lifespan (`with TestClient(app)`, or uvicorn)."""
    from .runtime import Engine
    from .serving.api import build_app

    settings = settings or ServerSettings()
    if not isinstance(engine, Engine):
        engine = Engine.wrap(engine, settings.model_name)
    return build_app(engine, settings)


def warmup_sizes(max_batch: int) -> tuple[int, ...]:
    """Batch sizes a server captures at start: 1 (a lone request) and max_batch (batched calls are padded up to
    it: a padded call of a captured size costs less than compiling and capturing each size)."""
    return tuple(sorted({1, max_batch}))


def settings_from_args(args: argparse.Namespace, model_name: str) -> ServerSettings:
    return ServerSettings(model_name=model_name, max_batch=args.max_batch, batch_window_ms=args.batch_window_ms,
                          max_queue=args.max_queue, timeout_s=args.timeout_s,
                          max_body_bytes=int(args.max_body_mb * 2**20), max_side=args.max_side,
                          max_work=args.max_work, warmup=() if args.no_warmup else warmup_sizes(args.max_batch),
                          host=args.host, allowed_hosts=tuple(args.allowed_host),
                          allowed_origins=tuple(args.allow_origin))


def cmd_serve(args: argparse.Namespace) -> int:
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"amused serve: warning: listening on {args.host}; the API has no authentication")
    if args.replicas is not None:
        return serve_replicas(args)
    if args.max_ongoing_requests is not None:
        raise ValueError("--max-ongoing-requests is a Ray Serve setting: use it with --replicas")
    import uvicorn

    from .runtime import engine_from_args

    engine = engine_from_args(args, expected_images=10**6)  # a server lives long: "auto" compiles
    settings = settings_from_args(args, engine.model_name)
    app = create_app(engine, settings)
    print(f"amused serve: {settings.model_name} on {engine.device} (fast path: {engine.fast}), "
          f"http://{args.host}:{args.port} (docs: /docs); warming up batch sizes {list(settings.warmup)} "
          f"(/health says when ready)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log)
    return 0


def serve_replicas(args: argparse.Namespace) -> int:
    """`amused serve --replicas N`: the same app on Ray Serve, one engine per replica (serving/ray_app.py)."""
    try:
        from .serving import ray_app
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("ray"):
            raise
        raise ValueError("--replicas runs on Ray Serve, which is not installed: pip install 'amused-mim[serve-ray]'"
                         ) from None
    max_ongoing = ray_app.check_options(args.replicas, args.max_ongoing_requests, args.max_batch)
    settings = settings_from_args(args, args.model or "embedded")
    # Ray sheds (503) once every replica holds max_ongoing requests and the proxy max_queue more, so the
    # replica's own queue bound never bites first.
    settings = dataclasses.replace(settings, max_queue=max_ongoing)
    options = ray_app.RayOptions(replicas=args.replicas, max_ongoing_requests=max_ongoing,
                                 max_queued_requests=args.max_queue, host=args.host, port=args.port,
                                 log_level=args.log_level, access_log=args.access_log)
    engine_kwargs = dict(model=args.model, device=args.device, dtype=args.dtype, fast=args.fast,
                         reference_stream=args.reference_stream, expected_images=10**6)
    return ray_app.run(engine_kwargs, settings, options)


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
    p.add_argument("--max-work", type=int, default=None,
                   help="largest height x width x images x (steps + 4) of one request, 422 above it (the 4 counts "
                        "each image's VQ decode; default: twice a full default batch at the model's native size)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="another name clients may put in the Host header (repeatable; loopback names and --host "
                        "are always allowed)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web origin (https://app.example) whose pages may call the API (repeatable; default: "
                        "none, cross-origin requests get 403)")
    add_runtime_args(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="log every request (default: on)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip capturing the batch sizes at start (the first requests of each size pay for it)")
    ray = p.add_argument_group("several replicas (Ray Serve; pip install 'amused-mim[serve-ray]', docs/serving_ray.md)")
    ray.add_argument("--replicas", type=int, default=None, metavar="N",
                     help="serve with N Ray Serve replicas, one engine each (one GPU each on CUDA; an equal share of "
                          "the CPUs otherwise); default: the one-process server")
    ray.add_argument("--max-ongoing-requests", type=int, default=None, metavar="N",
                     help="requests one replica holds (running, batching or queued); when every replica holds "
                          "them, --max-queue more wait in Ray's proxy and the rest get 503 (default: 2 x --max-batch)")
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
