"""The proxy's per-client-address limits, in a real nginx running the project's own template in front of a real
service: a burst beyond `limit_req` and requests beyond `limit_conn` are refused with 429 in the api's JSON error
shape with a Retry-After that holds, and requests within the limits reach the api. Loopback only; every loop is
bounded in count and time."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import ServiceProcess, service_env
from ingestctl.hostlayout import ClientLimits

pytestmark = pytest.mark.service

BODY_LIMIT = 65536


@pytest.fixture(scope="module")
def upstream(database_url, redis_server, tmp_path_factory, proxy_ports) -> Iterator[ServiceProcess]:
    """The api the proxy sends to: on the blue slot's port, its own rate limiter off (RATE_LIMIT_PER_MINUTE=0)."""
    proc = ServiceProcess(service_env(database_url, redis_server.url, MAX_REQUEST_BODY_BYTES=str(BODY_LIMIT)),
                          tmp_path_factory.mktemp("proxy-limits") / "service.log", port=proxy_ports.blue).start()
    yield proc
    proc.stop()


def get(port: int, request_id: str) -> httpx.Response:
    """One request on a connection of its own (as another client from the same address would open)."""
    return httpx.get(f"http://127.0.0.1:{port}/health/live", headers={"X-Request-Id": request_id}, timeout=5)


def assert_rate_limited(response: httpx.Response, request_id: str) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert set(error) == {"code", "message", "request_id"}
    assert error["code"] == "RATE_LIMITED"  # the api's own rate limiter's code: clients handle one shape
    assert error["request_id"] == request_id == response.headers["x-request-id"]
    assert "limit_conn or limit_req of the proxy" in error["message"]


def test_a_burst_beyond_limit_req_gets_429_json_with_a_retry_after_that_holds(upstream, start_proxy):
    port = start_proxy(BODY_LIMIT, ClientLimits(connections=0, requests_per_s=1, burst=3))
    started = time.monotonic()
    answers = [get(port, f"burst-{i}") for i in range(12)]
    elapsed = time.monotonic() - started
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 429}, statuses
    # 1 r/s with bursts of 3: the first request and 3 more at once, then one more per second that passed.
    assert statuses[:4] == [200] * 4, statuses
    assert 4 <= statuses.count(200) <= 4 + int(elapsed) + 1, (statuses, elapsed)
    assert statuses.count(429) >= 12 - (4 + int(elapsed) + 1)
    for i, response in enumerate(answers):
        if response.status_code == 429:
            assert_rate_limited(response, f"burst-{i}")
    # Retry-After is honest: after waiting it, the next request passes.
    time.sleep(int(answers[-1].headers.get("retry-after", "1")) + 0.1)
    assert get(port, "after-wait").status_code == 200


def test_requests_beyond_limit_conn_get_429_json_until_one_in_progress_ends(upstream, start_proxy):
    port = start_proxy(BODY_LIMIT, ClientLimits(connections=2, requests_per_s=0, burst=0))
    held: list[socket.socket] = []
    try:
        # Two requests in progress: headers sent, the body still coming (nginx counts a request once its headers
        # are read, until it ends).
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"POST /api/v1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n[")
            held.append(sock)
        deadline = time.monotonic() + 5
        attempt = 0
        while True:
            attempt += 1
            response = get(port, f"third-{attempt}")
            if response.status_code == 429 or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # nginx has not read the held requests' headers yet
        assert_rate_limited(response, f"third-{attempt}")
        assert get(port, "fourth").status_code == 429, "still two in progress: still refused"

        held.pop().close()  # one of them ends (the client went away)
        deadline = time.monotonic() + 5
        while (status := get(port, "after-close").status_code) != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == 200, "one request in progress of 2 allowed: a new one passes"
    finally:
        for sock in held:
            sock.close()


def test_within_the_limits_every_request_reaches_the_api(upstream, start_proxy):
    """The inventory's defaults (64 at once, 200/s, bursts of 400) let a client's ordinary pace through."""
    port = start_proxy(BODY_LIMIT)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        statuses = [client.get("/health/live").status_code for _ in range(100)]
    assert statuses == [200] * 100
