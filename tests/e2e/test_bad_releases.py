"""Genuinely broken releases are caught by the deploy's gates and rolled back by themselves (exit 3).

Each bad release is a copy of this checkout with one real fault built into its image (`releases.variant`):
readiness that fails, a query endpoint answering 500, a query path slower than the metric gate's p95, a
stats path slow enough for the benchmark gate but invisible to the metric gate's probe, and a migration
that raises. No mocks: the real `ingestctl deploy` builds, ships and rolls them out on the sandbox.

The module starts by deploying a known-good baseline WITH the benchmark gate (so the same gate that must
fail a slow release is shown passing a good one), and leaves the fleet on that baseline, healthy and unlocked.
After each failure it proves from the hosts themselves that every host is back on the baseline: /version,
state.json, the ledger entry (outcome and the failing gate with its numbers), the schema head, the lock.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from releases import Result, app_urls, ingestctl, variant, version_of

pytestmark = pytest.mark.e2e

BASELINE = "e2e4b-good"
LOCK_DIR = "/var/lib/ingest/lock"
LEDGER = "/var/lib/ingest/ledger.jsonl"
STATE = "/opt/ingest/state.json"
PSQL = "cd /opt/ingest && docker compose -p ingest -f compose.yml exec -T postgres psql -U ingest -d ingest -tAc"
EVENTS_API = "service/ingest/api/events.py"
OPERATIONS_API = "service/ingest/api/operations.py"


def replacing(old: str, new: str, count: int = 1) -> Callable[[str], str]:
    """A change that fails loudly when the code it breaks has moved, instead of deploying a good release."""

    def change(text: str) -> str:
        assert old in text, f"cannot build the bad release: {old!r} is no longer in the file; update this test"
        return text.replace(old, new, count)

    return change


def with_asyncio(change: Callable[[str], str]) -> Callable[[str], str]:
    return lambda text: change(text).replace("from __future__ import annotations\n",
                                             "from __future__ import annotations\n\nimport asyncio\n", 1)


# ----- host state -------------------------------------------------------------------------------------------

def states(testbed, ssh) -> dict[str, str]:
    found = {}
    for host in testbed.hosts:
        code, out, err = ssh(host.name, f"cat {STATE}")
        assert code == 0, f"{host.name}: cannot read {STATE}: {err}"
        found[host.name] = out
    return found


def last_ledger_entry(ssh, host: str) -> dict:
    code, out, err = ssh(host, f"tail -n 1 {LEDGER}")
    assert code == 0 and out.strip(), f"{host}: cannot read {LEDGER}: {err}"
    return json.loads(out)


def schema_head(ssh, db_host: str) -> str:
    code, out, err = ssh(db_host, f"{PSQL} 'SELECT version_num FROM alembic_version'")
    assert code == 0, f"{db_host}: cannot read the schema head: {err}"
    return out.strip()


def assert_back_on_baseline(testbed, ssh) -> None:
    served = {host: version_of(url) for host, url in app_urls(testbed).items()}
    assert set(served.values()) == {BASELINE}, f"expected every app host back on {BASELINE}: {served}"
    now = states(testbed, ssh)
    for host, text in now.items():
        assert json.loads(text)["release"] == BASELINE, f"{host}: {STATE} records {json.loads(text)['release']}"
    for host in testbed.hosts:
        code, _out, _err = ssh(host.name, f"test -e {LOCK_DIR}")
        assert code != 0, f"{host.name}: the deploy lock {LOCK_DIR} is still held after the rollback"


def assert_rolled_back(result: Result, release: str, gate: str, testbed, ssh) -> dict:
    """Exit 3, every host on the baseline, and a ledger entry naming the failed gate with its numbers."""
    assert result.code == 3, result.explain()
    assert result.summary()["outcome"] == "rolled-back", result.explain()
    assert [e for e in result.events if e["type"] == "rollback"], f"no rollback event: {result.explain()}"
    assert_back_on_baseline(testbed, ssh)
    for host in testbed.hosts:
        entry = last_ledger_entry(ssh, host.name)
        assert entry["release"] == release and entry["outcome"] == "rolled-back", f"{host.name}: {entry}"
        assert entry["previous_release"] == BASELINE, f"{host.name}: {entry}"
    failed = [g for g in entry["gates"] if g["name"] == gate and not g["passed"]]
    assert failed and failed[-1]["numbers"], f"ledger entry does not name a failed {gate} gate with numbers: {entry}"
    return failed[-1]


def assert_incident_draft(result: Result, release: str, ssh, testbed) -> None:
    """Exit 3 after the canary took traffic and the metric gate failed: a SEV-2 draft linking the run, whose
    report has the runbook's headings, the gate's numbers in its timeline, and MTTD/MTTR equal to what the
    ledger's own timestamps give. Then the draft is noted, confirmed (closed) and listed as closed."""
    from datetime import datetime

    from markdown_it import MarkdownIt

    [draft] = [e for e in result.events if e["type"] == "incident"]
    assert draft["sev"] == 2 and draft["status"] == "draft", draft
    entry = last_ledger_entry(ssh, testbed.hosts[0].name)
    assert draft["run_id"] == entry["id"] and entry["release"] == release, (draft, entry)

    md = ingestctl("incident", "report", "local", draft["incident"])
    assert md.code == 0, md.explain()
    tokens = MarkdownIt("commonmark").enable("table").parse(md.stdout)
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open" and t.tag == "h2"]
    assert headings[:4] == ["영향 (Impact)", "원인 (Cause)", "임시조치 (Mitigation)", "복구검증 (Recovery Validation)"]
    assert "SEV-2 보고" in headings and "타임라인 (Timeline)" in headings, headings
    assert len([t for t in tokens if t.type == "table_open"]) == 3, md.stdout[:3000]

    report = ingestctl("incident", "report", "local", draft["incident"], "--format", "json")
    assert report.code == 0, report.explain()
    data = json.loads(report.stdout)
    failed = [row for row in data["timeline"] if row["kind"] == "gate" and row["event"] == "metrics gate FAILED"]
    assert failed and "error_ratio=" in failed[0]["details"], data["timeline"]
    assert any(row["kind"] == "rollback" for row in data["timeline"]), data["timeline"]

    # MTTD and MTTR from the ledger entry itself: detection is the failing gate's verdict, the first signal the
    # end of the last step completed before it, recovery the end of the run's own rollback.
    def ts(text: str) -> float:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()

    detected = ts(next(g for g in entry["gates"] if not g["passed"])["at"])
    ends = [ts(s["started"]) + s["duration_s"] for s in entry["steps"]]
    signal = max(end for end in ends if end <= detected)
    assert data["mttd_s"] == pytest.approx(detected - signal, abs=0.002), (data, entry)
    assert data["mttr_s"] == pytest.approx(ts(entry["finished"]) - detected, abs=0.002), (data, entry)
    assert 0 < data["mttd_s"] < 120 and 0 < data["mttr_s"] < 300, data

    assert ingestctl("incident", "note", "local", draft["incident"], "users saw 500s on /api/v1/events").code == 0
    closed = ingestctl("incident", "close", "local", draft["incident"], "--json")
    assert closed.code == 0 and closed.summary()["status"] == "closed", closed.explain()
    listed = ingestctl("incident", "list", "local", "--json")
    rows = {e["id"]: e for e in listed.events if e["type"] == "row"}
    assert rows[draft["incident"]]["status"] == "closed" and rows[draft["incident"]]["run"] == entry["id"], rows
    again = ingestctl("incident", "report", "local", draft["incident"], "--format", "json")
    notes = json.loads(again.stdout)["notes"]
    assert [n["text"] for n in notes] == ["users saw 500s on /api/v1/events"], notes


# ----- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A frozen copy of this checkout: the good baseline and every bad variant start from the same code."""
    return variant(tmp_path_factory.mktemp("bad-releases-baseline"), {})


@pytest.fixture(scope="module")
def baseline(testbed, ssh, checkout) -> dict[str, str]:
    """The fleet on the known-good BASELINE, deployed through every gate including the benchmark."""
    result = ingestctl("deploy", "local", "--version", BASELINE, "--json", root=checkout)
    assert result.code == 0, result.explain()
    bench = [e for e in result.events if e["type"] == "gate" and e.get("gate") == "benchmark"]
    if result.summary()["outcome"] != "noop":
        assert bench and bench[-1]["passed"] is True, f"the good baseline failed the benchmark: {result.explain()}"
    assert_back_on_baseline(testbed, ssh)
    return states(testbed, ssh)


def bad_release(tmp_path, name: str, changes: dict) -> tuple[str, Result]:
    root = variant(tmp_path, changes)
    release = f"e2e4b-{name}"
    return release, ingestctl("deploy", "local", "--version", release, "--skip-bench", "--json", root=root)


# ----- the bad releases ---------------------------------------------------------------------------------------

def test_release_that_fails_readiness_is_rolled_back(testbed, ssh, baseline, tmp_path):
    # The gate waits out the whole health timeout for a release that never turns ready: 8 s here, not the
    # inventory's 30 s (sized for good releases on a loaded machine), the rest of this module keeps 30 s.
    release, result = bad_release(tmp_path, "unready", {
        OPERATIONS_API: replacing('status_code=200 if status == "ok" else 503', "status_code=503"),
        "inventories/local.py": replacing('"health_timeout_s": 30,', '"health_timeout_s": 8,')})
    gate = assert_rolled_back(result, release, "health", testbed, ssh)
    assert gate["numbers"].get("timeout_s") == 8 and gate["numbers"].get("not_ready"), gate
    for host in testbed.hosts:
        _code, running, _err = ssh(host.name, "docker ps --format '{{.Image}}'")
        assert f"ingest:{release}" not in running.split(), f"{host.name}: the unready release still runs: {running}"


def test_release_whose_errors_trip_the_metric_gate_is_rolled_back(testbed, ssh, baseline, tmp_path):
    release, result = bad_release(tmp_path, "errors", {EVENTS_API: replacing(
        "    after = None\n", '    raise RuntimeError("e2e: this release breaks the query path")\n    after = None\n')})
    gate = assert_rolled_back(result, release, "metrics", testbed, ssh)
    ratios = {k: v for k, v in gate["numbers"].items() if k.endswith(".error_ratio")}
    assert ratios and max(ratios.values()) > gate["numbers"]["thresholds.max_error_ratio"], gate
    assert "error ratio" in result.stdout, result.explain()
    assert_incident_draft(result, release, ssh, testbed)


def test_a_weighted_canary_catches_a_bad_release_on_its_share_and_rolls_it_back(testbed, ssh, baseline, tmp_path):
    """canary_weight 10: the bad release gets a tenth of the first host's requests, the gate judges it by its
    own (the probes reach it alone), and it is rolled back; a bounded load through the fleet counts what failed."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from ingestctl import paths
    from ingestctl import secrets as secrets_mod

    from bench.blast_radius import DATA_START, INVENTORY
    from bench.failures import cut
    from bench.load import Load

    values = secrets_mod.load(paths.secrets_file("local"))
    load = Load(list(app_urls(testbed).values()), values["API_KEY"], values["JWT_SECRET"], workers=2,
                max_seconds=300, max_requests=100_000)
    with load:
        release, result = bad_release(tmp_path, "canary10", {
            EVENTS_API: replacing("    after = None\n",
                                  '    raise RuntimeError("e2e: this release breaks the query path")\n    after = None\n'),
            INVENTORY: replacing(DATA_START, DATA_START + '        "canary_weight": 10,\n'),
        })
    gate = assert_rolled_back(result, release, "metrics", testbed, ssh)
    [plan] = [e for e in result.events if e["type"] == "plan"]
    assert plan["canary_weight"] == 10, plan
    [canary] = [e for e in result.events if e.get("step") == "canary"]
    assert canary["weight"] == 10 and len(canary["hosts"]) == 1, canary
    assert not [e for e in result.events if e.get("step") == "switched"], "no host ever switched whole"
    ratios = {k: v for k, v in gate["numbers"].items() if k.endswith("error_ratio")}
    assert ratios and max(ratios.values()) > gate["numbers"]["thresholds.max_error_ratio"], gate
    back = next(e for e in result.events if e["type"] == "rollback" and e.get("outcome") == "rolled-back")
    window = cut(load.result.samples, canary["ts"], back["ts"])
    # The bad release answered some queries with 500 (it did take traffic), but a small share of all: a whole
    # host of three would fail about a sixth (half the load is queries).
    assert 0 < window.failed and window.share < 0.05, window
    # What failed is the bad release's own answer, nothing from the switching.
    assert {s.reason for s in load.result.samples if s.reason} == {"HTTP 500"}, load.result.failure_reasons


def test_release_whose_latency_trips_the_metric_gate_is_rolled_back(testbed, ssh, baseline, tmp_path):
    # 0.8 s per query: well above the inventory's max_p95_ms (500 ms) whatever the machine's load.
    release, result = bad_release(tmp_path, "slow", {EVENTS_API: with_asyncio(replacing(
        "    after = None\n", "    await asyncio.sleep(0.8)\n    after = None\n"))})
    gate = assert_rolled_back(result, release, "metrics", testbed, ssh)
    p95s = {k: v for k, v in gate["numbers"].items() if k.endswith(".p95_ms") and v is not None}
    assert p95s and max(p95s.values()) > gate["numbers"]["thresholds.max_p95_ms"], gate
    assert "p95" in result.stdout, result.explain()


def test_release_that_fails_the_benchmark_gate_is_rolled_back(testbed, ssh, baseline, tmp_path):
    # 0.3 s per stats query: the metric gate's probe only reads events, so it passes; the local profile's
    # average threshold (250 ms) catches it. Run WITHOUT --skip-bench: this is the gate under test.
    root = variant(tmp_path, {EVENTS_API: with_asyncio(replacing(
        "    until = until or datetime.now(UTC)\n",
        "    await asyncio.sleep(0.3)\n    until = until or datetime.now(UTC)\n"))})
    release = "e2e4b-slow-stats"
    result = ingestctl("deploy", "local", "--version", release, "--json", root=root)
    metric_gates = [e for e in result.events if e["type"] == "gate" and e.get("gate") == "metrics"]
    assert metric_gates and all(e["passed"] for e in metric_gates), f"expected the metric gate to pass: {metric_gates}"
    gate = assert_rolled_back(result, release, "benchmark", testbed, ssh)
    assert gate["numbers"].get("profile") == "local", gate
    assert "BENCH_FAIL_THRESHOLD_MS" in result.stdout, result.explain()


def test_failed_migration_stops_before_any_app_host_changes(testbed, ssh, baseline, tmp_path):
    db = next(h.name for h in testbed.hosts if "db" in h.roles)
    assert schema_head(ssh, db) == "0002"
    migration = '''"""E2E: a migration that fails half-way (its DDL must roll back with it)."""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

backward_compatible = True
downgrade_data_safe = True


def upgrade() -> None:
    op.execute("CREATE TABLE e2e_half_done (id integer)")
    raise RuntimeError("e2e: this migration fails on purpose")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS e2e_half_done")
'''
    before = states(testbed, ssh)
    release, result = bad_release(tmp_path, "bad-migration",
                                  {"service/alembic/versions/0003_e2e_fails.py": migration})
    assert result.code == 3, result.explain()
    assert "migration" in result.summary().get("error", ""), result.explain()
    assert not [e for e in result.events if e.get("step") == "rollout"], f"a batch started: {result.explain()}"
    assert states(testbed, ssh) == before, f"an app host's {STATE} changed although the migration failed"
    assert_back_on_baseline(testbed, ssh)
    assert schema_head(ssh, db) == "0002", "the schema moved although its migration failed"
    _code, leftover, _err = ssh(db, f"{PSQL} \"SELECT to_regclass('public.e2e_half_done')\"")
    assert leftover.strip() == "", f"the failed migration's DDL was kept: {leftover!r}"
    restore = re.search(r"restore point (/\S+?\.dump)", result.stdout)
    assert restore, f"no restore point named: {result.explain()}"
    code, _out, _err = ssh(db, f"test -s {restore.group(1)}")
    assert code == 0, f"{db}: restore point {restore.group(1)} is missing or empty"
    entry = last_ledger_entry(ssh, db)
    assert entry["release"] == release and entry["outcome"] == "failed", entry
    assert "migration" in (entry.get("message") or ""), entry


# ----- faults injected from outside during the automatic rollback ----------------------------------------------

ERRORS_RELEASE = {EVENTS_API: replacing(
    "    after = None\n", '    raise RuntimeError("e2e: this release breaks the query path")\n    after = None\n')}
# Shadows the host's docker CLI (first on sshd's PATH): the FAILING-th slot start or stop on a host (the switch's
# container work; the proxy itself is never reloaded by a switch) fails the way a container runtime hiccups under
# load.
FLAKY_DOCKER = """#!/bin/sh
case "$*" in compose*up*--force-recreate*api_*|compose*stop*api_*)
  n=$(( $(cat /tmp/e2e-slot-ops 2>/dev/null || echo 0) + 1 )); echo "$n" > /tmp/e2e-slot-ops
  if [ "$n" = {failing} ]; then
    echo 'Error response from daemon: OCI runtime create failed: unable to start container process: read init-p: connection reset by peer: unknown' >&2
    exit 1
  fi;;
esac
exec /usr/bin/docker "$@"
"""


def app_hosts(testbed) -> list[str]:
    return [h.name for h in testbed.hosts if "app" in h.roles]


@contextmanager
def flaky_slot_ops(testbed, ssh, failing: int) -> Iterator[None]:
    """While inside, the FAILING-th slot start or stop of each app host fails once."""
    for host in app_hosts(testbed):
        code, out, err = ssh(host, "command -v docker && docker compose version")
        assert code == 0 and out.startswith("/usr/bin/docker\n"), f"{host}: not /usr/bin/docker with compose v2: {out}{err}"
        code, _out, err = ssh(host, "rm -f /tmp/e2e-slot-ops && cat > /usr/local/bin/docker <<'EOF'\n"
                              f"{FLAKY_DOCKER.replace('{failing}', str(failing))}EOF\nchmod 755 /usr/local/bin/docker")
        assert code == 0, err
    try:
        yield
    finally:
        for host in app_hosts(testbed):
            ssh(host, "rm -f /usr/local/bin/docker")


def test_a_failed_slot_start_in_the_forward_switch_is_retried_and_the_run_ends_honestly(testbed, ssh, baseline,
                                                                                       tmp_path):
    """The canary's own switch: starting its slot fails once; the switch is retried, then the bad release's gate
    fails and the fleet returns to the baseline (exit 3)."""
    with flaky_slot_ops(testbed, ssh, failing=1):
        release, result = bad_release(tmp_path, "errors", ERRORS_RELEASE)
    retries = [e for e in result.events if e["type"] == "retry"]
    assert retries and "OCI runtime create failed" in retries[0]["message"], result.explain()
    assert_rolled_back(result, release, "metrics", testbed, ssh)


def test_a_transient_runtime_failure_during_the_automatic_rollback_is_retried(testbed, ssh, baseline, tmp_path):
    """The second slot operation is the rollback's: stopping the failed canary's slot fails once, is retried."""
    with flaky_slot_ops(testbed, ssh, failing=2):
        release, result = bad_release(tmp_path, "errors", ERRORS_RELEASE)
    retries = [e for e in result.events if e["type"] == "retry"]
    assert retries and "OCI runtime create failed" in retries[0]["message"], result.explain()
    assert_rolled_back(result, release, "metrics", testbed, ssh)


def test_a_host_whose_state_write_fails_after_the_proxy_moved_is_rolled_back_not_stopped(testbed, ssh, baseline,
                                                                                         tmp_path):
    """The proxy already routes to the new slot when state.json cannot be written: the rollback must see the
    half-switched host as it really is, move traffic back to the old slot, and never stop the slot serving."""
    hosts = app_hosts(testbed)
    for host in hosts:  # a directory where the atomic write puts its temp file: the write fails, nothing else
        code, _out, err = ssh(host, f"mkdir -p {STATE}.tmp")
        assert code == 0, err
    root = variant(tmp_path, ERRORS_RELEASE)
    executable = str(Path(sys.executable).parent / "ingestctl")
    deploy = subprocess.Popen(
        [executable, "deploy", "local", "--version", "e2e4b-errors", "--skip-bench", "--json"],
        cwd=root, env={**os.environ, "INGESTCTL_ROOT": str(root)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: list[str] = []
    healed = False
    try:
        for line in deploy.stdout:
            lines.append(line)
            if not healed and '"type": "retry"' in line:
                # The rollback is converging on the half-switched host: let the disk "recover".
                for host in hosts:
                    ssh(host, f"rmdir {STATE}.tmp")
                healed = True
        stderr = deploy.stderr.read()
        code = deploy.wait(timeout=600)
    finally:
        if deploy.poll() is None:
            deploy.kill()
        for host in hosts:
            ssh(host, f"rmdir {STATE}.tmp 2>/dev/null; true")
    result = Result(code, "".join(lines), stderr)
    assert healed, f"the rollback never retried the host whose state write failed: {result.explain()}"
    assert result.code == 3, result.explain()
    assert_back_on_baseline(testbed, ssh)


# ----- migrations the release still running elsewhere cannot run alongside -------------------------------------

INCOMPATIBLE_MIGRATION = '''"""E2E: declared not backward-compatible; its downgrade is data-safe (an index)."""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

backward_compatible = False
downgrade_data_safe = True


def upgrade() -> None:
    op.create_index("ix_e2e_incompatible", "events", ["source", "type"])


def downgrade() -> None:
    op.drop_index("ix_e2e_incompatible", table_name="events")
'''
MIGRATION_PATH = "service/alembic/versions/0003_e2e_incompatible.py"


def test_a_rolling_deploy_refuses_an_incompatible_migration(testbed, ssh, baseline, tmp_path):
    db = next(h.name for h in testbed.hosts if "db" in h.roles)
    before = states(testbed, ssh)
    release, result = bad_release(tmp_path, "incompatible", {MIGRATION_PATH: INCOMPATIBLE_MIGRATION})
    assert result.code == 2, result.explain()
    assert "0003_e2e_incompatible" in result.stdout and "expand/contract" in result.stdout, result.explain()
    assert not [e for e in result.events if e.get("step") in ("ship", "migrate", "rollout")], result.explain()
    assert schema_head(ssh, db) == "0002", "the schema moved although the deploy was refused"
    assert states(testbed, ssh) == before
    assert_back_on_baseline(testbed, ssh)


def test_allow_incompatible_downgrades_the_schema_before_the_old_release_returns(testbed, ssh, baseline, tmp_path):
    db = next(h.name for h in testbed.hosts if "db" in h.roles)
    root = variant(tmp_path, {MIGRATION_PATH: INCOMPATIBLE_MIGRATION, **ERRORS_RELEASE})
    release = "e2e4b-incompatible-errors"
    result = ingestctl("deploy", "local", "--version", release, "--skip-bench", "--allow-incompatible", "--json",
                       root=root)
    plan = next(e for e in result.events if e["type"] == "plan" and "batches" in e)
    assert len(plan["batches"]) == 1, f"--allow-incompatible must switch every app host in one batch: {plan}"
    downgrade = [e for e in result.events if e["type"] == "rollback" and "downgrading schema" in e.get("message", "")]
    assert downgrade, f"no schema downgrade before the rollback: {result.explain()}"
    assert_rolled_back(result, release, "metrics", testbed, ssh)
    assert schema_head(ssh, db) == "0002", "the incompatible migration was not undone"
    _code, index, _err = ssh(db, f"{PSQL} \"SELECT to_regclass('public.ix_e2e_incompatible')\"")
    assert index.strip() == "", f"the downgrade left the index behind: {index!r}"


def test_rollback_app_with_schema_from_a_checkout_that_lacks_the_migration(testbed, ssh, baseline, checkout,
                                                                          tmp_path):
    """A good release with an incompatible, data-safe migration goes out with --allow-incompatible. On-call, in
    the baseline checkout (which has never seen that migration), rolls back app and schema in one command."""
    db = next(h.name for h in testbed.hosts if "db" in h.roles)
    root = variant(tmp_path, {MIGRATION_PATH: INCOMPATIBLE_MIGRATION})
    release = "e2e4b-incompatible-good"
    deployed = ingestctl("deploy", "local", "--version", release, "--skip-bench", "--allow-incompatible", "--json",
                         root=root)
    assert deployed.code == 0, deployed.explain()
    assert schema_head(ssh, db) == "0003"

    refused = ingestctl("rollback", "app", "local", "--to", BASELINE, root=checkout)
    assert refused.code == 2 and "--with-schema" in refused.stdout + refused.stderr, refused.explain()
    assert schema_head(ssh, db) == "0003"

    result = ingestctl("rollback", "app", "local", "--to", BASELINE, "--with-schema", "--json", root=checkout)
    assert result.code == 0, result.explain()
    assert schema_head(ssh, db) == "0002", "the schema did not come down with the app"
    measured = [e for e in result.events if e.get("unavailable_s") is not None]
    assert measured and measured[-1]["unavailable_s"] > 0, f"the unavailability was not measured: {result.explain()}"
    assert_back_on_baseline(testbed, ssh)


def test_verify_passes_after_the_rollbacks(testbed, baseline, docker_engine):
    """The testinfra suite on the fleet the rollbacks left: live image as recorded, no stray slot, no leak, no lock."""
    image = f"ingest:{BASELINE}"
    result = ingestctl("verify", "local", env={"INGEST_IMAGE": image,
                                               "INGEST_IMAGE_ID": docker_engine.images.get(image).id})
    assert result.code == 0, result.explain()
