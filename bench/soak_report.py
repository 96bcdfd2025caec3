"""The zero-downtime bench's verdict per phase and per kind of switch, from the load's samples: requests,
failed requests with their reasons and times, and p99 latency during the switch against the baseline's.

Pure: the phases' windows and switch times come in, records and text come out (tests/unit/test_bench_failures.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from bench.failures import (
    FailureRecord,
    Sample,
    failure_records,
    group_failures,
    ms,
    near_marks,
    percentile,
    within,
)

BASELINE = "baseline"
# The phase whose release fails its gate: its failed requests are that release's blast radius, not a switch's.
BAD_RELEASE = "bad-release"
# The negative control (bench/racy_switch.py): it must fail requests, so they do not count against the target.
RACY_CONTROL = "racy-control"
NOT_COUNTED = (BAD_RELEASE, RACY_CONTROL)
# How many failed requests each phase shows one by one in the text (all are counted and grouped).
SHOWN_FAILURES = 5


@dataclass(frozen=True)
class PhaseWindow:
    """When a phase ran: its window (settling included) and its action, in epoch seconds, and the `switched`
    events of the action's --json stream."""

    name: str
    kind: str  # baseline | deploy | rollback-app | config | bad-release | racy-control
    round: int
    start: float
    action_start: float
    action_end: float
    end: float
    switches: tuple[float, ...] = ()
    exit_code: int = 0


@dataclass
class PhaseReport:
    name: str
    kind: str
    round: int
    requests: int
    failed: int
    reasons: list[tuple[str, int]]
    failures: list[FailureRecord]
    action_s: float
    switches: int
    p99_ms: float | None  # over the whole action
    p99_switch_ms: float | None  # within SWITCH_WINDOW_S of a `switched` event
    exit_code: int = 0
    p99_vs_baseline: float | None = field(default=None)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["reasons"] = dict(self.reasons)
        data["failures"] = [asdict(f) for f in self.failures[:50]]
        return data


def phase_report(window: PhaseWindow, samples: Sequence[Sample]) -> PhaseReport:
    mine = within(samples, window.start, window.end)
    during = within(mine, window.action_start, window.action_end)
    switching = near_marks(mine, window.switches)
    return PhaseReport(
        name=window.name, kind=window.kind, round=window.round, requests=len(mine),
        failed=sum(1 for s in mine if s.reason is not None), reasons=group_failures(mine),
        failures=failure_records(window.name, mine, window.action_start, window.switches),
        action_s=round(window.action_end - window.action_start, 1), switches=len(window.switches),
        p99_ms=ms(percentile([s.latency_s for s in during], 0.99)),
        p99_switch_ms=ms(percentile([s.latency_s for s in switching], 0.99)), exit_code=window.exit_code,
    )


def compare_to_baseline(reports: list[PhaseReport]) -> float | None:
    """Set each report's p99 ratio (its switch p99, else its action p99, over the baseline's p99); returns the
    baseline's p99 in ms."""
    baseline = next((r.p99_ms for r in reports if r.kind == BASELINE), None)
    for report in reports:
        mine = report.p99_switch_ms if report.p99_switch_ms is not None else report.p99_ms
        if baseline and mine is not None and report.kind != BASELINE:
            report.p99_vs_baseline = round(mine / baseline, 2)
    return baseline


@dataclass
class KindTotal:
    kind: str
    phases: int
    switches: int
    requests: int
    failed: int
    reasons: list[tuple[str, int]]
    worst_p99_vs_baseline: float | None


def totals_by_kind(reports: Sequence[PhaseReport]) -> list[KindTotal]:
    totals = []
    for kind in dict.fromkeys(r.kind for r in reports):
        mine = [r for r in reports if r.kind == kind]
        reasons: dict[str, int] = {}
        for report in mine:
            for reason, count in report.reasons:
                reasons[reason] = reasons.get(reason, 0) + count
        ratios = [r.p99_vs_baseline for r in mine if r.p99_vs_baseline is not None]
        totals.append(KindTotal(kind, len(mine), sum(r.switches for r in mine), sum(r.requests for r in mine),
                                sum(r.failed for r in mine), sorted(reasons.items(), key=lambda i: (-i[1], i[0])),
                                max(ratios) if ratios else None))
    return totals


def failed_outside_bad_releases(reports: Sequence[PhaseReport]) -> int:
    """The failed requests that count against the target: neither a bad release's nor the racy control's."""
    return sum(r.failed for r in reports if r.kind not in NOT_COUNTED)


def render(reports: Sequence[PhaseReport], baseline_p99_ms: float | None) -> list[str]:
    """The text tables: per phase, per kind of switch, then every phase's reasons and first failures."""
    lines = ["| round | phase | requests | failed | action (s) | switches | p99 action (ms) | p99 at switch (ms) "
             "| vs baseline p99 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        lines.append(f"| {r.round} | {r.name} | {r.requests} | {r.failed} | {r.action_s} | {r.switches} | "
                     f"{_text(r.p99_ms)} | {_text(r.p99_switch_ms)} | {_text(r.p99_vs_baseline, 'x')} |")
    lines += ["", f"baseline p99: {_text(baseline_p99_ms)} ms", "",
              "| kind | phases | switches | requests | failed | worst p99 vs baseline | reasons |",
              "|---|---|---|---|---|---|---|"]
    for t in totals_by_kind(reports):
        reasons = "; ".join(f"{count}x {reason}" for reason, count in t.reasons) or "-"
        lines.append(f"| {t.kind} | {t.phases} | {t.switches} | {t.requests} | {t.failed} | "
                     f"{_text(t.worst_p99_vs_baseline, 'x')} | {reasons} |")
    for r in reports:
        if not r.failed:
            continue
        blast = {BAD_RELEASE: " (the bad release's blast radius)", RACY_CONTROL: " (the negative control)"}.get(
            r.kind, "")
        lines += ["", f"failed requests in round {r.round}, {r.name}{blast}:"]
        lines += [f"  {count}x {reason}" for reason, count in r.reasons]
        lines += [f"  - {f.line()}" for f in r.failures[:SHOWN_FAILURES]]
    return lines


def _text(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:g}{unit}"
