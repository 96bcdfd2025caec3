"""Bulk bytes to a host over the OpenSSH client, reached exactly as pyinfra reaches it (its `ssh_*` data).

paramiko's SFTP moves about 20 MB/s per host on this kind of machine; the OpenSSH client runs the cipher in C
in its own process, so several hosts' transfers use several cores. One master connection per host is kept
for the run (ControlMaster/ControlPersist), so repeated streams do not pay a handshake each.

Building the argv is pure (`ssh_argv`); `send` runs it, feeding stdin from an iterator of chunks.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ingestctl.errors import EnvironmentMissing, HostError

# A stream that moves nothing for this long is dead (a host paused, a cable cut), not slow.
SERVER_ALIVE_INTERVAL_S = 10
SERVER_ALIVE_COUNT = 3
PROGRESS_EVERY_S = 2.0
STDERR_TAIL = 2000


@dataclass(frozen=True)
class Progress:
    host: str
    sent: int
    total: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        return (f"{self.host}: {self.sent / 1e6:.1f} of {self.total / 1e6:.1f} MB "
                f"({self.rate / 1e6:.1f} MB/s)")


ProgressSink = Callable[[Progress], None]


def control_dir() -> Path:
    """Where master connections' sockets live: short (socket paths are limited to ~100 bytes) and private."""
    path = Path(tempfile.gettempdir()) / f"ingestctl-ssh-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    # Another user could have made it first, to catch our master connections: use it only if it is ours alone.
    info = path.lstat()
    if not path.is_dir() or path.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise EnvironmentMissing(
            f"{path} must be a directory owned by uid {os.getuid()} with mode 0700, found uid {info.st_uid} "
            f"mode {oct(info.st_mode & 0o777)}; remove it and run again"
        )
    return path


def _strict(value: Any) -> str:
    """pyinfra's `ssh_strict_host_key_checking` in OpenSSH's words; pyinfra's default is accept-new."""
    return {"off": "no", "no": "no", "yes": "yes", "accept-new": "accept-new"}.get(str(value or ""), "accept-new")


def ssh_argv(host_name: str, data: Any, remote_command: str, control_path: Path | None) -> list[str]:
    """The `ssh` command that runs REMOTE_COMMAND on the host pyinfra knows as HOST_NAME with DATA.

    DATA is pyinfra's HostData or a dict (only `.get` is used). Keys read: ssh_hostname, ssh_port, ssh_user,
    ssh_key, ssh_known_hosts_file, ssh_strict_host_key_checking, ssh_config_file, _sudo.
    Never prompts (BatchMode): a host that needs a password fails instead of hanging.
    """
    argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
            "-o", f"ServerAliveInterval={SERVER_ALIVE_INTERVAL_S}", "-o", f"ServerAliveCountMax={SERVER_ALIVE_COUNT}",
            "-o", f"StrictHostKeyChecking={_strict(data.get('ssh_strict_host_key_checking'))}",
            "-o", "LogLevel=ERROR"]
    if data.get("ssh_config_file"):
        argv[1:1] = ["-F", str(data.get("ssh_config_file"))]
    if control_path is not None:
        argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={control_path}/%C", "-o", "ControlPersist=60"]
    if data.get("ssh_known_hosts_file"):
        argv += ["-o", f"UserKnownHostsFile={data.get('ssh_known_hosts_file')}"]
    if data.get("ssh_key"):
        argv += ["-i", str(data.get("ssh_key")), "-o", "IdentitiesOnly=yes"]
    if data.get("ssh_port"):
        argv += ["-p", str(int(data.get("ssh_port")))]
    if data.get("ssh_user"):
        argv += ["-l", str(data.get("ssh_user"))]
    command = f"sudo -n sh -c {shlex.quote(remote_command)}" if data.get("_sudo") else remote_command
    return [*argv, str(data.get("ssh_hostname") or host_name), "--", command]


def send(
    host_name: str,
    argv: list[str],
    chunks: Iterable[bytes],
    total: int,
    progress: ProgressSink | None = None,
) -> None:
    """Run ARGV and write CHUNKS to its stdin; HostError naming the host with the remote's stderr on failure."""
    started = last = time.monotonic()
    sent = 0
    try:
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError as exc:
        raise EnvironmentMissing(
            "the OpenSSH client is missing on this machine: apt-get install openssh-client"
        ) from exc
    assert process.stdin is not None
    try:
        for chunk in chunks:
            process.stdin.write(chunk)
            sent += len(chunk)
            now = time.monotonic()
            if progress is not None and now - last >= PROGRESS_EVERY_S:
                progress(Progress(host_name, sent, total, now - started))
                last = now
    except BrokenPipeError:
        pass  # the remote side ended early: its exit status and stderr say why
    finally:
        stdout, stderr = process.communicate()  # closes stdin: the remote sees the end of the stream
    if process.returncode != 0:
        detail = (stderr or stdout).decode(errors="replace").strip()[-STDERR_TAIL:] or "no output"
        raise HostError(f"host {host_name}: stream of {sent} bytes failed (exit {process.returncode}): {detail}")
    if progress is not None and total >= 10_000_000:
        progress(Progress(host_name, sent, total, time.monotonic() - started))
