"""Throwaway PostgreSQL and Redis servers from the Debian packages, for tests, benchmarks and local runs.

PostgreSQL refuses to run as root, so when we are root the cluster directory is owned by `postgres` and
every server command runs through `runuser -u postgres --`.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_HINT = "apt-get install -y postgresql redis-server"


class LocalServerError(RuntimeError):
    """A throwaway server could not be started; the message says which and why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bindir() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if candidates:
        return Path(candidates[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def missing_prerequisites() -> str | None:
    """None when both servers can be started here, else a reason naming how to get them."""
    if postgres_bindir() is None:
        return f"PostgreSQL server binaries (initdb) not found; {INSTALL_HINT}"
    if shutil.which("redis-server") is None:
        return f"redis-server not found; {INSTALL_HINT}"
    if os.geteuid() == 0 and (shutil.which("runuser") is None or not _user_exists("postgres")):
        return "running as root needs the `postgres` user and runuser to start PostgreSQL; " + INSTALL_HINT
    return None


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@dataclass
class LocalPostgres:
    """A cluster in `root` (default: a fresh directory under /tmp, removed on stop)."""

    root: Path | None = None
    port: int = field(default_factory=free_port)
    user: str = "ingest"
    password: str = ""
    _bindir: Path | None = None

    def __post_init__(self) -> None:
        self._bindir = postgres_bindir()
        self._owns_root = self.root is None
        if self.root is None:
            # Under /tmp itself: pytest's and mkdtemp's private parents are not traversable by `postgres`.
            self.root = Path(tempfile.mkdtemp(prefix="ingest-pg-", dir="/tmp"))
        if not self.password:
            self.password = os.urandom(16).hex()

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    def _as_owner(self, args: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args

    def _run(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(self._as_owner(args), check=False, capture_output=True, text=True, **kwargs)
        if result.returncode != 0:
            raise LocalServerError(f"{args[0]} failed ({result.returncode}): {result.stderr.strip()[-800:]}")
        return result

    def start(self) -> LocalPostgres:
        if self._bindir is None:
            raise LocalServerError(f"PostgreSQL server binaries not found; {INSTALL_HINT}")
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            if subprocess.run(self._as_owner(["test", "-w", str(self.root)]), check=False).returncode != 0:
                raise LocalServerError(f"{self.root}: the postgres user cannot reach this directory; "
                                       "pick one whose parents are traversable (e.g. under /tmp)")
        if not (self.datadir / "PG_VERSION").exists():
            pwfile = self.root / "pwfile"
            pwfile.write_text(self.password + "\n")
            os.chmod(pwfile, 0o600)
            if os.geteuid() == 0:
                shutil.chown(pwfile, "postgres", "postgres")
            self._run([str(self._bindir / "initdb"), "-D", str(self.datadir), "-U", self.user,
                       f"--pwfile={pwfile}", "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8"])
            pwfile.unlink()
            with (self.datadir / "postgresql.conf").open("a") as conf:
                # Throwaway data: trade durability for speed, like a CI database.
                conf.write("\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                           "unix_socket_directories = ''\nmax_connections = 200\n")
        self._run([str(self._bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.root / "server.log"),
                   "-o", f"-p {self.port} -h 127.0.0.1", "-w", "-t", "60", "start"])
        return self

    def stop(self) -> None:
        if self._bindir and (self.datadir / "postmaster.pid").exists():
            subprocess.run(self._as_owner([str(self._bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast",
                                           "-w", "stop"]), check=False, capture_output=True)
        if self._owns_root and self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class LocalRedis:
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> LocalRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise LocalServerError(f"redis-server not found; {INSTALL_HINT}")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LocalServerError(f"redis-server on port {self.port} exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise LocalServerError(f"redis-server on port {self.port} did not answer PING within {timeout}s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"
