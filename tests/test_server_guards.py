"""What a hostile or careless client cannot do to `amused serve`: ask for unbounded work, drive the server from
another web page or a DNS-rebound name, or keep it busy after giving up."""

import threading
import time

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from amused import AmusedPipeline  # noqa: E402
from amused.runtime import Engine  # noqa: E402
from amused.server import ServerSettings, create_app  # noqa: E402
from amused.serving.batcher import Batcher, Cancelled, Job  # noqa: E402

LOCAL = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def pipe(ref_dir):
    p = AmusedPipeline.from_pretrained(ref_dir)
    p.generation_defaults = {"num_inference_steps": 2}
    return p


def test_work_over_the_bound_is_422_before_it_runs(pipe):
    with TestClient(create_app(pipe, ServerSettings(max_work=8 * 8 * 2 * (4 + 4))), base_url=LOCAL) as client:
        ok = client.post("/v1/generate", json={"prompt": "a", "num_inference_steps": 4, "num_images": 2})
        assert ok.status_code == 200, ok.text
        big = client.post("/v1/generate", json={"prompt": "a", "num_inference_steps": 5, "num_images": 2})
        assert big.status_code == 422 and "--max-work" in big.json()["message"]
        assert client.get("/health").json()["stats"]["pipeline_calls"] == 1  # the refused one never ran
    default = ServerSettings()  # default bound: twice a full default batch at the native size
    with TestClient(create_app(pipe, default), base_url=LOCAL) as client:
        assert client.get("/health").json()["max_work"] == 2 * 8 * 8 * (12 + 4) * default.max_batch  # 4: the decode


@pytest.mark.parametrize("headers,allowed", [
    ({}, True),
    ({"host": "localhost:8000"}, True),
    ({"host": "evil.example"}, False),  # a DNS-rebound name
    ({"origin": "http://evil.example"}, False),  # another web page
    ({"origin": LOCAL}, True),  # the server's own page (/docs)
])
def test_host_and_origin_are_checked(pipe, headers, allowed):
    with TestClient(create_app(pipe, ServerSettings()), base_url=LOCAL) as client:
        r = client.get("/health", headers=headers)
    assert (r.status_code != 403) is allowed, r.text
    if not allowed:
        assert r.json()["error"] == "forbidden"


def test_allowed_names_and_origins_are_settings(pipe):
    settings = ServerSettings(allowed_hosts=("amused.internal",), allowed_origins=("https://app.example",))
    with TestClient(create_app(pipe, settings), base_url="http://amused.internal") as client:
        assert client.get("/health", headers={"origin": "https://app.example"}).status_code == 200
        assert client.get("/health", headers={"origin": "https://other.example"}).status_code == 403
    anywhere = ServerSettings(host="0.0.0.0")  # bound to every interface without a list: any Host name
    with TestClient(create_app(pipe, anywhere), base_url="http://10.1.2.3:8000") as client:
        assert client.get("/health").status_code == 200


def test_a_running_plain_loop_job_stops_between_steps_when_nobody_waits(pipe):
    """On the plain loop the worker checks its jobs between steps: once every job of the call is abandoned (its
    client went away or its deadline passed), the call stops with `Cancelled` instead of running to the end."""
    batcher = Batcher(Engine.wrap(pipe), max_batch=4, batch_window_ms=0, max_queue=4)
    job = Job("text", "a", "", 1, None, {"num_inference_steps": 8, "guidance_scale": 1.0, "temperature": (1.0, 0.0),
                                          "height": 8, "width": 8}, deadline=time.monotonic() + 60)
    check = batcher._stop_check([job])
    check(0, 7, None)  # a live job: the call goes on
    job.abandoned = True
    with pytest.raises(Cancelled, match="step 1"):
        check(1, 6, None)
    expired = Job("text", "a", "", 1, None, {}, deadline=time.monotonic() - 1)
    with pytest.raises(Cancelled):
        batcher._stop_check([expired])(0, 7, None)


def test_a_job_whose_client_left_is_dropped_before_it_runs(pipe):
    """A queued job whose request gave up is never run (`abandon`, which the handler calls when it sees the
    connection closed)."""
    gate, calls = threading.Event(), []

    class Slow:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, **kwargs):
            calls.append(kwargs["prompt"])
            gate.wait(20)
            return self.inner(**kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    batcher = Batcher(Engine.wrap(Slow(pipe)), max_batch=1, batch_window_ms=0, max_queue=4)
    options = {"num_inference_steps": 2, "guidance_scale": 1.0, "temperature": (1.0, 0.0), "height": 8, "width": 8}
    first = Job("text", "first", "", 1, 1, options, deadline=time.monotonic() + 60)
    gone = Job("text", "gone", "", 1, 2, options, deadline=time.monotonic() + 60)
    batcher.start()
    try:
        batcher.submit(first)
        for _ in range(200):
            if calls:
                break
            time.sleep(0.01)
        batcher.submit(gone)
        batcher.abandon(gone)
        gate.set()
    finally:
        batcher.stop()
    assert calls == ["first"] and batcher.stats["dropped"] == 1


@pytest.mark.parametrize("field,value,status", [("seed", True, 422), ("num_inference_steps", True, 422),
                                                ("num_images", False, 422), ("temperature", [True, 0], 422),
                                                ("seed", "3", 200), ("num_inference_steps", "2", 200)])
def test_true_and_false_are_not_numbers_but_digit_strings_are(pipe, field, value, status):
    with TestClient(create_app(pipe), base_url=LOCAL) as client:  # pydantic alone reads true as 1
        r = client.post("/v1/generate", json={"prompt": "a", field: value})
    assert r.status_code == status, r.text
    if status == 422:
        assert field in r.json()["message"] and "true/false" in r.json()["message"]


def test_work_counts_each_images_decode(pipe):
    with TestClient(create_app(pipe, ServerSettings(max_work=8 * 8 * 2 * (1 + 4))), base_url=LOCAL) as client:
        assert client.post("/v1/generate", json={"prompt": "a", "num_inference_steps": 1, "num_images": 2}
                           ).status_code == 200
        big = client.post("/v1/generate", json={"prompt": "a", "num_inference_steps": 1, "num_images": 3})
        assert big.status_code == 422 and "(num_inference_steps + 4)" in big.json()["message"]
