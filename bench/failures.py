"""What a load's requests came to, as records and pure functions: why each failed request failed, the failures
grouped by reason, their times relative to the action and to the proxy switches, and latency percentiles.

No I/O here, so the zero-downtime bench's verdicts are unit-tested (tests/unit/test_bench_failures.py).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

# The status each request must get: anything else is a failed request.
EXPECTED_STATUS = {"POST": 202, "GET": 200}
# A switch's latency is measured this long either side of each `switched` event of the ingestctl --json stream.
SWITCH_WINDOW_S = 2.0


@dataclass(frozen=True)
class Sample:
    """One request, as the client saw it. REASON is None when it got its expected status."""

    at: float  # epoch seconds when the answer (or the transport error) came
    latency_s: float
    base: str  # the base URL it went to
    method: str
    client: str  # keepalive | idle-gaps | fresh (a new connection per request)
    request_id: str
    reason: str | None


def status_reason(method: str, status: int) -> str | None:
    """None when STATUS is what METHOD expects, else the failure's reason."""
    return None if status == EXPECTED_STATUS[method] else f"HTTP {status}"


def error_reason(exc: BaseException) -> str:
    """A transport error's reason: its class and the start of its message (the class alone hides which race)."""
    message = " ".join(str(exc).split())[:100]
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def host_of(base: str) -> str:
    return urlsplit(base).hostname or base


def failure_key(sample: Sample) -> str:
    """What failures are grouped by: the reason, the method, the host and the kind of client."""
    return f"{sample.reason} on {sample.method} {host_of(sample.base)} ({sample.client})"


def group_failures(samples: Iterable[Sample]) -> list[tuple[str, int]]:
    """The failed SAMPLES counted per failure_key, most frequent first (ties by key, so the order is stable)."""
    counts = Counter(failure_key(s) for s in samples if s.reason is not None)
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def nearest_offset(at: float, marks: Sequence[float]) -> float | None:
    """AT minus the nearest of MARKS (negative: before it), or None without marks."""
    if not marks:
        return None
    return min((at - mark for mark in marks), key=abs)


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile (0 < FRACTION <= 1) of VALUES; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def within(samples: Iterable[Sample], start: float, end: float) -> list[Sample]:
    return [s for s in samples if start <= s.at < end]


def near_marks(samples: Iterable[Sample], marks: Sequence[float], window_s: float = SWITCH_WINDOW_S) -> list[Sample]:
    """The SAMPLES answered within WINDOW_S of any of MARKS: the requests that met a switch."""
    return [s for s in samples if any(abs(s.at - mark) <= window_s for mark in marks)]


@dataclass(frozen=True)
class Window:
    """The requests answered between START and END, and how many of them failed."""

    start: float
    end: float
    requests: int
    failed: int

    @property
    def share(self) -> float:
        return self.failed / self.requests if self.requests else 0.0


def cut(samples: Sequence[Sample], took_traffic: float, healthy: float) -> Window:
    """The window from a bad release taking traffic to the fleet healthy, widened to every failed request."""
    failures = sorted(s.at for s in samples if s.reason is not None)
    start = min([took_traffic, *failures[:1]])
    end = max([healthy, *failures[-1:]])
    inside = [s for s in samples if start <= s.at <= end]
    return Window(start, end, len(inside), sum(s.reason is not None for s in inside))


@dataclass(frozen=True)
class FailureRecord:
    """A failed request placed in its phase: seconds since the phase's action began and from the nearest switch."""

    phase: str
    reason: str
    method: str
    host: str
    client: str
    request_id: str
    since_action_s: float
    from_switch_s: float | None

    def line(self) -> str:
        switch = "" if self.from_switch_s is None else f", {self.from_switch_s:+.2f}s from the nearest switch"
        return (f"{self.phase}: {self.reason} on {self.method} {self.host} ({self.client}, request "
                f"{self.request_id}) at {self.since_action_s:+.2f}s into the action{switch}")


def failure_records(phase: str, samples: Iterable[Sample], action_start: float,
                    switches: Sequence[float]) -> list[FailureRecord]:
    return [
        FailureRecord(phase, s.reason, s.method, host_of(s.base), s.client, s.request_id,
                      round(s.at - action_start, 3), _rounded(nearest_offset(s.at, switches)))
        for s in samples if s.reason is not None
    ]


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)
