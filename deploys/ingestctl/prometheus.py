"""Prometheus' HTTP API (instant queries) and the PromQL the metric gate and the SLOs ask it.

The builders are pure strings, unit-tested; `Prometheus.query` is the only part that talks to a server. Every
expression reads the service's own metrics (`service/ingest/metrics.py`), whose request series carry the
release as a `version` label, so a release is judged by itself over any window, across restarts and switches.
Probe and scrape routes are left out, as the scraping gate leaves them out (`gates.IGNORED_ROUTES`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import httpx

from ingestctl.errors import IngestctlError
from ingestctl.gates import DURATION, IGNORED_ROUTES, REQUESTS_TOTAL

DURATION_RULE = re.compile(r"^([1-9][0-9]{0,5})([smhdw])$")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class PrometheusError(IngestctlError):
    """Prometheus did not answer, or answered something other than a query result (exit 2)."""

    exit_code = 2


def duration_seconds(text: str) -> int:
    """`30d` -> 2592000. One PromQL unit (s, m, h, d, w), as the inventory's SLO windows are written."""
    match = DURATION_RULE.match(text)
    if not match:
        raise ValueError(f"expected a duration such as 30s, 10m, 1h or 30d, found {text!r}")
    return int(match.group(1)) * UNIT_SECONDS[match.group(2)]


def range_for(seconds: float) -> str:
    """A PromQL range covering SECONDS, rounded up to whole seconds (at least 1s)."""
    return f"{max(1, math.ceil(seconds))}s"


def _string(value: str) -> str:
    # PromQL string literals take Go's escapes; JSON's are the same for the characters a version can hold.
    return json.dumps(value)


def selector(version: str | None = None, errors: bool = False, le: str | None = None) -> str:
    """Label matchers for real traffic: no probe or scrape routes; one release; only 5xx when ERRORS; one
    histogram bucket when LE."""
    routes = "|".join(re.escape(route) for route in sorted(IGNORED_ROUTES))
    matchers = [f"route!~{_string(routes)}"]
    if version is not None:
        matchers.append(f"version={_string(version)}")
    if errors:
        matchers.append('status=~"5.."')
    if le is not None:
        matchers.append(f"le={_string(le)}")
    return "{" + ",".join(matchers) + "}"


def _by(labels: tuple[str, ...]) -> str:
    return f" by ({', '.join(labels)})" if labels else ""


def requests_query(window: str, version: str | None = None, by: tuple[str, ...] = ()) -> str:
    """Requests answered in the window."""
    return f"sum{_by(by)} (increase({REQUESTS_TOTAL}{selector(version)}[{window}]))"


def error_ratio_query(window: str, version: str | None = None, by: tuple[str, ...] = ()) -> str:
    """5xx answers over all answers in the window. `or ... * 0`: a window without any 5xx series is 0, not
    empty (a division by a missing numerator would drop the result)."""
    total = requests_query(window, version, by)
    errors = f"sum{_by(by)} (increase({REQUESTS_TOTAL}{selector(version, errors=True)}[{window}]))"
    return f"({errors} or {total} * 0) / {total}"


def quantile_query(q: float, window: str, version: str | None = None, by: tuple[str, ...] = ()) -> str:
    """The Q quantile of request latency in seconds, from the histogram's buckets over the window."""
    return (f"histogram_quantile({q:g}, sum by ({', '.join((*by, 'le'))}) "
            f"(increase({DURATION}_bucket{selector(version)}[{window}])))")


def slower_ratio_query(bound_le: str, window: str) -> str:
    """The share of requests slower than the bucket bound BOUND_LE (its `le` label, e.g. "0.25")."""
    faster = f"sum (increase({DURATION}_bucket{selector(le=bound_le)}[{window}]))"
    total = f"sum (increase({DURATION}_bucket{selector(le='+Inf')}[{window}]))"
    return f"1 - {faster} / {total}"


def freshest_scrape_query(version: str) -> str:
    """When the least recently scraped target running VERSION was last scraped (Unix seconds)."""
    return f"min(timestamp(ingest_build_info{{version={_string(version)}}}))"


@dataclass(frozen=True)
class Sample:
    labels: dict[str, str]
    value: float | None  # None for NaN (e.g. a ratio over a window without requests)


def parse_vector(payload: object, query: str) -> list[Sample]:
    """The samples of an instant query's JSON answer (`resultType` vector or scalar). Untrusted: checked."""
    if not isinstance(payload, dict) or payload.get("status") != "success":
        error = payload.get("error") if isinstance(payload, dict) else None
        raise PrometheusError(f"query {query!r}: expected status success, found {str(error or payload)[:300]}")
    data = payload.get("data")
    if not isinstance(data, dict) or data.get("resultType") not in ("vector", "scalar"):
        raise PrometheusError(f"query {query!r}: expected a vector or scalar result, found {str(data)[:300]}")
    result = data.get("result")
    if data["resultType"] == "scalar":
        result = [{"metric": {}, "value": result}]
    if not isinstance(result, list):
        raise PrometheusError(f"query {query!r}: expected a list of samples, found {str(result)[:300]}")
    samples = []
    for item in result:
        try:
            labels = {str(k): str(v) for k, v in item["metric"].items()}
            value = float(item["value"][1])
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise PrometheusError(f"query {query!r}: a sample is not [time, value]: {str(item)[:200]}") from exc
        samples.append(Sample(labels, None if math.isnan(value) else value))
    return samples


class Prometheus:
    """Instant queries against one server's HTTP API (`GET /api/v1/query`)."""

    def __init__(self, url: str, timeout_s: float = 5.0, transport: httpx.BaseTransport | None = None):
        self.url = url.rstrip("/")
        self.client = httpx.Client(timeout=timeout_s, transport=transport)

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.client.close()

    def query(self, promql: str, at: float | None = None) -> list[Sample]:
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        try:
            response = self.client.get(f"{self.url}/api/v1/query", params=params)
        except httpx.HTTPError as exc:
            raise PrometheusError(f"Prometheus at {self.url} does not answer: {type(exc).__name__}: {exc}; "
                                  "check prometheus_url in the inventory and that the server runs") from exc
        try:
            payload = response.json()
        except ValueError:
            raise PrometheusError(f"Prometheus at {self.url} answered HTTP {response.status_code} without JSON: "
                                  f"{response.text[:200]!r}; is prometheus_url a Prometheus server?") from None
        return parse_vector(payload, promql)

    def scalar(self, promql: str, at: float | None = None) -> float | None:
        """The single value of PROMQL, None when the result is empty or NaN."""
        samples = self.query(promql, at)
        if len(samples) > 1:
            raise PrometheusError(f"query {promql!r}: expected one sample, found {len(samples)}")
        return samples[0].value if samples else None
