"""Untrusted checkpoints and requests: refused early, by name, before anything large is allocated or read.

tests/test_pipeline.py already covers truncated weights, corrupt JSON, an absurd `hidden_size` refused with
CheckpointError and pickle refused by default; these add *when* the refusal happens and the remaining inputs.
"""

import json
import shutil
import tracemalloc

import pytest
import torch

from amused import AmusedPipeline, loading
from amused.loading import CheckpointError
from amused.models.uvit import UViT
from amused.models.vqgan import VQGAN


@pytest.fixture()
def ckpt(ref_dir, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(ref_dir, target)
    return target


@pytest.fixture()
def spies(monkeypatch):
    """Record every model construction and weight-file read during a load."""
    calls = []
    for cls in (UViT, VQGAN):
        init = cls.__init__

        def spy(self, *args, _init=init, _name=cls.__name__, **kwargs):
            calls.append(_name)
            _init(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", spy)
    read = loading.load_state_dict
    monkeypatch.setattr(loading, "load_state_dict",
                        lambda path, *args: calls.append(f"read {path}") or read(path, *args))
    return calls


def edit_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("component,changes", [
    ("transformer", dict(hidden_size=10**9)),
    ("transformer", dict(num_hidden_layers=10**6)),
    ("transformer", dict(vocab_size=2**40)),
    ("transformer", dict(intermediate_size=-1)),
    ("vqvae", dict(block_out_channels=[8, 10**8])),
    ("vqvae", dict(num_vq_embeddings=2**40)),
])
def test_absurd_sizes_are_refused_before_building_or_reading_weights(ckpt, spies, component, changes):
    edit_config(ckpt / component, **changes)
    key = next(iter(changes))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=key):
            AmusedPipeline.from_pretrained(ckpt)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    built = [c for c in spies if not c.startswith("read")]
    # The transformer loads first: a bad transformer config stops before any model or weight file is touched.
    if component == "transformer":
        assert spies == []
    else:  # the transformer before it loaded normally; the bad VQ-GAN is never built, its weights never read
        assert built == ["UViT"] and not any("vqvae" in c for c in spies)
    assert peak < 50 * 2**20  # Python-side allocations during the refused load stay small


def test_models_are_built_on_the_meta_device_so_config_size_costs_no_memory(ckpt, spies):
    """Within the limits, a config that does not match its weights is refused by shape, never materialised:
    the model is built on `meta`, and only the weight file's own tensors are real."""
    edit_config(ckpt / "transformer", hidden_size=4096, intermediate_size=16384, num_hidden_layers=64)
    with pytest.raises(CheckpointError, match="does not fit UViT|has shape"):
        AmusedPipeline.from_pretrained(ckpt)
    assert spies[:2] == [f"read {ckpt / 'transformer' / 'diffusion_pytorch_model.safetensors'}", "UViT"]


def test_text_encoder_config_that_does_not_fit_its_weights_is_a_checkpoint_error(ckpt, monkeypatch):
    edit_config(ckpt / "text_encoder", hidden_size=10**6)  # refused before anything is allocated
    with pytest.raises(CheckpointError, match="text_encoder/config.json: hidden_size=1000000 is outside"):
        AmusedPipeline.from_pretrained(ckpt)
    edit_config(ckpt / "text_encoder", hidden_size=16)  # in range, but the weights are 8 wide
    with pytest.raises(CheckpointError, match="text_encoder/model.safetensors: .* has shape"):
        AmusedPipeline.from_pretrained(ckpt)
    monkeypatch.setenv("AMUSED_TEXT_BACKEND", "transformers")  # the same file through transformers
    with pytest.raises(CheckpointError, match="text encoder"):
        AmusedPipeline.from_pretrained(ckpt)


def test_text_encoder_class_and_package_come_from_allowlists(ckpt):
    edit_config(ckpt / "text_encoder", architectures=["os.system"])
    with pytest.raises(CheckpointError, match="unknown text model class"):
        AmusedPipeline.from_pretrained(ckpt)
    (ckpt / "text_encoder" / "packaged.json").write_text(json.dumps({"package": "../../etc/passwd"}))
    with pytest.raises(ValueError, match="unknown packaged text encoder"):
        AmusedPipeline.from_pretrained(ckpt)


def test_pickle_is_refused_even_next_to_nothing_else_and_never_unpickled(ckpt, monkeypatch):
    weights = ckpt / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    (ckpt / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"not even a pickle")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called without allow_pickle"))
    with pytest.raises(CheckpointError, match="pickle"):
        AmusedPipeline.from_pretrained(ckpt)


def test_server_takes_no_model_or_file_names_from_requests(ref_dir):
    """The API has no field naming a model, a file or an output path: the served model is fixed at start-up
    (`amused serve --model`, the operator's choice) and images come back in the response. Such fields are
    refused (extra="forbid"), so there is no path to traverse."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from amused.server import ServerSettings, create_app

    pipe = AmusedPipeline.from_pretrained(ref_dir)
    app = create_app(pipe, ServerSettings(allowed_hosts=("testserver",)))
    with TestClient(app) as client:
        spec = client.get("/openapi.json").json()
        fields = set()
        for name, schema in spec["components"]["schemas"].items():
            if name.endswith("Request"):
                fields |= set(schema.get("properties", {}))
        assert not {f for f in fields if any(w in f for w in ("model", "path", "file", "out", "name", "dir"))}
        for field in ("model", "output", "out", "path"):
            r = client.post("/v1/generate", json={"prompt": "a", field: "../../etc/passwd"})
            assert r.status_code == 422 and field in r.json()["message"]
        assert client.get("/../../etc/passwd").status_code == 404
        assert client.get("/static/..%2f..%2fetc%2fpasswd").status_code == 404


def test_server_defaults_are_loopback_same_origin_and_bounded_bodies(ref_dir, monkeypatch):
    """`amused serve` with no flags: it listens on loopback only, answers 403 to a Host that is not its own
    (DNS rebinding) and to other web pages (a cross-origin Origin), and 413 to a body over 10 MiB; clients
    that send no Origin (curl, scripts) or their own are served."""
    pytest.importorskip("fastapi")
    import uvicorn
    from fastapi.testclient import TestClient

    from amused.server import main

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: started.append((app, host, port)))
    monkeypatch.setenv("AMUSED_NUM_THREADS", "1")  # 2 shared cores: see docs/reliability.md, CPU threads
    threads = torch.get_num_threads()
    try:
        assert main(["--model", str(ref_dir), "--device", "cpu", "--no-warmup"]) == 0
    finally:
        torch.set_num_threads(threads)  # loading sets the CPU threads for the process
    [(app, host, port)] = started
    assert (host, port) == ("127.0.0.1", 8000)
    with TestClient(app, base_url="http://localhost:8000") as client:
        assert client.get("/health").status_code == 200
        assert client.get("/health", headers={"host": "attacker.example"}).status_code == 403
        assert client.get("/health", headers={"origin": "https://attacker.example"}).status_code == 403
        assert client.get("/health", headers={"origin": "http://localhost:8000"}).status_code == 200
        r = client.post("/v1/generate", content=b"{" + b" " * (10 * 2**20) + b"}",
                        headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"] == "body_too_large"
