"""The sockets a slot serves on: HOST:PORT, and the unix socket the per-host proxy reaches it through.

The proxy connects to a slot through a symlink the deploy flips (`ln -s` + `rename`), so a switch moves new
requests to the other slot without reloading nginx, and so without closing any client's kept-alive connection.
A connection on the unix socket has no peer address; `UnixSocketPeer` names it `unix` so uvicorn's
X-Forwarded-For handling can trust it as it trusts 127.0.0.1 (both can only be the local proxy).
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

# The peer "address" of a unix-socket connection, as uvicorn's ProxyHeadersMiddleware sees it: a literal it
# trusts when listed, which no TCP peer can take (a TCP peer always has an IP address).
UNIX_PEER = "unix"


def tcp_listener(host: str, port: int, backlog: int = 2048) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def unix_listener(path: str, backlog: int = 2048) -> socket.socket:
    """Listen on PATH, replacing the socket a previous container of this slot left there (never another kind of
    file). World-connectable: the proxy's workers run as another user, and the directory is only the slots'."""
    target = Path(path)
    try:
        if stat.S_ISSOCK(target.lstat().st_mode):
            target.unlink()
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o666)
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def listeners(host: str, port: int, unix_socket: str) -> list[socket.socket]:
    sockets = [tcp_listener(host, port)]
    if unix_socket:
        sockets.append(unix_listener(unix_socket))
    return sockets


def trusted_peers(forwarded_allow_ips: str, unix_socket: str) -> str:
    """FORWARDED_ALLOW_IPS, plus the unix socket's peer when the slot serves one."""
    return f"{forwarded_allow_ips},{UNIX_PEER}" if unix_socket else forwarded_allow_ips


class UnixSocketPeer:
    """ASGI middleware, outside uvicorn's ProxyHeadersMiddleware: a request without a peer address (it came over
    the unix socket) gets the peer `unix`, so X-Forwarded-For from the proxy is believed and the rate limiter keys
    on the real client, as it does over TCP."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket") and scope.get("client") is None:
            scope = {**scope, "client": (UNIX_PEER, 0)}
        await self.app(scope, receive, send)
