"""One-shot rollbacks on the real sandbox: application, schema and the compatibility check between them, plus
the refusals (unknown release, held lock, unreachable host) that must leave the fleet exactly as it was.

Every release here is a real build of this checkout or of a patched copy (`releases.variant`) carrying an
extra migration, deployed by the real `ingestctl` over SSH. Outcomes are proved from the hosts themselves
(state.json, the ledger file, the lock directory, `/version` over HTTP, the database's alembic head), not only
from exit codes; each scenario ends with `ingestctl verify local`.

The module starts from its own baseline (e2e8-v1 then e2e8-v2 of this checkout, schema 0002) and ends with
e2e8-v2 live on schema 0002, whatever ran before or fails in between, so later modules find a healthy fleet.
"""

from __future__ import annotations

import json
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from releases import PROJECT_ROOT, Result, app_urls, ingestctl, variant, version_of

pytestmark = pytest.mark.e2e

V1, V2 = "e2e8-v1", "e2e8-v2"
SAFE, UNSAFE, INCOMPAT = "e2e8-safe3", "e2e8-unsafe3", "e2e8-incompat4"
STATE_FILE = "/opt/ingest/state.json"
LEDGER_FILE = "/var/lib/ingest/ledger.jsonl"
LOCK_INFO = "/var/lib/ingest/lock/info.json"
HOSTS = ("db1", "app2", "app3")

# A data-safe migration on top of 0002: an index, whose downgrade drops only the index.
SAFE_MIGRATION = '''"""e2e: index events by source; dropping it loses nothing."""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

backward_compatible = True
downgrade_data_safe = True


def upgrade() -> None:
    op.create_index("ix_e2e_events_source", "events", ["source"])


def downgrade() -> None:
    op.drop_index("ix_e2e_events_source", table_name="events")
'''

# Backward-compatible (the previous release ignores a new nullable column), but its downgrade drops the column.
UNSAFE_MIGRATION = '''"""e2e: a nullable note column; its downgrade drops the column and what was written to it."""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

backward_compatible = True
downgrade_data_safe = False


def upgrade() -> None:
    op.add_column("events", sa.Column("e2e_note", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("events", "e2e_note")
'''

# On top of the unsafe 0003: declared incompatible with the releases before it.
INCOMPAT_MIGRATION = '''"""e2e: declared not backward-compatible; releases before it must not run on it."""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

backward_compatible = False
downgrade_data_safe = True


def upgrade() -> None:
    op.create_index("ix_e2e_events_note", "events", ["e2e_note"])


def downgrade() -> None:
    op.drop_index("ix_e2e_events_note", table_name="events")
'''

SAFE_FILE = "service/alembic/versions/0003_e2e_index_events_by_source.py"
UNSAFE_FILE = "service/alembic/versions/0003_e2e_add_event_note.py"
INCOMPAT_FILE = "service/alembic/versions/0004_e2e_index_event_note.py"


# ----- reading the hosts ------------------------------------------------------------------------------------

def host_state(ssh, host: str) -> dict | None:
    status, out, err = ssh(host, f"cat {STATE_FILE} 2>/dev/null || true")
    assert status == 0, f"{host}: cannot read {STATE_FILE}: {err}"
    return json.loads(out) if out.strip() else None


def fleet_states(ssh) -> dict[str, dict | None]:
    return {h: host_state(ssh, h) for h in HOSTS}


def ledger(ssh, host: str = "db1") -> dict[str, dict]:
    """The host's ledger by entry id (a later line with the same id supersedes an earlier one)."""
    status, out, err = ssh(host, f"cat {LEDGER_FILE} 2>/dev/null || true")
    assert status == 0, err
    entries: dict[str, dict] = {}
    for line in out.splitlines():
        if line.strip():
            entry = json.loads(line)
            entries[entry["id"]] = entry
    return entries


def lock_holders(ssh) -> list[str]:
    return [h for h in HOSTS if ssh(h, f"test -e {LOCK_INFO}")[0] == 0]


def schema_head() -> str | None:
    """The database's alembic head as `ingestctl status --json` reports it (read with psql on db1)."""
    result = ingestctl("status", "local", "--json")
    assert result.code == 0, result.explain()
    heads = {e["schema"] for e in result.events if e.get("type") == "row"}
    assert len(heads) == 1, f"expected one schema head, found {heads}"
    return heads.pop()


def live_versions(testbed) -> dict[str, str | None]:
    return {name: version_of(url) for name, url in app_urls(testbed).items()}


def assert_fleet_on(testbed, ssh, release: str) -> None:
    states = fleet_states(ssh)
    assert {h: (s or {}).get("release") for h, s in states.items()} == {h: release for h in HOSTS}
    assert live_versions(testbed) == {h: release for h in app_urls(testbed)}


def verify(ssh, root: Path = PROJECT_ROOT) -> None:
    """`ingestctl verify local`, checking the image of the release that is live now."""
    state = host_state(ssh, "db1")
    assert state, "db1: no release live to verify"
    result = ingestctl("verify", "local", root=root,
                       env={"INGEST_IMAGE": state["image"], "INGEST_IMAGE_ID": state["image_id"]}, timeout=600)
    assert result.code == 0, "ingestctl verify local failed:\n" + result.explain()


def deploy(version: str, root: Path = PROJECT_ROOT, *extra: str) -> Result:
    result = ingestctl("deploy", "local", "--version", version, "--skip-bench", "--json", *extra, root=root)
    assert result.code == 0, f"deploy {version}:\n" + result.explain()
    assert result.summary()["outcome"] in ("success", "noop")
    return result


def assert_nothing_changed(ssh, states_before: dict, ledger_before: dict) -> None:
    assert fleet_states(ssh) == states_before, "a refused command changed a host's state.json"
    assert ledger(ssh) == ledger_before, "a refused command wrote the ledger"
    assert lock_holders(ssh) == [], "a refused command left the deploy lock behind"


def reset_schema_to_0002(ssh) -> None:
    """The operator's manual repair after the product refused an unsafe downgrade: drop what the test
    migrations added and put the alembic head back at 0002 (psql in the db host's postgres container)."""
    sql = ("DROP INDEX IF EXISTS ix_e2e_events_note; DROP INDEX IF EXISTS ix_e2e_events_source; "
           "ALTER TABLE events DROP COLUMN IF EXISTS e2e_note; "
           "DELETE FROM schema_migration_meta WHERE revision IN ('0003', '0004'); "
           "UPDATE alembic_version SET version_num = '0002'")
    command = ("cd /opt/ingest && $(docker compose version >/dev/null 2>&1 && echo 'docker compose' || echo "
               f"docker-compose) -p ingest -f compose.yml exec -T postgres psql -U ingest -d ingest -v "
               f"ON_ERROR_STOP=1 -c \"{sql}\"")
    status, _out, err = ssh("db1", command)
    assert status == 0, f"resetting the schema to 0002 failed: {err}"


def back_to_baseline(testbed, ssh) -> None:
    """Whatever a test left behind: schema 0002 and e2e8-v2 live (this checkout), lock free."""
    if lock_holders(ssh):
        ingestctl("lock", "break", "local", "--force")
    if schema_head() != "0002":
        reset_schema_to_0002(ssh)
    if {(s or {}).get("release") for s in fleet_states(ssh).values()} != {V2}:
        result = ingestctl("rollback", "app", "local", "--to", V2, "--json")
        if result.code != 0:
            deploy(V2)
    assert_fleet_on(testbed, ssh, V2)
    assert schema_head() == "0002"


# ----- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def baseline(testbed, ssh):
    """e2e8-v1 then e2e8-v2 of this checkout, so the ledger knows two good releases on schema 0002."""
    if schema_head() not in (None, "0001", "0002"):
        reset_schema_to_0002(ssh)  # a previous session died mid-module
    deploy(V1)
    deploy(V2)
    assert_fleet_on(testbed, ssh, V2)
    yield
    back_to_baseline(testbed, ssh)


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, Path]:
    return {
        SAFE: variant(tmp_path_factory.mktemp("safe3"), {SAFE_FILE: SAFE_MIGRATION}),
        UNSAFE: variant(tmp_path_factory.mktemp("unsafe3"), {UNSAFE_FILE: UNSAFE_MIGRATION}),
        INCOMPAT: variant(tmp_path_factory.mktemp("incompat4"),
                          {UNSAFE_FILE: UNSAFE_MIGRATION, INCOMPAT_FILE: INCOMPAT_MIGRATION}),
    }


# ----- application rollback ---------------------------------------------------------------------------------

def test_dry_runs_print_the_plan_the_real_run_would_follow_and_change_nothing(testbed, ssh, baseline):
    states, entries = fleet_states(ssh), ledger(ssh)
    app = ingestctl("rollback", "app", "local", "--dry", "--json")
    assert app.code == 0, app.explain()
    [plan] = [e for e in app.events if e["type"] == "plan"]
    assert (plan["from_release"], plan["to_release"]) == (V2, V1), plan
    assert app.summary().get("dry") is True
    config = ingestctl("config", "set", "local", "INGEST_MAX_BATCH_ITEMS=7", "--dry", "--json")
    assert config.code == 0, config.explain()
    [plan] = [e for e in config.events if e["type"] == "plan"]
    assert {"key": "INGEST_MAX_BATCH_ITEMS", "old": "1000", "new": "7"} in plan["changes"], plan
    assert config.summary().get("dry") is True
    assert_nothing_changed(ssh, states, entries)
    assert lock_holders(ssh) == []


def test_the_schema_record_reads_the_same_inside_the_container_and_through_docker_exec(testbed, ssh, baseline):
    """The schema read an app rollback plans from enters the postgres container's namespaces (nsenter); where it
    cannot (here a shell function makes nsenter fail), it falls back to `docker exec`, with the same rows."""
    from ingestctl.facts.release import SchemaRecord

    read = SchemaRecord().command()
    code, entered, err = ssh("db1", read)
    assert code == 0, err
    code, executed, err = ssh("db1", f"nsenter() {{ return 1; }}; {read}")
    assert code == 0, err
    assert SchemaRecord().process(entered.splitlines())[0] == "0002", entered
    assert entered == executed


def test_the_schema_record_skips_a_stranger_with_composes_name_and_finds_the_container_by_its_labels(testbed, ssh,
                                                                                                      baseline):
    """The postgres container is inspected by compose's name for it (one engine call), and used only if compose's
    labels say it is this project's running postgres. Here the real one's v2 name is hidden and a stranger holds
    the v1 name: the stranger is not entered, and the label search finds the real one, with the same rows."""
    from ingestctl.facts.release import SchemaRecord

    read = SchemaRecord().command()
    code, expected, err = ssh("db1", read)
    assert code == 0 and expected.startswith("head|"), (expected, err)
    code, out, err = ssh("db1", "docker run -d --name ingest_postgres_1 --label com.docker.compose.project=other "
                                "--label com.docker.compose.service=postgres --entrypoint sleep "
                                "\"$(docker inspect -f '{{.Config.Image}}' ingest-postgres-1)\" 120")
    assert code == 0, err
    try:
        hide_v2_name = 'docker() { case "$*" in *ingest-postgres-1*) return 1;; esac; command docker "$@"; }'
        code, found, err = ssh("db1", f"{hide_v2_name}; {read}")
        assert code == 0, err
        assert found == expected
    finally:
        ssh("db1", "docker rm -f ingest_postgres_1")


def test_rollback_app_returns_every_host_to_the_previous_release_then_to_a_named_one(testbed, ssh, baseline):
    before = ledger(ssh)
    result = ingestctl("rollback", "app", "local", "--json")
    assert result.code == 0, result.explain()
    assert result.summary()["outcome"] == "success"
    assert_fleet_on(testbed, ssh, V1)

    new = [e for i, e in ledger(ssh).items() if i not in before]
    assert [e["kind"] for e in new] == ["rollback-app"], new
    entry = new[0]
    assert entry["release"] == V1 and entry["outcome"] == "success"
    assert entry["previous_release"] == V2
    assert isinstance(entry["time_to_healthy_s"], (int, float)) and 0 < entry["time_to_healthy_s"] < 300
    assert sorted(entry["hosts"]) == sorted(app_urls(testbed))
    # Every host holds this run's entry (earlier runs may differ: a host unreachable at a run's end misses it).
    assert all(ledger(ssh, h).get(entry["id"]) == entry for h in ("app2", "app3"))

    result = ingestctl("rollback", "app", "local", "--to", V2, "--json")
    assert result.code == 0, result.explain()
    assert_fleet_on(testbed, ssh, V2)
    assert lock_holders(ssh) == []
    verify(ssh)


def test_a_rollback_reaches_each_host_over_one_ssh_connection(testbed, ssh, baseline, testbed_name):
    """Reads, lock, switch, health and ledger share one connection per host (sshpool), counted by each sshd."""
    from ingestctl.testbed.probe import ssh_logins

    assert_fleet_on(testbed, ssh, V2)
    since = time.time()
    result = ingestctl("rollback", "app", "local", "--to", V1, "--json")
    until = time.time()
    assert result.code == 0, result.explain()
    logins = {h: ssh_logins(f"{testbed_name}-{h}", since, until) for h in ("db1", "app2", "app3")}
    assert logins == {"db1": 1, "app2": 1, "app3": 1}, logins
    back = ingestctl("rollback", "app", "local", "--to", V2, "--json")
    assert back.code == 0, back.explain()
    assert_fleet_on(testbed, ssh, V2)


def test_a_rollback_starts_the_proxy_again_where_it_was_removed(testbed, ssh, baseline):
    """app2's proxy container is gone (removed by hand, its config unchanged): the switch to the warm standby
    starts it again, with the Compose the host has (chosen on the host: the warm path does not ask for it)."""
    assert_fleet_on(testbed, ssh, V2)
    code, _out, err = ssh("app2", "docker rm -f $(docker ps -q --filter label=com.docker.compose.service=proxy)")
    assert code == 0, err
    assert version_of(app_urls(testbed)["app2"]) is None, "app2 still answers without its proxy"
    result = ingestctl("rollback", "app", "local", "--to", V1, "--json")
    assert result.code == 0, result.explain()
    assert_fleet_on(testbed, ssh, V1)
    back = ingestctl("rollback", "app", "local", "--to", V2, "--json")
    assert back.code == 0, back.explain()
    assert_fleet_on(testbed, ssh, V2)


def test_rollback_app_to_an_unknown_release_is_refused_naming_the_known_ones(testbed, ssh, baseline):
    states, entries = fleet_states(ssh), ledger(ssh)
    result = ingestctl("rollback", "app", "local", "--to", "e2e8-never-built", "--json")
    assert result.code == 2, result.explain()
    error = result.summary()["error"]
    assert "e2e8-never-built" in error and "unknown release" in error
    assert V1 in error and V2 in error, f"expected the known-good releases named, found: {error}"
    assert_nothing_changed(ssh, states, entries)
    assert_fleet_on(testbed, ssh, V2)
    verify(ssh)


# ----- refusals: held lock, unreachable host ----------------------------------------------------------------

def test_rollback_while_the_lock_is_held_exits_5_naming_the_holder(testbed, ssh, baseline):
    from ingestctl import lock

    record = lock.new_record(who="e2e8-oncall@elsewhere", command="ingestctl deploy local (e2e8 held lock)",
                             release=None, now=datetime.now(UTC))
    status, out, err = ssh("app2", lock.acquire_command(record))
    assert status == 0 and "acquired" in out, err
    try:
        states, entries = fleet_states(ssh), ledger(ssh)
        for command in (("rollback", "app", "local"), ("config", "set", "local", "INGEST_MAX_BATCH_ITEMS=7")):
            result = ingestctl(*command, "--json")
            assert result.code == 5, f"{' '.join(command)}:\n{result.explain()}"
            assert result.summary()["outcome"] == "locked"
            assert "e2e8-oncall@elsewhere" in result.summary()["error"]
            assert fleet_states(ssh) == states and ledger(ssh) == entries
            # Only the held lock remains: the run released the locks it took on the other hosts.
            assert lock_holders(ssh) == ["app2"]
    finally:
        ssh("app2", lock.release_command(record.token))
    assert lock_holders(ssh) == []
    verify(ssh)


def test_rollback_with_a_host_unreachable_fails_naming_it_and_changes_nothing(testbed, ssh, baseline, testbed_name):
    container = f"{testbed_name}-app3"
    states, entries = fleet_states(ssh), ledger(ssh)
    subprocess.run(["docker", "pause", container], check=True, capture_output=True, timeout=60)
    try:
        started = time.monotonic()
        result = ingestctl("rollback", "app", "local", "--to", V1, "--json", timeout=300)
        took = time.monotonic() - started
        reachable = {h: host_state(ssh, h) for h in ("db1", "app2")}
    finally:
        subprocess.run(["docker", "unpause", container], check=True, capture_output=True, timeout=60)
    assert result.code == 2, result.explain()
    assert "app3" in result.summary()["error"] and "cannot reach" in result.summary()["error"]
    assert took < 120, f"an unreachable host took {took:.0f}s to report; expected the SSH connect timeout"
    assert reachable == {h: states[h] for h in ("db1", "app2")}, "the reachable hosts were changed"
    deadline = time.monotonic() + 60
    while ssh("app3", "true")[0] != 0:  # sshd answers again once the container is unpaused
        assert time.monotonic() < deadline, "app3 did not answer over SSH within 60 s of docker unpause"
        time.sleep(1)
    assert_nothing_changed(ssh, states, entries)
    assert_fleet_on(testbed, ssh, V2)
    verify(ssh)


# ----- schema rollback --------------------------------------------------------------------------------------

def test_rollback_schema_undoes_a_data_safe_migration_once_the_app_no_longer_needs_it(testbed, ssh, baseline,
                                                                                       variants):
    root = variants[SAFE]
    deploy(SAFE, root=root)
    assert schema_head() == "0003"

    # The running release needs 0003: refused, nothing touched.
    states, entries = fleet_states(ssh), ledger(ssh)
    result = ingestctl("rollback", "schema", "local", "--json", root=root)
    assert result.code == 2, result.explain()
    error = result.summary()["error"]
    assert "0003_e2e_index_events_by_source" in error and "running release needs" in error
    assert "rollback app" in error
    assert_nothing_changed(ssh, states, entries)
    assert schema_head() == "0003"

    # Back to a release built for 0002 (0003 is backward-compatible), then the schema.
    result = ingestctl("rollback", "app", "local", "--to", V2, "--json", root=root)
    assert result.code == 0, result.explain()
    assert_fleet_on(testbed, ssh, V2)

    before = ledger(ssh)
    result = ingestctl("rollback", "schema", "local", "--json", root=root)
    assert result.code == 0, result.explain()
    assert schema_head() == "0002"
    new = [e for i, e in ledger(ssh).items() if i not in before]
    assert [e["kind"] for e in new] == ["rollback-schema"]
    assert new[0]["schema_head_before"] == "0003" and new[0]["schema_head_after"] == "0002"
    assert new[0]["outcome"] == "success"
    restore_point = new[0]["restore_point"]
    assert restore_point and ssh("db1", f"test -s {restore_point}")[0] == 0, "no restore point on db1"
    assert_fleet_on(testbed, ssh, V2)  # still ready on the older schema
    assert lock_holders(ssh) == []
    verify(ssh)


def test_rollback_schema_refuses_an_unsafe_downgrade_and_changes_nothing(testbed, ssh, baseline, variants):
    root = variants[UNSAFE]
    deploy(UNSAFE, root=root)
    assert schema_head() == "0003"
    result = ingestctl("rollback", "app", "local", "--to", V2, "--json", root=root)
    assert result.code == 0, result.explain()
    assert_fleet_on(testbed, ssh, V2)

    states, entries = fleet_states(ssh), ledger(ssh)
    result = ingestctl("rollback", "schema", "local", "--json", root=root)
    assert result.code == 2, result.explain()
    error = result.summary()["error"]
    assert "0003_e2e_add_event_note" in error, error
    assert "op.drop_column" in error and "events.e2e_note" in error, error
    assert "not data-safe" in error
    assert_nothing_changed(ssh, states, entries)
    assert schema_head() == "0003"
    verify(ssh, root=root)


def test_rollback_app_across_an_incompatible_migration_is_refused_naming_it(testbed, ssh, baseline, variants):
    root = variants[INCOMPAT]
    # A rolling deploy refuses it; --allow-incompatible switches every host in one batch after the migration.
    refused = ingestctl("deploy", "local", "--version", INCOMPAT, "--skip-bench", "--json", root=root)
    assert refused.code == 2 and "expand/contract" in refused.summary()["error"], refused.explain()
    deploy(INCOMPAT, root, "--allow-incompatible")
    assert schema_head() == "0004"
    assert_fleet_on(testbed, ssh, INCOMPAT)

    states, entries = fleet_states(ssh), ledger(ssh)
    for args in ((), ("--to", V2)):
        result = ingestctl("rollback", "app", "local", *args, "--json", root=root)
        assert result.code == 2, result.explain()
        error = result.summary()["error"]
        # Judged from the database's own record: 0004 is not backward-compatible, and 0003 below it has no
        # data-safe downgrade, so neither --with-schema nor a schema rollback can help: roll forward.
        assert "0004: not backward-compatible" in error and "without data loss" in error, error
        assert_nothing_changed(ssh, states, entries)
    assert_fleet_on(testbed, ssh, INCOMPAT)
    assert schema_head() == "0004"
    verify(ssh, root=root)

    # The repair the refusal asks for is the operator's: here, put the schema back by hand and roll back.
    reset_schema_to_0002(ssh)
    result = ingestctl("rollback", "app", "local", "--to", V2, "--json")
    assert result.code == 0, result.explain()
    assert_fleet_on(testbed, ssh, V2)
    verify(ssh)
