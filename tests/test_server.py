"""The HTTP API (`amused serve`) against the tiny checkpoint: responses, errors, batching, queue and limits.

A `SpyPipe` wraps the real tiny pipeline to count calls and, with a gate, to hold the worker busy so the
queue fills or a request times out deterministically.
"""

import argparse
import base64
import io
import json
import random
import threading
import time

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from amused import AmusedImg2ImgPipeline, AmusedPipeline  # noqa: E402
from amused.server import ServerSettings, add_command, create_app  # noqa: E402
from amused.serving.batcher import Batcher, Job  # noqa: E402

SIDE = 8  # the tiny model's native size; sizes must be multiples of 4 (VQ factor 2, U-ViT downsamples 2x)


@pytest.fixture(scope="module")
def pipe(ref_dir):
    p = AmusedPipeline.from_pretrained(ref_dir)
    p.generation_defaults = {"num_inference_steps": 2}  # fast; requests may still ask for more
    return p


class SpyPipe:
    """The real pipeline behind a recorder; with `gate`, each call waits for it (the worker stays busy)."""

    def __init__(self, pipe, gate: threading.Event | None = None):
        self._pipe, self.gate = pipe, gate
        self.calls: list[dict] = []
        self.entered = threading.Event()

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(20), "test gate never opened"
        return self._pipe(**kwargs)

    def __getattr__(self, name):
        return getattr(self._pipe, name)


def serve(pipe, **settings) -> TestClient:
    return TestClient(create_app(pipe, ServerSettings(**settings)), base_url="http://127.0.0.1:8000")


def png_b64(size=(SIDE, SIDE), mode="RGB", color=None, seed=0) -> str:
    if color is None:
        pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        image = PIL.Image.fromarray(pixels).convert(mode)
    else:
        image = PIL.Image.new(mode, size, color)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode(b64_or_bytes) -> PIL.Image.Image:
    raw = base64.b64decode(b64_or_bytes) if isinstance(b64_or_bytes, str) else b64_or_bytes
    image = PIL.Image.open(io.BytesIO(raw))
    image.load()
    return image


def in_threads(fn, args_list):
    """Run fn(*args) concurrently; returns the results in order."""
    results = [None] * len(args_list)

    def run(i, args):
        results[i] = fn(*args)

    threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    return threads, results


def wait_for(condition, timeout=10.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.005)


# ----------------------------------------------------------------------------------------------------------
# Text to image
# ----------------------------------------------------------------------------------------------------------

def test_generate_png_carries_settings(pipe):
    with serve(pipe) as client:
        r = client.post("/v1/generate", json={"prompt": "a red apple", "seed": 3}, headers={"accept": "image/png"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.headers["x-amused-seed"] == "3" and r.headers["x-amused-batch-size"] == "1"
        image = decode(r.content)
        assert image.size == (SIDE, SIDE)
        meta = json.loads(image.info["amused"])
        assert meta["prompt"] == "a red apple" and meta["seed"] == 3 and meta["steps"] == 2
        # response_format asks for the same thing as the Accept header
        again = client.post("/v1/generate", json={"prompt": "a red apple", "seed": 3, "response_format": "png"})
        assert again.headers["content-type"] == "image/png" and again.content == r.content


def test_generate_json_matches_python_api(pipe):
    with serve(pipe) as client:
        r = client.post("/v1/generate", json={"prompt": "a cat", "seed": 5, "num_images": 2, "guidance_scale": 4})
    assert r.status_code == 200
    body = r.json()
    assert body["seed"] == 5 and body["batch_size"] == 1 and len(body["images"]) == 2
    assert body["settings"] == {"task": "text", "model": "embedded", "prompt": "a cat", "negative_prompt": "",
                                "num_images": 2, "num_inference_steps": 2, "guidance_scale": 4.0,
                                "temperature": [2.0, 0.0], "height": SIDE, "width": SIDE}
    assert set(body["timing"]) == {"queue_ms", "run_ms", "total_ms"} and body["warnings"] == []
    expected = pipe("a cat", num_images_per_prompt=2, guidance_scale=4,
                    generator=torch.Generator().manual_seed(5)).images
    for got, want in zip(body["images"], expected):
        assert np.array_equal(np.asarray(decode(got).convert("RGB")), np.asarray(want))


@pytest.mark.filterwarnings("ignore:prompt .* is longer than")
def test_long_prompt_is_announced(pipe):
    with serve(pipe) as client:
        body = client.post("/v1/generate", json={"prompt": "a very long prompt " * 20, "seed": 0}).json()
    assert any("prompt is longer than" in w for w in body["warnings"])


# ----------------------------------------------------------------------------------------------------------
# Bad input: 422 naming the field, 400 for the pipeline's own refusals, never 500
# ----------------------------------------------------------------------------------------------------------

BAD_GENERATE = [
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 101}, "num_inference_steps"),
    ({"guidance_scale": "lots"}, "guidance_scale"),
    ('{"prompt": "x", "guidance_scale": NaN}', "guidance_scale"),  # Python's JSON parser accepts NaN
    ('{"prompt": "x", "guidance_scale": 1e999}', "guidance_scale"),  # parses to inf
    ({"guidance_scale": 1e6}, "guidance_scale"),
    ({"height": 6}, "height"),  # not a multiple of 4
    ({"width": 2048}, "width"),  # over max_side
    ({"num_images": 0}, "num_images"),
    ({"num_images": 9}, "num_images"),
    ({"num_images": 2, "response_format": "png"}, "num_images"),
    ({"temperature": [1, -1]}, "temperature"),
    ({"seed": -1}, "seed"),
    ({"prompt": "x" * 2001}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"sampler": "ddim"}, "sampler"),
    ("[1, 2]", "body"),
    ('{"prompt": ', "body"),
]


@pytest.mark.parametrize("payload,field", BAD_GENERATE, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_GENERATE)])
def test_generate_bad_field_is_422_naming_it(pipe, payload, field):
    with serve(pipe) as client:
        if isinstance(payload, str):
            r = client.post("/v1/generate", content=payload, headers={"content-type": "application/json"})
        else:
            r = client.post("/v1/generate", json={"prompt": "x", **payload})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "invalid_request"
    assert field == "body" or any(field in map(str, d["loc"]) for d in body["detail"]), body
    assert field == "body" or field in body["message"]


FUZZ_VALUES = {
    "prompt": ["a cat", "", "émoji ✨", "x" * 3000, None, 5, ["a"]],
    "negative_prompt": ["", "blurry", None, 3],
    "seed": [0, 2**63 - 1, 2**63, -1, 1.5, "7", None],
    "num_inference_steps": [1, 2, 100, 0, -3, 101, 2.5, "2", None, True],
    "guidance_scale": [0, 1, 7.5, 100, -1, 1e308, "NaN", "inf", None, [1]],
    "temperature": [0, 2, [2, 0], [1], [1, 2, 3], [-1, 0], "hot", None, 1e9],
    "height": [8, 4, 12, 6, 0, -8, 10**6, None, "8"],
    "width": [8, 16, 6, 0, 20, None],
    "num_images": [1, 2, 8, 9, 0, -1, None],
    "response_format": ["json", "png", "gif", None],
    "extra": [1],
}


class CappedSteps(SpyPipe):
    """At most 2 decoding steps whatever a request asks (the fuzz test checks status codes, not images)."""

    def __call__(self, **kwargs):
        return super().__call__(**{**kwargs, "num_inference_steps": min(kwargs["num_inference_steps"], 2)})


def test_generate_fuzz_never_500(pipe):
    rng = random.Random(0)
    statuses = []
    with serve(CappedSteps(pipe), max_side=16) as client:
        for _ in range(150):
            payload = {k: rng.choice(v) for k, v in FUZZ_VALUES.items() if rng.random() < (0.9 if k == "prompt"
                                                                                            else 0.3)}
            r = client.post("/v1/generate", json=payload)
            statuses.append(r.status_code)
            assert r.status_code in (200, 400, 422), (payload, r.status_code, r.text)
            if r.status_code == 200:
                n = payload.get("num_images") or 1
                assert r.headers["content-type"] == "image/png" or len(r.json()["images"]) == n
            else:
                assert r.json()["error"] and r.json()["message"]
    assert statuses.count(200) >= 10 and statuses.count(422) >= 50  # both sides were exercised


def test_image_tasks_bad_fields(pipe):
    with serve(pipe) as client:
        cases = [
            ("/v1/img2img", {"image": png_b64(), "strength": 0}, "strength"),
            ("/v1/img2img", {"image": png_b64(), "strength": 1.5}, "strength"),
            ("/v1/img2img", {"image": "not base64!"}, "image"),
            ("/v1/img2img", {"image": base64.b64encode(b"not an image").decode()}, "image"),
            ("/v1/img2img", {"image": png_b64(size=(6, 6))}, "image"),  # not a multiple of 4
            ("/v1/img2img", {"image": png_b64(size=(2000, 4))}, "image"),  # over max_side, refused before decoding
            ("/v1/inpaint", {"image": png_b64()}, "mask_image"),
            ("/v1/inpaint", {"image": png_b64(), "mask_image": png_b64(size=(4, 4), mode="L")}, "mask_image"),
        ]
        for path, payload, field in cases:
            r = client.post(path, json={"prompt": "x", **payload})
            assert r.status_code == 422, (path, payload.keys(), r.text)
            assert any(field in map(str, d["loc"]) for d in r.json()["detail"]), r.json()
        r = client.post("/v1/img2img", content=b"prompt=x", headers={"content-type": "text/plain"})
        assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"


def test_pipeline_value_error_is_400_with_its_message(pipe):
    with serve(pipe) as client:  # an all-black mask covers no token: the pipeline refuses it
        r = client.post("/v1/inpaint", json={"prompt": "x", "image": png_b64(),
                                             "mask_image": png_b64(mode="L", color=0)})
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_argument" and "mask_image" in r.json()["message"]


def test_body_too_large_is_413(pipe):
    with serve(pipe, max_body_bytes=1024) as client:
        r = client.post("/v1/generate", json={"prompt": "x" * 1500})
        assert r.status_code == 413 and r.json()["error"] == "body_too_large"
        chunks = iter([b'{"prompt": "', b"x" * 2000, b'"}'])  # chunked: no Content-Length to go by
        r = client.post("/v1/generate", content=chunks, headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert client.post("/v1/generate", json={"prompt": "small", "seed": 0}).status_code == 200


# ----------------------------------------------------------------------------------------------------------
# Batching, queue, timeouts
# ----------------------------------------------------------------------------------------------------------

def busy_then(client, spy, gate, requests):
    """Hold the worker busy with one seeded request, queue `requests` behind it, then let everything run;
    returns the queued requests' responses."""
    batcher = client.app.state.service.batcher
    first, _ = in_threads(lambda: client.post("/v1/generate", json={"prompt": "first", "seed": 9}), [()])
    assert spy.entered.wait(10)  # the worker is busy with the first request
    threads, results = in_threads(lambda j: client.post("/v1/generate", json=j), [(j,) for j in requests])
    wait_for(lambda: batcher.depth == len(requests))
    gate.set()
    for t in first + threads:
        t.join(20)
    spy.calls.pop(0)  # the first request's call
    return results


def test_concurrent_requests_share_one_call(pipe):
    gate = threading.Event()
    spy = SpyPipe(pipe, gate)
    prompts = ["an apple", "a pear", "a plum", "a fig"]
    with serve(spy, max_batch=4, batch_window_ms=2000) as client:  # the batch closes as soon as it is full
        results = busy_then(client, spy, gate, [{"prompt": p} for p in prompts])
    assert len(spy.calls) == 1
    assert sorted(spy.calls[0]["prompt"]) == sorted(prompts)
    for prompt, r in zip(prompts, results):
        body = r.json()
        assert r.status_code == 200 and body["batch_size"] == 4 and body["seed"] is None
        assert json.loads(decode(body["images"][0]).info["amused"])["prompt"] == prompt  # split back in order


def test_seeded_and_different_settings_do_not_batch(pipe):
    gate = threading.Event()
    spy = SpyPipe(pipe, gate)
    requests = [{"prompt": "a", "seed": 1}, {"prompt": "b", "seed": 2}, {"prompt": "c"}, {"prompt": "d"},
                {"prompt": "e", "num_inference_steps": 3}]
    with serve(spy, max_batch=2, batch_window_ms=2000) as client:
        results = busy_then(client, spy, gate, requests)
    assert all(r.status_code == 200 for r in results)
    batched = [c["prompt"] for c in spy.calls if isinstance(c["prompt"], list)]
    assert batched == [["c", "d"]] or batched == [["d", "c"]]
    assert len(spy.calls) == 4  # a, b, e alone; c + d together
    assert [r.json()["seed"] for r in results[:2]] == [1, 2]


def test_a_lone_client_does_not_wait_for_the_batch_window(pipe):
    """One client at a time (each request after the last answer): no batch-mates are coming, so a request
    starts at once instead of idling for the window."""
    with serve(pipe, batch_window_ms=3000) as client:
        for k in range(3):
            r = client.post("/v1/generate", json={"prompt": f"apple {k}"})
            assert r.status_code == 200 and r.json()["timing"]["queue_ms"] < 1000
        assert client.get("/health").json()["concurrency"] < 1.5


def test_the_window_waits_when_requests_overlap():
    """Little's law: arrivals every 10 ms that each take 100 ms to answer -> ~10 in the system: the oldest
    job waits for batch-mates (up to the window); a lone, rare one does not."""
    batcher = Batcher(engine=None, max_batch=4, batch_window_ms=300, max_queue=10)
    options = {"height": 8, "width": 8, "num_inference_steps": 2, "guidance_scale": 3.0, "temperature": (1.0, 0.0)}
    batcher._gap_s, batcher._latency_s = 0.010, 0.100
    batcher.submit(Job("text", "a", "", 1, None, options, deadline=float("inf")))
    later = threading.Timer(0.1, lambda: batcher.submit(Job("text", "b", "", 1, None, options,
                                                              deadline=float("inf"))))
    later.start()
    assert [j.prompt for j in batcher._next_batch()] == ["a", "b"]  # waited, and "b" joined
    later.join()
    batcher._gap_s, batcher._latency_s = 1.0, 0.100  # one request in ten is in the system
    batcher.submit(Job("text", "c", "", 1, None, options, deadline=float("inf")))
    started = time.monotonic()
    assert [j.prompt for j in batcher._next_batch()] == ["c"]
    assert time.monotonic() - started < 0.2  # did not sit out the 300 ms window


def test_batch_selection_rules():
    """Oldest live job leads; only same-key jobs join, up to max_batch images; expired jobs are dropped."""
    batcher = Batcher(engine=None, max_batch=4, batch_window_ms=0, max_queue=10)

    def job(prompt, n=1, seed=None, steps=12, deadline=float("inf")):
        options = {"height": 8, "width": 8, "num_inference_steps": steps, "guidance_scale": 3.0,
                   "temperature": (1.0, 0.0)}
        return Job("text", prompt, "", n, seed, options, deadline=deadline)

    # The expired head has the same settings as "b": "b" must not ride along with "a".
    for j in [job("expired", steps=5, deadline=0), job("a"), job("b", steps=5), job("c", n=2), job("d", n=2),
              job("e", seed=1)]:
        batcher.submit(j)
    calls = [[j.prompt for j in batcher._next_batch()] for _ in range(4)]
    assert calls == [["a", "c"], ["b"], ["d"], ["e"]]  # "d" would make 5 images; "e" has a seed
    assert batcher.depth == 0 and batcher.stats["dropped"] == 1


def test_full_queue_is_503_with_retry_after(pipe):
    gate = threading.Event()
    spy = SpyPipe(pipe, gate)
    with serve(spy, max_queue=2, batch_window_ms=0) as client:
        batcher = client.app.state.service.batcher
        post = lambda seed: client.post("/v1/generate", json={"prompt": "x", "seed": seed})  # noqa: E731
        first, results = in_threads(post, [(0,)])
        assert spy.entered.wait(10)  # the worker is busy with the first request
        queued, queued_results = in_threads(post, [(1,), (2,)])
        wait_for(lambda: batcher.depth == 2)
        r = post(3)
        assert r.status_code == 503 and r.json()["error"] == "queue_full"
        assert int(r.headers["retry-after"]) >= 1
        health = client.get("/health").json()
        assert health["queue_depth"] == 2 and health["running"] == 1 and health["stats"]["rejected_full"] == 1
        gate.set()
        for t in first + queued:
            t.join(20)
        assert [r.status_code for r in results + queued_results] == [200, 200, 200]
        assert client.get("/health").json()["queue_depth"] == 0  # recovered


def test_timeout_is_504_and_the_queued_work_is_dropped(pipe):
    gate = threading.Event()
    spy = SpyPipe(pipe, gate)
    with serve(spy, timeout_s=0.5, batch_window_ms=0) as client:
        batcher = client.app.state.service.batcher
        first, results = in_threads(lambda: client.post("/v1/generate", json={"prompt": "slow", "seed": 0}), [()])
        assert spy.entered.wait(10)
        r = client.post("/v1/generate", json={"prompt": "waits", "seed": 1})
        assert r.status_code == 504 and r.json()["error"] == "timeout"
        assert batcher.depth == 0 and batcher.stats["dropped"] == 1
        gate.set()
        first[0].join(20)
        assert results[0].status_code == 504  # it was running: it finished, unseen
        wait_for(lambda: not batcher.running)
    assert [c["prompt"] for c in spy.calls] == ["slow"]  # the queued request never ran


# ----------------------------------------------------------------------------------------------------------
# Image tasks, health, docs, CLI
# ----------------------------------------------------------------------------------------------------------

def test_img2img_json_matches_python_api_and_multipart(pipe):
    image = png_b64(seed=1)
    with serve(pipe) as client:
        r = client.post("/v1/img2img", json={"prompt": "a cat", "image": image, "strength": 0.5, "seed": 7})
        assert r.status_code == 200, r.text
        got = np.asarray(decode(r.json()["images"][0]).convert("RGB"))
        form = client.post("/v1/img2img", data={"prompt": "a cat", "strength": "0.5", "seed": "7"},
                           files={"image": ("in.png", base64.b64decode(image), "image/png")})
        assert form.status_code == 200, form.text
        assert np.array_equal(np.asarray(decode(form.json()["images"][0]).convert("RGB")), got)
    want = AmusedImg2ImgPipeline.from_pipe(pipe)("a cat", image=decode(image).convert("RGB"), strength=0.5,
                                                 generator=torch.Generator().manual_seed(7)).images[0]
    assert np.array_equal(got, np.asarray(want))


def test_inpaint_json_and_multipart(pipe):
    image, mask = png_b64(seed=2), png_b64(mode="L", color=255)
    with serve(pipe) as client:
        r = client.post("/v1/inpaint", json={"prompt": "a dog", "image": image, "mask_image": mask,
                                             "temperature": [1, 0]}, headers={"accept": "image/png"})
        assert r.status_code == 200 and decode(r.content).size == (SIDE, SIDE)
        form = client.post("/v1/inpaint", data={"prompt": "a dog", "temperature": "[1, 0]"},
                           files={"image": ("i.png", base64.b64decode(image), "image/png"),
                                  "mask_image": ("m.png", base64.b64decode(mask), "image/png")})
        assert form.status_code == 200, form.text
        assert form.json()["settings"]["task"] == "inpaint" and form.json()["settings"]["temperature"] == [1.0, 0.0]


def test_health_and_docs(pipe):
    with serve(pipe, max_queue=5) as client:
        health = client.get("/health")
        assert health.status_code == 200
        assert {"status": "ok", "model_loaded": True, "device": "cpu", "queue_depth": 0,
                "max_queue": 5}.items() <= health.json().items()
        assert client.get("/docs").status_code == 200
        schema = client.get("/openapi.json").json()
        assert {"/v1/generate", "/v1/img2img", "/v1/inpaint", "/health"} <= set(schema["paths"])
        body = schema["paths"]["/v1/inpaint"]["post"]["requestBody"]["content"]
        assert {"application/json", "multipart/form-data"} <= set(body)
        steps = schema["components"]["schemas"]["GenerateRequest"]["properties"]["num_inference_steps"]
        assert {"minimum": 1, "maximum": 100}.items() <= steps["anyOf"][0].items()


def served_app(monkeypatch, argv) -> tuple:
    """Run `amused serve ARGV` up to the point where uvicorn would start; returns (app, host, port)."""
    import uvicorn

    from amused.server import main

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: started.append((app, host, port)))
    monkeypatch.setenv("AMUSED_NUM_THREADS", "1")  # 2 shared cores: see docs/reliability.md, CPU threads
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # loading sets the CPU threads for the process
    [started] = started
    return started


def test_serve_command_applies_its_flags(ref_dir, monkeypatch, capsys):
    """The flags of `amused serve` reach the running app: queue size, work bound (422 above it), extra Host
    name and web origin (403 for others), body limit (413), warm-up sizes and the port."""
    app, host, port = served_app(monkeypatch, [
        "--model", str(ref_dir), "--device", "cpu", "--port", "9002", "--max-queue", "3", "--max-batch", "2",
        "--max-work", "1000", "--max-body-mb", "0.001", "--allowed-host", "box.lan",
        "--allow-origin", "https://app.example"])
    assert (host, port) == ("127.0.0.1", 9002)
    assert f"{ref_dir} on cpu" in capsys.readouterr().out
    with TestClient(app, base_url="http://box.lan:9002") as client:
        deadline = time.monotonic() + 30
        while (r := client.get("/health")).status_code == 503 and time.monotonic() < deadline:  # warming up
            assert r.json()["state"] == "warming"
            time.sleep(0.05)
        health = r.json()
        assert (health["state"], health["max_queue"], health["max_batch"], health["max_work"]) == ("ready", 3, 2, 1000)
        assert health["warmed_batch_sizes"] == [1, 2]
        r = client.post("/v1/generate", json={"prompt": "a", "num_images": 2, "num_inference_steps": 8})  # 1,024
        assert r.status_code == 422 and "--max-work" in r.json()["message"]
        assert client.get("/health", headers={"origin": "https://app.example"}).status_code == 200
        assert client.get("/health", headers={"origin": "https://evil.example"}).status_code == 403
        assert client.get("/health", headers={"host": "evil.example"}).status_code == 403
        assert client.post("/v1/generate", json={"prompt": "a" * 1100}).status_code == 413
    with pytest.raises(ValueError, match="max_batch"):
        ServerSettings(max_batch=0)
    parser = argparse.ArgumentParser(prog="amused")
    add_command(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    help_text = capsys.readouterr().out
    assert "examples:" in help_text and "--max-work" in help_text
