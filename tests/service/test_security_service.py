"""Security guards of the real service: JWT lifetime, audience and issuer; rate limiting before authentication;
a deadline for request headers (slow clients)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from conftest import API_KEY, JWT_SECRET, ServiceProcess, mint_token, service_env
from ingest.tools.credentials import CredentialsError, mint_read_token
from ingest.tools.localservers import LocalRedis

pytestmark = pytest.mark.service

YEAR_3000 = int(datetime(3000, 1, 1, tzinfo=UTC).timestamp())


def query(base_url: str, token: str) -> httpx.Response:
    return httpx.get(base_url + "/api/v1/events", params={"limit": 1},
                     headers={"Authorization": f"Bearer {token}"}, timeout=10)


def assert_unauthorized(response: httpx.Response, *fragments: str) -> str:
    assert response.status_code == 401, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "request_id"}
    assert body["error"]["code"] == "UNAUTHORIZED"
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    assert response.headers["www-authenticate"].startswith("Bearer")
    for fragment in fragments:
        assert fragment in body["error"]["message"], body["error"]["message"]
    return body["error"]["message"]


# --- JWT ---------------------------------------------------------------------------------------------------------

def test_a_good_token_is_accepted(service):
    assert query(service.base_url, mint_token()).status_code == 200
    # exactly the maximum lifetime, an `aud` list naming the service, no `iat` but an `exp` within the maximum
    assert query(service.base_url, mint_token(expires_in=86400)).status_code == 200
    assert query(service.base_url, mint_token(aud=["other", "ingest"])).status_code == 200
    assert query(service.base_url, mint_token(iat=None, expires_in=3600)).status_code == 200


@pytest.mark.parametrize(
    ("expires_in", "claims"),
    [
        (300, {"exp": YEAR_3000}),  # with iat: exp - iat is centuries
        (300, {"exp": YEAR_3000, "iat": None}),  # without iat: exp is centuries from now
        (86400 + 120, {}),  # just over the default 24 h, beyond the 30 s leeway
        (3 * 86400, {"iat": None}),
    ],
    ids=["year-3000", "year-3000-no-iat", "25h", "3d-no-iat"],
)
def test_a_token_living_too_long_is_refused(service, expires_in, claims):
    response = query(service.base_url, mint_token(expires_in=expires_in, **claims))
    assert_unauthorized(response, "lifetime", "86400", "JWT_MAX_LIFETIME_SECONDS")


def test_a_short_token_issued_in_the_future_is_refused(service):
    # Otherwise a "one hour" token issued in the year 2999 would pass the lifetime check.
    response = query(service.base_url, mint_token(iat=YEAR_3000 - 3600, exp=YEAR_3000))
    assert_unauthorized(response, "ImmatureSignatureError")


@pytest.mark.parametrize(
    ("claims", "fragments"),
    [
        ({"aud": "someone-else"}, ("aud", "'ingest'", "JWT_AUDIENCE")),
        ({"aud": ["someone-else", "another"]}, ("aud", "JWT_AUDIENCE")),
        ({"aud": None}, ("`aud`",)),
        ({"iss": "evil-issuer"}, ("iss", "'ingest'", "JWT_ISSUER")),
        ({"iss": None}, ("`iss`",)),
        ({"exp": None}, ("`exp`",)),
    ],
    ids=["wrong-aud", "wrong-aud-list", "no-aud", "wrong-iss", "no-iss", "no-exp"],
)
def test_audience_issuer_and_expiry_are_required(service, claims, fragments):
    assert_unauthorized(query(service.base_url, mint_token(**claims)), *fragments)


def test_a_wrong_scope_is_still_403(service):
    response = query(service.base_url, mint_token(scope="events:write"))
    assert response.status_code == 403 and response.json()["error"]["code"] == "FORBIDDEN"


def test_the_tools_mint_tokens_the_service_accepts(service, monkeypatch):
    for name in ("JWT_AUDIENCE", "JWT_ISSUER", "JWT_MAX_LIFETIME_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    assert query(service.base_url, mint_read_token(JWT_SECRET)).status_code == 200
    assert query(service.base_url, mint_read_token(JWT_SECRET, ttl_seconds=600, subject="gate")).status_code == 200
    with pytest.raises(CredentialsError, match="JWT_MAX_LIFETIME_SECONDS"):
        mint_read_token(JWT_SECRET, ttl_seconds=86400 + 1)


def test_audience_issuer_and_lifetime_are_configurable(database_url, redis_server, start_service, monkeypatch):
    svc = start_service(service_env(database_url, redis_server.url, JWT_AUDIENCE="ingest-eu", JWT_ISSUER="auth.example",
                                    JWT_MAX_LIFETIME_SECONDS="600"))
    assert query(svc.base_url, mint_token(aud="ingest-eu", iss="auth.example", expires_in=600)).status_code == 200
    assert_unauthorized(query(svc.base_url, mint_token(iss="auth.example")), "'ingest-eu'", "JWT_AUDIENCE")
    assert_unauthorized(query(svc.base_url, mint_token(aud="ingest-eu")), "'auth.example'", "JWT_ISSUER")
    assert_unauthorized(query(svc.base_url, mint_token(aud="ingest-eu", iss="auth.example", expires_in=900)),
                        "600", "JWT_MAX_LIFETIME_SECONDS")
    # The tools honour the same variables.
    monkeypatch.setenv("JWT_AUDIENCE", "ingest-eu")
    monkeypatch.setenv("JWT_ISSUER", "auth.example")
    monkeypatch.setenv("JWT_MAX_LIFETIME_SECONDS", "600")
    assert query(svc.base_url, mint_read_token(JWT_SECRET, ttl_seconds=600)).status_code == 200
    with pytest.raises(CredentialsError):
        mint_read_token(JWT_SECRET)  # the default 900 s is over this service's maximum


# --- rate limiting -----------------------------------------------------------------------------------------------

def test_unauthenticated_requests_are_rate_limited(database_url, start_service):
    redis = LocalRedis().start()  # its own: the bucket of 127.0.0.1 must not be shared with other tests
    try:
        # Five tokens, and one more a minute: nothing refills while the test runs.
        svc = start_service(service_env(database_url, redis.url, RATE_LIMIT_PER_MINUTE="1", RATE_LIMIT_BURST="5"))
        with httpx.Client(base_url=svc.base_url, timeout=10) as http:
            codes = [http.get("/api/v1/events").status_code for _ in range(10)]
            assert codes[:5] == [401] * 5, codes
            assert set(codes) <= {401, 429} and codes[-1] == 429, codes

            limited = http.post("/api/v1/events", json=[], headers={"X-API-Key": "not-the-key-0123456789"})
            assert limited.status_code == 429, limited.text
            assert int(limited.headers["retry-after"]) >= 1
            body = limited.json()
            assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "request_id"}
            assert body["error"]["code"] == "RATE_LIMITED"
            assert body["error"]["request_id"] == limited.headers["x-request-id"]
            # Keyed by client address, not by credential: this client's valid requests wait too.
            assert http.post("/api/v1/events", json=[], headers={"X-API-Key": API_KEY}).status_code == 429
            assert http.get("/api/v1/stats", headers={"Authorization": f"Bearer {mint_token()}"}).status_code == 429
            # Health and metrics are never limited (probes must see the service).
            assert http.get("/health/live").status_code == 200
    finally:
        redis.stop()


# --- header timeout ----------------------------------------------------------------------------------------------

def seconds_until_closed(sock: socket.socket, limit: float = 15.0) -> float:
    """Seconds from now until the server closes the connection (EOF or reset); reading and dropping any data."""
    started = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"connection still open after {limit} s")
    return time.monotonic() - started


@pytest.fixture(scope="module")
def slow_header_service(database_url, redis_server, tmp_path_factory) -> Iterator[ServiceProcess]:
    """One service with HEADER_TIMEOUT_SECONDS=2 for the header tests (each start costs seconds)."""
    proc = ServiceProcess(service_env(database_url, redis_server.url, HEADER_TIMEOUT_SECONDS="2"),
                          tmp_path_factory.mktemp("slow-headers") / "service.log").start()
    yield proc
    proc.stop()


@pytest.mark.parametrize(
    "partial",
    [b"GET /api/v1/eve", b"GET /api/v1/events HTTP/1.1\r\nHost: test\r\nX-Slow: ", b""],
    ids=["partial-request-line", "partial-headers", "nothing"],
)
def test_a_client_stalling_in_its_headers_is_cut_off(slow_header_service, partial):
    def closings() -> int:
        return sum("request headers not complete in time" in line for line in slow_header_service.log_lines())

    before = closings()
    with socket.create_connection(("127.0.0.1", slow_header_service.port), timeout=10) as sock:
        sock.sendall(partial)
        elapsed = seconds_until_closed(sock)
    # HEADER_TIMEOUT_SECONDS=2: not before it (generous margin below), and not much after (loaded machines).
    assert 1.5 <= elapsed <= 5.0, elapsed
    assert closings() == before + 1


def test_trickled_headers_do_not_extend_the_deadline(slow_header_service):
    with socket.create_connection(("127.0.0.1", slow_header_service.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: test\r\n")
        try:
            for _ in range(20):  # a header line every 0.5 s, for up to 10 s
                time.sleep(0.5)
                sock.sendall(b"X-Drip: 1\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        elapsed = time.monotonic() - started + seconds_until_closed(sock, limit=10)
    assert 1.5 <= elapsed <= 6.0, elapsed


def test_headers_sent_in_time_are_served_and_keep_alive_gets_a_new_deadline(slow_header_service):
    with socket.create_connection(("127.0.0.1", slow_header_service.port), timeout=10) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: test\r\n")
        time.sleep(1.0)  # slow, but within the 2 s
        sock.sendall(b"Accept: application/json\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first
        # The next request on the kept-alive connection stalls in its headers: cut off after its own deadline.
        time.sleep(1.0)
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: te")
        elapsed = seconds_until_closed(sock)
    assert 1.5 <= elapsed <= 5.0, elapsed


def test_the_default_service_answers_normal_clients(client):
    # The shared service runs with the default HEADER_TIMEOUT_SECONDS (10): ordinary requests never notice it.
    assert client.get("/health/live").status_code == 200
