"""The switch without a reload, in a real nginx running the project's template in front of two real services
(the blue and green slots, on their unix sockets): flipping the proxy's route moves the very next request, even
on a client connection kept alive through the flip, and a load of every kind of client sees no failed request
through many flips. The negative control: `nginx -s reload`, which the switch used before, does close idle
client connections. Loopback only; every loop is bounded in count and time."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from conftest import API_KEY, JWT_SECRET, ServiceProcess, read_http_response, route, service_env
from ingestctl.hostlayout import ClientLimits
from test_proxy_limits import bench_load_module

pytestmark = pytest.mark.service

VERSIONS = {"blue": "1.0.0-blue", "green": "2.0.0-green"}


@pytest.fixture(scope="module")
def slots(database_url, redis_server, tmp_path_factory, slot_sockets) -> Iterator[dict[str, ServiceProcess]]:
    started = {}
    for slot, version in VERSIONS.items():
        started[slot] = ServiceProcess(
            service_env(database_url, redis_server.url, APP_VERSION=version, APP_SLOT=slot,
                        UNIX_SOCKET=str(slot_sockets / f"{slot}.sock")),
            tmp_path_factory.mktemp(f"slot-{slot}") / "service.log").start()
    yield started
    for proc in started.values():
        proc.stop()


@pytest.fixture
def flip(slot_sockets, tmp_path):
    def flip(slot: str) -> None:
        route(tmp_path / "routes", slot_sockets / f"{slot}.sock", "canary", "live")
    return flip


def get_version(sock: socket.socket) -> str:
    sock.sendall(b"GET /version HTTP/1.1\r\nHost: t\r\n\r\n")
    status, _headers, body = read_http_response(sock)
    assert status == 200, body
    return __import__("json").loads(body)["version"]


def nginx_pids(port: int) -> set[str]:
    out = subprocess.run(["sh", "-c", f"ss -Hltnp 'sport = :{port}'"], capture_output=True, text=True).stdout
    return set(__import__("re").findall(r"pid=(\d+)", out))


def test_a_flip_moves_the_next_request_on_a_connection_kept_alive_through_it(slots, start_proxy, flip):
    port = start_proxy(1 << 20)
    workers = nginx_pids(port)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        assert get_version(sock) == VERSIONS["blue"]
        flip("green")
        assert get_version(sock) == VERSIONS["green"], "the next request on the same connection"
        flip("blue")
        assert get_version(sock) == VERSIONS["blue"]
    assert nginx_pids(port) == workers, "no reload: the same nginx processes serve throughout"


def test_every_kind_of_client_sees_no_failure_through_twenty_flips(slots, start_proxy, flip):
    port = start_proxy(1 << 20, ClientLimits(0, 0, 0))  # one client address here: no per-address limits
    load_module = bench_load_module()
    with load_module.Load([f"http://127.0.0.1:{port}"], API_KEY, JWT_SECRET, workers=2, idle_clients=4,
                          fresh_clients=2, max_gap_s=1.0, max_seconds=30, max_requests=50_000) as load:
        time.sleep(0.5)
        for turn in range(20):
            flip("green" if turn % 2 == 0 else "blue")
            time.sleep(0.25)
    result = load.result
    assert result.requests > 200, result.as_dict()
    assert result.failures == 0, result.as_dict()


def test_the_negative_control_a_reload_closes_idle_kept_alive_client_connections(start_proxy, slots, tmp_path):
    """What the switch no longer does: nginx's graceful reload closes every idle kept-alive client connection, so
    a client that sends on one at that instant gets no answer."""
    port = start_proxy(1 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        assert get_version(sock) == VERSIONS["blue"]
        conf = next(tmp_path.glob("nginx.conf"))
        subprocess.run(["nginx", "-p", str(tmp_path), "-c", str(conf), "-s", "reload"], check=True,
                       capture_output=True)
        time.sleep(1.0)
        sock.sendall(b"GET /version HTTP/1.1\r\nHost: t\r\n\r\n")
        try:
            closed = sock.recv(1) == b""
        except ConnectionResetError:
            closed = True
    assert closed, "the reload left the idle connection open"
