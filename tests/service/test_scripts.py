"""The runbook's scripts, run as operators run them, against real services."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import API_KEY, JWT_SECRET, service_env
from ingest.tools.localservers import free_port
from ingest.tools.query_benchmark import PROFILES

pytestmark = pytest.mark.service

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def run_script(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BENCH_", "API_KEY", "JWT_SECRET"))}
    clean.update(env or {})
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], check=False, capture_output=True, text=True,
                          timeout=240, env=clean)


def test_runtime_health_passes_on_a_healthy_service(service):
    result = run_script("check_runtime_health.py", "--base-url", service.base_url)
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith(f"PASS  {service.base_url}")
    for check in ("live", "ready", "version", "metrics"):
        assert f"ok   {check}" in result.stdout


def test_runtime_health_degraded_passes_only_with_the_flag(database_url, start_service, service):
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    degraded = start_service(service_env(database_url, dead_redis))
    strict = run_script("check_runtime_health.py", "--base-url", degraded.base_url)
    assert strict.returncode == 1
    assert "FAIL ready" in strict.stdout and "status=degraded" in strict.stdout
    lenient = run_script("check_runtime_health.py", "--base-url", degraded.base_url, "--allow-ready-degraded",
                         "--json")
    assert lenient.returncode == 0, lenient.stdout
    assert json.loads(lenient.stdout)["ok"] is True
    # A fleet: every URL is checked, one bad host fails the run.
    fleet = run_script("check_runtime_health.py", "--base-url", service.base_url, "--base-url",
                       f"http://127.0.0.1:{free_port()}", "--json")
    assert fleet.returncode == 1
    hosts = json.loads(fleet.stdout)["hosts"]
    assert [h["ok"] for h in hosts] == [True, False]


def bench_env(**extra: str) -> dict[str, str]:
    return {"API_KEY": API_KEY, "JWT_SECRET": JWT_SECRET, "BENCH_PROFILE": "local", **extra}


def test_benchmark_seeds_once_measures_and_gates(service):
    ok = run_script("benchmark_queries.py", "--base-url", service.base_url, "--json",
                    env=bench_env(BENCH_FAIL_THRESHOLD_MS="5000", BENCH_FAIL_P95_THRESHOLD_MS="5000"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    report = json.loads(ok.stdout)
    assert report["ok"] is True
    assert report["seeded"][service.base_url] in (0, 2000)  # 0 when an earlier run already seeded
    names = {r["name"] for r in report["results"]}
    assert names == {"events_by_source", "events_filtered", "events_page", "stats"}
    for result in report["results"]:
        assert result["count"] == PROFILES["local"].requests_per_endpoint and result["errors"] == 0
        assert 0 < result["avg_ms"] <= result["p99_ms"] and result["p95_ms"] <= result["p99_ms"]

    # Seeded data is reused, and a threshold no real request can meet fails the run with a table.
    strict = run_script("benchmark_queries.py", "--base-url", service.base_url,
                        env=bench_env(BENCH_FAIL_P95_THRESHOLD_MS="0.001"))
    assert strict.returncode == 1
    assert "BENCH_FAIL_P95_THRESHOLD_MS" in strict.stdout and strict.stdout.rstrip().endswith(
        "FAIL: a threshold was exceeded or requests failed")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (bench_env(BENCH_PROFILE="huge"), "BENCH_PROFILE: must be one of local, staging, production"),
        (bench_env(BENCH_FAIL_THRESHOLD_MS="fast"), "BENCH_FAIL_THRESHOLD_MS: must be a number"),
        ({"API_KEY": API_KEY, "BENCH_PROFILE": "local"}, "JWT_SECRET: not set"),
    ],
)
def test_benchmark_rejects_bad_settings(env, message):
    result = run_script("benchmark_queries.py", "--base-url", "http://127.0.0.1:9", env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert JWT_SECRET not in result.stderr
