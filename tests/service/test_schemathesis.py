"""Property-based fuzzing of the service's own OpenAPI document: no input, valid or not, may cause a 5xx.

Bounded: a small max_examples per operation and mode, with valid credentials (reaching the handlers and the
database) and without. Only the not_a_server_error check runs: the contract under test is "bad input gets a
4xx", not full schema conformance of every answer. Uses schemathesis's Python API directly (its pytest
fixture loader does not run under this pytest version).
"""

from __future__ import annotations

import time

import pytest
import schemathesis
from conftest import API_KEY, mint_token
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

pytestmark = pytest.mark.service

MAX_EXAMPLES = {GenerationMode.POSITIVE: 60, GenerationMode.NEGATIVE: 40}


def _operations(service):
    schema = schemathesis.openapi.from_url(service.base_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /api/v1/events", "GET /api/v1/events", "GET /api/v1/stats", "GET /health/ready", "GET /version",
    }
    return operations


def _credentials(method: str) -> dict[str, str]:
    return {"X-API-Key": API_KEY} if method.upper() == "POST" else {"Authorization": f"Bearer {mint_token()}"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize("authenticated", [True, False], ids=["authenticated", "anonymous"])
def test_no_server_errors(service, mode, authenticated):
    started = time.monotonic()
    calls = 0

    def fuzz(operation, headers: dict[str, str]) -> None:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES[mode] if authenticated else 5, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            nonlocal calls
            calls += 1
            # Our credentials win over generated headers of the same name, so the handlers are reached.
            case.call_and_validate(base_url=service.base_url, headers={**(case.headers or {}), **headers},
                                   checks=[not_a_server_error])

        check()

    for operation in _operations(service):
        try:
            fuzz(operation, _credentials(operation.method) if authenticated else {})
        except Unsatisfiable:
            # Negative mode has nothing to break in an operation without parameters or body (e.g. /health/live).
            if mode is not GenerationMode.NEGATIVE or len(operation.query) or len(operation.body):
                raise
    assert calls > 0
    assert time.monotonic() - started < 90
