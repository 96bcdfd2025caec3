"""Real PostgreSQL and Redis for the service tests, and the service itself as a real uvicorn process.

Session-scoped: one throwaway PostgreSQL cluster and one Redis for the run. Tests that break a server
(degrade mode) start their own.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import jwt
import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICE_DIR = ROOT / "service"
sys.path.insert(0, str(SERVICE_DIR))

from ingest.tools.localservers import (
    LocalPostgres,
    LocalRedis,
    free_port,
    missing_prerequisites,
)

API_KEY = "test-api-key-" + uuid.uuid4().hex
JWT_SECRET = "test-jwt-secret-" + uuid.uuid4().hex + uuid.uuid4().hex


def mint_token(scope: str = "events:read", secret: str = JWT_SECRET, expires_in: int = 300, **claims) -> str:
    """A query token as the service wants it (aud and iss "ingest", issued now); `claims` override or, given as
    None, remove claims (e.g. `iat=None`, `aud="someone-else"`)."""
    now = int(time.time())
    payload = {"sub": "tests", "scope": scope, "aud": "ingest", "iss": "ingest", "iat": now, "exp": now + expires_in}
    payload.update(claims)
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, secret, "HS256")


def run_alembic(database_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "DATABASE_URL"))}
    env["DATABASE_URL"] = database_url
    return subprocess.run([sys.executable, "-m", "alembic", *args], check=False, cwd=SERVICE_DIR, env=env,
                          capture_output=True, text=True, timeout=120)


def read_http_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 response read from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


@dataclass
class ServiceProcess:
    """`python -m ingest` from service/, as the image runs it; stdout (JSON logs) goes to a file."""

    env: dict[str, str]
    log_path: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("POSTGRES_", "DATABASE_URL", "REDIS_", "API_KEY", "JWT_", "RATE_LIMIT"))}
        env.update(self.env, PORT=str(self.port), HOST="127.0.0.1", PYTHONUNBUFFERED="1")
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "ingest"], cwd=SERVICE_DIR, env=env,
                                        stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited with {self.process.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.base_url + "/health/live", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"service not live within {timeout}s: {self.log_path.read_text()[-2000:]}")

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()


@pytest.fixture(scope="session")
def postgres() -> Iterator[LocalPostgres]:
    reason = missing_prerequisites()
    if reason:
        pytest.skip(reason)
    server = LocalPostgres().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis]:
    reason = missing_prerequisites()
    if reason:
        pytest.skip(reason)
    server = LocalRedis().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def database_url(postgres) -> str:
    url = postgres.create_database("ingest_tests")
    result = run_alembic(url, "upgrade", "head")
    assert result.returncode == 0, result.stderr
    return url


@pytest.fixture
def fresh_database(postgres) -> Iterator[str]:
    """An empty database of its own, for tests that migrate or break the schema."""
    name = "t_" + uuid.uuid4().hex[:12]
    url = postgres.create_database(name)
    yield url
    postgres.drop_database(name)


def service_env(database_url: str, redis_url: str, **overrides: str) -> dict[str, str]:
    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "API_KEY": API_KEY, "JWT_SECRET": JWT_SECRET,
           "APP_VERSION": "9.9.9-test", "RATE_LIMIT_PER_MINUTE": "0", "SHUTDOWN_GRACE_SECONDS": "15"}
    env.update(overrides)
    return env


@pytest.fixture
def start_service(tmp_path) -> Iterator[Callable[..., ServiceProcess]]:
    """Start a service of the test's own with the given environment; stopped (SIGTERM) at teardown."""
    started: list[ServiceProcess] = []

    def start(env: dict[str, str]) -> ServiceProcess:
        proc = ServiceProcess(env, tmp_path / f"service-{len(started)}.log").start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="session")
def service(database_url, redis_server, tmp_path_factory) -> Iterator[ServiceProcess]:
    """The shared service instance: real PostgreSQL and Redis, rate limiting off so tests do not interact."""
    proc = ServiceProcess(service_env(database_url, redis_server.url, MAX_REQUEST_BODY_BYTES="65536",
                                      INGEST_MAX_BATCH_ITEMS="50", APP_SLOT="green"),
                          tmp_path_factory.mktemp("svc") / "service.log").start()
    yield proc
    proc.stop()


@pytest.fixture
def client(service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.base_url, timeout=10) as http:
        yield http


@pytest.fixture
def ingest_headers() -> dict[str, str]:
    return {"X-API-Key": API_KEY}


@pytest.fixture
def read_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token()}"}


# ----- the per-host proxy: a real nginx running the project's own template ----------------------------------

def free_port_pair() -> int:
    """A free port P whose P + 1 is free too: Ports puts the proxy on P and the blue slot on P + 1."""
    for _ in range(100):
        port = free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two adjacent free ports")


def nginx_binary() -> str:
    found = shutil.which("nginx", path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin")
    if found is None:
        pytest.skip(reason="nginx is not installed: apt-get install nginx (scripts/setup.sh installs it)")
    return found


def wait_listening(port: int, process: subprocess.Popen, log_path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nginx not listening on {port} within {timeout}s: {log_path.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def proxy_ports():
    """The module's proxy port and, one above it, the blue slot's, where the module starts its upstream."""
    from ingestctl.hostlayout import Ports

    return Ports(public=free_port_pair())


@pytest.fixture(scope="module")
def slot_sockets(tmp_path_factory) -> Path:
    """The module's directory of slot sockets (a host's /run/ingest-slots): its upstreams serve UNIX_SOCKET here."""
    return tmp_path_factory.mktemp("slots")


def route(routes: Path, slot_socket: Path, *names: str) -> None:
    """Point the proxy's routes NAMES (live, canary) at SLOT_SOCKET as the deploy does: a symlink, renamed in."""
    for name in names:
        staged = routes / f".{name}.sock.new"
        staged.unlink(missing_ok=True)
        staged.symlink_to(slot_socket)
        staged.rename(routes / f"{name}.sock")


@pytest.fixture
def start_proxy(proxy_ports, slot_sockets, tmp_path) -> Iterator[Callable[..., int]]:
    """Start nginx with the project's proxy template (routes to the blue slot's socket), the given body limit and
    client limits (the inventory's defaults unless given). One proxy per test: it listens on the module's public
    port."""
    from ingestctl.hostlayout import ClientLimits, render_proxy
    from ingestctl.inventory import EnvData

    nginx = nginx_binary()
    started: list[subprocess.Popen] = []
    fields = EnvData.model_fields
    defaults = ClientLimits(fields["proxy_limit_conn"].default, fields["proxy_limit_req_per_s"].default,
                            fields["proxy_limit_req_burst"].default)

    def start(max_body_bytes: int, clients: ClientLimits = defaults) -> int:
        routes = tmp_path / "routes"
        routes.mkdir(exist_ok=True)
        route(routes, slot_sockets / "blue.sock", "live", "canary")
        conf = render_proxy(proxy_ports, max_body_bytes, clients, routes=str(routes))
        # The template's pid file and temp dirs are fixed paths under /tmp: move them into this test's own
        # directory so it never shares (or, on exit, deletes) another proxy's files.
        assert "/tmp/ingest-proxy" in conf
        conf_path = tmp_path / "nginx.conf"
        conf_path.write_text(conf.replace("/tmp/ingest-proxy", str(tmp_path / "ingest-proxy")))
        log_path = tmp_path / "nginx.log"
        with log_path.open("ab") as log:
            # Run as root, nginx would start its workers as `nobody`, who cannot enter pytest's private tmp_path
            # to buffer bodies; run as any other user, nginx ignores the directive.
            process = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(conf_path),
                                        "-g", "daemon off; user root;"], stdout=log, stderr=subprocess.STDOUT)
        started.append(process)
        wait_listening(proxy_ports.public, process, log_path)
        return proxy_ports.public

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
