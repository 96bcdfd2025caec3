"""Does a sandbox host answer? sshd (key login) and its Docker engine, checked over real SSH."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import paramiko

DOCKER_INFO = "docker info --format '{{.ServerVersion}} {{.Driver}}'"
# The sandbox entrypoint writes `failed` here when no storage driver let the inner engine start.
ENGINE_FAILED_MARK = "inner engine failed to start"
PROBE_COMMAND = (
    f'{DOCKER_INFO} || {{ test "$(cat /run/sandbox/storage-driver 2>/dev/null)" = failed '
    f"&& echo '{ENGINE_FAILED_MARK}; see /var/log/dockerd.log' >&2; exit 1; }}"
)
# A bare host (`testbed up --bare`) is ready when its sudo user reaches root without a password; Docker is
# reported once `ingestctl setup` has installed it, never required.
SUDO_OK = "sudo-ok"
BARE_PROBE_COMMAND = f"sudo -n true && echo {SUDO_OK}; sudo -n {DOCKER_INFO} 2>/dev/null || true"


@dataclass(frozen=True)
class HostHealth:
    name: str
    address: str
    ssh_port: int
    sshd: bool
    docker: bool
    docker_version: str = ""
    storage_driver: str = ""
    detail: str = ""
    # Bare hosts: whether the SSH user reached root with `sudo -n` (None on ready-made hosts, which log in as
    # root), and readiness does not need Docker.
    sudo: bool | None = None
    bare: bool = False

    @property
    def ready(self) -> bool:
        if self.bare:
            return self.sshd and bool(self.sudo)
        return self.sshd and self.docker


def run_ssh(
    address: str, port: int, user: str, key_path: str, command: str, timeout: float = 10.0
) -> tuple[int, str, str]:
    """Run one command over SSH with the testbed key; (exit status, stdout, stderr)."""
    client = paramiko.SSHClient()
    # Sandbox hosts generate fresh host keys on every start: nothing to pin, nothing to remember.
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    try:
        client.connect(
            address,
            port=port,
            username=user,
            key_filename=key_path,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            allow_agent=False,
            look_for_keys=False,
        )
        _stdin, stdout, stderr = client.exec_command(command, timeout=timeout)
        out = stdout.read().decode(errors="replace")
        err = stderr.read().decode(errors="replace")
        return stdout.channel.recv_exit_status(), out, err
    finally:
        client.close()


def check_host(
    name: str, address: str, port: int, user: str, key_path: str, timeout: float = 5.0, bare: bool = False
) -> HostHealth:
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            banner = sock.recv(64)
    except OSError as exc:
        return HostHealth(name, address, port, False, False, detail=f"no TCP answer on port {port}: {exc}")
    if not banner.startswith(b"SSH-"):
        return HostHealth(
            name, address, port, False, False, detail=f"port {port} answered without an SSH banner"
        )
    try:
        command = BARE_PROBE_COMMAND if bare else PROBE_COMMAND
        status, out, err = run_ssh(address, port, user, key_path, command, timeout=timeout + 5)
    except (paramiko.SSHException, OSError, EOFError) as exc:
        return HostHealth(name, address, port, False, False, detail=f"SSH login failed: {exc}", bare=bare)
    if bare:
        return _bare_health(name, address, port, user, out, err)
    version, _, driver = out.strip().partition(" ")
    # `docker info --format` exits 0 with empty server fields when the engine is down: judge by the output.
    if status != 0 or not version:
        reason = err.strip().splitlines()[-1] if err.strip() else "no server version (engine not answering)"
        return HostHealth(name, address, port, True, False, detail=f"docker info: {reason[-200:]}")
    return HostHealth(name, address, port, True, True, docker_version=version, storage_driver=driver)


def _bare_health(name: str, address: str, port: int, user: str, out: str, err: str) -> HostHealth:
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    sudo = SUDO_OK in lines
    info = [line for line in lines if line != SUDO_OK]
    version, _, driver = (info[0] if info else "").partition(" ")
    detail = "" if sudo else f"`sudo -n true` failed for {user}: {err.strip()[-200:] or 'no output'}"
    if sudo and not version:
        detail = "no Docker engine yet (run `ingestctl setup local`)"
    return HostHealth(
        name, address, port, True, bool(version), docker_version=version, storage_driver=driver,
        detail=detail, sudo=sudo, bare=True,
    )


def check_all(hosts, user: str, key_path: str, timeout: float = 5.0, bare: bool = False) -> list[HostHealth]:
    """Check every host at once; `hosts` are HostState-like objects (name, address, ssh_port)."""
    hosts = list(hosts)
    if not hosts:
        return []
    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        return list(
            pool.map(lambda h: check_host(h.name, h.address, h.ssh_port, user, key_path, timeout, bare), hosts)
        )


def wait_ready(
    hosts, user: str, key_path: str, deadline_s: float, on_wait=None, bare: bool = False
) -> list[HostHealth]:
    """Poll until every host answers (sshd and Docker; sshd and sudo on bare hosts), or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    last_report = 0.0
    while True:
        health = check_all(hosts, user, key_path, timeout=3.0, bare=bare)
        if all(h.ready for h in health) or time.monotonic() >= deadline:
            return health
        if all(h.ready or ENGINE_FAILED_MARK in h.detail for h in health):
            return health  # waiting longer cannot help
        if on_wait and time.monotonic() - last_report > 5:
            waiting = [h.name for h in health if not h.ready]
            on_wait(f"waiting for sshd and {'sudo' if bare else 'Docker'} on {', '.join(waiting)}")
            last_report = time.monotonic()
        time.sleep(0.5)


def received_bytes(container: str, interface: str = "eth0") -> int:
    """Bytes a sandbox host's network interface has received, read from outside it (docker exec), so a
    shipping measurement does not trust the code that ships."""
    import docker

    client = docker.from_env()
    try:
        result = client.containers.get(container).exec_run(["cat", f"/sys/class/net/{interface}/statistics/rx_bytes"])
    finally:
        client.close()
    if result.exit_code != 0:
        raise RuntimeError(f"{container}: reading {interface} rx_bytes failed: {result.output!r}")
    return int(result.output.decode().strip())


def ssh_logins(container: str, since: float, until: float) -> int:
    """SSH connections a sandbox host's sshd accepted between the Unix times SINCE and UNTIL, from its own log
    (the container's stderr, read from outside): how many connections a command really made."""
    import docker

    client = docker.from_env()
    try:
        logs = client.containers.get(container).logs(stdout=True, stderr=True, since=since, until=until)
    finally:
        client.close()
    return logs.decode(errors="replace").count("Accepted publickey")
