"""The local Docker engine: find it, start it when it is installed but not running, hand out a client."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable

from ingestctl import paths
from ingestctl.errors import EnvironmentMissing

INSTALL_HINT = (
    "install it with `apt-get install docker.io` (ingestctl needs root or membership of the docker group)"
)
START_TIMEOUT_S = 60.0


def docker_client(progress: Callable[[str], None] | None = None, start: bool = True):
    """A docker SDK client for a running engine, starting `dockerd` first when it is installed but down."""
    try:
        import docker
        import docker.errors
    except ImportError as exc:  # pragma: no cover - the deploy extra always installs it
        raise EnvironmentMissing(
            "the `docker` Python package is missing: pip install -e '.[deploy]'"
        ) from exc

    if shutil.which("docker") is None:
        raise EnvironmentMissing(f"Docker is not installed: {INSTALL_HINT}")

    client = _answering_client(docker)
    if client is not None:
        return client
    if not start or os.environ.get("DOCKER_HOST"):
        raise EnvironmentMissing(
            "the Docker engine is not answering on its socket; start it with `dockerd &` "
            f"(or check DOCKER_HOST); if missing, {INSTALL_HINT}"
        )
    # Only starting the engine needs dockerd itself: it lives in /usr/sbin, which a user's PATH lacks on Debian,
    # and a user of the docker group talks to an engine that already runs.
    if _dockerd() is None:
        raise EnvironmentMissing(f"Docker's engine (dockerd) is not installed: {INSTALL_HINT}")
    _start_dockerd(progress)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        client = _answering_client(docker)
        if client is not None:
            return client
        time.sleep(0.5)
    raise EnvironmentMissing(
        f"started dockerd but it did not answer within {START_TIMEOUT_S:.0f}s; see {_dockerd_log()}"
    )


def _dockerd() -> str | None:
    return shutil.which("dockerd") or shutil.which("dockerd", path="/usr/sbin:/sbin")


def _answering_client(docker):
    try:
        client = docker.from_env(timeout=300)
        client.ping()
        return client
    except PermissionError as exc:
        raise EnvironmentMissing(f"no permission to use the Docker socket ({exc}); {INSTALL_HINT}") from exc
    except docker.errors.DockerException as exc:
        if "Permission denied" in str(exc):
            raise EnvironmentMissing(f"no permission to use the Docker socket; {INSTALL_HINT}") from exc
        return None


def _dockerd_log():
    return paths.state_dir() / "dockerd.log"


def _start_dockerd(progress: Callable[[str], None] | None) -> None:
    if os.geteuid() != 0:
        raise EnvironmentMissing(
            "the Docker engine is not running and starting dockerd needs root: run `sudo dockerd &`"
        )
    log_path = _dockerd_log()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        progress(f"Docker engine not running: starting dockerd in the background (log {log_path})")
    with open(log_path, "ab") as log:
        # A new session so the engine outlives this command and its terminal.
        subprocess.Popen(
            [_dockerd()],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
