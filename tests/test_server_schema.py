"""Schemathesis over the server's own OpenAPI schema, against the app in-process with the tiny pipeline.

Every operation gets schema-conforming and schema-violating requests (bounded counts); the properties: no
5xx ever, every 4xx carries a JSON body with `error` and `message`, and a 2xx matches the documented schema.
"""

import json

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import checks as st_checks  # noqa: E402

from amused import AmusedPipeline  # noqa: E402
from amused.server import ServerSettings, create_app  # noqa: E402
from tiny import save_reference_checkpoint  # noqa: E402


def _app():
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="amused-schema-"))
    pipe = AmusedPipeline.from_pretrained(save_reference_checkpoint(folder))
    pipe.generation_defaults = {"num_inference_steps": 2}
    # max_side keeps a schema-valid 16384 px request from allocating for minutes; it must then be a clean 4xx.
    return create_app(pipe, ServerSettings(max_side=64, timeout_s=30, max_body_bytes=2**20))


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
