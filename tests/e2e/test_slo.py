"""SLOs and the error budget on the sandbox, read from its real Prometheus (Debian's package, scraping every app
host's /metrics through the proxy every second).

One fleet for the module: a baseline deployed with the metric gate judged by PromQL. Then a real, bounded error
burst (PostgreSQL stopped on db1 while 30 authenticated queries answer 503, then started again) exhausts the
availability budget (99.99%) of a copy of the checkout whose inventory enforces the policy over a 10-minute window (the
shipped local inventory only reports it, so other modules' bad releases never block the next deploy). In that
copy `deploy` is refused (exit 2, no host touched), `deploy --emergency` runs and is recorded, and
`rollback app` runs. The module leaves the fleet on its baseline, healthy and unlocked.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from releases import app_urls, ingestctl, variant, version_of

pytestmark = pytest.mark.e2e

BASELINE = "e2e-slo-1"
FIX = "e2e-slo-2"
LEDGER = "/var/lib/ingest/ledger.jsonl"
STATE = "/opt/ingest/state.json"
COMPOSE = "cd /opt/ingest && docker compose -p ingest -f compose.yml"
BURST = 30


@pytest.fixture(scope="module")
def deployed(testbed):
    """The fleet on BASELINE, its metric gate judged by the sandbox's Prometheus."""
    result = ingestctl("deploy", "local", "--version", BASELINE, "--skip-bench", "--json")
    assert result.code == 0, result.explain()
    return result


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """A copy of the checkout whose local inventory enforces the error budget over a short window."""

    def enforce(text: str) -> str:
        for old, new in (('"error_budget_policy": "report"', '"error_budget_policy": "refuse"'),
                         # 99.99%: the burst must exhaust the budget however much traffic the session's earlier
                         # modules sent through the same fleet inside the window (a CI run sends thousands).
                         ('"availability": {"target": 0.99, "window": "1h"', '"availability": {"target": 0.9999, '
                                                                             '"window": "10m"')):
            assert old in text, f"inventories/local.py no longer has {old!r}; update this test"
            text = text.replace(old, new)
        return text

    return variant(tmp_path_factory.mktemp("slo-strict"), {"inventories/local.py": enforce})


def slo_events(result) -> dict[str, dict]:
    return {e["slo"]: e for e in result.events if e["type"] == "slo"}


def host_records(testbed, ssh) -> dict[str, str]:
    """Every host's ledger and state.json, as they are now."""
    found = {}
    for host in testbed.hosts:
        code, out, err = ssh(host.name, f"cat {LEDGER} {STATE}")
        assert code == 0, f"{host.name}: {err}"
        found[host.name] = out
    return found


def test_metric_gate_judges_the_release_by_promql(deployed, testbed):
    gates = [e for e in deployed.events if e["type"] == "gate" and e.get("gate") == "metrics"]
    assert gates, deployed.explain()
    for gate in gates:
        numbers = gate["numbers"]
        assert gate["passed"] is True and numbers["source"] == "prometheus", gate
        assert numbers["release"]["version"] == BASELINE
        assert numbers["release"]["requests"] >= numbers["thresholds"]["min_requests"], gate
        assert f'version="{BASELINE}"' in numbers["queries"]["error_ratio_query"]
        assert numbers["queries"]["p95_query"].startswith("histogram_quantile(0.95")
        assert "PromQL: error ratio `" in gate["message"]
    assert all(version_of(url) == BASELINE for url in app_urls(testbed).values())


def test_slo_reads_the_sandbox_prometheus(deployed, testbed, run_ingestctl):
    from ingestctl import inventory

    status = run_ingestctl("testbed", "status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    events = [json.loads(line) for line in status.stdout.splitlines() if line.startswith("{")]
    (prometheus,) = [e for e in events if e["type"] == "prometheus"]
    assert prometheus["url"] == testbed.prometheus_url and testbed.prometheus_url.endswith(":9090")
    assert inventory.load("local").data.prometheus_url == testbed.prometheus_url

    result = ingestctl("slo", "local", "--json")
    assert result.code == 0, result.explain()
    slos = slo_events(result)
    assert set(slos) == {"availability", "latency"}
    # The baseline's gate probes are real traffic Prometheus scraped: the SLOs see them.
    assert slos["availability"]["requests"] >= 10, slos
    assert slos["availability"]["value"] is not None and 0 <= slos["availability"]["value"] <= 1
    assert slos["latency"]["value"] is not None and slos["latency"]["value"] > 0
    assert result.summary()["policy"] == "report"
    text = ingestctl("slo", "local")
    assert text.code == 0 and "budget left" in text.stdout and "availability" in text.stdout, text.explain()


def error_burst(testbed, ssh) -> list[int]:
    """PostgreSQL stopped on db1, BURST authenticated queries (bounded: 10 at a time, 10 s each), started again;
    every app host ready before it returns. The answers' status codes."""
    from ingest.tools.credentials import mint_read_token
    from ingestctl import paths
    from ingestctl import secrets as secrets_mod

    token = mint_read_token(secrets_mod.load(paths.secrets_file("local"))["JWT_SECRET"], ttl_seconds=300,
                            subject="e2e-slo")
    urls = list(app_urls(testbed).values())
    code, _out, err = ssh("db1", f"{COMPOSE} stop postgres", timeout=120)
    assert code == 0, err
    try:
        def query(n: int) -> int:
            try:
                return httpx.get(urls[n % len(urls)] + "/api/v1/events", params={"limit": 1}, timeout=10,
                                 headers={"Authorization": f"Bearer {token}"}).status_code
            except httpx.HTTPError:
                return 0
        with ThreadPoolExecutor(max_workers=10) as pool:
            answers = list(pool.map(query, range(BURST)))
    finally:
        code, _out, err = ssh("db1", f"{COMPOSE} start postgres", timeout=120)
        assert code == 0, err
    deadline = time.monotonic() + 120
    pending = set(urls)
    while pending and time.monotonic() < deadline:
        for url in list(pending):
            try:
                if httpx.get(url + "/health/ready", timeout=3).status_code == 200:
                    pending.discard(url)
            except httpx.HTTPError:
                pass
        time.sleep(1)
    assert not pending, f"not ready again after PostgreSQL came back: {pending}"
    return answers


def test_exhausted_budget_refuses_deploy_but_not_emergency_or_rollback(deployed, strict, testbed, ssh):
    answers = error_burst(testbed, ssh)
    assert sum(500 <= code < 600 for code in answers) >= BURST // 2, answers

    # Prometheus scrapes every second: the burst shows within a few.
    deadline = time.monotonic() + 60
    while True:
        budget = ingestctl("slo", "local", "--json", root=strict)
        assert budget.code == 0, budget.explain()
        availability = slo_events(budget)["availability"]
        if availability["exhausted"] or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert availability["exhausted"] is True and availability["budget_remaining"] <= 0, availability
    assert availability["burn_rate"] > 1, availability
    assert "availability" in budget.summary()["exhausted"]

    before = host_records(testbed, ssh)
    refused = ingestctl("deploy", "local", "--version", FIX, "--skip-bench", "--json", root=strict)
    assert refused.code == 2, refused.explain()
    summary = refused.summary()
    assert summary["outcome"] == "refused", summary
    assert "availability error budget exhausted" in summary["error"] and "--emergency" in summary["error"]
    assert not [e for e in refused.events if e.get("step") == "build"], "refused, yet it built an image"
    assert host_records(testbed, ssh) == before, "a refused deploy touched a host (ledger or state changed)"

    emergency = ingestctl("deploy", "local", "--version", FIX, "--skip-bench", "--emergency", "--json", root=strict)
    assert emergency.code == 0, emergency.explain()
    budget_step = [e for e in emergency.events if e.get("step") == "budget"]
    assert budget_step and budget_step[0]["emergency"] is True and "EMERGENCY" in budget_step[0]["message"]
    assert emergency.summary()["emergency"] is True
    assert all(version_of(url) == FIX for url in app_urls(testbed).values())
    code, out, err = ssh("db1", f"tail -n 1 {LEDGER}")
    assert code == 0, err
    entry = json.loads(out)
    assert (entry["release"], entry["outcome"], entry["emergency"]) == (FIX, "success", True), entry
    history = ingestctl("history", "local", root=strict)
    assert "(emergency)" in history.stdout, history.explain()

    # Still exhausted, and a rollback is never blocked by the budget.
    still = ingestctl("slo", "local", "--json", root=strict)
    assert slo_events(still)["availability"]["exhausted"] is True, still.explain()
    rollback = ingestctl("rollback", "app", "local", "--json", root=strict)
    assert rollback.code == 0, rollback.explain()
    assert all(version_of(url) == BASELINE for url in app_urls(testbed).values())

    # Every kind of rollback runs past the exhausted budget: a config change, then its one-shot undo.
    changed = ingestctl("config", "set", "local", "INGEST_MAX_BATCH_ITEMS=900", "--json", root=strict)
    assert changed.code == 0, changed.explain()
    undone = ingestctl("rollback", "config", "local", "--json", root=strict)
    assert undone.code == 0, undone.explain()
    assert undone.summary()["outcome"] == "success", undone.explain()
