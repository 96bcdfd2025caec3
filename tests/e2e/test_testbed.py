"""`ingestctl testbed up|down|status` on the real Docker engine, and the sandbox images it builds.

The shared session testbed (conftest.py) serves the read-only checks; the lifecycle test runs its own
testbed so taking it down does not pull hosts from under other tests.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import paramiko
import pytest

pytestmark = pytest.mark.e2e

PROJECT_ROOT = Path(__file__).resolve().parents[2]

HOST_NAMES = ["db1", "app2", "app3"]


def _events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_status_json_shows_every_host_answering(testbed, run_ingestctl):
    result = run_ingestctl("testbed", "status", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    hosts = [event for event in _events(result.stdout) if event["type"] == "host"]
    assert [h["name"] for h in hosts] == HOST_NAMES
    for event in hosts:
        recorded = testbed.host(event["name"])
        assert event["address"] == recorded.address
        assert event["ssh_port"] == 22
        assert event["ssh_key"] == testbed.ssh_key
        assert event["sshd"] is True and event["docker"] is True, event
    assert hosts[0]["roles"] == ["db", "app"]
    assert hosts[1]["roles"] == ["app"]


def test_prometheus_scrapes_every_app_host_through_its_proxy(testbed, run_ingestctl):
    import httpx

    result = run_ingestctl("testbed", "status", "--json")
    (event,) = [e for e in _events(result.stdout) if e["type"] == "prometheus"]
    assert event["url"] == testbed.prometheus_url
    assert httpx.get(f"{testbed.prometheus_url}/-/ready", timeout=5).status_code == 200
    wanted = {h.name: f"http://{h.address}:8000/metrics" for h in testbed.hosts if "app" in h.roles}
    # Prometheus hands discovered targets to its scrapers every 5 s: a just-started server may list none yet.
    deadline = time.monotonic() + 30
    while True:
        targets = httpx.get(f"{testbed.prometheus_url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        scraped = {t["labels"]["host"]: t["scrapeUrl"] for t in targets}
        if scraped == wanted or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert scraped == wanted


def test_state_records_network_driver_and_absolute_key(testbed, testbed_name):
    from ingestctl.testbed import state

    loaded = state.load(testbed_name)
    assert loaded.name == testbed_name
    assert loaded.network == f"{testbed_name}-net"
    assert loaded.storage_driver in {"overlay2", "vfs"}
    assert loaded.security_mode in {"privileged", "explicit-caps"}
    assert os.path.isabs(loaded.ssh_key)
    assert stat.S_IMODE(os.stat(loaded.ssh_key).st_mode) == 0o600
    from ingestctl import paths

    assert stat.S_IMODE(os.stat(paths.secrets_file("local")).st_mode) == 0o600


def test_ssh_logs_in_with_the_generated_key_only(testbed, ssh):
    for name in HOST_NAMES:
        status, out, err = ssh(name, "hostname && id -u && docker info --format '{{.Driver}}'")
        assert status == 0, err
        hostname, uid, driver = out.split()
        assert (hostname, uid, driver) == (name, "0", testbed.storage_driver)

    # Any other key is refused: root logs in by the testbed's key only.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    pkey = paramiko.Ed25519Key.from_private_key(io.StringIO(other.decode()))
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    db1 = testbed.host("db1")
    with pytest.raises(paramiko.AuthenticationException):
        client.connect(
            db1.address,
            port=db1.ssh_port,
            username="root",
            pkey=pkey,
            allow_agent=False,
            look_for_keys=False,
            timeout=10,
        )
    client.close()


def test_up_again_is_a_quick_noop(testbed, run_ingestctl):
    from ingestctl.testbed.engine import docker_client

    client = docker_client()
    before = {h.name: client.containers.get(h.container).id for h in testbed.hosts}
    started = time.monotonic()
    result = run_ingestctl("testbed", "up", "--json")
    took = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    summary = _events(result.stdout)[-1]
    assert summary["type"] == "summary" and summary["already_up"] is True, summary
    after = {h.name: client.containers.get(h.container).id for h in testbed.hosts}
    assert after == before, "a no-op `up` must keep the running hosts"
    # How quick it is belongs to a benchmark, not to a test on a loaded machine: printed for the log only.
    print(f"no-op up: {summary['elapsed_s']}s inside, {took:.1f}s overall")


def test_inner_engine_loads_and_publishes_a_container(testbed, ssh):
    """The shipping path in miniature: docker save | ssh docker load, then a published port answers."""
    from ingestctl.testbed.images import REDIS_IMAGE

    db1 = testbed.host("db1")
    pipeline = f"docker save {REDIS_IMAGE} | ssh -F {testbed.ssh_config} db1 docker load"
    loaded = subprocess.run(pipeline, shell=True, capture_output=True, text=True, timeout=300, check=False)
    assert loaded.returncode == 0, loaded.stderr
    name = f"probe-{uuid.uuid4().hex[:8]}"
    status, _, err = ssh("db1", f"docker run -d --name {name} -p 16379:6379 {REDIS_IMAGE}")
    assert status == 0, err
    try:
        deadline = time.monotonic() + 30
        reply = b""
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((db1.address, 16379), timeout=2) as sock:
                    sock.sendall(b"PING\r\n")
                    reply = sock.recv(16)
                    if reply.startswith(b"+PONG"):
                        break
            except OSError:
                pass
            time.sleep(0.5)
        assert reply.startswith(b"+PONG"), f"redis on db1:16379 answered {reply!r}"
    finally:
        ssh("db1", f"docker rm -f {name}; docker image rm {REDIS_IMAGE}")


def test_local_inventory_groups_and_pyinfra_exec(testbed):
    from ingestctl import inventory

    env = inventory.load("local")
    assert env.db_host == "db1"
    assert env.app_hosts == HOST_NAMES
    data = env.host_data("app2")
    assert data["ssh_hostname"] == testbed.host("app2").address
    assert data["ssh_key"] == testbed.ssh_key
    assert data["ssh_strict_host_key_checking"] == "no"

    pyinfra = [sys.executable, "-m", "pyinfra", "-y", "inventories/local.py", "exec", "--", "hostname"]
    result = subprocess.run(
        pyinfra, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    output = result.stdout + result.stderr  # pyinfra writes its progress and command output to stderr
    assert result.returncode == 0, output
    for name in HOST_NAMES:
        # Each host answers `hostname` with its own name: "[db1]  db1".
        assert re.search(rf"^\[{name}\]\s+{name}$", output, re.MULTILINE), output


def test_infra_suite_passes_against_the_testbed(testbed):
    command = [
        sys.executable,
        "-m",
        "pytest",
        "tests/infra",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "not after_deploy",
        "-n",
        "0",  # a few seconds of tests: not worth the checkout's two pytest-xdist workers
    ]
    result = subprocess.run(
        command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


@pytest.fixture
def engine(docker_engine):
    return docker_engine


@pytest.fixture
def sandbox_images(engine):
    from ingestctl.testbed import images

    return images.ensure_all(client=engine)


def _run_until(container, command: list[str], deadline_s: float = 60.0):
    deadline = time.monotonic() + deadline_s
    while True:
        result = container.exec_run(command)
        if result.exit_code == 0 or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def test_postgres_image_follows_the_official_interface(engine, sandbox_images, tmp_path):
    password = uuid.uuid4().hex
    secret = tmp_path / "pg_password"
    secret.write_text(password)
    os.chmod(secret, 0o600)
    os.chown(secret, 999, 999)  # the image's postgres uid, as in the official image
    container = engine.containers.run(
        sandbox_images["postgres"],
        detach=True,
        name=f"pgprobe-{uuid.uuid4().hex[:8]}",
        environment={
            "POSTGRES_PASSWORD_FILE": "/run/secrets/pg",
            "POSTGRES_USER": "ingest",
            "POSTGRES_DB": "events",
        },
        volumes={str(secret): {"bind": "/run/secrets/pg", "mode": "ro"}},
    )
    try:
        ready = _run_until(container, ["pg_isready", "-h", "127.0.0.1", "-U", "ingest", "-d", "events"])
        assert ready.exit_code == 0, ready.output
        query = ["psql", "-h", "127.0.0.1", "-U", "ingest", "-d", "events", "-tAc", "select current_user"]
        good = container.exec_run(query, environment={"PGPASSWORD": password})
        assert (good.exit_code, good.output.strip()) == (0, b"ingest"), good.output
        bad = container.exec_run(query, environment={"PGPASSWORD": "not-" + password})
        assert bad.exit_code != 0 and b"password authentication failed" in bad.output
        container.reload()
        assert password not in json.dumps(container.attrs), "the password must not appear in docker inspect"
        assert container.exec_run(["pg_dump", "--version"]).exit_code == 0
    finally:
        container.remove(force=True, v=True)


def test_redis_image_answers_ping(engine, sandbox_images):
    container = engine.containers.run(
        sandbox_images["redis"], detach=True, name=f"redisprobe-{uuid.uuid4().hex[:8]}"
    )
    try:
        result = _run_until(container, ["redis-cli", "ping"], 30)
        assert result.output.strip() == b"PONG", result.output
        assert container.exec_run(["id", "-u"]).output.strip() == b"999"
    finally:
        container.remove(force=True, v=True)


def test_lifecycle_up_repairs_then_down_leaves_nothing_behind(engine, testbed, testbed_name, run_ingestctl):
    """Own testbed: up from cached images, a silent engine is repaired by `up`, `down` removes everything."""
    from ingestctl.testbed import hostspec

    name = f"{testbed_name}-lc"
    env = {"INGESTCTL_TESTBED": name}
    # What another checkout (or a killed run) would leave: db1's engine volume, holding its deployments.
    leftover = hostspec.volume_name(name, "db1")
    engine.volumes.create(leftover)
    engine.containers.run(hostspec.SANDBOX_IMAGE, ["/x/from-another-checkout"], entrypoint=["touch"], remove=True,
                          volumes={leftover: {"bind": "/x", "mode": "rw"}})
    try:
        started = time.monotonic()
        up = run_ingestctl("testbed", "up", "--json", env=env)
        up_s = time.monotonic() - started
        assert up.returncode == 0, up.stdout + up.stderr
        print(f"testbed up with cached images: {up_s:.1f}s")
        assert any(f"removed leftovers of an earlier testbed {name}" in e.get("message", "")
                   and leftover in e.get("message", "") for e in _events(up.stdout)), up.stdout
        fresh = engine.containers.get(f"{name}-db1").exec_run(["test", "-e", "/var/lib/docker/from-another-checkout"])
        assert fresh.exit_code != 0, "db1 came up on the leftover volume of another checkout"

        # Stop app3's inner engine (its pid file names the exact process): status must say so, up must repair it.
        engine.containers.get(f"{name}-app3").exec_run(["sh", "-c", "kill $(cat /var/run/docker.pid)"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = run_ingestctl("testbed", "status", "--json", env=env)
            if status.returncode != 0:
                break
            time.sleep(1)
        assert status.returncode == 2, status.stdout
        app3 = next(e for e in _events(status.stdout) if e.get("name") == "app3")
        assert (app3["sshd"], app3["docker"]) == (True, False), app3
        repaired = run_ingestctl("testbed", "up", "--json", env=env)
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        assert any("restarting sandbox host app3" in e.get("message", "") for e in _events(repaired.stdout))
    finally:
        started = time.monotonic()
        down = run_ingestctl("testbed", "down", "--json", env=env)
        print(f"testbed down: {time.monotonic() - started:.1f}s")
    assert down.returncode == 0, down.stdout + down.stderr

    assert [c.name for c in engine.containers.list(all=True) if c.name.startswith(name)] == []
    assert [n.name for n in engine.networks.list() if n.name.startswith(name)] == []
    assert [v.name for v in engine.volumes.list() if v.name.startswith(name)] == []
    assert engine.containers.list(all=True, filters={"label": f"io.ingest.testbed={name}"}) == []
    from ingestctl.testbed import state

    assert not state.state_path(name).exists()
    after = run_ingestctl("testbed", "status", env=env)
    assert after.returncode == 2 and "ingestctl testbed up" in after.stdout + after.stderr
    # Cached images stay for the next `up` (only --purge removes them).
    from ingestctl.testbed.images import SANDBOX_HOST_IMAGE

    assert engine.images.get(SANDBOX_HOST_IMAGE)
