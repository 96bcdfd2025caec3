"""PromQL builders, the Prometheus HTTP client against a real server on loopback, the SLOs' budget and burn
arithmetic, the deploy's budget decision and the Prometheus-judged metric gate."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from ingestctl import prometheus as promql
from ingestctl import slo
from ingestctl.errors import ConfigError
from ingestctl.gates import ProbeTally
from ingestctl.inventory import environment
from ingestctl.ledger import LedgerEntry, _outcome_text
from ingestctl.output import Reporter
from ingestctl.prometheus import Prometheus, PrometheusError
from ingestctl.promgate import ReleaseWindow, judge_release, read_window
from ingestctl.slospec import LATENCY_BOUNDS_MS, SLOs
from ingestctl.testbed import prometheus as tb_prometheus
from ingestctl.testbed.state import HostState

IGNORED = 'route!~"/health/live|/health/ready|/metrics|/version"'


# ----- PromQL builders ------------------------------------------------------------------------------------------

def test_requests_and_error_ratio_queries_select_one_release_and_leave_probes_out():
    assert promql.requests_query("7s", "v1.2") == (
        f'sum (increase(ingest_http_requests_total{{{IGNORED},version="v1.2"}}[7s]))')
    ratio = promql.error_ratio_query("30d", by=("version",))
    total = f"sum by (version) (increase(ingest_http_requests_total{{{IGNORED}}}[30d]))"
    errors = f'sum by (version) (increase(ingest_http_requests_total{{{IGNORED},status=~"5.."}}[30d]))'
    assert ratio == f"({errors} or {total} * 0) / {total}"


def test_quantile_and_slower_ratio_queries_read_the_histogram():
    assert promql.quantile_query(0.95, "5s", "v1") == (
        f'histogram_quantile(0.95, sum by (le) (increase(ingest_http_request_duration_seconds_bucket'
        f'{{{IGNORED},version="v1"}}[5s])))')
    assert promql.quantile_query(0.5, "1h", by=("version",)).startswith("histogram_quantile(0.5, sum by (version, le)")
    assert promql.slower_ratio_query("0.25", "1h") == (
        f'1 - sum (increase(ingest_http_request_duration_seconds_bucket{{{IGNORED},le="0.25"}}[1h])) / '
        f'sum (increase(ingest_http_request_duration_seconds_bucket{{{IGNORED},le="+Inf"}}[1h]))')


def test_a_version_cannot_break_out_of_its_label_string():
    query = promql.requests_query("5s", 'v"}) or vector(1) #')
    assert 'version="v\\"}) or vector(1) #"' in query


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("10m", 600), ("1h", 3600), ("30d", 2592000),
                                               ("2w", 1209600)])
def test_durations(text, seconds):
    assert promql.duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "1.5h", "10", "1y", "h", "-1m", "1h30m"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError, match="expected a duration such as"):
        promql.duration_seconds(text)


def test_range_rounds_up_to_whole_seconds():
    assert [promql.range_for(s) for s in (0.2, 5.0, 5.01, 12.7)] == ["1s", "5s", "6s", "13s"]


# ----- the HTTP client, against a real server on loopback ---------------------------------------------------------

class FakePrometheus:
    """A real HTTP server on 127.0.0.1 answering /api/v1/query in Prometheus' JSON shape. ANSWERS maps a
    substring of the query to the value (None: an empty vector), the first matching key winning; every query
    it received is kept."""

    def __init__(self, answers: dict[str, float | None], raw: bytes | None = None):
        self.answers = answers
        self.raw = raw
        self.queries: list[dict[str, list[str]]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                url = urlparse(self.path)
                params = parse_qs(url.query)
                owner.queries.append(params)
                if owner.raw is not None:
                    body = owner.raw
                elif url.path != "/api/v1/query":
                    self.send_response(404)
                    self.end_headers()
                    return
                else:
                    body = json.dumps(owner.answer(params["query"][0])).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, query: str) -> dict:
        matches = [key for key in self.answers if key in query]
        if not matches:
            return {"status": "error", "errorType": "bad_data", "error": f"no answer for {query}"}
        value = self.answers[matches[0]]
        result = [] if value is None else [{"metric": {}, "value": [1700000000.0, repr(float(value))]}]
        return {"status": "success", "data": {"resultType": "vector", "result": result}}

    def __enter__(self) -> FakePrometheus:
        self.thread.start()
        return self

    def __exit__(self, *_exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake() -> Iterator[type[FakePrometheus]]:
    yield FakePrometheus


def test_client_sends_the_query_and_reads_a_vector(fake):
    with fake({"up": 3.0}) as server, Prometheus(server.url) as prom:
        assert prom.scalar("sum(up)", at=1700000000.5) == 3.0
    assert server.queries == [{"query": ["sum(up)"], "time": ["1700000000.500"]}]


def test_client_reads_nan_as_none_and_empty_as_none(fake):
    with fake({"nan": float("nan"), "empty": None}) as server, Prometheus(server.url) as prom:
        assert prom.scalar("nan") is None
        assert prom.scalar("empty") is None


def test_client_reports_a_query_error_with_the_query(fake):
    with fake({}) as server, Prometheus(server.url) as prom, pytest.raises(PrometheusError) as caught:
        prom.query("rate(x[5m])")
    assert "rate(x[5m])" in str(caught.value) and "no answer for" in str(caught.value)


def test_client_names_the_url_when_nothing_answers():
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with Prometheus(url, timeout_s=2) as prom, pytest.raises(PrometheusError) as caught:
        prom.query("up")
    assert f"Prometheus at {url} does not answer" in str(caught.value)
    assert "prometheus_url" in str(caught.value)


def test_client_refuses_an_answer_that_is_not_json(fake):
    with fake({}, raw=b"<html>grafana</html>") as server, Prometheus(server.url) as prom:
        with pytest.raises(PrometheusError, match="without JSON"):
            prom.query("up")


@pytest.mark.parametrize("payload", [
    {"status": "success", "data": {"resultType": "matrix", "result": []}},
    {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": ["x"]}]}},
    {"status": "success", "data": {"resultType": "vector", "result": "nope"}},
    ["not", "an", "object"],
])
def test_untrusted_answers_of_the_wrong_shape_are_refused(payload):
    with pytest.raises(PrometheusError):
        promql.parse_vector(payload, "q")


# ----- budget and burn arithmetic ------------------------------------------------------------------------------

def test_budget_spent_and_burning():
    budget = slo.Budget(allowed_ratio=0.01, bad_ratio=0.0025, burn_bad_ratio=0.03)
    assert budget.remaining == pytest.approx(0.75)
    assert budget.burn_rate == pytest.approx(3.0)
    assert not budget.exhausted


def test_budget_exhausted_at_and_past_the_allowed_ratio():
    assert slo.Budget(0.01, 0.01, None).exhausted
    over = slo.Budget(0.001, 0.004, 0.0)
    assert over.remaining == pytest.approx(-3.0) and over.exhausted and over.burn_rate == 0.0


def test_a_window_without_requests_spends_nothing():
    budget = slo.Budget(0.05, None, None)
    assert (budget.remaining, budget.burn_rate, budget.exhausted) == (1.0, 0.0, False)


def status(name="availability", bad=0.0, allowed=0.01) -> slo.SLOStatus:
    return slo.SLOStatus(name, "99% over 1h", 1 - bad, 100, slo.Budget(allowed, bad, bad), "1h", "5m", {})


def test_deploy_is_refused_while_the_availability_budget_is_exhausted():
    decision = slo.deploy_decision([status(bad=0.2)], "refuse", emergency=False)
    assert not decision.allowed
    assert "availability error budget exhausted" in decision.message and "--emergency" in decision.message


def test_emergency_goes_ahead_and_says_so():
    decision = slo.deploy_decision([status(bad=0.2)], "refuse", emergency=True)
    assert decision.allowed and decision.emergency and "EMERGENCY" in decision.message


def test_report_policy_and_a_healthy_budget_go_ahead():
    assert slo.deploy_decision([status(bad=0.2)], "report", emergency=False).allowed
    healthy = slo.deploy_decision([status(bad=0.001)], "refuse", emergency=False)
    assert healthy.allowed and not healthy.emergency


def test_an_exhausted_latency_budget_does_not_block_a_deploy():
    assert slo.deploy_decision([status("latency", bad=0.5, allowed=0.05)], "refuse", emergency=False).allowed


# ----- SLOs declared in the inventory, read from Prometheus ------------------------------------------------------

HOSTS = {"db1": {"ssh_hostname": "10.0.0.1", "roles": ["db", "app"]}}


def env_with(**data):
    return environment(name="t", data=data, hosts=HOSTS, source="inventories/t.py")


def test_slos_need_a_prometheus_url_and_valid_values():
    with pytest.raises(ConfigError, match="expected prometheus_url beside slos"):
        env_with(slos={"availability": {"target": 0.99}})
    with pytest.raises(ConfigError) as caught:
        env_with(prometheus_url="http://p:9090", slos={"availability": {"target": 1, "window": "1y"},
                                                       "latency": {"p95_ms": 300}})
    text = str(caught.value)
    assert "data.slos.availability.target: expected a value < 1" in text
    assert "data.slos.availability.window: expected a duration such as" in text
    assert "data.slos.latency.p95_ms: expected one of the latency histogram's bounds in ms" in text


def test_latency_bounds_are_the_service_histograms_and_their_le_labels_match():
    from ingest.metrics import HTTP_DURATION
    from prometheus_client.utils import floatToGoString

    buckets = [b for b in HTTP_DURATION._upper_bounds if b != float("inf")]
    assert [b * 1000 for b in buckets] == pytest.approx(LATENCY_BOUNDS_MS)
    for bound in LATENCY_BOUNDS_MS:
        spec = SLOs(latency={"p95_ms": bound}).latency
        assert spec.bound_le == floatToGoString(bound / 1000)


def test_evaluate_reads_value_budget_and_burn_from_prometheus(fake):
    slos = SLOs(availability={"target": 0.99, "window": "1h", "burn_window": "5m"},
                latency={"p95_ms": 250, "window": "1h", "burn_window": "5m"})
    answers = {"[1h])) or": 0.004, "[5m])) or": 0.02, "histogram_quantile(0.95": 0.180,
               'le="0.25"}[1h]': 0.10, 'le="0.25"}[5m]': 0.01, "sum (increase(ingest_http_requests_total": 500}
    with fake(answers) as server, Prometheus(server.url) as prom:
        availability, latency = slo.evaluate(prom, slos)
    assert availability.value == pytest.approx(0.996) and availability.requests == 500
    assert availability.budget.remaining == pytest.approx(0.6)
    assert availability.budget.burn_rate == pytest.approx(2.0)
    assert latency.value == 180.0 and latency.value_text == "p95 180 ms"
    assert latency.budget.remaining == pytest.approx(-1.0) and latency.budget.exhausted
    assert latency.budget.burn_rate == pytest.approx(0.2)
    assert latency.as_dict()["queries"]["p95"].startswith("histogram_quantile(0.95")


def test_slo_command_needs_a_prometheus_url_and_slos():
    with pytest.raises(ConfigError, match="data.prometheus_url is not set"):
        slo.read_statuses(env_with())
    with pytest.raises(ConfigError, match="data.slos is not set"):
        slo.read_statuses(env_with(prometheus_url="http://127.0.0.1:9"))


def test_check_before_deploy_refuses_goes_ahead_in_an_emergency_and_fails_closed(fake, capsys):
    data = {"slos": {"availability": {"target": 0.99, "window": "1h"}}}
    reporter = Reporter(json_mode=True)
    with fake({" or ": 0.5, "sum (increase": 40}) as server:
        env = env_with(prometheus_url=server.url, **data)
        with pytest.raises(ConfigError, match="deploy refused: availability error budget exhausted"):
            slo.check_before_deploy(env, reporter, emergency=False)
        assert slo.check_before_deploy(env, reporter, emergency=True) is True
        report = env_with(prometheus_url=server.url, error_budget_policy="report", **data)
        assert slo.check_before_deploy(report, reporter, emergency=False) is False
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[0]["emergency"] is True and "EMERGENCY" in events[0]["message"]
    gone = env_with(prometheus_url="http://127.0.0.1:9", **data)
    with pytest.raises(ConfigError, match="cannot read the error budget: Prometheus at http://127.0.0.1:9"):
        slo.check_before_deploy(gone, reporter, emergency=False)
    assert slo.check_before_deploy(env_with(), reporter, emergency=False) is False  # no SLOs: nothing to check


def test_emergency_is_recorded_and_shown_in_history():
    entry = LedgerEntry(id="20260101T000000Z-abcdef", kind="deploy", env="t", who="a@b",
                        started="2026-01-01T00:00:00Z", outcome="success", emergency=True)
    again = LedgerEntry.model_validate_json(entry.model_dump_json())
    assert again.emergency is True
    assert _outcome_text(again) == "success (emergency)"
    assert LedgerEntry.model_validate({**json.loads(entry.model_dump_json()), "emergency": False}).emergency is False


# ----- the metric gate judged by Prometheus ------------------------------------------------------------------------

def window(requests=40.0, ratio=0.0, p95=0.05) -> ReleaseWindow:
    return ReleaseWindow("v2", requests, ratio, p95, {"requests": "R", "error_ratio": "E", "p95": "P"})


def test_release_gate_passes_and_reports_its_queries():
    result = judge_release(window(), hosts=2, max_error_ratio=0.01, max_p95_ms=500, min_requests=10,
                           probes={"app2": ProbeTally(20, 0), "app3": ProbeTally(20, 0)})
    assert result.passed, result.message
    assert "release v2 40 req, err 0.0, p95 50.0 ms on 2 host(s)" in result.message
    assert "PromQL: error ratio `E`; p95 `P`" in result.message
    assert result.numbers["queries"] == {"requests_query": "R", "error_ratio_query": "E", "p95_query": "P"}
    assert result.numbers["source"] == "prometheus"
    assert result.numbers["release"] == {"version": "v2", "requests": 40, "error_ratio": 0.0, "p95_ms": 50.0}
    assert result.numbers["app2"] == {"probes": 20, "probe_failures": 0}


@pytest.mark.parametrize(("kwargs", "probes", "expected"), [
    ({"requests": 19}, {}, "19 requests in the window, fewer than the 20 needed to judge it (10 per host)"),
    ({"ratio": 0.2}, {}, "error ratio 0.200 > 0.01"),
    ({"p95": 0.8}, {}, "p95 800.0 ms > 500 ms"),
    ({}, {"app2": ProbeTally(20, 3)}, "app2: 3 of 20 probe requests did not answer 2xx"),
])
def test_release_gate_fails_on_each_rule(kwargs, probes, expected):
    result = judge_release(window(**kwargs), hosts=2, max_error_ratio=0.01, max_p95_ms=500, min_requests=10,
                           probes=probes)
    assert not result.passed
    assert expected in result.message


def test_read_window_asks_for_the_release_over_the_window(fake):
    with fake({" or ": 0.0, "histogram_quantile": 0.012, "sum (increase": 37}) as server, \
            Prometheus(server.url) as prom:
        read = read_window(prom, "v9", 6.2)
    assert (read.requests, read.error_ratio, read.p95_s) == (37, 0.0, 0.012)
    asked = [q["query"][0] for q in server.queries]
    assert all('version="v9"' in q and "[7s]" in q for q in asked) and len(asked) == 3


# ----- the sandbox's Prometheus ---------------------------------------------------------------------------------

def test_sandbox_prometheus_scrapes_every_app_host_through_its_proxy_twice_a_second():
    hosts = [HostState("db1", "172.30.0.2", 22, ["db", "app"]), HostState("app2", "172.30.0.3", 22, ["app"])]
    config = json.loads(tb_prometheus.config_text(hosts))
    assert config["global"] == {"scrape_interval": "500ms", "scrape_timeout": "500ms"}
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"] == [{"targets": ["172.30.0.2:8000"], "labels": {"host": "db1"}},
                                     {"targets": ["172.30.0.3:8000"], "labels": {"host": "app2"}}]
    kwargs = tb_prometheus.container_kwargs("tb", "ingest-prometheus:2", "CONFIG")
    assert kwargs["network"] == "tb-net" and kwargs["name"] == "tb-prometheus"
    assert kwargs["labels"]["io.ingest.testbed"] == "tb"  # `testbed down` removes it with the hosts
    assert kwargs["environment"] == {"PROMETHEUS_CONFIG": "CONFIG"}


class _Container:
    def __init__(self, env: str, image: str = "ingest-prometheus:2", status: str = "running") -> None:
        self.status = status
        self.attrs = {"Config": {"Env": [f"PROMETHEUS_CONFIG={env}"], "Image": image},
                      "NetworkSettings": {"Networks": {"tb-net": {"IPAddress": "172.30.0.9"}}}}


class _Containers:
    def __init__(self, container: _Container) -> None:
        self.container = container

    def get(self, name: str) -> _Container:
        assert name == "tb-prometheus"
        return self.container


class _Client:
    def __init__(self, container: _Container) -> None:
        self.containers = _Containers(container)


@pytest.mark.parametrize("stale", ["config", "image", "status"])
def test_a_sandbox_prometheus_with_another_config_image_or_state_is_not_taken_as_running(stale):
    hosts = [HostState("app2", "172.30.0.3", 22, ["app"])]
    current = tb_prometheus.config_text(hosts)
    container = _Container(current if stale != "config" else current.replace("500ms", "1s"),
                           image="ingest-prometheus:1" if stale == "image" else "ingest-prometheus:2",
                           status="exited" if stale == "status" else "running")
    assert tb_prometheus.running_url(_Client(container), "tb", "ingest-prometheus:2", hosts) is None
    assert tb_prometheus.running_url(_Client(_Container(current)), "tb", "ingest-prometheus:2",
                                     hosts) == "http://172.30.0.9:9090"


# ----- `ingestctl slo ENV` ------------------------------------------------------------------------------------

INVENTORY = """
from ingestctl.inventory import environment

_env = environment(
    name="t",
    data={{"prometheus_url": "{url}", "slos": {{"availability": {{"target": 0.999, "window": "30d"}},
                                                "latency": {{"p95_ms": 250, "window": "30d"}}}}}},
    hosts={{"db1": {{"ssh_hostname": "10.0.0.1", "roles": ["db", "app"]}}}},
)
db = _env.group("db")
app = _env.group("app")
"""


def slo_cli(tmp_path, monkeypatch, url: str, *args: str):
    from click.testing import CliRunner
    from ingestctl.cli import main

    (tmp_path / "inventories").mkdir(exist_ok=True)
    (tmp_path / "service").mkdir(exist_ok=True)
    (tmp_path / "inventories" / "t.py").write_text(INVENTORY.format(url=url))
    monkeypatch.setenv("INGESTCTL_ROOT", str(tmp_path))
    return CliRunner().invoke(main, ["slo", "t", *args])


def test_slo_command_reports_each_slo_and_the_exhausted_budget(fake, tmp_path, monkeypatch):
    answers = {"[30d])) or": 0.002, "[1h])) or": 0.004, "histogram_quantile(0.95": 0.1,
               'le="0.25"}[30d]': 0.01, 'le="0.25"}[1h]': 0.0, "sum (increase": 1000}
    with fake(answers) as server:
        result = slo_cli(tmp_path, monkeypatch, server.url, "--json")
        text = slo_cli(tmp_path, monkeypatch, server.url)
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.output.splitlines()]
    slos = {e["slo"]: e for e in events if e["type"] == "slo"}
    assert slos["availability"]["value"] == pytest.approx(0.998)
    assert slos["availability"]["budget_remaining"] == pytest.approx(-1.0) and slos["availability"]["exhausted"]
    assert slos["availability"]["burn_rate"] == pytest.approx(4.0)
    assert slos["latency"]["value"] == 100.0 and slos["latency"]["budget_remaining"] == pytest.approx(0.8)
    assert events[-1]["type"] == "summary" and events[-1]["exhausted"] == ["availability"]
    assert text.exit_code == 0 and "budget left" in text.output and "-100.0%" in text.output, text.output


def test_slo_command_exits_2_naming_prometheus_when_it_does_not_answer(tmp_path, monkeypatch):
    result = slo_cli(tmp_path, monkeypatch, "http://127.0.0.1:9")
    assert result.exit_code == 2
    assert "Prometheus at http://127.0.0.1:9 does not answer" in result.output


def test_release_gate_numbers_flatten_into_the_ledger_with_numeric_ratios_and_p95():
    from ingestctl.runlock import _flat_numbers

    result = judge_release(window(ratio=0.2), hosts=1, max_error_ratio=0.01, max_p95_ms=500, min_requests=10,
                           probes={"app2": ProbeTally(20, 20)})
    flat = _flat_numbers(result.numbers)
    measured = {k: v for k, v in flat.items() if k.endswith((".error_ratio", ".p95_ms", ".max_error_ratio"))}
    assert measured == {"release.error_ratio": 0.2, "release.p95_ms": 50.0, "thresholds.max_error_ratio": 0.01}
    assert flat["queries.error_ratio_query"] == "E"
