"""The SLOs an inventory declares (data key `slos`), validated where the inventory is loaded.

    "slos": {
        "availability": {"target": 0.999, "window": "30d", "burn_window": "1h"},
        "latency": {"p95_ms": 250, "window": "30d"},
    }

Availability: the share of real requests (probes and scrapes left out) that did not answer 5xx. Latency: 95% of
requests within `p95_ms`, which must be a bound of the service's latency histogram so that the share of slower
requests is read exactly from one bucket, not guessed between two.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from ingestctl.prometheus import duration_seconds

# service/ingest/metrics.py HTTP_DURATION buckets, in ms (a unit test keeps the two equal).
LATENCY_BOUNDS_MS = (5, 10, 25, 50, 75, 100, 150, 250, 400, 500, 750, 1000, 2500, 5000, 10000)


def _duration(text: str) -> str:
    duration_seconds(text)
    return text


def _no_bool(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("expected a number, not True/False")  # noqa: TRY004 - pydantic's error type
    return value


Duration = Annotated[str, AfterValidator(_duration)]
Fraction = Annotated[float, BeforeValidator(_no_bool), Field(gt=0, lt=1)]


def _latency_bound(value: float) -> float:
    if value not in LATENCY_BOUNDS_MS:
        raise ValueError(f"expected one of the latency histogram's bounds in ms: "
                         f"{', '.join(map(str, LATENCY_BOUNDS_MS))}, found {value:g}")
    return value


class AvailabilitySLO(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target: Fraction
    window: Duration = "30d"
    # The burn rate is read over this shorter window: how fast the budget goes now, not on average.
    burn_window: Duration = "1h"

    @property
    def allowed_error_ratio(self) -> float:
        return 1 - self.target


class LatencySLO(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    p95_ms: Annotated[float, BeforeValidator(_no_bool), AfterValidator(_latency_bound)]
    window: Duration = "30d"
    burn_window: Duration = "1h"

    # p95: 5% of requests may be slower than the bound.
    allowed_slow_ratio: ClassVar[float] = 0.05

    @property
    def bound_le(self) -> str:
        """The histogram bucket's `le` label for the bound, as prometheus_client writes it (0.25, 1.0, 10.0)."""
        seconds = self.p95_ms / 1000
        return repr(float(seconds))


class SLOs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    availability: AvailabilitySLO | None = None
    latency: LatencySLO | None = None
