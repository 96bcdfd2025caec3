"""The incident report: timeline, MTTD/MTTR arithmetic, the runbook's fields in its order, Markdown and JSON."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from ingestctl import incident_report, incidents
from ingestctl.incidents import IncidentEvent
from ingestctl.ledger import GateResult, LedgerEntry, Step
from markdown_it import MarkdownIt

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
RUNBOOK = Path(__file__).resolve().parents[2] / "docs" / "RUNBOOK.md"
GOOD, BAD, CFG = "v1", "v2", "c0ffee000001"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def entry(n: int, kind="deploy", release=BAD, outcome="success", start=0.0, end=30.0, **more) -> LedgerEntry:
    return LedgerEntry(id=f"20240501T1200{n:02d}-00{n:04x}", kind=kind, env="local", release=release,
                       config_version=CFG, who="ci@runner", started=at(start), finished=at(end), outcome=outcome,
                       **more)


BAD_RUN = entry(1, outcome="rolled-back", start=0, end=80, previous_release=GOOD, hosts=["app1"],
                image_id="sha256:" + "ab" * 32, schema_head_before="0001", schema_head_after="0002",
                steps=[Step(name="build", started=at(0), duration_s=20), Step(name="migrate", started=at(20),
                                                                              duration_s=10)],
                gates=[GateResult(name="health", passed=True, numbers={"app1.ready_s": 1.2}, at=at(45)),
                       GateResult(name="metrics", passed=False, at=at(57.5),
                                  numbers={"app1.error_ratio": 0.42, "thresholds.max_error_ratio": 0.01})],
                message="metrics gate failed: error ratio 0.42 > 0.01 | on app1")
BEFORE = entry(0, release=GOOD, start=-3600, end=-3500)
AFTER_CONFIG = entry(2, kind="config-set", release=GOOD, start=300, end=340, previous_config_version="c0ffee000000")


DRAFT = incidents.draft_for_run(BAD_RUN, 3, at(81))


def draft(**more) -> incidents.Incident:
    return incidents.fold([DRAFT, *more.get("later", [])])[0]


def later(n: int, action: str, seconds: float, **fields) -> IncidentEvent:
    return IncidentEvent(id=f"20240501T1201{n:02d}Z-00{n:04x}", incident=DRAFT.incident, action=action, env="local",
                         at=at(seconds), who="ana@laptop", **fields)


def test_mttd_and_mttr_come_from_the_ledger_timestamps():
    report = incident_report.build(draft(), [BEFORE, BAD_RUN], now=at(600))
    assert report.first_signal == at(30)  # the end of `migrate`: the failing batch started then
    assert report.detected == at(57.5)  # the metric gate's verdict
    assert report.recovery is not None and report.recovery.at == at(80)  # the rollback finished
    assert report.mttd_s == 27.5 and report.mttr_s == 22.5


def test_mttr_waits_for_a_later_recovery_when_the_rollback_failed():
    failed = BAD_RUN.model_copy(update={"outcome": "failed"})
    recovery = entry(3, kind="rollback-app", release=GOOD, start=200, end=230)
    report = incident_report.build(draft(), [failed], now=at(600))
    assert report.recovery is None and report.mttr_s is None
    report = incident_report.build(draft(), [failed, recovery], now=at(600))
    assert report.recovery.at == at(230) and report.mttr_s == pytest.approx(230 - 57.5)


def test_a_manual_incident_measures_from_since_and_recovers_at_the_next_gated_change():
    opened = IncidentEvent(id="20240501T120100Z-000001", incident="inc-20240501-000001", action="open", env="local",
                           at=at(100), who="ana@laptop", sev=3, title="slow stats", since=at(40))
    [incident] = incidents.fold([opened])
    report = incident_report.build(incident, [BEFORE, AFTER_CONFIG], now=at(600))
    assert (report.first_signal, report.detected) == (at(40), at(100))
    assert report.mttd_s == 60 and report.recovery.at == at(340) and report.mttr_s == 240


def test_timeline_has_every_change_gate_rollback_and_lock_event_in_the_window_in_order():
    closed = draft(later=[later(1, "note", 120, text="users saw 500s"), later(2, "close", 400)])
    report = incident_report.build(closed, [BEFORE, BAD_RUN, AFTER_CONFIG], now=at(600))
    events = [(row.kind, row.event) for row in report.timeline]
    assert [row.at for row in report.timeline] == sorted(row.at for row in report.timeline)
    assert ("gate", "metrics gate FAILED") in events and ("gate", "health gate passed") in events
    assert ("rollback", "rolled back app1 to v1") in events
    assert ("lock", "deploy lock taken by ci@runner") in events and ("lock", "deploy lock released") in events
    assert ("config", "config rollout c0ffee000000 → c0ffee000001 started") in events
    assert ("schema", "schema 0001 → 0002") in events
    assert ("incident", "note by ana@laptop") in events and ("incident", "closed by ana@laptop") in events
    assert not [row for row in report.timeline if row.source == BEFORE.id]  # outside the window
    failed = next(row for row in report.timeline if row.event == "metrics gate FAILED")
    assert failed.at == at(57.5) and "app1.error_ratio=0.42" in failed.details
    assert "thresholds.max_error_ratio=0.01" in failed.details


def test_emergency_runs_are_marked_in_the_timeline_and_the_changes():
    emergency = entry(4, start=500, end=540, emergency=True)
    report = incident_report.build(draft(), [BAD_RUN, emergency], now=at(600))
    assert any(row.event.endswith("(--emergency)") for row in report.timeline)
    assert [c.emergency for c in report.changes] == [False, True]
    assert "| yes |" in incident_report.to_markdown(report)


def runbook_common_fields() -> list[str]:
    """`- 영향 (Impact): ...` lines of the runbook's common required fields, as the runbook has them."""
    text = RUNBOOK.read_text()
    block = text.split("모든 시나리오는 아래 공통 필수 항목을 같은 순서로 기록합니다.", 1)[1].split("###", 1)[0]
    return re.findall(r"^- ([^:\n]+):", block, flags=re.M)


def test_markdown_has_the_runbooks_fields_in_its_order_and_renders_headings_and_tables():
    report = incident_report.build(draft(later=[later(1, "note", 120, text="<script>x</script> | `y`")]),
                                   [BAD_RUN], now=at(600))
    text = incident_report.to_markdown(report)
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open" and t.tag == "h2"]
    common = runbook_common_fields()
    assert len(common) == 4 and common[0].startswith("영향")
    assert headings[:4] == common  # exactly the seed's words, in its order
    assert headings[4:7] == ["롤백/재배포 기록", "후속조치", "SEV-2 보고"]
    assert "타임라인 (Timeline)" in headings and "MTTD / MTTR" in headings
    assert [t.tag for t in tokens if t.type == "heading_open"][0] == "h1"
    tables = [t for t in tokens if t.type == "table_open"]
    assert len(tables) == 3  # summary, timeline, releases
    html = MarkdownIt("commonmark").enable("table").render(text)
    assert "<script>" not in html  # free text is inert
    cells = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "td_open"]
    assert "27.5 s" in cells and "22.5 s" in cells  # MTTD and MTTR in the summary table
    # Every row of every table has as many cells as its header: a `|` in free text did not split a cell.
    for table in re.findall(r"((?:^\|.*\|\n)+)", text, flags=re.M):
        rows = [re.split(r"(?<!\\)\|", line)[1:-1] for line in table.strip().split("\n")]
        assert len({len(row) for row in rows}) == 1, table
    assert "SEV-2" in text and "주요 기능 영향 범위, 우회 가능 여부" in text
    assert text.count(incident_report.TO_WRITE) >= 4  # root cause, preventive actions, ... marked for a person


def test_json_report_carries_the_same_numbers_for_tools():
    report = incident_report.build(draft(), [BAD_RUN], now=at(600))
    data = json.loads(json.dumps(incident_report.to_json(report)))
    assert data["mttd_s"] == 27.5 and data["mttr_s"] == 22.5
    assert data["first_signal"] == "2024-05-01T12:00:30.000Z" and data["detected"] == "2024-05-01T12:00:57.500Z"
    assert data["incident"]["run_id"] == BAD_RUN.id and data["incident"]["status"] == "draft"
    assert list(data["sections"])[:4] == runbook_common_fields()
    assert any("확정 원인" in item and incident_report.TO_WRITE in item for item in data["sections"]["원인 (Cause)"])
    assert any(row["kind"] == "gate" and "error_ratio=0.42" in row["details"] for row in data["timeline"])
    assert data["changes"][0]["schema"] == "0001 → 0002" and data["changes"][0]["release"] == "v1 → v2"


@pytest.mark.parametrize("sev", [1, 2, 3])
def test_the_sev_report_format_is_the_seeds_for_each_severity(sev):
    incident = draft()
    incident.sev = sev
    text = incident_report.to_markdown(incident_report.build(incident, [BAD_RUN], now=at(600)))
    seed = RUNBOOK.read_text().split("## SEV Report Format", 1)[1].split(f"- SEV-{sev} 보고:", 1)[1]
    first, second = [line.strip()[2:] for line in seed.strip().split("\n")[:2]]
    assert f"## SEV-{sev} 보고" in text and first in text and second in text
