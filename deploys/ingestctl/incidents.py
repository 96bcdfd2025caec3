"""Incidents: an append-only file of JSON lines on every host, beside the ledger, one line per incident event.

An incident is never rewritten: `open`, `note`, `close` and `dismiss` are events, and an incident is the fold of
its events. Two people noting the same incident at once both append, and neither note is lost; appends are
serialised per host by the same flock as the ledger's (`ledger.append_command`). That is why incident commands
do not take the deploy lock: on-call must be able to note an incident while a rollback holds it.

Pure: the event model, the checks on values read back from hosts, the fold, the draft a failed deploy opens
(its severity rule) and the shell commands (built here, run elsewhere).
"""

from __future__ import annotations

import json
import re
import secrets as _random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from ingestctl import hostvalues
from ingestctl import ledger as ledger_mod
from ingestctl.errors import ConfigError

INCIDENTS_PATH = "/var/lib/ingest/incidents.jsonl"

Action = Literal["open", "note", "close", "dismiss"]
Severity = Literal[1, 2, 3]
Status = Literal["draft", "open", "closed", "dismissed"]
TITLE_MAX = 200
NOTE_MAX = 2000
# Printable text: a title is one line, a note may have line breaks and tabs. No other control characters, so
# nothing read from a host can move a terminal's cursor or forge lines in the report.
_TITLE = re.compile(rf"[^\x00-\x1f\x7f]{{1,{TITLE_MAX}}}")
_NOTE = re.compile(rf"[^\x00-\x08\x0b-\x1f\x7f]{{1,{NOTE_MAX}}}")


class IncidentEvent(BaseModel):
    """One thing that happened to an incident. Unknown fields from newer writers are ignored."""

    model_config = ConfigDict(extra="ignore")

    id: str  # the event's own id (ledger.new_entry_id): the same line read from two hosts counts once
    incident: str
    action: Action
    env: str
    at: datetime
    who: str
    sev: Severity | None = None
    title: str | None = None
    since: datetime | None = None  # open: the first failing signal, when known
    run_id: str | None = None  # open: the run whose failure opened it (a draft)
    draft: bool = False
    text: str | None = None  # note: free text; dismiss/close: an optional reason


def new_incident_id(now: datetime) -> str:
    return f"inc-{now.astimezone(UTC):%Y%m%d}-{_random.token_hex(3)}"


def check_title(value: str, what: str = "title") -> str:
    if not _TITLE.fullmatch(value):
        raise ConfigError(f"{what}: expected one line of 1 to {TITLE_MAX} printable characters, found "
                          f"{hostvalues.shown(value)}")
    return value


def check_note(value: str, what: str = "note") -> str:
    if not _NOTE.fullmatch(value):
        raise ConfigError(f"{what}: expected 1 to {NOTE_MAX} printable characters (line breaks allowed), found "
                          f"{hostvalues.shown(value)}")
    return value


def check_values(event: IncidentEvent) -> None:
    """HostValueError (a ConfigError) naming the first field of EVENT not in the shape ingestctl writes."""
    hostvalues.RUN_ID.check(event.id, "id")
    hostvalues.INCIDENT_ID.check(event.incident, "incident")
    hostvalues.ENV_NAME.check(event.env, "env")
    hostvalues.WHO.check(event.who, "who")
    if event.run_id is not None:
        hostvalues.RUN_ID.check(event.run_id, "run_id")
    if event.title is not None and not _TITLE.fullmatch(event.title):
        raise hostvalues.HostValueError("title", f"one line of at most {TITLE_MAX} printable characters",
                                        event.title)
    if event.text is not None and not _NOTE.fullmatch(event.text):
        raise hostvalues.HostValueError("text", f"at most {NOTE_MAX} printable characters", event.text)
    if event.action == "open" and (event.sev is None or event.title is None):
        raise hostvalues.HostValueError("open", "an open event with sev and title", event.model_dump_json()[:80])


def serialise(event: IncidentEvent, known_secrets: Mapping[str, str]) -> str:
    """One compact JSON line, after checking its values and that no secret (e.g. pasted into a note) is in it."""
    check_values(event)
    record = event.model_dump(mode="json", exclude_none=True)
    ledger_mod.assert_no_secret(record, known_secrets, what="incident event")
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


@dataclass(frozen=True)
class ParsedEvents:
    events: list[IncidentEvent]
    skipped: list[ledger_mod.SkippedLine] = field(default_factory=list)


def parse(text: str, source: str = "incidents") -> ParsedEvents:
    """Events in file order. Unreadable lines and lines whose values are not in the shape ingestctl writes are
    skipped and named in `skipped`: one forged line must not hide every other incident."""
    events: list[IncidentEvent] = []
    skipped: list[ledger_mod.SkippedLine] = []
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            event = IncidentEvent.model_validate(json.loads(line))
            check_values(event)
        except (json.JSONDecodeError, ValidationError) as exc:
            torn = number == len(lines) and not text.endswith("\n")
            skipped.append(ledger_mod.SkippedLine(source, number, "torn last line (an interrupted write), ignored"
                                                  if torn else f"not an incident event ({type(exc).__name__})"))
            continue
        except hostvalues.HostValueError as exc:
            skipped.append(ledger_mod.SkippedLine(source, number, f"rejected ({exc}), ignored"))
            continue
        events.append(event)
    return ParsedEvents(events, skipped)


def merge(copies: Mapping[str, Sequence[IncidentEvent]]) -> list[IncidentEvent]:
    """Every host's events, deduplicated by event id, oldest first."""
    by_id: dict[str, IncidentEvent] = {}
    for events in copies.values():
        for event in events:
            by_id.setdefault(event.id, event)
    return sorted(by_id.values(), key=lambda e: (e.at, e.id))


# --- the fold ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Note:
    at: datetime
    who: str
    text: str


@dataclass
class Incident:
    id: str
    env: str
    sev: int
    title: str
    opened_at: datetime
    opened_by: str
    since: datetime | None
    run_id: str | None
    status: Status
    notes: list[Note] = field(default_factory=list)
    closed_at: datetime | None = None
    closed_by: str | None = None
    close_reason: str | None = None

    @property
    def first_signal(self) -> datetime:
        """The first failing signal: --since (or the draft's), else the moment it was opened."""
        return self.since or self.opened_at

    @property
    def is_open(self) -> bool:
        return self.status in ("draft", "open")


def fold(events: Sequence[IncidentEvent]) -> list[Incident]:
    """Incidents from their events, oldest first. An event for an incident never opened is ignored; the first
    close or dismiss wins (a second one changes nothing)."""
    incidents: dict[str, Incident] = {}
    for event in sorted(events, key=lambda e: (e.at, e.id)):
        found = incidents.get(event.incident)
        if event.action == "open":
            if found is None and event.sev is not None and event.title is not None:
                incidents[event.incident] = Incident(
                    id=event.incident, env=event.env, sev=event.sev, title=event.title, opened_at=event.at,
                    opened_by=event.who, since=event.since, run_id=event.run_id,
                    status="draft" if event.draft else "open")
            continue
        if found is None:
            continue
        if event.action == "note" and event.text:
            found.notes.append(Note(event.at, event.who, event.text))
        elif event.action in ("close", "dismiss") and found.is_open:
            found.status = "closed" if event.action == "close" else "dismissed"
            found.closed_at, found.closed_by, found.close_reason = event.at, event.who, event.text
    return sorted(incidents.values(), key=lambda i: (i.opened_at, i.id))


def find(incidents: Sequence[Incident], env: str, incident_id: str) -> Incident:
    if not hostvalues.INCIDENT_ID.matches(incident_id):
        raise ConfigError(f"ID: expected {hostvalues.INCIDENT_ID.expected}, found {hostvalues.shown(incident_id)}; "
                          f"`ingestctl incident list {env}` lists them")
    for incident in incidents:
        if incident.id == incident_id:
            return incident
    known = ", ".join(i.id for i in incidents[-5:]) or "none yet"
    raise ConfigError(f"no incident {hostvalues.shown(incident_id)} in {env}'s ledger (latest: {known}); "
                      f"`ingestctl incident list {env}` lists them")


# --- the draft a failed deploy opens -----------------------------------------------------------------------

TRAFFIC_GATES = frozenset({"metrics", "benchmark"})


def draft_severity(exit_code: int, entry: ledger_mod.LedgerEntry) -> int:
    """The draft's SEV by what the gates saw (docs/RUNBOOK.md, Post-Incident):

    - exit 4 (a rollback failed; hosts may be on neither release): SEV-1;
    - exit 3 after the new release took traffic (a host switched) and a metric or benchmark gate failed on it:
      SEV-2, users saw the errors or the latency that gate measured;
    - any other exit 3 (readiness failed before the proxy moved, a migration failed, an abort): SEV-3.
    """
    if exit_code == 4:
        return 1
    failed = {gate.name for gate in entry.gates if not gate.passed}
    return 2 if entry.hosts and failed & TRAFFIC_GATES else 3


def first_failure(entry: ledger_mod.LedgerEntry) -> ledger_mod.GateResult | None:
    return next((gate for gate in entry.gates if not gate.passed), None)


def signal_and_detection(entry: ledger_mod.LedgerEntry) -> tuple[datetime, datetime]:
    """(first failing signal, detection) of a failed run, from its ledger timestamps alone.

    Detection is the verdict of its first failing gate (the run's end when no gate failed, e.g. a migration
    error). The first failing signal is the start of the step that failed: the end of the last step the run
    completed before detection (a failing batch records no step of its own), else the run's start.
    """
    gate = first_failure(entry)
    detected = (gate.at if gate and gate.at else None) or entry.finished or entry.started
    ends = [step.started.timestamp() + step.duration_s for step in entry.steps]
    before = [end for end in ends if end <= detected.timestamp()]
    signal = datetime.fromtimestamp(max(before), UTC) if before else entry.started
    return min(signal, detected), detected


def draft_for_run(entry: ledger_mod.LedgerEntry, exit_code: int, now: datetime) -> IncidentEvent:
    """The `open` event of the draft incident a deploy ending with EXIT_CODE (3 or 4) leaves behind."""
    gate = first_failure(entry)
    cause = f"{gate.name} gate failed" if gate else (entry.message or "the run failed")[:120]
    what = "rollback failed" if exit_code == 4 else "rolled back" if entry.hosts else "stopped"
    title = check_title(f"deploy {entry.release or '?'} to {entry.env} {what}: {cause}"[:TITLE_MAX].splitlines()[0])
    since, _detected = signal_and_detection(entry)
    return IncidentEvent(id=ledger_mod.new_entry_id(now), incident=new_incident_id(now), action="open",
                         env=entry.env, at=now, who=entry.who, sev=draft_severity(exit_code, entry), title=title,
                         since=since, run_id=entry.id, draft=True)


# --- commands run on a host ----------------------------------------------------------------------------------


def append_command(line: str) -> str:
    return ledger_mod.append_command(line, path=INCIDENTS_PATH)


def read_command() -> str:
    return ledger_mod.read_command(INCIDENTS_PATH)
