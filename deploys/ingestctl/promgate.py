"""The metric gate when the inventory names a `prometheus_url`: the same window of real probe requests, judged
by PromQL over the release's own series (error ratio, p95, requests) instead of two scrapes of each host.

`judge_release` is pure and unit-tested; `prometheus_metric_gate` sends the probes and asks Prometheus.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from ingestctl import prometheus as promql
from ingestctl.gates import GateResult, ProbeTally, probe_window, tls
from ingestctl.prometheus import Prometheus, PrometheusError


@dataclass(frozen=True)
class ReleaseWindow:
    """What Prometheus says the release did in the window."""

    version: str
    requests: float
    error_ratio: float | None
    p95_s: float | None
    queries: dict[str, str]


def judge_release(window: ReleaseWindow, hosts: int, max_error_ratio: float, max_p95_ms: float,
                  min_requests: int, probes: Mapping[str, ProbeTally]) -> GateResult:
    """Pass when the release served at least MIN_REQUESTS per gated host (silence proves nothing), its error
    ratio and p95 are within thresholds, and the gate's own probes got 2xx answers on every host."""
    ratio = window.error_ratio or 0.0
    p95_ms = None if window.p95_s is None else round(window.p95_s * 1000, 1)
    needed = min_requests * hosts
    failures: list[str] = []
    if window.requests < needed:
        failures.append(f"release {window.version}: {window.requests:.0f} requests in the window, fewer than the "
                        f"{needed} needed to judge it ({min_requests} per host)")
    if ratio > max_error_ratio:
        failures.append(f"release {window.version}: error ratio {ratio:.3f} > {max_error_ratio}")
    if p95_ms is not None and p95_ms > max_p95_ms:
        failures.append(f"release {window.version}: p95 {p95_ms} ms > {max_p95_ms} ms")
    for host, tally in probes.items():
        if tally.sent and tally.failed / tally.sent > max_error_ratio:
            failures.append(f"{host}: {tally.failed} of {tally.sent} probe requests did not answer 2xx")
    # The scraping gate's shape (a scope per judged thing, then thresholds), so the ledger and the tools that
    # read `*.error_ratio` / `*.p95_ms` see the release judged the same way.
    numbers: dict[str, Any] = {
        "source": "prometheus",
        "release": {"version": window.version, "requests": round(window.requests), "error_ratio": round(ratio, 4),
                    "p95_ms": p95_ms},
        **{host: {"probes": t.sent, "probe_failures": t.failed} for host, t in probes.items()},
        "thresholds": {"max_error_ratio": max_error_ratio, "max_p95_ms": max_p95_ms, "min_requests": min_requests},
        # `*_query`: the ledger flattens numbers, and `*.error_ratio` / `*.p95_ms` keys must stay numbers.
        "queries": {f"{name}_query": query for name, query in window.queries.items()},
    }
    ran = f" [PromQL: error ratio `{window.queries['error_ratio']}`; p95 `{window.queries['p95']}`]"
    if failures:
        return GateResult("metrics", False, "metric gate failed: " + "; ".join(failures) + ran, numbers)
    summary = (f"release {window.version} {round(window.requests)} req, err {round(ratio, 4)}, "
               f"p95 {p95_ms} ms on {hosts} host(s)")
    return GateResult("metrics", True, f"metric gate passed: {summary}{ran}", numbers)


def read_window(prom: Prometheus, version: str, seconds: float) -> ReleaseWindow:
    window = promql.range_for(seconds)
    queries = {
        "requests": promql.requests_query(window, version),
        "error_ratio": promql.error_ratio_query(window, version),
        "p95": promql.quantile_query(0.95, window, version),
    }
    return ReleaseWindow(version, prom.scalar(queries["requests"]) or 0.0, prom.scalar(queries["error_ratio"]),
                         prom.scalar(queries["p95"]), queries)


def wait_for_scrape(prom: Prometheus, version: str, after: float, timeout_s: float) -> None:
    """Until every target running VERSION was scraped after AFTER, so the window's last requests are counted."""
    deadline = time.monotonic() + timeout_s
    query = promql.freshest_scrape_query(version)
    while True:
        scraped = prom.scalar(query)
        if scraped is not None and scraped >= after:
            return
        if time.monotonic() >= deadline:
            seen = "never" if scraped is None else f"last at {scraped:.1f}, window ended at {after:.1f}"
            raise PrometheusError(f"Prometheus at {prom.url} has not scraped release {version} after the window "
                                  f"within {timeout_s:g}s ({seen}); does it scrape every app host's /metrics?")
        time.sleep(0.1)


def prometheus_metric_gate(
    prometheus_url: str,
    version: str,
    urls: Mapping[str, str],
    window_s: float,
    max_error_ratio: float,
    max_p95_ms: float,
    probe: Callable[[httpx.Client, str], httpx.Response] | None = None,
    probe_requests: int = 20,
    min_requests: int = 0,
    scrape_timeout_s: float = 15.0,
) -> GateResult:
    """Probe the window, wait for Prometheus to have scraped its end, then judge the release by PromQL."""
    started = time.time()
    with httpx.Client(timeout=5.0, verify=tls(urls.values())) as client:
        probes = probe_window(client, urls, window_s, probe, probe_requests)
    ended = time.time()
    try:
        with Prometheus(prometheus_url) as prom:
            wait_for_scrape(prom, version, ended, scrape_timeout_s)
            window = read_window(prom, version, time.time() - started)
    except PrometheusError as exc:
        return GateResult("metrics", False, f"metric gate failed: {exc}",
                          {"source": "prometheus", "release": version})
    return judge_release(window, len(urls), max_error_ratio, max_p95_ms, min_requests, probes)
