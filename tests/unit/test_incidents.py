"""Incidents: the event model, the checks on lines read from hosts, the fold, and the draft a failed deploy opens."""

from __future__ import annotations

import json
import shlex
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from ingestctl import incidents
from ingestctl.errors import ConfigError
from ingestctl.incidents import IncidentEvent
from ingestctl.ledger import GateResult, LedgerEntry, Step

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
INC = "inc-20240501-0a0b0c"
SECRETS = {"API_KEY": "key-0123456789abcdef0123"}


def ev(n: int, action="open", incident=INC, **more) -> IncidentEvent:
    fields = {"sev": 2, "title": "errors after deploy"} if action == "open" else {}
    fields.update(more)
    return IncidentEvent(id=f"20240501T1200{n:02d}Z-00{n:04x}", incident=incident, action=action, env="local",
                         at=T0 + timedelta(minutes=n), who="ana@laptop", **fields)


def run_entry(outcome="rolled-back", hosts=("app1",), gates=(), steps=()) -> LedgerEntry:
    return LedgerEntry(id="20240501T115900-abcdef", kind="deploy", env="local", release="v2", previous_release="v1",
                       who="ci@runner", started=T0 - timedelta(minutes=1), finished=T0 + timedelta(seconds=30),
                       outcome=outcome, hosts=list(hosts), gates=list(gates), steps=list(steps))


def test_events_round_trip_and_fold_into_an_incident_with_notes_and_close():
    events = [ev(0, since=T0 - timedelta(minutes=5)), ev(1, "note", text="p95 at 900 ms\non app1"),
              ev(2, "close", text="fixed by rollback"), ev(3, "note", text="late note")]
    text = "".join(incidents.serialise(e, SECRETS) + "\n" for e in events)
    parsed = incidents.parse(text)
    assert parsed.events == events and not parsed.skipped
    [incident] = incidents.fold(parsed.events)
    assert incident.status == "closed" and incident.closed_by == "ana@laptop"
    assert incident.closed_at == T0 + timedelta(minutes=2) and incident.close_reason == "fixed by rollback"
    assert [n.text for n in incident.notes] == ["p95 at 900 ms\non app1", "late note"]
    assert incident.first_signal == T0 - timedelta(minutes=5)


def test_first_close_wins_and_a_dismissed_draft_stays_dismissed():
    [incident] = incidents.fold([ev(0, draft=True), ev(1, "dismiss"), ev(2, "close")])
    assert incident.status == "dismissed" and incident.closed_at == T0 + timedelta(minutes=1)
    [draft] = incidents.fold([ev(0, draft=True)])
    assert draft.status == "draft" and draft.is_open


def test_events_of_an_incident_never_opened_are_ignored():
    assert incidents.fold([ev(1, "note", text="orphan"), ev(2, "close")]) == []


def test_merge_counts_a_line_read_from_several_hosts_once_in_time_order():
    a, b, c = ev(0), ev(1, "note", text="x"), ev(2, "close")
    merged = incidents.merge({"app1": [a, c], "app2": [b, a], "db1": [c]})
    assert merged == [a, b, c]


@pytest.mark.parametrize("field,value", [
    ("incident", "inc-1; rm -rf /"), ("id", "$(reboot)"), ("who", "ana laptop"), ("env", "../prod"),
    ("run_id", "20240501T115900-abcdef;x"), ("title", "two\nlines"), ("title", "x" * 201),
    ("text", "bell\x07"),
])
def test_a_forged_line_is_skipped_and_named_not_used(field, value):
    good = ev(0)
    record = json.loads(incidents.serialise(ev(1, "note", text="n"), SECRETS))
    record[field] = value
    parsed = incidents.parse(incidents.serialise(good, SECRETS) + "\n" + json.dumps(record) + "\n", source="app1:x")
    assert parsed.events == [good]
    assert len(parsed.skipped) == 1 and parsed.skipped[0].line == 2 and field in parsed.skipped[0].reason


def test_a_torn_last_line_is_skipped_quietly():
    line = incidents.serialise(ev(0), SECRETS)
    parsed = incidents.parse(line + "\n" + line[:20])
    assert len(parsed.events) == 1 and "torn" in parsed.skipped[0].reason


def test_serialise_refuses_a_secret_pasted_into_a_note():
    with pytest.raises(ConfigError, match="text contains the value of API_KEY"):
        incidents.serialise(ev(1, "note", text=f"the key is {SECRETS['API_KEY']}"), SECRETS)


def test_titles_and_notes_are_checked_before_any_host():
    with pytest.raises(ConfigError, match="--title: expected one line"):
        incidents.check_title("a\nb", "--title")
    with pytest.raises(ConfigError, match="TEXT: expected 1 to 2000"):
        incidents.check_note("", "TEXT")
    assert incidents.check_note("line 1\nline 2\ttab") == "line 1\nline 2\ttab"


def test_find_names_a_malformed_or_unknown_id():
    found = incidents.fold([ev(0)])
    assert incidents.find(found, "local", INC).id == INC
    with pytest.raises(ConfigError, match="ID: expected an incident id"):
        incidents.find(found, "local", "42")
    with pytest.raises(ConfigError, match=f"no incident 'inc-20240501-ffffff'.*latest: {INC}"):
        incidents.find(found, "local", "inc-20240501-ffffff")


# --- the draft of a failed deploy --------------------------------------------------------------------------

METRICS_FAILED = GateResult(name="metrics", passed=False, numbers={"app1.error_ratio": 0.4}, at=T0)
HEALTH_PASSED = GateResult(name="health", passed=True, at=T0 - timedelta(seconds=10))
HEALTH_FAILED = GateResult(name="health", passed=False, numbers={"timeout_s": 60}, at=T0)


@pytest.mark.parametrize("exit_code,hosts,gates,sev", [
    (4, ("app1",), (METRICS_FAILED,), 1),
    (4, (), (), 1),
    (3, ("app1",), (HEALTH_PASSED, METRICS_FAILED), 2),  # took traffic, the metric gate saw it
    (3, ("app1", "app2"), (GateResult(name="benchmark", passed=False),), 2),
    (3, ("app1",), (HEALTH_FAILED,), 3),  # failed readiness: the proxy never moved
    (3, (), (METRICS_FAILED,), 3),  # no host switched
    (3, (), (), 3),  # a migration failed, or an abort
])
def test_draft_severity_follows_what_the_gates_saw(exit_code, hosts, gates, sev):
    assert incidents.draft_severity(exit_code, run_entry(hosts=hosts, gates=gates)) == sev


def test_signal_is_the_start_of_the_failing_step_and_detection_the_failing_gate():
    steps = [Step(name="build", started=T0 - timedelta(seconds=60), duration_s=20),
             Step(name="migrate", started=T0 - timedelta(seconds=40), duration_s=12.5),
             Step(name="benchmark", started=T0 + timedelta(seconds=5), duration_s=3)]  # after the verdict: ignored
    signal, detected = incidents.signal_and_detection(run_entry(steps=steps, gates=[HEALTH_PASSED, METRICS_FAILED]))
    assert detected == T0
    assert signal == T0 - timedelta(seconds=27.5)


def test_without_a_failed_gate_detection_is_the_run_end_and_signal_its_start():
    entry = run_entry(outcome="failed", hosts=())
    assert incidents.signal_and_detection(entry) == (entry.started, entry.finished)


def test_draft_for_run_links_the_run_and_is_a_valid_line():
    entry = run_entry(gates=[METRICS_FAILED])
    event = incidents.draft_for_run(entry, 3, T0 + timedelta(minutes=1))
    assert event.draft and event.run_id == entry.id and event.sev == 2 and event.action == "open"
    assert event.title == "deploy v2 to local rolled back: metrics gate failed"
    assert incidents.parse(incidents.serialise(event, SECRETS) + "\n").events == [event]


def test_append_command_keeps_every_line_whatever_the_text(tmp_path):
    """The line reaches the file intact through the shell, quotes and `$(...)` included."""
    path = tmp_path / "incidents.jsonl"
    events = [ev(0, title="it's `$(touch pwned)` \"quoted\""), ev(1, "note", text="a; b && c | d")]
    for event in events:
        command = incidents.append_command(incidents.serialise(event, SECRETS))
        subprocess.run(["sh", "-c", command.replace(shlex.quote(incidents.INCIDENTS_PATH), shlex.quote(str(path)))],
                       check=True, cwd=tmp_path)
    assert incidents.parse(path.read_text()).events == events
    assert not (tmp_path / "pwned").exists()


# --- the command line's own parsing -----------------------------------------------------------------------


def test_since_takes_an_iso_time_or_a_duration_ago_and_never_the_future():
    from ingestctl.incident_cli import parse_since

    now = T0
    assert parse_since(None, now) is None
    assert parse_since("15m", now) == T0 - timedelta(minutes=15)
    assert parse_since("2h", now) == T0 - timedelta(hours=2)
    assert parse_since("2024-05-01T11:30:00Z", now) == T0 - timedelta(minutes=30)
    assert parse_since("2024-05-01T11:30:00", now) == T0 - timedelta(minutes=30)  # no offset: UTC
    assert parse_since("2024-05-01T13:30:00+02:00", now) == T0 - timedelta(minutes=30)
    with pytest.raises(ConfigError, match="--since: expected an ISO 8601 time"):
        parse_since("yesterday", now)
    with pytest.raises(ConfigError, match="in the future"):
        parse_since("2024-05-01T12:30:00Z", now)
