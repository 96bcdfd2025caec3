"""A slot's listeners: HOST:PORT plus the unix socket the proxy reaches it through, and the peer a unix-socket
request is given so the proxy's X-Forwarded-For is believed (the rate limiter keys on the real client)."""

from __future__ import annotations

import asyncio
import socket
import stat
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "service"))

from ingest.listeners import UnixSocketPeer, trusted_peers, unix_listener  # noqa: E402
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware  # noqa: E402


def client_seen(client, headers: list[tuple[bytes, bytes]], unix_socket: str = "/run/ingest-slots/blue.sock"):
    """The scope["client"] the app sees behind UnixSocketPeer and ProxyHeadersMiddleware, as __main__ stacks them."""
    seen = {}

    async def app(scope, receive, send):
        seen["client"] = scope["client"]

    stack = UnixSocketPeer(ProxyHeadersMiddleware(app, trusted_hosts=trusted_peers("127.0.0.1", unix_socket)))
    scope = {"type": "http", "client": client, "headers": headers, "scheme": "http"}
    asyncio.run(stack(scope, None, None))
    return seen["client"]


def test_a_unix_socket_request_from_the_proxy_keys_on_the_forwarded_client():
    assert client_seen(None, [(b"x-forwarded-for", b"203.0.113.7")]) == ("203.0.113.7", 0)


def test_a_unix_socket_request_without_forwarding_is_the_unix_peer():
    assert client_seen(None, []) == ("unix", 0)


def test_a_tcp_peer_is_trusted_as_before_and_only_when_listed():
    assert client_seen(("127.0.0.1", 5000), [(b"x-forwarded-for", b"203.0.113.7")]) == ("203.0.113.7", 0)
    assert client_seen(("198.51.100.9", 5000), [(b"x-forwarded-for", b"203.0.113.7")]) == ("198.51.100.9", 5000)


def test_without_a_unix_socket_the_unix_peer_is_not_trusted():
    assert client_seen(None, [(b"x-forwarded-for", b"203.0.113.7")], unix_socket="") == ("unix", 0)


def test_the_unix_listener_replaces_a_stale_socket_and_is_connectable_by_the_proxys_user(tmp_path):
    path = str(tmp_path / "blue.sock")
    stale = unix_listener(path)
    stale.close()  # a previous container's socket file stays behind
    sock = unix_listener(path)
    try:
        assert stat.S_IMODE(Path(path).stat().st_mode) == 0o666
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
    finally:
        sock.close()


def test_the_unix_listener_never_removes_a_file_that_is_not_a_socket(tmp_path):
    path = tmp_path / "blue.sock"
    path.write_text("not a socket")
    with pytest.raises(OSError):
        unix_listener(str(path))
    assert path.read_text() == "not a socket"
