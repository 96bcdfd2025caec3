"""Shared end-to-end fixtures: a real sandbox testbed (3 hosts with sshd and Docker) for the session.

The session testbed is named by INGESTCTL_E2E_TESTBED (default `ingest-e2e`; with `--e2e-sandboxes per-file`,
with the pytest-xdist worker's id appended: one testbed per worker), never the developer's own `ingest-tb`, and
INGESTCTL_TESTBED is set to it for the whole session, so `inventories/local.py`, `ingestctl ... local` and
subprocesses all target it. It is taken down after the session unless
INGESTCTL_KEEP_TESTBED=1 (handy when iterating: the next session's `up` is then a quick no-op).

Usage in a test module:

    pytestmark = pytest.mark.e2e

    def test_something(testbed):          # ingestctl.testbed.state.TestbedState
        db1 = testbed.host("db1")         # .address, .ssh_port, .roles
        run_on = ssh_runner(testbed)      # or use the `ssh` fixture below
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import releases

E2E_TESTBED = os.environ.get("INGESTCTL_E2E_TESTBED", "ingest-e2e")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
HOW_TO_GET_DOCKER = (
    "install Docker (`apt-get install docker.io debootstrap`) and run as root; `.ci/run` does this in CI"
)


def docker_or_skip():
    """A docker SDK client for a running engine (started if installed but down), else skip with how to get one."""
    from ingestctl.errors import EnvironmentMissing
    from ingestctl.testbed.engine import docker_client

    try:
        return docker_client()
    except EnvironmentMissing as exc:
        pytest.skip(reason=f"Docker is not available: {exc}; {HOW_TO_GET_DOCKER}")


def ingestctl(*args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the real `ingestctl` console script from the checkout, capturing its output."""
    executable = shutil.which("ingestctl", path=str(Path(sys.executable).parent)) or "ingestctl"
    completed = subprocess.run(
        [executable, *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    releases.OUTPUTS.append(completed.stdout + completed.stderr)
    return completed


@pytest.fixture(scope="session")
def run_ingestctl() -> Callable[..., subprocess.CompletedProcess]:
    """`run_ingestctl("testbed", "status", "--json", env={...})`: the real console script, output captured."""
    return ingestctl


@pytest.fixture(scope="session")
def docker_engine():
    """A docker SDK client for the local engine; skips with how to get Docker when there is none."""
    return docker_or_skip()


@pytest.fixture(scope="session")
def testbed_name(pytestconfig) -> Iterator[str]:
    name = E2E_TESTBED
    # Every pytest-xdist worker has a sandbox of its own: by default each runs one stream of end-to-end files
    # (tests/suite_streams.py), the first worker on the plain name and the other on `ingest-e2e-gw1`; with
    # `--e2e-sandboxes per-file` each runs whole files on `ingest-e2e-gw0`, `ingest-e2e-gw1`, ...
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and (worker != "gw0" or pytestconfig.getoption("e2e_sandboxes") == "per-file"):
        name = f"{name}-{worker}"
    previous = os.environ.get("INGESTCTL_TESTBED")
    os.environ["INGESTCTL_TESTBED"] = name
    yield name
    if previous is None:
        os.environ.pop("INGESTCTL_TESTBED", None)
    else:
        os.environ["INGESTCTL_TESTBED"] = previous


@pytest.fixture(scope="session")
def testbed(testbed_name: str):
    """The session's sandbox hosts, up and answering over SSH and Docker (built from cache if possible)."""
    docker_or_skip()
    from ingestctl.testbed import lifecycle

    messages: list[str] = []
    result = lifecycle.up(messages.append, name=testbed_name)
    yield result.state
    try:
        # The session ends with a scan for every secret value across what the hosts keep readable (ledger,
        # docker inspect, logs, image history): it must find none. What ingestctl printed: below.
        leaks = releases.host_leaks(result.state, session_secrets())
        assert not leaks, "secret values leaked: " + "; ".join(leaks)
    finally:
        if os.environ.get("INGESTCTL_KEEP_TESTBED") != "1":
            lifecycle.down(messages.append, name=testbed_name)


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_output() -> Iterator[None]:
    """Every end-to-end session, on every worker (the bare-host module runs beside the sandbox stream), ends with
    a scan of everything ingestctl printed in it for every secret value: it must find none."""
    yield
    leaks = releases.output_leaks(session_secrets())
    assert not leaks, "secret values leaked: " + "; ".join(leaks)


def session_secrets() -> dict[str, str]:
    """The local environment's secret values, and every one a test made up (rotations)."""
    from ingestctl import paths
    from ingestctl import secrets as secrets_mod

    values = secrets_mod.load(paths.secrets_file("local"))
    found = {name: values[name] for name in secrets_mod.REQUIRED if values.get(name)}
    if values.get("POSTGRES_PASSWORD"):  # the api's own database password, derived from it
        found["app role password"] = secrets_mod.app_database_password(values["POSTGRES_PASSWORD"])
    return {**found, **releases.MADE_UP_SECRETS}


@pytest.fixture(scope="session")
def ssh(testbed) -> Callable[..., tuple[int, str, str]]:
    """`ssh("db1", "docker ps")` -> (exit status, stdout, stderr), over real SSH with the testbed key."""
    from ingestctl.testbed.probe import run_ssh

    def run(host: str, command: str, timeout: float = 60.0) -> tuple[int, str, str]:
        target = testbed.host(host)
        return run_ssh(target.address, target.ssh_port, testbed.ssh_user, testbed.ssh_key, command, timeout)

    return run
