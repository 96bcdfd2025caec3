"""An oversized body is answered 413 with the JSON error, never with a connection reset or a 502.

Over real TCP sockets: straight to a real uvicorn service, and through a real nginx running the project's own
proxy template. A server that closes while the client is still uploading makes the kernel send an RST, and
whether the client reads the 413 first is a race; each request is repeated so that race would show.

Deployed, the proxy's client_max_body_size is the live config's MAX_REQUEST_BODY_BYTES (the service's own limit),
so the proxy refuses an oversized body before buffering it; the tests with a larger proxy limit reach the
service's own 413 through the proxy.
"""

from __future__ import annotations

import json
import re
import socket
import uuid
from collections.abc import Iterator

import httpx
import pytest
from conftest import API_KEY, ServiceProcess, read_http_response, service_env

pytestmark = pytest.mark.service

SERVICE_LIMIT = 65536  # MAX_REQUEST_BODY_BYTES of the service under test
PROXY_LIMIT = 64 * 1024 * 1024  # above every body sent here, so the service's own limit is the one that answers
REPEATS = 5
SIZES = {"2MB": 2_000_000, "20MB": 20_000_000}
FRAMINGS = ("content-length", "chunked")


def oversized_body(size: int) -> bytes:
    """The runbook's check: a JSON array of one huge number."""
    return b"[" + b"0" * (size - 2) + b"]"


def event_batch(size: int) -> bytes:
    """A valid batch of one event whose JSON is exactly SIZE bytes (its payload padded)."""
    event = {"id": str(uuid.uuid4()), "source": "proxy-body-limit", "type": "padded",
             "timestamp": "2024-05-01T12:00:00Z", "payload": {"pad": ""}}
    event["payload"]["pad"] = "x" * (size - len(json.dumps([event]).encode()))
    body = json.dumps([event]).encode()
    assert len(body) == size
    return body


def post_body(port: int, size: int, framing: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return post_bytes(port, oversized_body(size), framing, headers)


def post_bytes(port: int, body: bytes, framing: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """The plainest HTTP/1.1 client: upload the whole body over a raw socket, then read the answer.

    Unlike httpx, which ignores a failed upload and still tries to read an answer, this one fails on the reset, so
    the race shows.
    """
    head = ("POST /api/v1/events HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"X-API-Key: {API_KEY}\r\n" + "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items()))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        if framing == "content-length":
            sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode())
            sock.sendall(body)
        else:
            sock.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
            for start in range(0, len(body), 65536):
                chunk = body[start:start + 65536]
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sock.sendall(b"0\r\n\r\n")
        status, response_headers, content = read_http_response(sock)
    return httpx.Response(status, headers=response_headers, content=content)


def assert_payload_too_large(response: httpx.Response) -> dict:
    assert response.status_code == 413, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"code", "message", "request_id"}
    assert error["code"] == "PAYLOAD_TOO_LARGE"
    assert error["request_id"] == response.headers["x-request-id"]
    return error


def send_repeatedly(port: int, size: int, framing: str) -> None:
    for attempt in range(REPEATS):
        try:
            response = post_body(port, size, framing)
        except OSError as exc:
            pytest.fail(f"attempt {attempt + 1}/{REPEATS}: {exc!r} instead of a 413")
        assert_payload_too_large(response)


@pytest.fixture(scope="module")
def limited_service(database_url, redis_server, tmp_path_factory, slot_sockets) -> Iterator[ServiceProcess]:
    """A service of this module's own, on the blue slot's socket so the rendered proxy reaches it."""
    proc = ServiceProcess(service_env(database_url, redis_server.url, MAX_REQUEST_BODY_BYTES=str(SERVICE_LIMIT),
                                      UNIX_SOCKET=str(slot_sockets / "blue.sock")),
                          tmp_path_factory.mktemp("body-limit") / "service.log").start()
    yield proc
    proc.stop()


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_service_answers_413_to_an_oversized_body(limited_service, size, framing):
    send_repeatedly(limited_service.port, size, framing)


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_proxy_passes_the_service_413_through(limited_service, start_proxy, size, framing):
    send_repeatedly(start_proxy(PROXY_LIMIT), size, framing)


def test_service_answers_an_expect_100_continue_client_without_asking_for_the_body(limited_service):
    """No `100 Continue` for a body it will refuse: the client learns the answer without uploading anything."""
    with socket.create_connection(("127.0.0.1", limited_service.port), timeout=5) as sock:
        sock.sendall(b"POST /api/v1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     + f"X-API-Key: {API_KEY}\r\nContent-Length: 20000000\r\nExpect: 100-continue\r\n\r\n".encode())
        status, headers, body = read_http_response(sock)
    assert status == 413, body
    assert json.loads(body)["error"]["code"] == "PAYLOAD_TOO_LARGE"


@pytest.mark.parametrize("framing", FRAMINGS)
def test_proxy_answers_its_own_413_in_the_same_json_error(limited_service, start_proxy, framing):
    port = start_proxy(1024 * 1024)
    for attempt in range(REPEATS):
        request_id = f"proxy-{framing}-{attempt}"
        error = assert_payload_too_large(post_body(port, SIZES["2MB"], framing, {"X-Request-Id": request_id}))
        assert error["request_id"] == request_id
        assert "client_max_body_size of the proxy)" in error["message"], "answered by the service, not nginx"


@pytest.mark.parametrize("framing", FRAMINGS)
def test_proxy_limit_is_the_configured_one_a_body_at_it_passes_one_byte_more_is_refused(limited_service,
                                                                                         start_proxy, framing):
    """As deployed: the proxy rendered with the live config's MAX_REQUEST_BODY_BYTES, the service running it."""
    port = start_proxy(SERVICE_LIMIT)
    at_limit = post_bytes(port, event_batch(SERVICE_LIMIT), framing)
    assert at_limit.status_code == 202, at_limit.text
    assert at_limit.json()["accepted"] == 1
    for attempt in range(REPEATS):
        error = assert_payload_too_large(post_bytes(port, event_batch(SERVICE_LIMIT + 1), framing))
        assert f"at most {SERVICE_LIMIT} bytes (MAX_REQUEST_BODY_BYTES, client_max_body_size of the proxy)" in \
            error["message"], f"attempt {attempt + 1}: answered by the service, not by nginx: {error}"


@pytest.mark.parametrize("headers", [{}, {"X-Request-Id": 'x", "code": "OK'}], ids=["none", "unsafe"])
def test_proxy_413_names_its_own_request_id_without_a_usable_one(limited_service, start_proxy, headers):
    error = assert_payload_too_large(post_body(start_proxy(1024 * 1024), SIZES["2MB"], "content-length", headers))
    assert re.fullmatch("[0-9a-f]{32}", error["request_id"]), error  # nginx's $request_id
