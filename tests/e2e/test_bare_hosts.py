"""From bare hosts to a gated deploy and every rollback, as a non-root sudo user (DESIGN sections 2 and 5).

The module starts its OWN bare testbed (`ingestctl testbed up --bare`: sshd and a `deploy` user with
passwordless sudo, no Docker; db1 on Debian 12 for Compose v1, the app hosts on Debian 13 for Compose v2),
named by INGESTCTL_E2E_BARE_TESTBED (default `ingest-bare-e2e`), and takes it down at the end unless
INGESTCTL_KEEP_TESTBED=1. Then, with the real console script over real SSH:

    deploy refused names every host        (the preflight check `hostsetup.setup_problems`)
    setup --dry        changes nothing
    setup              Docker, Compose, log rotation, uid, directories, db firewall: everything through sudo
    setup again        reports no change, in seconds
    deploy             the first gated deploy, as the sudo user (secrets uploaded through sudo)
    a bad release      caught by the health gate, rolled back by itself (exit 3)
    rollback app, rollback schema, config set + rollback config
    a secret file      written through sudo via stdin, without any SFTP session (so never via /tmp)

Every host command the tests run themselves goes through `sudo -n` too: the `deploy` user owns nothing.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from releases import PROJECT_ROOT, Result, app_urls, ingestctl, variant, version_of

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

DEFAULT_BARE = "ingest-bare-e2e"
E2E_TESTBED = os.environ.get("INGESTCTL_E2E_TESTBED", "ingest-e2e")  # the session's ready-made testbed
BARE_TESTBED = os.environ.get("INGESTCTL_E2E_BARE_TESTBED") or (
    # Never the session's ready-made testbed: when that one carries the bare default name, go beside it.
    f"{DEFAULT_BARE}-own" if E2E_TESTBED == DEFAULT_BARE else DEFAULT_BARE
)
GOOD, GOOD2 = "bare-good1", "bare-good2"
STATE = "/opt/ingest/state.json"
LEDGER = "/var/lib/ingest/ledger.jsonl"
LOCK_DIR = "/var/lib/ingest/lock"
OPERATIONS_API = "service/ingest/api/operations.py"
SETUP_NO_CHANGE_BOUND_S = 30


def run(*args: str, root=PROJECT_ROOT, timeout: float = 1500) -> Result:
    """`ingestctl ARGS` against the bare testbed. `setup` runs as its module until cli.py attaches it."""
    env = {"INGESTCTL_TESTBED": BARE_TESTBED}
    if args and args[0] == "setup":
        result = ingestctl(*args, root=root, env=env, timeout=timeout)
        if result.code == 2 and "No such command 'setup'" in result.stderr:
            import subprocess
            import sys

            completed = subprocess.run(
                [sys.executable, "-m", "ingestctl.setup_cli", *args[1:]], cwd=root,
                env={**os.environ, "INGESTCTL_ROOT": str(root), **env}, capture_output=True, text=True,
                timeout=timeout, check=False,
            )
            return Result(completed.returncode, completed.stdout, completed.stderr)
        return result
    return ingestctl(*args, root=root, env=env, timeout=timeout)


# ----- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bare_testbed(docker_engine) -> Iterator:
    previous = os.environ.get("INGESTCTL_TESTBED")
    os.environ["INGESTCTL_TESTBED"] = BARE_TESTBED  # in-process loads (inventories/local.py, setup_problems)
    started = time.monotonic()
    result = run("testbed", "up", "--bare", "--json", timeout=900)
    assert result.code == 0, result.explain()
    from ingestctl.testbed import state as state_mod

    testbed = state_mod.load(BARE_TESTBED)
    print(f"bare testbed {BARE_TESTBED} up in {time.monotonic() - started:.0f}s")
    try:
        yield testbed
    finally:
        if os.environ.get("INGESTCTL_KEEP_TESTBED") != "1":
            run("testbed", "down", timeout=300)
        if previous is None:
            os.environ.pop("INGESTCTL_TESTBED", None)
        else:
            os.environ["INGESTCTL_TESTBED"] = previous


@pytest.fixture(scope="module")
def sudo_ssh(bare_testbed) -> Callable[..., tuple[int, str, str]]:
    """`sudo_ssh("db1", "docker ps")`: the command as root through `sudo -n`, logged in as the `deploy` user."""
    from ingestctl.testbed.probe import run_ssh

    def call(host: str, command: str, timeout: float = 60.0, sudo: bool = True) -> tuple[int, str, str]:
        target = bare_testbed.host(host)
        wrapped = f"sudo -n sh -c {shlex.quote(command)}" if sudo else command
        return run_ssh(target.address, target.ssh_port, bare_testbed.ssh_user, bare_testbed.ssh_key, wrapped,
                       timeout)

    return call


@pytest.fixture(scope="module")
def set_up(bare_testbed, sudo_ssh) -> dict:
    """`ingestctl setup local` once, timed; both runs' results for the tests that look at them."""
    started = time.monotonic()
    first = run("setup", "local", "--json")
    first_s = time.monotonic() - started
    assert first.code == 0, first.explain()
    started = time.monotonic()
    second = run("setup", "local", "--json")
    second_s = time.monotonic() - started
    print(f"setup: first run {first_s:.0f}s, second run {second_s:.1f}s")
    return {"first": first, "first_s": first_s, "second": second, "second_s": second_s}


@pytest.fixture(scope="module")
def deployed(set_up, bare_testbed, sudo_ssh) -> str:
    """The first deploy on the freshly set-up fleet, as the sudo user."""
    result = run("deploy", "local", "--version", GOOD, "--skip-bench", "--json")
    assert result.code == 0, result.explain()
    assert_fleet_on(bare_testbed, sudo_ssh, GOOD)
    return GOOD


# ----- helpers ----------------------------------------------------------------------------------------------

def fleet_states(testbed, sudo_ssh) -> dict[str, dict]:
    found = {}
    for host in testbed.hosts:
        code, out, err = sudo_ssh(host.name, f"cat {STATE}")
        assert code == 0, f"{host.name}: cannot read {STATE}: {err}"
        found[host.name] = json.loads(out)
    return found


def assert_fleet_on(testbed, sudo_ssh, release: str) -> None:
    served = {host: version_of(url) for host, url in app_urls(testbed).items()}
    assert set(served.values()) == {release}, f"expected every app host to serve {release}: {served}"
    states = fleet_states(testbed, sudo_ssh)
    assert {s["release"] for s in states.values()} == {release}, states
    for host in testbed.hosts:
        code, _out, _err = sudo_ssh(host.name, f"test -e {LOCK_DIR}")
        assert code != 0, f"{host.name}: the deploy lock is still held"


def last_ledger_entry(sudo_ssh, host: str) -> dict:
    code, out, err = sudo_ssh(host, f"tail -n 1 {LEDGER}")
    assert code == 0 and out.strip(), f"{host}: cannot read {LEDGER}: {err}"
    return json.loads(out)


def tcp_answers(address: str, port: int, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


# ----- the bare fleet ---------------------------------------------------------------------------------------

def test_bare_hosts_have_a_sudo_user_and_no_docker(bare_testbed, sudo_ssh):
    status = run("testbed", "status", "--json")
    assert status.code == 0, status.explain()
    hosts = [e for e in status.events if e["type"] == "host"]
    assert {(e["name"], e["ssh_user"], e["sudo"]) for e in hosts} == {
        ("db1", "deploy", True), ("app2", "deploy", True), ("app3", "deploy", True)}
    assert {e["name"]: e["suite"] for e in hosts} == {"db1": "bookworm", "app2": "trixie", "app3": "trixie"}
    for host in bare_testbed.hosts:
        code, out, _err = sudo_ssh(host.name, "id -un; command -v docker || echo no-docker", sudo=False)
        assert code == 0 and out.split() == ["deploy", "no-docker"], f"{host.name}: {out}"
        code, out, _err = sudo_ssh(host.name, "id -u")
        assert code == 0 and out.strip() == "0", f"{host.name}: sudo does not reach root"


def test_before_setup_the_preflight_check_names_every_host_and_the_fix(bare_testbed):
    from ingestctl import hostsetup

    problems = hostsetup.setup_problems("local")
    assert sorted(problems) == ["app2", "app3", "db1"], problems
    assert all("Docker is not installed" in found[0] for found in problems.values()), problems
    assert "fix: `ingestctl setup local`" in hostsetup.describe_problems("local", problems)


def test_setup_dry_run_changes_nothing(bare_testbed, sudo_ssh):
    result = run("setup", "local", "--dry", "--json")
    assert result.code == 0, result.explain()
    summary = result.summary()
    assert summary["dry"] is True and sorted(summary["changed_hosts"]) == ["app2", "app3", "db1"]
    for host in bare_testbed.hosts:
        code, _out, _err = sudo_ssh(host.name, "command -v docker || test -e /etc/ingest")
        assert code != 0, f"{host.name}: --dry changed the host"


def test_setup_installs_docker_and_compose_from_debian_through_sudo(bare_testbed, sudo_ssh, set_up):
    summary = set_up["first"].summary()
    assert summary["outcome"] == "changed" and sorted(summary["changed_hosts"]) == ["app2", "app3", "db1"]
    compose = {"db1": "docker-compose version", "app2": "docker compose version", "app3": "docker compose version"}
    for host in bare_testbed.hosts:
        code, out, err = sudo_ssh(host.name, "docker info --format '{{.ServerVersion}} {{.LoggingDriver}}'")
        assert code == 0 and out.split()[1] == "json-file", f"{host.name}: {out}{err}"
        code, out, err = sudo_ssh(host.name, compose[host.name])
        assert code == 0, f"{host.name}: {compose[host.name]} failed: {err}"
        code, out, err = sudo_ssh(host.name, "cat /etc/docker/daemon.json")
        assert json.loads(out)["log-opts"] == {"max-file": "5", "max-size": "10m"}
        code, out, _err = sudo_ssh(host.name, "id -u ingest; stat -c '%a %U' /opt/ingest /var/lib/ingest")
        assert out.split() == ["10001", "755", "root", "750", "root"], f"{host.name}: {out}"
        code, out, _err = sudo_ssh(host.name, "ls -A /tmp")
        assert out.strip() == "", f"{host.name}: setup left files in /tmp: {out}"
    code, out, err = sudo_ssh("db1", "nft list table inet ingest")
    assert code == 0, f"db1: the firewall table is not loaded: {err}"
    for app in bare_testbed.hosts:
        assert app.address in out, f"db1's firewall does not let {app.name} ({app.address}) in: {out}"


def test_a_second_setup_reports_no_change_in_seconds(set_up):
    summary = set_up["second"].summary()
    assert summary["outcome"] == "noop" and summary["changed_hosts"] == [], set_up["second"].explain()
    hosts = [e for e in set_up["second"].events if e["type"] == "host"]
    assert hosts and all(e["changed"] == [] for e in hosts), hosts
    assert set_up["second_s"] < SETUP_NO_CHANGE_BOUND_S, f"second setup took {set_up['second_s']:.0f}s"


def test_after_setup_the_preflight_check_passes(set_up):
    from ingestctl import hostsetup

    assert hostsetup.setup_problems("local") == {}


# ----- deploy and rollbacks as the sudo user ------------------------------------------------------------------

def test_first_deploy_as_the_sudo_user(bare_testbed, sudo_ssh, deployed):
    for host in bare_testbed.hosts:
        entry = last_ledger_entry(sudo_ssh, host.name)
        assert entry["release"] == GOOD and entry["outcome"] == "success", f"{host.name}: {entry}"
        code, out, err = sudo_ssh(host.name, "stat -c '%a %u' /opt/ingest/config/*/secrets/*")
        assert code == 0 and out.strip(), f"{host.name}: no secret files: {err}"
        assert {line for line in out.splitlines()} == {"600 10001"}, f"{host.name}: secret files: {out}"
    code, out, _err = sudo_ssh("db1", "stat -c '%a %u' /opt/ingest/db/secrets/postgres_password")
    assert out.strip() == "600 999", out


def test_db_firewall_answers_the_app_hosts_only(bare_testbed, sudo_ssh, deployed):
    db1 = bare_testbed.host("db1")
    # This machine is not one of the environment's app hosts: its Redis drops it.
    assert not tcp_answers(db1.address, 6379), "redis on db1 answers an address that is not an app host"
    # It is the sandbox inventory's one db client (its gateway address), so PostgreSQL, and only PostgreSQL,
    # answers it; nobody else is in that set.
    assert tcp_answers(db1.address, 5432), "postgres on db1 does not answer the inventory's db_clients"
    code, out, err = sudo_ssh("db1", "nft -j list set inet ingest db_clients_v4")
    assert code == 0, f"db1: no db_clients set: {err}"
    elements = next(item["set"] for item in json.loads(out)["nftables"] if "set" in item)["elem"]
    assert len(elements) == 1 and bare_testbed.gateway in json.dumps(elements), f"db1's db_clients: {elements}"
    probe = f"timeout 5 bash -c 'exec 3<>/dev/tcp/{db1.address}/6379' && echo open"
    for host in ("app2", "app3"):
        code, out, err = sudo_ssh(host, probe)
        assert out.strip() == "open", f"{host} cannot reach redis on db1: {out}{err}"


def test_a_bad_release_is_rolled_back_by_itself(bare_testbed, sudo_ssh, deployed, tmp_path):
    root = variant(tmp_path, {OPERATIONS_API: lambda text: _replacing(
        text, 'status_code=200 if status == "ok" else 503', "status_code=503")})
    result = run("deploy", "local", "--version", "bare-unready", "--skip-bench", "--json", root=root)
    assert result.code == 3, result.explain()
    assert result.summary()["outcome"] == "rolled-back", result.explain()
    assert_fleet_on(bare_testbed, sudo_ssh, GOOD)
    entry = last_ledger_entry(sudo_ssh, "app2")
    assert entry["release"] == "bare-unready" and entry["outcome"] == "rolled-back", entry


def test_rollback_app_returns_to_the_previous_release(bare_testbed, sudo_ssh, deployed, tmp_path):
    result = run("deploy", "local", "--version", GOOD2, "--skip-bench", "--json")
    assert result.code == 0, result.explain()
    assert_fleet_on(bare_testbed, sudo_ssh, GOOD2)
    result = run("rollback", "app", "local", "--json")
    assert result.code == 0, result.explain()
    assert_fleet_on(bare_testbed, sudo_ssh, GOOD)
    assert last_ledger_entry(sudo_ssh, "app3")["kind"] == "rollback-app"


SAFE_FILE = "service/alembic/versions/0003_e2e_bare_index_events_by_source.py"
SAFE_MIGRATION = '''"""e2e (bare hosts): index events by source; dropping it loses nothing."""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

backward_compatible = True
downgrade_data_safe = True


def upgrade() -> None:
    op.create_index("ix_e2e_bare_events_source", "events", ["source"])


def downgrade() -> None:
    op.drop_index("ix_e2e_bare_events_source", table_name="events")
'''


def schema_head() -> str:
    result = run("status", "local", "--json")
    assert result.code == 0, result.explain()
    heads = {e["schema"] for e in result.events if e.get("type") == "row"}
    assert len(heads) == 1, f"expected one schema head, found {heads}"
    return heads.pop()


def test_rollback_schema_after_rollback_app(bare_testbed, sudo_ssh, deployed, tmp_path):
    root = variant(tmp_path, {SAFE_FILE: SAFE_MIGRATION})
    result = run("deploy", "local", "--version", "bare-safe3", "--skip-bench", "--json", root=root)
    assert result.code == 0, result.explain()
    assert schema_head() == "0003"
    result = run("rollback", "app", "local", "--to", GOOD, "--json", root=root)
    assert result.code == 0, result.explain()
    assert_fleet_on(bare_testbed, sudo_ssh, GOOD)
    result = run("rollback", "schema", "local", "--json", root=root)
    assert result.code == 0, result.explain()
    assert schema_head() == "0002"
    entry = last_ledger_entry(sudo_ssh, "db1")
    assert entry["kind"] == "rollback-schema" and entry["outcome"] == "success", entry
    code, _out, _err = sudo_ssh("db1", f"test -s {entry['restore_point']}")
    assert code == 0, "no restore point on db1"
    assert_fleet_on(bare_testbed, sudo_ssh, GOOD)


def test_config_set_then_rollback_config(bare_testbed, sudo_ssh, deployed):
    before = {s["config_version"] for s in fleet_states(bare_testbed, sudo_ssh).values()}
    assert len(before) == 1
    result = run("config", "set", "local", "INGEST_MAX_BATCH_ITEMS=5", "--json")
    assert result.code == 0, result.explain()
    lowered = {s["config_version"] for s in fleet_states(bare_testbed, sudo_ssh).values()}
    assert len(lowered) == 1 and lowered != before, lowered
    result = run("rollback", "config", "local", "--json")
    assert result.code == 0, result.explain()
    assert {s["config_version"] for s in fleet_states(bare_testbed, sudo_ssh).values()} == before
    for host in bare_testbed.hosts:
        code, out, _err = sudo_ssh(host.name, "ls -A /tmp")
        leftovers = [name for name in out.split() if name.startswith("pyinfra-")]
        assert leftovers == [], f"{host.name}: files left in /tmp: {leftovers}"


def _replacing(text: str, old: str, new: str) -> str:
    assert old in text, f"cannot build the bad release: {old!r} is no longer in the file; update this test"
    return text.replace(old, new, 1)


# ----- secret files through sudo, never through /tmp ------------------------------------------------------------

SFTP_SERVER = "/usr/lib/openssh/sftp-server"  # Debian's `Subsystem sftp` in /etc/ssh/sshd_config
SFTP_LOG = "/var/log/e2e-sftp-sessions.log"
# Counts every SFTP session sshd starts on the host (pyinfra's files.put uploads through one), then serves it.
SFTP_SPY = f"""#!/bin/sh
echo "sftp session for $(id -un)" >> {SFTP_LOG}
exec {SFTP_SERVER}.real "$@"
"""


@pytest.fixture
def sftp_spy(sudo_ssh) -> Iterator[Callable[[], int]]:
    """On app2: `sessions()` is how many SFTP sessions sshd has started since the fixture began."""
    code, _out, err = sudo_ssh("app2", f"test -e {SFTP_SERVER}.real || mv {SFTP_SERVER} {SFTP_SERVER}.real; "
                                        f": > {SFTP_LOG}; chmod 666 {SFTP_LOG}; cat > {SFTP_SERVER} <<'EOF'\n"
                                        f"{SFTP_SPY}EOF\nchmod 755 {SFTP_SERVER}")
    assert code == 0, err

    def sessions() -> int:
        code, out, err = sudo_ssh("app2", f"wc -l < {SFTP_LOG}")
        assert code == 0, err
        return int(out.strip())

    try:
        yield sessions
    finally:
        sudo_ssh("app2", f"mv -f {SFTP_SERVER}.real {SFTP_SERVER}; rm -f {SFTP_LOG}")


def test_secret_file_reaches_a_sudo_host_through_stdin_not_sftp(bare_testbed, sudo_ssh, set_up, sftp_spy):
    from ingestctl import pyinfra_runner as runner
    from ingestctl.operations import secretfiles
    from pyinfra.operations import files

    dest = "/opt/ingest/e2e-secretfile/token"
    secret = "e2e-secret-value\nsecond line, no newline at the end"
    call = runner.OperationCall(secretfiles.secret_file, kwargs={
        "name": "e2e secret file", "dest": dest, "content": secret, "mode": "600", "user": "10001",
        "group": "10001"})
    result = runner.run_operations("local", [call], hosts=["app2"])
    assert result.hosts["app2"].changed
    assert sftp_spy() == 0, "the secret went through SFTP"
    code, out, err = sudo_ssh("app2", f"stat -c '%a %u %g' {dest}; cat {dest}")
    assert code == 0 and out == f"600 10001 10001\n{secret}", f"{out!r} {err}"
    code, out, _err = sudo_ssh("app2", "ls -A /tmp /opt/ingest/e2e-secretfile")
    assert "pyinfra-" not in out and ".ingestctl-" not in out, out
    again = runner.run_operations("local", [call], hosts=["app2"])
    assert not again.hosts["app2"].changed and again.hosts["app2"].noops == (f"{dest} already in place",)

    # The detector itself: pyinfra's files.put on a sudo host does open an SFTP session (to /tmp).
    from io import StringIO

    put = runner.OperationCall(files.put, kwargs={"name": "e2e put", "src": StringIO("not secret"),
                                                  "dest": "/opt/ingest/e2e-secretfile/put", "mode": "600"})
    runner.run_operations("local", [put], hosts=["app2"])
    assert sftp_spy() >= 1, "the SFTP spy saw nothing: it cannot tell stdin from SFTP"
    sudo_ssh("app2", "rm -rf /opt/ingest/e2e-secretfile")
