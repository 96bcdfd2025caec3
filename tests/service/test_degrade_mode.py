"""Redis outage: the service keeps ingesting with in-process rate limiting and says so in readiness."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from conftest import API_KEY, service_env
from ingest.tools.localservers import LocalRedis

pytestmark = pytest.mark.service


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def ingest_one(base_url: str) -> httpx.Response:
    event = {"id": str(uuid.uuid4()), "source": "degrade", "type": "t", "timestamp": datetime.now(UTC).isoformat()}
    return httpx.post(base_url + "/api/v1/events", json=event, headers={"X-API-Key": API_KEY}, timeout=5)


def degraded_gauge(base_url: str) -> float:
    for line in httpx.get(base_url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("ingest_degraded "):
            return float(line.split()[1])
    raise AssertionError("ingest_degraded missing from /metrics")


def test_redis_outage_degrades_and_recovers(database_url, start_service):
    redis = LocalRedis().start()
    try:
        svc = start_service(service_env(database_url, redis.url, RATE_LIMIT_PER_MINUTE="600000",
                                        RATE_LIMIT_BURST="100000"))
        assert httpx.get(svc.base_url + "/health/ready").json()["status"] == "ok"
        assert ingest_one(svc.base_url).status_code == 202

        redis.stop()
        ready = wait_for(lambda: (r := httpx.get(svc.base_url + "/health/ready", timeout=5)).status_code == 503 and r)
        assert ready.json()["status"] == "degraded"
        assert ready.json()["checks"]["redis"]["status"] == "error"
        assert ready.json()["checks"]["database"]["status"] == "ok"
        assert httpx.get(svc.base_url + "/health/live").status_code == 200
        started = time.monotonic()
        answers = [ingest_one(svc.base_url).status_code for _ in range(20)]
        assert answers == [202] * 20
        # The circuit breaker skips Redis: no per-request connect timeouts while it is down.
        assert time.monotonic() - started < 5
        assert degraded_gauge(svc.base_url) == 1

        redis = LocalRedis(port=redis.port).start()
        wait_for(lambda: httpx.get(svc.base_url + "/health/ready", timeout=5).status_code == 200)
        assert httpx.get(svc.base_url + "/health/ready").json()["status"] == "ok"
        assert degraded_gauge(svc.base_url) == 0
        assert ingest_one(svc.base_url).status_code == 202
        assert any('"entering degrade mode' in line for line in svc.log_lines())
    finally:
        redis.stop()


def test_rate_limit_answers_429_in_redis_and_in_degrade_mode(database_url, start_service):
    redis = LocalRedis().start()
    try:
        # One token a minute: on a loaded machine the requests below may take seconds, and a faster refill would
        # let a sixth through (a timing the test must not depend on).
        svc = start_service(service_env(database_url, redis.url, RATE_LIMIT_PER_MINUTE="1", RATE_LIMIT_BURST="5"))
        codes = [ingest_one(svc.base_url).status_code for _ in range(8)]
        assert codes[:5] == [202] * 5 and 429 in codes[5:]
        limited = ingest_one(svc.base_url)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert limited.json()["error"]["code"] == "RATE_LIMITED"

        redis.stop()
        wait_for(lambda: httpx.get(svc.base_url + "/health/ready", timeout=5).json()["status"] == "degraded")
        codes = [ingest_one(svc.base_url).status_code for _ in range(8)]
        assert codes.count(202) <= 5 and 429 in codes  # the in-process bucket limits too
    finally:
        redis.stop()


def test_memory_backend_needs_no_redis(database_url, start_service):
    svc = start_service(service_env(database_url, "redis://127.0.0.1:1/0", RATE_LIMIT_BACKEND="memory"))
    ready = httpx.get(svc.base_url + "/health/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ok"
    assert ingest_one(svc.base_url).status_code == 202
    assert degraded_gauge(svc.base_url) == 0
