"""Release gates: health, live metrics and benchmark thresholds.

Each gate returns a GateResult with the numbers it judged, so the output and the ledger can say exactly why a
release passed or was rolled back. The arithmetic on Prometheus samples is pure and unit-tested; only
`health_gate`, `metric_gate` and `bench_gate` talk to hosts, over HTTP on their app port.
"""

from __future__ import annotations

import functools
import json
import math
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

REQUESTS_TOTAL = "ingest_http_requests_total"
DURATION = "ingest_http_request_duration_seconds"
# Probes and scrapes would dilute the error ratio and p95 of real traffic.
IGNORED_ROUTES = frozenset({"/metrics", "/health/live", "/health/ready", "/version"})


@functools.cache
def _tls() -> ssl.SSLContext:
    """httpx's default TLS context, built once: a client built without it loads the CA bundle again, about 0.1 s
    per gate (several per deploy)."""
    return httpx.create_ssl_context()


def tls(urls: Iterable[str]) -> ssl.SSLContext | bool:
    """What a gate's client verifies TLS with for URLS: the default context when one of them is https, and
    nothing to load when none is (the gates mostly speak plain HTTP to the hosts; loading the CA bundle that no
    request would use costs a rollback 20-35 ms after its flip)."""
    return _tls() if any(url.startswith("https:") for url in urls) else False


@dataclass
class GateResult:
    name: str
    passed: bool
    message: str
    numbers: dict[str, Any] = field(default_factory=dict)
    # When the gate reached its verdict (epoch seconds): an incident's timeline and MTTD are read from it.
    at: float = field(default_factory=lambda: round(time.time(), 3))

    def as_dict(self) -> dict[str, Any]:
        return {"gate": self.name, "passed": self.passed, "message": self.message, "numbers": self.numbers,
                "at": self.at}


@dataclass(frozen=True)
class MetricSnapshot:
    """Cumulative request counts and latency buckets of one host, from one scrape of /metrics."""

    total: float
    errors: float
    buckets: tuple[tuple[float, float], ...]  # (upper bound in seconds, cumulative count), sorted

    @classmethod
    def parse(cls, text: str) -> MetricSnapshot:
        # Imported here: the parser costs every command's start 16 ms, and a rollback's health gate never scrapes.
        from prometheus_client.parser import text_string_to_metric_families

        total = errors = 0.0
        buckets: dict[float, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.labels.get("route") in IGNORED_ROUTES:
                    continue
                if sample.name == REQUESTS_TOTAL:
                    total += sample.value
                    if str(sample.labels.get("status", "")).startswith("5"):
                        errors += sample.value
                elif sample.name == f"{DURATION}_bucket":
                    bound = float(sample.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
        return cls(total, errors, tuple(sorted(buckets.items())))

    def minus(self, earlier: MetricSnapshot) -> MetricSnapshot:
        """What happened between two scrapes. A restarted process (counters went down) counts from zero."""
        if self.total < earlier.total:
            return self
        before = dict(earlier.buckets)
        return MetricSnapshot(
            self.total - earlier.total,
            self.errors - earlier.errors,
            tuple((bound, count - before.get(bound, 0.0)) for bound, count in self.buckets),
        )


def quantile(buckets: Iterable[tuple[float, float]], q: float) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding the q-th observation."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return ordered[-1][0]


@dataclass(frozen=True)
class ProbeTally:
    """The gate's own requests to one host: how many were sent and how many did not answer 2xx."""

    sent: int = 0
    failed: int = 0


def judge_window(
    deltas: Mapping[str, MetricSnapshot], max_error_ratio: float, max_p95_ms: float, min_requests: int = 0,
    probes: Mapping[str, ProbeTally] | None = None,
) -> GateResult:
    """Pass when every host served at least MIN_REQUESTS in the window (silence proves nothing), its error ratio
    and p95 are within thresholds, and the gate's own probes got 2xx answers (a 401 or a reset is a failure
    too, though the service's 5xx counter never sees it)."""
    numbers: dict[str, Any] = {}
    failures: list[str] = []
    for host, delta in deltas.items():
        ratio = (delta.errors / delta.total) if delta.total else 0.0
        p95 = quantile(delta.buckets, 0.95)
        p95_ms = None if p95 is None else round(p95 * 1000, 1)
        tally = (probes or {}).get(host, ProbeTally())
        numbers[host] = {"requests": int(delta.total), "error_ratio": round(ratio, 4), "p95_ms": p95_ms,
                         "probes": tally.sent, "probe_failures": tally.failed}
        if delta.total < min_requests:
            failures.append(f"{host}: {int(delta.total)} requests in the window, fewer than the {min_requests} "
                            "needed to judge it")
        if ratio > max_error_ratio:
            failures.append(f"{host}: error ratio {ratio:.3f} > {max_error_ratio}")
        if tally.sent and tally.failed / tally.sent > max_error_ratio:
            failures.append(f"{host}: {tally.failed} of {tally.sent} probe requests did not answer 2xx")
        if p95_ms is not None and p95_ms > max_p95_ms:
            failures.append(f"{host}: p95 {p95_ms} ms > {max_p95_ms} ms")
    numbers["thresholds"] = {"max_error_ratio": max_error_ratio, "max_p95_ms": max_p95_ms,
                             "min_requests": min_requests}
    if failures:
        return GateResult("metrics", False, "metric gate failed: " + "; ".join(failures), numbers)
    summary = ", ".join(
        f"{host} {n['requests']} req, err {n['error_ratio']}, p95 {n['p95_ms']} ms"
        for host, n in numbers.items()
        if host != "thresholds"
    )
    return GateResult("metrics", True, f"metric gate passed: {summary}", numbers)


def health_gate(
    urls: Mapping[str, str],
    timeout_s: float,
    on_wait: Callable[[str], None] | None = None,
    path: str = "/health/ready",
) -> GateResult:
    """Every host must answer 200 on /health/ready within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    started = time.monotonic()
    pending = dict(urls)
    ready_after: dict[str, float] = {}
    last: dict[str, str] = {}
    last_said = started
    with httpx.Client(timeout=2.0, verify=tls(urls.values())) as client:
        while pending and time.monotonic() < deadline:
            for host, base in list(pending.items()):
                try:
                    response = client.get(base + path)
                    last[host] = f"HTTP {response.status_code} {response.text[:200]}"
                    if response.status_code == 200:
                        ready_after[host] = round(time.monotonic() - started, 2)
                        del pending[host]
                except httpx.HTTPError as exc:
                    last[host] = f"{type(exc).__name__}: {exc}"
            if pending:
                # A line every 2 s at most: progress for a person watching, not a flood in CI logs.
                if on_wait and time.monotonic() - last_said >= 2.0:
                    waited = time.monotonic() - started
                    on_wait(f"health gate: waiting for {', '.join(sorted(pending))} to be ready "
                            f"({waited:.0f}s of {timeout_s:.0f}s)")
                    last_said = time.monotonic()
                time.sleep(0.25)
    numbers = {"ready_after_s": ready_after, "timeout_s": timeout_s}
    if pending:
        detail = "; ".join(f"{host}: {last.get(host, 'no answer')}" for host in sorted(pending))
        return GateResult("health", False, f"health gate failed after {timeout_s}s: {detail}", numbers)
    return GateResult("health", True, f"health gate passed: {len(urls)} host(s) ready", numbers)


def _scrape(client: httpx.Client, base: str) -> MetricSnapshot:
    response = client.get(base + "/metrics")
    response.raise_for_status()
    return MetricSnapshot.parse(response.text)


def probe_window(client: httpx.Client, urls: Mapping[str, str], window_s: float,
                 probe: Callable[[httpx.Client, str], httpx.Response] | None, probe_requests: int,
                 ) -> dict[str, ProbeTally]:
    """Watch the window, sending real requests to every host. Bounded in count and in time: the probe stops at
    the window's end or after probe_requests per host.

    The probes are paced evenly over the whole window, each host in its own thread: Prometheus counts a new
    release's requests by extrapolating its first scrape back to zero, which holds for a steady rate and not
    for a burst at the window's start. Threads keep one slow host from starving the others of their probes."""
    deadline = time.monotonic() + window_s
    if not probe:
        time.sleep(window_s)
        return {host: ProbeTally() for host in urls}
    with ThreadPoolExecutor(max_workers=len(urls) or 1, thread_name_prefix="probe") as pool:
        tallies = pool.map(lambda base: _probe_host(client, base, probe, deadline, window_s, probe_requests),
                           urls.values())
        return dict(zip(urls, tallies, strict=True))


def _probe_host(client: httpx.Client, base: str, probe: Callable[[httpx.Client, str], httpx.Response],
                deadline: float, window_s: float, probe_requests: int) -> ProbeTally:
    start = deadline - window_s
    sent = failed = 0
    while sent < probe_requests and time.monotonic() < deadline:
        try:
            ok = probe(client, base).is_success
        except httpx.HTTPError:
            ok = False
        sent += 1
        failed += 0 if ok else 1
        due = start + sent * window_s / probe_requests
        time.sleep(max(0.0, min(due, deadline) - time.monotonic()))
    time.sleep(max(0.0, deadline - time.monotonic()))
    return ProbeTally(sent, failed)


def metric_gate(
    urls: Mapping[str, str],
    window_s: float,
    max_error_ratio: float,
    max_p95_ms: float,
    probe: Callable[[httpx.Client, str], httpx.Response] | None = None,
    probe_requests: int = 20,
    min_requests: int = 0,
) -> GateResult:
    """Scrape /metrics, watch the window (sending a bounded probe of real requests), scrape again, judge."""
    with httpx.Client(timeout=5.0, verify=tls(urls.values())) as client:
        try:
            before = {host: _scrape(client, base) for host, base in urls.items()}
        except httpx.HTTPError as exc:
            return GateResult("metrics", False, f"metric gate failed: cannot scrape /metrics: {exc}")
        probes = probe_window(client, urls, window_s, probe, probe_requests)
        try:
            after = {host: _scrape(client, base) for host, base in urls.items()}
        except httpx.HTTPError as exc:
            return GateResult("metrics", False, f"metric gate failed: cannot scrape /metrics: {exc}")
    deltas = {host: after[host].minus(before[host]) for host in urls}
    return judge_window(deltas, max_error_ratio, max_p95_ms, min_requests, probes)


def bench_command(base_urls: Iterable[str], script: str) -> list[str]:
    """The runbook's benchmark script against every base URL, with machine-readable output."""
    command = [sys.executable, script, "--json"]
    for url in base_urls:
        command += ["--base-url", url]
    return command


def bench_gate(
    base_urls: Iterable[str], script: str, env: Mapping[str, str], timeout_s: float = 300
) -> GateResult:
    """Run scripts/benchmark_queries.py with the environment's profile and thresholds; non-zero exit fails."""
    command = bench_command(base_urls, script)
    try:
        completed = subprocess.run(command, env=dict(env), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return GateResult("benchmark", False, f"benchmark gate failed: no result within {timeout_s}s")
    numbers: dict[str, Any] = {
        "profile": env.get("BENCH_PROFILE"),
        "fail_threshold_ms": env.get("BENCH_FAIL_THRESHOLD_MS"),
        "fail_p95_threshold_ms": env.get("BENCH_FAIL_P95_THRESHOLD_MS"),
    }
    for line in reversed(completed.stdout.strip().splitlines()):
        try:
            numbers["result"] = json.loads(line)
            break
        except json.JSONDecodeError:
            continue
    results = (numbers.get("result") or {}).get("results") or []
    summary = ""
    if results:
        worst_avg = max(r.get("avg_ms") or 0 for r in results)
        worst_p95 = max(r.get("p95_ms") or 0 for r in results)
        numbers.update(worst_avg_ms=worst_avg, worst_p95_ms=worst_p95)
        summary = (f": worst avg {worst_avg} ms (limit {env.get('BENCH_FAIL_THRESHOLD_MS')}), worst p95 "
                   f"{worst_p95} ms (limit {env.get('BENCH_FAIL_P95_THRESHOLD_MS')}) over {len(results)} "
                   "endpoint x host")
        breaches = [f"{r.get('name')} on {r.get('base_url')}: {', '.join(map(str, r['breaches']))}"
                    for r in results if r.get("breaches")]
        if breaches:
            summary += "; breaches: " + "; ".join(breaches[:5])
    if completed.returncode != 0:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
        detail = summary or f": {' '.join(tail)}"
        return GateResult("benchmark", False, f"benchmark gate failed (exit {completed.returncode}){detail}", numbers)
    return GateResult("benchmark", True, f"benchmark gate passed{summary}", numbers)
