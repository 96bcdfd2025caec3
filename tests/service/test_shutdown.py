"""SIGTERM: stop accepting, let the in-flight request finish, exit 0."""

from __future__ import annotations

import json
import signal
import socket
import time
import uuid

import httpx
import pytest
from conftest import API_KEY, read_http_response, service_env

pytestmark = pytest.mark.service


def test_sigterm_drains_an_in_flight_request(database_url, redis_server, start_service):
    svc = start_service(service_env(database_url, redis_server.url, SHUTDOWN_GRACE_SECONDS="20"))
    event = json.dumps({"id": str(uuid.uuid4()), "source": "drain", "type": "t",
                        "timestamp": "2024-01-01T00:00:00Z"}).encode()
    with socket.create_connection(("127.0.0.1", svc.port), timeout=15) as sock:
        # A slow client: headers and half the body now, the rest after SIGTERM.
        sock.sendall(b"POST /api/v1/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     + f"X-API-Key: {API_KEY}\r\nContent-Length: {len(event)}\r\n\r\n".encode() + event[:20])
        time.sleep(0.3)
        svc.process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        # New connections are refused while the old request is still being served.
        with pytest.raises(httpx.TransportError):
            httpx.get(svc.base_url + "/health/live", timeout=2)
        assert svc.process.poll() is None, "exited before the in-flight request finished"
        sock.sendall(event[20:])
        status, _, body = read_http_response(sock)
    assert status == 202, body
    assert json.loads(body) == {"accepted": 1, "duplicates": 0}
    assert svc.process.wait(15) == 0
    assert any("in-flight requests drained" in line for line in svc.log_lines())
