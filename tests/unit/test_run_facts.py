"""A run's typed facts become its ledger entry field by field; entries written before the facts were typed (and
before the lease, emergency and rotation fields existed) still load, and read the same way."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

from ingestctl import ledger, runlock
from ingestctl.runcontext import Run, RunFacts

IMAGE_ID = "sha256:" + "ab" * 32
# A deploy as the first ledger writer recorded it: no emergency, lock_takeover or rotated_secrets fields, and the
# gates without `at`. Kept verbatim: hosts carry such lines for as long as their ledgers are kept.
OLD_LINE = json.dumps({
    "id": "20261126T181029-0a1b2c", "kind": "deploy", "env": "local", "release": "v1", "image_id": IMAGE_ID,
    "config_version": "c0ffee000001", "schema_head_before": None, "schema_head_after": "0002",
    "release_schema_head": "0002", "who": "ana@laptop", "started": "2026-11-26T18:10:29Z",
    "finished": "2026-11-26T18:11:11Z",
    "steps": [{"name": "build", "started": "2026-11-26T18:10:29Z", "duration_s": 3.1}],
    "gates": [{"name": "health", "passed": True, "numbers": {"app2.ready": True}}],
    "outcome": "success", "duration_s": 42.0, "time_to_healthy_s": 30.5, "hosts": ["app2", "app3"],
    "previous_release": None, "previous_config_version": None, "restore_point": "/opt/ingest/backups/x.dump",
    "bench_skipped": True, "message": None,
})


def ctx():
    return SimpleNamespace(config=SimpleNamespace(secrets={"API_KEY": "key-0123456789abcdef0123"}))


def test_an_entry_from_before_typed_facts_still_loads():
    parsed = ledger.parse(OLD_LINE + "\n")
    assert not parsed.skipped
    [entry] = parsed.entries
    assert (entry.release, entry.outcome, entry.hosts, entry.code_schema_head()) == \
        ("v1", "success", ["app2", "app3"], "0002")
    assert (entry.emergency, entry.lock_takeover, entry.rotated_secrets) == (False, None, [])
    assert entry.bench_skipped and entry.gates[0].at is None


def test_typed_facts_write_the_same_fields_the_old_writer_did():
    run = Run("20261203T020000-abcdef", "deploy", "local", "ana@laptop", started=time.time() - 42)
    run.facts = RunFacts(release="v2", image_id=IMAGE_ID, config_version="c0ffee000002", schema_before="0002",
                         schema_after="0003", release_schema_head="0003", previous={"app2": "v1", "app3": "v1"},
                         skip_bench=True, outcome="rolled-back", switched=["app2"], message="metrics gate failed",
                         restore_point="/opt/ingest/backups/y.dump", time_to_healthy_s=12.5,
                         previous_config_version="c0ffee000001")
    line = ledger.serialise(runlock.ledger_entry(ctx(), run), ctx().config.secrets)
    written = json.loads(line)
    # A reader of the old format finds every field it knows (serialise leaves out the ones that are None).
    assert set(json.loads(OLD_LINE)) <= set(written)
    assert (written["schema_head_before"], written["schema_head_after"], written["previous_release"],
            written["hosts"], written["outcome"], written["bench_skipped"]) == \
        ("0002", "0003", "v1", ["app2"], "rolled-back", True)
    assert ledger.parse(line + "\n").entries[0].message == "metrics gate failed"


def test_a_run_that_stopped_before_an_outcome_is_recorded_failed_and_a_journal_line_running():
    run = Run("20261203T020000-abcdef", "deploy", "local", "ana@laptop")
    assert runlock.ledger_entry(ctx(), run).outcome == "failed"
    assert runlock.ledger_entry(ctx(), run, running=True).outcome == "running"
    run.facts.outcome = "noop"  # nothing to switch is a successful deploy in the ledger
    assert runlock.ledger_entry(ctx(), run).outcome == "success"


def test_previous_release_is_recorded_only_when_every_host_agreed():
    run = Run("20261203T020000-abcdef", "deploy", "local", "ana@laptop")
    run.facts.previous = {"app2": "v1", "app3": "v0"}
    assert runlock.ledger_entry(ctx(), run).previous_release is None
    run.facts.previous = {"app2": "v1", "app3": None}
    assert runlock.ledger_entry(ctx(), run).previous_release == "v1"
