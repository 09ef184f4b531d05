"""`amused serve --replicas N`: the same HTTP API on Ray Serve, one replica (one engine) per GPU.

    amused serve --replicas 8                    # one replica per GPU of this machine (or of the Ray cluster
                                                 # that RAY_ADDRESS names), http://127.0.0.1:8000

Each replica is a Ray Serve deployment replica that loads one `amused.runtime.Engine` and runs the one-process
server's FastAPI app on it (`serving/api.py`, with its batching worker, `serving/batcher.py`): the routes, the
request and response schemas, the validation, the errors and the batching rules are the same objects, not copies.
What Ray adds:
- replicas: `num_replicas=N`, each with `num_gpus=1` on CUDA (its own GPU) or an equal share of the CPUs;
- routing: Ray's HTTP proxy sends each request to the less loaded of two replicas (power of two choices);
- shedding: a replica takes at most `--max-ongoing-requests` requests (running, batching or queued in it);
  when every replica is full, the proxy holds at most `--max-queue` more and answers 503 beyond that;
- health: Ray calls `check_health` on every replica (the batching worker must be alive) and replaces a replica
  that fails it or whose process dies; a replica takes traffic only once loaded and warmed up.

Batching stays ours (`serving/batcher.py`) rather than `@serve.batch`: Ray's batch queue is first come, first
served by request count, while ours groups only compatible requests (same size, steps, guidance, temperature,
sampler, no seed) and counts images; and a request that `@serve.batch` refuses through `batch_size_fn` goes to the
back of its queue (Ray's own note in ray/serve/batching.py), so a steady stream of one kind could starve another.
docs/serving_ray.md has the rest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ray import serve

if TYPE_CHECKING:
    from ..server import ServerSettings

APP_NAME = "amused"
REPLICA_HEADER = b"x-amused-replica"
RETRY_AFTER_S = 1  # Retry-After of the proxy's 503s (Ray's answer is static: it knows no batch times)
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"


@dataclass
class RayOptions:
    """How `amused serve --replicas` deploys (the Ray Serve side of the flags)."""

    replicas: int  # num_replicas: one engine each
    max_ongoing_requests: int  # per replica: running, batching and queued in it; more wait in the proxy
    max_queued_requests: int  # requests the proxy holds while every replica is full; one more gets 503
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    access_log: bool = True  # a line per request in the replicas' logs
    health_check_period_s: float = 5.0  # how often Ray calls check_health on each replica


def check_options(replicas: int, max_ongoing_requests: int | None, max_batch: int) -> int:
    """Validate the flags; returns max_ongoing_requests (default: two full batches, one running and one forming)."""
    if not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"--replicas must be an integer >= 1, got {replicas!r}")
    if max_ongoing_requests is None:
        return 2 * max_batch
    if max_ongoing_requests < 1:
        raise ValueError(f"--max-ongoing-requests must be an integer >= 1, got {max_ongoing_requests!r}")
    return max_ongoing_requests


# ----------------------------------------------------------------------------------------------------------
# The replica: one engine, the one-process server's app
# ----------------------------------------------------------------------------------------------------------

class ReplicaHeader:
    """Pure ASGI: every response names the replica that made it (`X-Amused-Replica`)."""

    def __init__(self, app, replica_id: str):
        self.app, self.value = app, replica_id.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged_send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, self.value)]}
            await send(message)

        return await self.app(scope, receive, tagged_send)


@serve.deployment(name=APP_NAME)
@serve.ingress()
class AmusedReplica:
    """A Ray Serve replica: loads the engine (and warms it up) before Ray routes traffic to it, then serves the
    FastAPI app of `serving/api.py` on it.

    Args:
        engine_kwargs: `amused.runtime.load_engine` arguments (model, device, dtype, fast, reference_stream).
        settings: the API's settings, as `amused serve` builds them (`warmup`: batch sizes warmed here).
    """

    async def __init__(self, engine_kwargs: dict[str, Any], settings: ServerSettings):
        from ..runtime import load_engine

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.engine = await asyncio.to_thread(load_engine, **engine_kwargs)
        # Warm up here, not in the batching worker: Ray routes requests to a replica only once its constructor
        # has returned, so a new (or replacement) replica takes no traffic while it captures its graphs.
        self.warmup_s = await asyncio.to_thread(self.engine.warm_up, settings.warmup) if settings.warmup else None
        self.settings = dataclasses.replace(settings, model_name=self.engine.model_name, warmup=())

    def __serve_build_asgi_app__(self):
        from .api import build_app

        app = build_app(self.engine, self.settings)
        app.state.service.batcher.warmup_s = self.warmup_s  # /health reports the warm-up done in __init__
        app.add_middleware(ReplicaHeader, replica_id=self.replica_id)
        self.service = app.state.service
        return app

    def check_health(self):
        """Ray calls this every few seconds; an exception (or no answer) gets the replica replaced."""
        if not self.service.batcher.alive:
            raise RuntimeError(f"replica {self.replica_id}: the batching worker thread is down")


# ----------------------------------------------------------------------------------------------------------
# The proxy: Ray's own error answers in the API's error shape
# ----------------------------------------------------------------------------------------------------------

class ProxyErrors:
    """Pure ASGI, in Ray's HTTP proxy: the answers the proxy makes itself get the API's JSON error body,
    `{"error": code, "message": text}`, as every answer of the one-process server has.

    - 503 from backpressure (every replica full and the proxy's queue full): `queue_full`, with Retry-After, as
      in the one-process server; other 503s (no replica running yet): `unavailable`.
    - No answer at all: the proxy lost the request because the replica holding it died (Ray does not resend a
      request that a replica had started). It becomes 503 `replica_lost` with Retry-After: generating has no side
      effects, so the request may be sent again, and Ray is starting a replacement.
    Answers from a replica carry `X-Amused-Replica` and pass untouched.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, held = False, {}

        async def rewriting_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = dict(message.get("headers", []))
                if message["status"] == 503 and REPLICA_HEADER not in headers:
                    held.update(start=message, body=b"")  # Ray's plain text: rewritten once the body is in
                    return
            elif message["type"] == "http.response.body" and held:
                held["body"] += message.get("body", b"")
                if not message.get("more_body", False):
                    text = held["body"].decode("utf-8", "replace").strip()
                    await self.answer(send, "queue_full" if "backpressure" in text else "unavailable", text,
                                      [(k, v) for k, v in held["start"].get("headers", [])
                                       if k.lower() not in (b"content-type", b"content-length")])
                return
            await send(message)

        await self.app(scope, receive, rewriting_send)
        if not started:
            await self.answer(send, "replica_lost", "the replica holding this request stopped before it answered; "
                                                    "Ray is replacing it: send the request again", [])

    @staticmethod
    async def answer(send, error: str, message: str, headers: list[tuple[bytes, bytes]]) -> None:
        body = json.dumps({"error": error, "message": message}).encode()
        if not any(k.lower() == b"retry-after" for k, _ in headers):
            headers = [*headers, (b"retry-after", str(RETRY_AFTER_S).encode())]
        await send({"type": "http.response.start", "status": 503, "headers": [
            *headers, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list:
    """What Ray's proxy calls (through RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH) for its middlewares."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyErrors)]


# ----------------------------------------------------------------------------------------------------------
# The driver: start Ray (or join RAY_ADDRESS), deploy, wait
# ----------------------------------------------------------------------------------------------------------

def pick_device(device: str, replicas: int, resources: dict[str, float]) -> str:
    """"cuda" (one GPU per replica) or "cpu", from --device and what the Ray cluster has."""
    gpus = int(resources.get("GPU", 0))
    if device in (None, "auto"):
        device = "cuda" if gpus else "cpu"
    if device.startswith("cuda:"):
        raise ValueError(f"--device {device} with --replicas: Ray gives each replica its own GPU; use --device cuda")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: choose auto, cpu or cuda")
    if device == "cuda" and replicas > gpus:
        raise ValueError(f"--replicas {replicas}: this Ray cluster has {gpus} GPU(s), and each replica takes one")
    return device


def check_runtime(engine_kwargs: dict[str, Any]) -> None:
    """The one-line errors of the one-process server for --fast and --dtype, here rather than in every replica."""
    import torch

    from ..runtime import pick_dtype, resolve_fast

    device = torch.device(engine_kwargs["device"])
    resolve_fast(engine_kwargs.get("fast", "auto"), device)
    pick_dtype(engine_kwargs.get("dtype", "auto"), device)


def deployment(engine_kwargs: dict[str, Any], settings: ServerSettings, options: RayOptions, resources: dict):
    """The bound Ray Serve application: `options.replicas` replicas, each on one GPU or a share of the CPUs."""
    if engine_kwargs["device"] == "cuda":
        actor_options = {"num_gpus": 1, "num_cpus": 1}
    else:  # an equal share each; Ray sets OMP_NUM_THREADS to it (at least 1), which sizes torch's thread pool
        actor_options = {"num_cpus": max(resources.get("CPU", 1) / options.replicas, 0.01)}
    return AmusedReplica.options(
        num_replicas=options.replicas, ray_actor_options=actor_options,
        max_ongoing_requests=options.max_ongoing_requests, max_queued_requests=options.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": RETRY_AFTER_S},
        health_check_period_s=options.health_check_period_s, health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=min(settings.timeout_s, 30.0),
        logging_config={"log_level": options.log_level.upper(), "enable_access_log": options.access_log},
    ).bind(engine_kwargs, settings)


def run(engine_kwargs: dict[str, Any], settings: ServerSettings, options: RayOptions) -> int:
    """Start Ray (a private instance on this machine, or the cluster RAY_ADDRESS names), deploy the replicas,
    and serve until SIGINT/SIGTERM; then take the deployment and the private Ray instance down."""
    import ray

    from ..components import family_of
    from ..embedded import resolve_model_name

    # A bad --model fails here, in one line, not in every replica's constructor; a hub id is downloaded once
    # into the cache the replicas of this machine then read.
    family_of(resolve_model_name(engine_kwargs.get("model")))

    def stop(signum, frame):
        raise KeyboardInterrupt

    # The proxy's own answers (503 on overload, none when a replica dies) in the API's JSON error shape. Ray reads
    # this in the proxy process: a private instance inherits it from here; a cluster's nodes need it set.
    os.environ.setdefault(PROXY_CALLBACK_ENV, "amused.serving.ray_app.proxy_middlewares")
    joined = bool(os.environ.get("RAY_ADDRESS"))
    ray.init(address=os.environ["RAY_ADDRESS"] if joined else "local", include_dashboard=False,
             logging_level=options.log_level.upper())
    signal.signal(signal.SIGTERM, stop)  # after ray.init, which installs a handler of its own that dumps a trace
    try:
        resources = ray.cluster_resources()
        device = pick_device(engine_kwargs.get("device"), options.replicas, resources)
        engine_kwargs = {**engine_kwargs, "device": device}
        check_runtime(engine_kwargs)
        serve.start(http_options={"host": options.host, "port": options.port})
        where = "one GPU each" if engine_kwargs["device"] == "cuda" else \
            f"{resources.get('CPU', 1) / options.replicas:g} CPU(s) each"
        print(f"amused serve: {options.replicas} Ray Serve replica(s) of {settings.model_name} ({where}), "
              f"http://{options.host}:{options.port} (docs: /docs); loading and warming up ...", flush=True)
        started = time.monotonic()
        serve.run(deployment(engine_kwargs, settings, options, resources), name=APP_NAME, route_prefix="/")
        print(f"amused serve: ready in {time.monotonic() - started:.1f} s: {options.replicas} replica(s), up to "
              f"{options.max_ongoing_requests} requests each, {options.max_queued_requests} more queued in the proxy, "
              f"503 beyond", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:  # on a shared cluster, take down only this application
            serve.delete(APP_NAME) if joined else serve.shutdown()
        finally:
            ray.shutdown()

