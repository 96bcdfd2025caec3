"""Real PostgreSQL and Redis for the service tests, and the service itself as a real uvicorn process.

Session-scoped: one throwaway PostgreSQL cluster and one Redis for the run. Tests that break a server
(degrade mode) start their own.
"""

from __future__ import annotations

import os
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
                                      INGEST_MAX_BATCH_ITEMS="50"),
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
