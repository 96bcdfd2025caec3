"""Prometheus metrics. The names are a contract: the deploy's metric gate parses them.

The request metrics carry the release (`version`, constant per process) so that Prometheus can judge a release
by itself over any window (`sum by (version)`), across restarts and switches, without joining ingest_build_info.
They carry the blue/green `slot` too: both slots may run the same release (a config change, the warm standby),
and a counter that moved between two processes would not be monotonic, so `increase()` would count the other
process's whole history as new requests when the proxy switches back to it.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

# `_created` series double the output and no gate reads them.
disable_created_metrics()

HTTP_REQUESTS = Counter(
    "ingest_http_requests_total", "HTTP requests answered, by route template, method, status and release.",
    ["route", "method", "status", "version", "slot"],
)
HTTP_DURATION = Histogram(
    "ingest_http_request_duration_seconds", "Time to answer an HTTP request, by route template and release.",
    ["route", "version", "slot"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0),
)
EVENTS_ACCEPTED = Counter("ingest_events_accepted", "Events newly stored.")
EVENTS_DUPLICATE = Counter("ingest_events_duplicate", "Events received again (same id) and not stored twice.")
DEGRADED = Gauge("ingest_degraded", "1 while Redis is unreachable and rate limiting runs in-process.")
RATE_LIMITED = Counter("ingest_rate_limited", "Requests refused with 429 by the rate limiter.")
BUILD_INFO = Gauge("ingest_build_info", "Always 1; labels carry the running release.", ["version"])
