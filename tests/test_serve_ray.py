"""`amused serve --replicas 2` (Ray Serve) on the CPU with the embedded model, as a user starts it.

One server for the module (starting Ray and two replicas is most of the time): requests spread over both
replicas and answer the one-process server's schema; a burst past every replica's capacity gets clean 503s; a
replica killed mid-request is replaced, and no request is lost to a client that resends on 503 as the API asks.
Before it, without Ray running: the flags' one-line errors and the proxy's error answers (serving/ray_app.py).
"""

import asyncio
import base64
import collections
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import PIL.Image
import pytest

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")

import amused.serving  # noqa: E402
from amused.server import main as serve_main  # noqa: E402
from amused.serving import ray_app  # noqa: E402

MAX_ONGOING = 4  # per replica
MAX_QUEUE = 8  # in Ray's proxy, once both replicas are full
FAST = {"num_inference_steps": 2}  # the embedded model draws 64x64 px; 2 steps keep each call short


# ----------------------------------------------------------------------------------------------------------
# Without a Ray instance: the flags' errors and the proxy's error answers
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--replicas", "0"], "--replicas must be an integer >= 1, got 0"),
    (["--replicas", "2", "--max-ongoing-requests", "0"], "--max-ongoing-requests must be an integer >= 1, got 0"),
    (["--max-ongoing-requests", "4"], "--max-ongoing-requests is a Ray Serve setting: use it with --replicas"),
])
def test_bad_flags_get_one_line_errors(argv, message, capsys):
    assert serve_main(argv) == 2
    assert capsys.readouterr().err.strip() == f"amused serve: error: {message}"


def test_replicas_without_ray_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as it does where Ray is not installed
    monkeypatch.delitem(sys.modules, "amused.serving.ray_app")
    monkeypatch.delattr(amused.serving, "ray_app")
    assert serve_main(["--replicas", "2"]) == 2
    assert "pip install 'amused-mim[serve-ray]'" in capsys.readouterr().err


def test_device_choice_and_its_errors():
    assert ray_app.pick_device("auto", 2, {"CPU": 2.0}) == "cpu"
    assert ray_app.pick_device("auto", 2, {"CPU": 16.0, "GPU": 2.0}) == "cuda"
    with pytest.raises(ValueError, match="--replicas 3: this Ray cluster has 2 GPU"):
        ray_app.pick_device("auto", 3, {"GPU": 2.0})
    with pytest.raises(ValueError, match="use --device cuda"):
        ray_app.pick_device("cuda:1", 1, {"GPU": 2.0})


def proxy_answer(*messages) -> tuple[int, dict, bytes]:
    """What a client gets when Ray's proxy sends `messages` (nothing: it lost the request) through ProxyErrors."""
    sent = []

    async def proxy(scope, receive, send):
        for message in messages:
            await send(message)

    async def send(message):
        sent.append(message)

    asyncio.run(ray_app.ProxyErrors(proxy)({"type": "http"}, None, send))
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_the_proxys_own_answers_get_the_apis_error_shape():
    text = b"Request dropped due to backpressure (num_queued_requests=8, max_queued_requests=8)."
    status, headers, body = proxy_answer(
        {"type": "http.response.start", "status": 503,
         "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"1")]},
        {"type": "http.response.body", "body": text})
    assert status == 503 and headers[b"retry-after"] == b"1" and headers[b"content-type"] == b"application/json"
    assert json.loads(body) == {"error": "queue_full", "message": text.decode()}

    status, headers, body = proxy_answer()  # the replica died holding the request
    assert status == 503 and headers[b"retry-after"] == b"1" and json.loads(body)["error"] == "replica_lost"

    replica = [(b"content-type", b"application/json"), (ray_app.REPLICA_HEADER, b"abc")]
    mine = b'{"error": "queue_full", "message": "the queue is full; retry in about 3 s"}'
    assert proxy_answer({"type": "http.response.start", "status": 503, "headers": replica},
                        {"type": "http.response.body", "body": mine}) == (503, dict(replica), mine)


# ----------------------------------------------------------------------------------------------------------
# A real server: Ray, two replicas of the embedded model on the CPU
# ----------------------------------------------------------------------------------------------------------

def free_port() -> int:
    """A free port below the kernel's ephemeral range: Ray's own processes take ephemeral ports while the server
    starts, and once took the one picked here (its proxy then failed to bind)."""
    low = 32768
    try:
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    for port in random.Random().sample(range(max(1024, low - 10000), low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def replica_pids(proc: subprocess.Popen) -> list[int]:
    """The replica processes under the server (Ray names its worker processes after the actor they hold)."""
    pids = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.cmdline()[:1] and child.cmdline()[0].startswith("ray::ServeReplica"):
                pids.append(child.pid)
        except psutil.Error:
            pass
    return pids


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("ray") / "serve.log"
    command = [sys.executable, "-m", "amused.server", "--replicas", "2", "--device", "cpu", "--port", str(port),
               "--max-batch", "4", "--max-ongoing-requests", str(MAX_ONGOING), "--max-queue", str(MAX_QUEUE),
               "--log-level", "warning", "--no-access-log"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private Ray instance, whatever is set
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:
        while True:
            assert proc.poll() is None, f"the server exited ({proc.returncode}):\n{log.read_text()[-4000:]}"
            assert time.monotonic() - started < 300, f"not ready in 300 s:\n{log.read_text()[-4000:]}"
            try:  # ready when both replicas answer (the first one can be serving while the second warms up)
                seen = {r.headers.get("x-amused-replica") for r in asyncio.run(health_all(url, 8))
                        if not isinstance(r, BaseException) and r.status_code == 200}
                if len(seen - {None}) == 2:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        print(f"\nray server ready in {time.monotonic() - started:.1f} s")
        yield url, proc
    finally:
        tree = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        proc.send_signal(signal.SIGTERM)  # the command takes the deployment and its private Ray instance down
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        for child in tree:  # anything of ours that outlived it
            try:
                child.kill()
            except psutil.Error:
                pass


async def health_all(url: str, n: int) -> list:
    async with httpx.AsyncClient(timeout=5) as client:
        return await asyncio.gather(*(client.get(url + "/health") for _ in range(n)), return_exceptions=True)


async def post_all(url: str, bodies: list[dict], **kwargs) -> list:
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(client.post(url + "/v1/generate", json=b, **kwargs) for b in bodies),
                                    return_exceptions=True)


def png_size(data: bytes) -> tuple[int, int]:
    image = PIL.Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.size


def test_requests_spread_over_both_replicas_with_the_same_schema(server):
    url, proc = server
    answers = asyncio.run(post_all(url, [{"prompt": f"red apple {i}", **FAST} for i in range(8)]))
    assert [getattr(r, "status_code", r) for r in answers] == [200] * 8
    for r in answers:
        body = r.json()
        assert set(body) == {"images", "seed", "batch_size", "settings", "timing", "warnings"}
        assert png_size(base64.b64decode(body["images"][0])) == (64, 64)
        assert body["settings"]["num_inference_steps"] == 2 and body["settings"]["model"] == "embedded"
    replicas = {r.headers["x-amused-replica"] for r in answers}
    assert len(replicas) == 2, replicas
    assert len(replica_pids(proc)) == 2

    # PNG answers, per-replica /health and the one-process server's errors, through Ray's proxy
    png = httpx.post(url + "/v1/generate", json={"prompt": "cat face", "seed": 3, **FAST},
                     headers={"accept": "image/png"}, timeout=60)
    assert png.status_code == 200 and png.headers["x-amused-seed"] == "3" and png_size(png.content) == (64, 64)
    health = httpx.get(url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["state"] == "ready"
    assert health.headers["x-amused-replica"] in replicas
    bad = httpx.post(url + "/v1/generate", json={"prompt": "x", "height": 66}, timeout=10)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "height"]
    assert {"/v1/generate", "/v1/img2img", "/v1/inpaint", "/health"} <= set(
        httpx.get(url + "/openapi.json", timeout=10).json()["paths"])

    # the same seed gives the same image on either replica (same device, same batch)
    images: dict[str, bytes] = {}
    for _ in range(20):
        r = httpx.post(url + "/v1/generate", json={"prompt": "grinning face", "seed": 7, **FAST}, timeout=60)
        images[r.headers["x-amused-replica"]] = PIL.Image.open(io.BytesIO(base64.b64decode(
            r.json()["images"][0]))).tobytes()
        if len(images) == 2:
            break
    assert len(images) == 2 and len(set(images.values())) == 1


def test_a_burst_past_every_replica_gets_503_not_500(server):
    url, _ = server
    answers = asyncio.run(post_all(url, [{"prompt": f"rocket {i}", "num_inference_steps": 4} for i in range(30)]))
    codes = collections.Counter(getattr(r, "status_code", type(r).__name__) for r in answers)
    assert set(codes) == {200, 503}, codes
    assert codes[200] >= 2 * MAX_ONGOING  # both replicas full before anything was shed
    for r in answers:
        if r.status_code == 503:
            assert r.json()["error"] == "queue_full" and int(r.headers["retry-after"]) >= 1
    # recovered: the next request is served
    assert httpx.post(url + "/v1/generate", json={"prompt": "star", **FAST}, timeout=60).status_code == 200


def test_a_killed_replica_is_replaced_and_nothing_is_lost(server):
    url, proc = server
    before = set()
    for r in asyncio.run(post_all(url, [{"prompt": f"ghost {i}", **FAST} for i in range(8)])):
        before.add(r.headers["x-amused-replica"])
    assert len(before) == 2
    victim = replica_pids(proc)[0]

    async def kill_mid_flight():
        async with httpx.AsyncClient(timeout=120) as client:
            # 8 requests fill both replicas (4 each); a batch of 4 at 16 steps takes seconds on one CPU thread
            bodies = [{"prompt": f"snowman {i}", "num_inference_steps": 16} for i in range(8)]
            flying = [asyncio.create_task(client.post(url + "/v1/generate", json=b)) for b in bodies]
            await asyncio.sleep(0.5)  # both replicas at work
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            answers = await asyncio.gather(*flying, return_exceptions=True)
            # a client that resends on 503 (Retry-After), as the API asks, gets every image
            retried = 0
            for k, r in enumerate(answers):
                while getattr(r, "status_code", None) == 503:
                    assert r.json()["error"] in ("replica_lost", "queue_full"), r.text
                    await asyncio.sleep(float(r.headers["retry-after"]))
                    r = await client.post(url + "/v1/generate", json=bodies[k])
                    retried += 1
                answers[k] = r
            return answers, retried, killed

    answers, retried, killed = asyncio.run(kill_mid_flight())
    assert [getattr(r, "status_code", r) for r in answers] == [200] * 8
    assert retried >= 1  # the victim's requests were lost with it (Ray does not resend them) and came back as 503
    print(f"\nkilled replica pid {victim}: {retried} request(s) answered 503 and were resent")

    # Ray replaces it: a new replica id answers, two replica processes again, and every request after the kill
    # was answered (by the survivor meanwhile)
    seen: set[str] = set()
    while not (seen - before and len(seen) >= 2):
        assert time.monotonic() - killed < 150, f"no replacement replica 150 s after the kill; answered by {seen}"
        for r in asyncio.run(post_all(url, [{"prompt": "sun", **FAST} for _ in range(4)])):
            assert r.status_code == 200, r.text
            seen.add(r.headers["x-amused-replica"])
        time.sleep(0.5)
    assert len(seen & before) == 1  # the survivor
    assert victim not in replica_pids(proc) and len(replica_pids(proc)) == 2
    print(f"replacement serving {time.monotonic() - killed:.1f} s after the kill")
    assert httpx.get(url + "/health", timeout=10).json()["state"] == "ready"
