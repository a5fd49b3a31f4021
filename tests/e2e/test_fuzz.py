"""A bounded schemathesis run of the OpenAPI document against `ptdaemon serve`.

Every generated request must get an answer below 500, and every 4xx must
be in the contract's error shape.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from ptdaemon.api.openapi import openapi_document
from tests.test_cli import Served, serving

schema = schemathesis.openapi.from_dict(openapi_document())
# Valid and invalid requests both: the invalid ones exercise the 4xx shape.
schema.config.generation.update(modes=list(schemathesis.GenerationMode))


SEEN: set[int] = set()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving(tmp_path_factory.mktemp("fuzz")) as daemon:
        yield daemon


def check_error_shape(path: str, raw: bytes) -> None:
    body: Any = json.loads(raw)
    assert isinstance(body, dict), raw
    if path == "/v1/submissions/batch" and set(body) == {"items"}:
        # A batch with no valid item: every item in the error shape.
        for item in body["items"]:
            check_error(item, raw)
        return
    check_error(body, raw)


def check_error(body: Any, raw: bytes) -> None:
    assert set(body) == {"error"}, raw
    error = body["error"]
    assert isinstance(error, dict), raw
    assert isinstance(error.get("code"), str), raw
    assert error["code"], raw
    assert isinstance(error.get("message"), str), raw
    assert set(error) <= {"code", "message", "details"}, raw


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_no_answer_is_a_server_error_and_every_4xx_has_the_error_shape(
    case: schemathesis.Case, served: Served
):
    token = (served.root / "state" / "admin.token").read_text().strip()
    response = case.call(
        base_url=f"http://127.0.0.1:{served.port}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert response.status_code < 500, (case.method, case.path, response.content)
    SEEN.add(response.status_code)
    if 400 <= response.status_code < 500:
        check_error_shape(case.path, response.content)
    # The run must not lock the admin out of its own daemon.
    assert served.healthy()


def test_the_run_reached_both_success_and_refusal():
    # Runs after the generated cases: a run that only ever got 401s or only
    # 2xx answers would prove little.
    assert any(200 <= code < 300 for code in SEEN), SEEN
    assert {400, 404, 422} <= SEEN, SEEN
