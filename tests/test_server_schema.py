"""Schemathesis over the server's own OpenAPI schema, against the app in-process with the tiny pipeline.

Every operation gets schema-conforming and schema-violating requests (bounded counts); the properties: no
5xx ever, and every 4xx carries a JSON body with `error` and `message`. Then hypothesis over damaged image
bytes (cut, bit-flipped, random), as uploads and as files: refused naming the field or file, or fully decoded.
"""

import json

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
from hypothesis import HealthCheck, event, settings  # noqa: E402
from schemathesis import checks as st_checks  # noqa: E402

from amused import AmusedPipeline  # noqa: E402
from amused.server import ServerSettings, create_app  # noqa: E402
from tiny import save_reference_checkpoint  # noqa: E402


def _app():
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="amused-schema-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    pipe = AmusedPipeline.from_pretrained(save_reference_checkpoint(folder))
    pipe.generation_defaults = {"num_inference_steps": 2}
    # max_side keeps a schema-valid 16384 px request from allocating for minutes; it must then be a clean 4xx.
    return create_app(pipe, ServerSettings(max_side=64, timeout_s=30, max_body_bytes=2**20, allowed_hosts=("testserver",)))


APP = _app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


def json_body_on_4xx(ctx, response, case):
    if 400 <= response.status_code < 500:
        try:
            body = json.loads(response.content)
        except ValueError as e:
            raise AssertionError(f"{case.method} {case.path} -> {response.status_code} without a JSON body: "
                                 f"{response.content[:200]!r}") from e
        assert isinstance(body, dict) and "error" in body and "message" in body, body


CHECKS = [st_checks.not_a_server_error, json_body_on_4xx]


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_api_never_500_and_4xx_is_json(case):
    case.call_and_validate(checks=CHECKS, excluded_checks=[st_checks.positive_data_acceptance])


# ----------------------------------------------------------------------------------------------------------
# Corrupt and truncated uploads
# ----------------------------------------------------------------------------------------------------------

import base64  # noqa: E402
import io  # noqa: E402

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as hst  # noqa: E402


def _encoded(fmt: str) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


FILES = {fmt: _encoded(fmt) for fmt in ("PNG", "JPEG", "WEBP")}


@hst.composite
def damaged(draw):
    """A PNG/JPEG/WebP cut short, with a byte flipped, or random bytes; never a whole intact file."""
    fmt = draw(hst.sampled_from(sorted(FILES)))
    data = FILES[fmt]
    how = draw(hst.sampled_from(["cut", "flip", "random"]))
    if how == "cut":
        return data[: draw(hst.integers(0, len(data) - 1))]
    if how == "flip":
        i = draw(hst.integers(0, len(data) - 1))
        return data[:i] + bytes([data[i] ^ draw(hst.integers(1, 255))]) + data[i + 1:]
    return draw(hst.binary(max_size=200))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(raw=damaged(), field=hst.sampled_from(["image", "mask_image"]), multipart=hst.booleans())
def test_damaged_uploads_are_422_naming_the_field_or_decode_fully(raw, field, multipart):
    """A damaged file is refused naming its field. A flipped byte that PIL can still decode (e.g. in JPEG
    pixel data) may be served: then the answer is a 200 with a PNG, never a 500."""
    from fastapi.testclient import TestClient

    good = base64.b64encode(FILES["PNG"]).decode()
    white = io.BytesIO()
    PIL.Image.new("L", (8, 8), 255).save(white, format="PNG")
    fields = {"image": good, "mask_image": base64.b64encode(white.getvalue()).decode()}
    with TestClient(APP) as client:
        if multipart:
            files = {k: ("f", base64.b64decode(v)) for k, v in fields.items()}
            files[field] = ("f", raw)
            r = client.post("/v1/inpaint", data={"prompt": "a", "num_inference_steps": "1"}, files=files)
        else:
            body = {"prompt": "a", "num_inference_steps": 1, **fields, field: base64.b64encode(raw).decode()}
            r = client.post("/v1/inpaint", json=body)
    assert r.status_code in (200, 422), (r.status_code, r.text)
    event(f"status {r.status_code}")
    if r.status_code == 422:
        assert field in r.json()["message"], r.json()


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(raw=damaged())
def test_damaged_image_files_raise_value_error_naming_the_file(raw, tmp_path_factory):
    from amused.images import load_image

    path = tmp_path_factory.mktemp("img") / "input.png"
    path.write_bytes(raw)
    try:
        image = load_image(path)
    except ValueError as e:
        assert str(path) in str(e)
        event("refused")
    else:
        assert image.size[0] > 0  # decoded completely (a flipped byte in pixel data)
        event("decoded")
