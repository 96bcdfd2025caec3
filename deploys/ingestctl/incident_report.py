"""The incident report the runbook asks for, pre-filled from the ledger: its Korean fields in its order, the SEV
report format, the timeline, the releases/configs/schema heads involved, MTTD and MTTR. Markdown for the ticket,
JSON for tools.

Pure: built from an incident, the merged ledger and a clock. What only a person can write (the confirmed root
cause, preventive actions, customer impact, workarounds) is marked TO_WRITE, never guessed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ingestctl import incidents as incidents_mod
from ingestctl import ledger as ledger_mod
from ingestctl.incidents import Incident
from ingestctl.ledger import LedgerEntry

# The seed runbook's common required fields, in its order and its words (docs/RUNBOOK.md, Incident Scenario
# Templates): the report's headings. tests/unit/test_incident_report.py compares them with the runbook.
IMPACT = "영향 (Impact)"
CAUSE = "원인 (Cause)"
MITIGATION = "임시조치 (Mitigation)"
VALIDATION = "복구검증 (Recovery Validation)"
COMMON_FIELDS = (IMPACT, CAUSE, MITIGATION, VALIDATION)
# The deploy/release template's own last field, and the others' follow-up (where preventive actions go).
ROLLBACK_RECORD = "롤백/재배포 기록"
FOLLOW_UP = "후속조치"
# The seed's SEV report format, line for line.
SEV_FORMAT: dict[int, tuple[str, str]] = {
    1: ("현재 영향 범위, 고객 영향, 우회 불가 여부", "15분 간격 업데이트, 임시조치 ETA, 최종 복구 ETA"),
    2: ("주요 기능 영향 범위, 우회 가능 여부", "30분 간격 업데이트, 완화/복구 ETA"),
    3: ("부분 영향 범위, 임시 우회 경로", "60분 간격 업데이트, 영구 조치 일정"),
}
TO_WRITE = "(작성 필요: only a person can write this)"
RECOVERY_KINDS = frozenset({"deploy", "rollback-app", "rollback-config", "config-set"})


@dataclass(frozen=True)
class TimelineRow:
    at: datetime
    kind: str  # deploy | gate | rollback | config | lock | incident | schema
    event: str
    details: str = ""
    source: str = ""  # the ledger run id or the incident id it comes from


@dataclass(frozen=True)
class ChangeRow:
    """One ledger entry in the window: what release, config and schema it moved between."""

    run_id: str
    kind: str
    started: datetime
    release: str
    image_id: str
    config: str
    schema: str
    outcome: str
    hosts: str
    emergency: bool


@dataclass(frozen=True)
class Recovery:
    at: datetime
    how: str


@dataclass
class Report:
    incident: Incident
    generated: datetime
    run: LedgerEntry | None
    first_signal: datetime
    detected: datetime
    recovery: Recovery | None
    timeline: list[TimelineRow]
    changes: list[ChangeRow]
    sections: dict[str, list[str]] = field(default_factory=dict)
    to_write: list[str] = field(default_factory=list)

    @property
    def mttd_s(self) -> float:
        return round((self.detected - self.first_signal).total_seconds(), 3)

    @property
    def mttr_s(self) -> float | None:
        return round((self.recovery.at - self.detected).total_seconds(), 3) if self.recovery else None


# --- arithmetic ------------------------------------------------------------------------------------------


def signal_and_detection(incident: Incident, run: LedgerEntry | None) -> tuple[datetime, datetime]:
    """MTTD's two ends. A draft's come from its run's ledger timestamps (incidents.signal_and_detection); an
    incident opened by hand was detected when it was opened, and its first signal is --since (else the same)."""
    if run is not None:
        signal, detected = incidents_mod.signal_and_detection(run)
        return (incident.since or signal), detected
    return min(incident.first_signal, incident.opened_at), incident.opened_at


def recovery(incident: Incident, run: LedgerEntry | None, entries: Sequence[LedgerEntry],
             detected: datetime) -> Recovery | None:
    """When the fleet was healthy again (MTTR's end), from the ledger:

    - the linked run rolled its hosts back (their health gate passed) or switched none: the run's end;
    - else the first successful deploy, app or config rollback or config rollout that started after detection:
      its end (each is gated on health, so its success means the fleet is healthy);
    - else, for an incident closed by hand without such an entry, its close; else not yet.
    """
    if run is not None and run.finished and (run.outcome == "rolled-back"
                                             or (run.outcome in ("failed", "aborted") and not run.hosts)):
        how = "automatic rollback" if run.outcome == "rolled-back" else "no host was switched"
        return Recovery(run.finished, f"{how} (run {run.id})")
    for entry in sorted(entries, key=lambda e: (e.started, e.id)):
        if (entry.succeeded and entry.kind in RECOVERY_KINDS and entry.started >= detected
                and (run is None or entry.id != run.id)):
            at = entry.finished or entry.started + timedelta(seconds=entry.time_to_healthy_s or 0)
            return Recovery(at, f"{entry.kind} {entry.release or entry.config_version or ''} (run {entry.id})")
    if incident.closed_at and incident.status == "closed":
        return Recovery(incident.closed_at, f"closed by {incident.closed_by} (no recovering change in the ledger)")
    return None


# --- timeline ------------------------------------------------------------------------------------------------


def _numbers(numbers: dict[str, Any], limit: int = 12) -> str:
    items = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items() if v is not None]
    return ", ".join(items[:limit]) + (f", … ({len(items) - limit} more)" if len(items) > limit else "")


def _arrow(before: str | None, after: str | None) -> str:
    if before and after and before != after:
        return f"{before} → {after}"
    return after or before or ""


def entry_rows(entry: LedgerEntry) -> list[TimelineRow]:
    """What one ledger entry says happened, as timeline rows: its lock, start, gates, rollback and end."""
    finished = entry.finished or entry.started
    src = entry.id
    what = {"deploy": "deploy", "rollback-app": "app rollback", "rollback-schema": "schema rollback",
            "rollback-config": "config rollback", "config-set": "config rollout"}[entry.kind]
    subject = _arrow(entry.previous_release, entry.release) if entry.kind in ledger_mod.RELEASE_KINDS else \
        _arrow(entry.previous_config_version, entry.config_version) if "config" in entry.kind else \
        _arrow(entry.schema_head_before, entry.schema_head_after)
    rows = [TimelineRow(entry.started, "lock", f"deploy lock taken by {entry.who}", entry.lock_takeover or "", src),
            TimelineRow(entry.started, "config" if "config" in entry.kind else entry.kind.split("-")[0],
                        f"{what} {subject} started" + (" (--emergency)" if entry.emergency else ""),
                        "benchmark gate skipped (--skip-bench)" if entry.bench_skipped else "", src)]
    for gate in entry.gates:
        rows.append(TimelineRow(gate.at or finished, "gate", f"{gate.name} gate {'passed' if gate.passed else 'FAILED'}"
                                + (f" on {gate.host}" if gate.host else ""), _numbers(gate.numbers), src))
    if entry.schema_head_before != entry.schema_head_after and entry.kind == "deploy":
        schema = _arrow(entry.schema_head_before, entry.schema_head_after)
        rows.append(TimelineRow(finished, "schema", f"schema {schema}", "", src))
    if entry.outcome == "rolled-back":
        rows.append(TimelineRow(finished, "rollback", f"rolled back {', '.join(entry.hosts) or 'the switched hosts'}"
                                f" to {entry.previous_release or 'what they ran before'}", entry.message or "", src))
    elif entry.finished:
        rows.append(TimelineRow(finished, entry.kind.split("-")[0], f"{what} {subject} finished: {entry.outcome}",
                                "" if entry.succeeded else (entry.message or ""), src))
    if entry.finished:
        rows.append(TimelineRow(finished, "lock", "deploy lock released", "", src))
    return rows


def incident_rows(incident: Incident) -> list[TimelineRow]:
    src = incident.id
    rows = [TimelineRow(incident.opened_at, "incident",
                        f"SEV-{incident.sev} {'draft opened by the failed run' if incident.run_id else 'opened'} "
                        f"by {incident.opened_by}", incident.title, src)]
    rows += [TimelineRow(note.at, "incident", f"note by {note.who}", note.text, src) for note in incident.notes]
    if incident.closed_at:
        rows.append(TimelineRow(incident.closed_at, "incident", f"{incident.status} by {incident.closed_by}",
                                incident.close_reason or "", src))
    return rows


def in_window(entries: Sequence[LedgerEntry], start: datetime, end: datetime) -> list[LedgerEntry]:
    return [e for e in entries if e.started <= end and (e.finished or e.started) >= start]


# --- the report ----------------------------------------------------------------------------------------------


def build(incident: Incident, entries: Sequence[LedgerEntry], now: datetime) -> Report:
    run = next((e for e in entries if e.id == incident.run_id), None) if incident.run_id else None
    first_signal, detected = signal_and_detection(incident, run)
    recovered = recovery(incident, run, entries, detected)
    start = min([first_signal, incident.opened_at] + ([run.started] if run else []))
    end = max([incident.closed_at or now] + ([recovered.at] if recovered else []))
    window = in_window(entries, start, end)
    timeline = sorted([row for entry in window for row in entry_rows(entry)] + incident_rows(incident),
                      key=lambda r: r.at)
    changes = [ChangeRow(e.id, e.kind, e.started,
                         _arrow(e.previous_release, e.release) if e.kind in ledger_mod.RELEASE_KINDS else "",
                         (e.image_id or "")[:19], _arrow(e.previous_config_version, e.config_version),
                         _arrow(e.schema_head_before, e.schema_head_after), e.outcome, ", ".join(e.hosts), e.emergency)
               for e in window]
    report = Report(incident, now, run, first_signal, detected, recovered, timeline, changes)
    fill_sections(report)
    return report


def _at(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z" if value else ""


def fill_sections(report: Report) -> None:
    incident, run = report.incident, report.run
    gate = incidents_mod.first_failure(run) if run else None
    scope = f"{', '.join(run.hosts)} took the new release {run.release}" if run and run.hosts else \
        "no host took traffic on the new release" if run else TO_WRITE
    report.sections[IMPACT] = [
        f"사용자/엔드포인트/시간대 영향 범위: {scope}; from {_at(report.first_signal)} to "
        f"{_at(report.recovery.at) if report.recovery else 'not recovered yet'}",
        f"endpoints and users affected: {TO_WRITE}",
    ]
    estimate = f"{gate.name} gate failed ({_numbers(gate.numbers, 6)})" if gate else \
        (run.message if run and run.message else TO_WRITE)
    report.sections[CAUSE] = [f"추정 원인 (estimated, from the gates): {estimate}",
                              f"확정 원인 (root cause): {TO_WRITE}"]
    if run and run.outcome == "rolled-back":
        mitigation = f"automatic rollback of {', '.join(run.hosts)} to {run.previous_release} at {_at(run.finished)}"
    elif run and not run.hosts:
        mitigation = "none needed: no host switched to the new release"
    else:
        mitigation = TO_WRITE
    report.sections[MITIGATION] = [f"즉시 완화 조치: {mitigation}", f"리스크: {TO_WRITE}"]
    report.sections[VALIDATION] = [
        f"복구 확인 지표와 확인 시각: {report.recovery.how} at {_at(report.recovery.at)}" if report.recovery
        else f"복구 확인 지표와 확인 시각: not recovered yet per the ledger; {TO_WRITE}"]
    report.sections[ROLLBACK_RECORD] = [
        f"{c.kind} {c.release or c.config or c.schema} ({c.outcome}, run {c.run_id}"
        + (", --emergency" if c.emergency else "") + ")" for c in report.changes] or ["no deploy or rollback"]
    report.sections[FOLLOW_UP] = [f"preventive actions: {TO_WRITE}", f"SLO/error budget status: {TO_WRITE}"]
    first, second = SEV_FORMAT[incident.sev]
    eta = f"recovered at {_at(report.recovery.at)}" if report.recovery else TO_WRITE
    report.sections[f"SEV-{incident.sev} 보고"] = [f"{first}: {scope}; {TO_WRITE}", f"{second}: {eta}"]
    report.to_write = ["영향: endpoints and users", "원인: 확정 원인 (root cause)", "임시조치: 리스크",
                       f"{FOLLOW_UP}: preventive actions", f"SEV-{incident.sev} 보고: {first}"]


def to_json(report: Report) -> dict[str, Any]:
    incident = report.incident
    return {
        "incident": {"id": incident.id, "env": incident.env, "sev": incident.sev, "title": incident.title,
                     "status": incident.status, "opened_at": _at(incident.opened_at), "opened_by": incident.opened_by,
                     "closed_at": _at(incident.closed_at) or None, "closed_by": incident.closed_by,
                     "run_id": incident.run_id},
        "first_signal": _at(report.first_signal),
        "detected": _at(report.detected),
        "recovered": _at(report.recovery.at) if report.recovery else None,
        "recovered_by": report.recovery.how if report.recovery else None,
        "mttd_s": report.mttd_s,
        "mttr_s": report.mttr_s,
        "sections": report.sections,
        "to_write": report.to_write,
        "timeline": [{"at": _at(r.at), "kind": r.kind, "event": r.event, "details": r.details, "source": r.source}
                     for r in report.timeline],
        "changes": [{**c.__dict__, "started": _at(c.started)} for c in report.changes],
        "notes": [{"at": _at(n.at), "who": n.who, "text": n.text} for n in incident.notes],
        "generated": _at(report.generated),
    }


# --- Markdown ------------------------------------------------------------------------------------------------

_MD_SPECIAL = str.maketrans({c: f"\\{c}" for c in "\\`*_[]#|!"} | {"<": "&lt;", "&": "&amp;"})


def md_text(value: object) -> str:
    """Free text (titles, notes, gate messages read from hosts) as inert Markdown: one line, no markup, no HTML."""
    return " ".join(str(value).split()).translate(_MD_SPECIAL)


def _seconds(value: float | None) -> str:
    return "not recovered yet" if value is None else f"{value:.1f} s"


def _table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(md_text(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def _bullets(items: Sequence[str]) -> list[str]:
    # TO_WRITE stays visible as emphasis; everything else is inert text.
    return [f"- {md_text(item).replace(md_text(TO_WRITE), f'**{TO_WRITE}**')}" for item in items] + [""]


def to_markdown(report: Report) -> str:
    incident = report.incident
    lines = [f"# SEV-{incident.sev}: {md_text(incident.title)}", ""]
    lines += _table(["field", "value"], [
        ["incident", incident.id], ["environment", incident.env], ["status", incident.status],
        ["severity", f"SEV-{incident.sev}"], ["opened", f"{_at(incident.opened_at)} by {incident.opened_by}"],
        ["linked run", incident.run_id or ""], ["first failing signal", _at(report.first_signal)],
        ["detected", _at(report.detected)],
        ["recovered", f"{_at(report.recovery.at)} ({report.recovery.how})" if report.recovery else "not yet"],
        ["MTTD", _seconds(report.mttd_s)], ["MTTR", _seconds(report.mttr_s)],
    ])
    for heading, items in report.sections.items():
        lines += [f"## {heading}", ""] + _bullets(items)
    lines += ["## 타임라인 (Timeline)", ""]
    lines += _table(["time (UTC)", "kind", "event", "details", "source"],
                    [[_at(r.at), r.kind, r.event, r.details, r.source] for r in report.timeline])
    lines += ["## 릴리스/설정/스키마 (Affected releases, config versions, schema heads)", ""]
    lines += _table(["run", "kind", "started (UTC)", "release", "image", "config", "schema", "outcome", "hosts",
                     "emergency"],
                    [[c.run_id, c.kind, _at(c.started), c.release, c.image_id, c.config, c.schema, c.outcome, c.hosts,
                      "yes" if c.emergency else ""] for c in report.changes])
    lines += ["## MTTD / MTTR", "",
              f"- MTTD = detected − first failing signal = {_at(report.detected)} − {_at(report.first_signal)} "
              f"= {_seconds(report.mttd_s)}",
              "- MTTR = fleet healthy − detected = "
              + (f"{_at(report.recovery.at)} − {_at(report.detected)} = {_seconds(report.mttr_s)}"
                 if report.recovery else "not recovered yet"), ""]
    return "\n".join(lines)
