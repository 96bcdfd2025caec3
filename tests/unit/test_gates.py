"""The gates' arithmetic on Prometheus samples: error ratio and p95 over a window, per host."""

import time

import pytest
from ingestctl.gates import MetricSnapshot, bench_command, judge_window, quantile, tls

SCRAPE = """\
# TYPE ingest_http_requests_total counter
ingest_http_requests_total{route="/api/v1/events",method="POST",status="202"} {ok}
ingest_http_requests_total{route="/api/v1/events",method="GET",status="500"} {err}
ingest_http_requests_total{route="/health/ready",method="GET",status="503"} 50.0
# TYPE ingest_http_request_duration_seconds histogram
ingest_http_request_duration_seconds_bucket{route="/api/v1/events",le="0.05"} {fast}
ingest_http_request_duration_seconds_bucket{route="/api/v1/events",le="0.5"} {slow}
ingest_http_request_duration_seconds_bucket{route="/api/v1/events",le="+Inf"} {total}
ingest_http_request_duration_seconds_count{route="/api/v1/events"} {total}
ingest_http_request_duration_seconds_sum{route="/api/v1/events"} 1.0
ingest_http_request_duration_seconds_bucket{route="/metrics",le="0.05"} 999.0
ingest_http_request_duration_seconds_bucket{route="/metrics",le="+Inf"} 999.0
"""


def scrape(ok, err, fast, slow, total):
    text = SCRAPE
    for name, value in dict(ok=ok, err=err, fast=fast, slow=slow, total=total).items():
        text = text.replace("{" + name + "}", f"{float(value)}")
    return MetricSnapshot.parse(text)


def test_parse_counts_5xx_as_errors_and_ignores_probe_routes():
    snap = scrape(90, 10, 80, 100, 100)
    assert snap.total == 100, "health and metrics routes must not count as traffic"
    assert snap.errors == 10
    assert dict(snap.buckets)[0.05] == 80, "the /metrics route's buckets must be left out"


def test_window_delta_subtracts_earlier_scrape():
    delta = scrape(190, 10, 170, 200, 200).minus(scrape(90, 10, 80, 100, 100))
    assert (delta.total, delta.errors) == (100, 0)
    assert dict(delta.buckets) == {0.05: 90, 0.5: 100, float("inf"): 100}


def test_restarted_process_counts_from_zero():
    later = scrape(5, 0, 5, 5, 5)
    assert later.minus(scrape(90, 10, 80, 100, 100)) == later


def test_quantile_interpolates_inside_bucket():
    # 100 observations: 50 under 0.1s, 100 under 0.2s -> p95 is 95% of the way... inside (0.1, 0.2]
    assert quantile([(0.1, 50), (0.2, 100), (float("inf"), 100)], 0.95) == pytest.approx(0.19)


def test_quantile_in_inf_bucket_returns_highest_finite_bound():
    assert quantile([(0.1, 10), (float("inf"), 100)], 0.95) == 0.1


def test_quantile_without_observations_is_none():
    assert quantile([(0.1, 0), (float("inf"), 0)], 0.95) is None


def test_judge_passes_within_thresholds():
    result = judge_window({"app2": scrape(99, 0, 99, 99, 99)}, max_error_ratio=0.01, max_p95_ms=100)
    assert result.passed, result.message
    assert result.numbers["app2"]["error_ratio"] == 0


def test_judge_fails_on_error_ratio_and_names_host_and_numbers():
    result = judge_window({"app3": scrape(90, 10, 100, 100, 100)}, max_error_ratio=0.01, max_p95_ms=1000)
    assert not result.passed
    assert "app3: error ratio 0.100 > 0.01" in result.message


def test_judge_fails_on_p95():
    result = judge_window({"db1": scrape(100, 0, 0, 100, 100)}, max_error_ratio=0.5, max_p95_ms=100)
    assert not result.passed
    assert "db1: p95" in result.message and "> 100" in result.message


def test_bench_command_passes_every_base_url():
    command = bench_command(["http://a:8000", "http://b:8000"], "scripts/benchmark_queries.py")
    assert command[1:] == ["scripts/benchmark_queries.py", "--json", "--base-url", "http://a:8000",
                           "--base-url", "http://b:8000"]


def _fake_bench(tmp_path, results, code):
    """A stand-in for scripts/benchmark_queries.py: prints its --json result line and exits with CODE."""
    import json

    script = tmp_path / "bench.py"
    script.write_text(f"import sys\nprint({json.dumps(json.dumps({'ok': code == 0, 'results': results}))})\n"
                      f"sys.exit({code})\n")
    return str(script)


def test_bench_gate_passes_and_reports_the_worst_numbers(tmp_path):
    from ingestctl.gates import bench_gate

    results = [{"name": "stats", "base_url": "http://a", "avg_ms": 12.5, "p95_ms": 40.0, "breaches": []},
               {"name": "page", "base_url": "http://b", "avg_ms": 30.0, "p95_ms": 90.0, "breaches": []}]
    gate = bench_gate(["http://a", "http://b"], _fake_bench(tmp_path, results, 0),
                      {"BENCH_FAIL_THRESHOLD_MS": "250", "BENCH_FAIL_P95_THRESHOLD_MS": "400"})
    assert gate.passed, gate.message
    assert "worst avg 30.0 ms (limit 250), worst p95 90.0 ms (limit 400)" in gate.message


def test_bench_gate_fails_on_nonzero_exit_and_names_the_breach(tmp_path):
    from ingestctl.gates import bench_gate

    results = [{"name": "page", "base_url": "http://b", "avg_ms": 300.0, "p95_ms": 90.0,
                "breaches": ["avg 300.0 ms > 250 ms"]}]
    gate = bench_gate(["http://b"], _fake_bench(tmp_path, results, 1),
                      {"BENCH_FAIL_THRESHOLD_MS": "250", "BENCH_FAIL_P95_THRESHOLD_MS": "400"})
    assert not gate.passed
    assert "page on http://b: avg 300.0 ms > 250 ms" in gate.message
    assert gate.numbers["worst_avg_ms"] == 300.0


class _Loopback:
    """A real HTTP server on loopback whose GET answers come from ANSWER(path) -> (status, body bytes)."""

    def __init__(self, answer):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                status, body = answer(self.path)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def _ReadyAfter(ready_after: int) -> _Loopback:  # noqa: N802 - reads as the server it builds
    """/health/ready answers 503 until its Nth request, then 200."""
    counter = {"n": 0}

    def answer(_path):
        counter["n"] += 1
        if counter["n"] >= ready_after:
            return 200, b'{"status": "ok"}'
        return 503, b'{"status": "unavailable"}'

    return _Loopback(answer)


def test_health_gate_waits_until_ready():
    from ingestctl.gates import health_gate

    server = _ReadyAfter(3)
    try:
        gate = health_gate({"app2": server.url}, timeout_s=10)
    finally:
        server.close()
    assert gate.passed, gate.message
    assert "app2" in gate.numbers["ready_after_s"]


def test_health_gate_fails_after_timeout_with_the_last_answer():
    from ingestctl.gates import health_gate

    server = _ReadyAfter(10**9)
    try:
        gate = health_gate({"app3": server.url}, timeout_s=1)
    finally:
        server.close()
    assert not gate.passed
    assert "app3: HTTP 503" in gate.message and "unavailable" in gate.message


def test_judge_fails_a_window_too_quiet_to_judge():
    from ingestctl.gates import ProbeTally

    result = judge_window({"app2": scrape(0, 0, 0, 0, 0)}, max_error_ratio=0.01, max_p95_ms=100, min_requests=10,
                          probes={"app2": ProbeTally(0, 0)})
    assert not result.passed and "app2: 0 requests in the window, fewer than the 10" in result.message


def test_judge_counts_probe_answers_that_are_not_2xx():
    from ingestctl.gates import ProbeTally

    # The service saw 20 requests and no 5xx; the gate's probe got 401 on 5 of its 20: a broken release all the same.
    result = judge_window({"app3": scrape(20, 0, 20, 20, 20)}, max_error_ratio=0.01, max_p95_ms=100, min_requests=10,
                          probes={"app3": ProbeTally(20, 5)})
    assert not result.passed and "app3: 5 of 20 probe requests did not answer 2xx" in result.message
    assert result.numbers["app3"]["probe_failures"] == 5


def _MetricsAndQueries(status: int) -> _Loopback:  # noqa: N802 - reads as the server it builds
    """/metrics counts the queries served so far; every query answers STATUS."""
    served = {"n": 0}

    def answer(path):
        if not path.startswith("/metrics"):
            served["n"] += 1
            return status, b"{}"
        n = str(float(served["n"]))
        text = SCRAPE
        for name, value in (("ok", n), ("err", "0.0"), ("fast", n), ("slow", n), ("total", n)):
            text = text.replace("{" + name + "}", value)
        return 200, text.encode()

    return _Loopback(answer)


@pytest.mark.parametrize("status,passes", [(200, True), (401, False)])
def test_metric_gate_probes_over_http_and_judges_their_answers(status, passes):
    from ingestctl.gates import metric_gate

    server = _MetricsAndQueries(status)
    try:
        # A window with room to spare for all 10 probes, however loaded the machine (0.5 s once fitted only 9).
        gate = metric_gate({"app2": server.url}, window_s=3.0, max_error_ratio=0.01, max_p95_ms=1000,
                           probe=lambda client, base: client.get(base + "/api/v1/events"), probe_requests=10,
                           min_requests=5)
    finally:
        server.close()
    assert gate.passed is passes, gate.message
    assert gate.numbers["app2"]["probes"] == 10


def test_the_ca_bundle_is_loaded_only_for_a_gate_that_speaks_https():
    import ssl

    assert tls(["http://10.0.0.2:8000", "http://10.0.0.3:8000"]) is False, "no TLS request, nothing to verify"
    context = tls(["http://10.0.0.2:8000", "https://app.example:443"])
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED


class _Answer:
    def __init__(self, ok: bool) -> None:
        self.is_success = ok


def _timed_probe(delays: dict[str, float], sent: dict[str, list[float]]):
    def probe(client, base: str):
        sent.setdefault(base, []).append(time.monotonic())
        time.sleep(delays.get(base, 0.0))
        return _Answer(True)

    return probe


def test_probes_are_paced_over_the_whole_window_not_sent_in_a_burst_at_its_start():
    from ingestctl.gates import probe_window

    sent: dict[str, list[float]] = {}
    started = time.monotonic()
    tallies = probe_window(None, {"app2": "a"}, window_s=1.0, probe=_timed_probe({}, sent), probe_requests=5)
    assert tallies["app2"].sent == 5
    # Due at 0, 0.2, 0.4, 0.6 and 0.8 s: the last one lands in the window's second half.
    assert sent["a"][-1] - started >= 0.75, [round(t - started, 3) for t in sent["a"]]
    assert time.monotonic() - started >= 1.0, "the window is watched to its end"


def test_a_slow_host_does_not_starve_the_other_hosts_of_their_probes():
    from ingestctl.gates import probe_window

    sent: dict[str, list[float]] = {}
    tallies = probe_window(None, {"slow": "s", "fast": "f"}, window_s=1.0,
                           probe=_timed_probe({"s": 0.4}, sent), probe_requests=5)
    assert tallies["fast"].sent == 5, tallies
    assert 1 <= tallies["slow"].sent <= 3, tallies
