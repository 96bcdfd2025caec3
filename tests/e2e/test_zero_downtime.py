"""The short soak that keeps zero downtime a tested guarantee: `bench/zero_downtime.py --soak 1` on the e2e
sandbox, under a bounded load of back-to-back keep-alive clients, keep-alive clients idle 0-6 s between
requests, and clients opening a connection per request (GET and POST, never retried). One round is a deploy, an
app rollback to the warm standby, a config change and its rollback, and a bad release that its metric gate
rolls back. Outside the bad release's phase not one request may fail, and every acknowledged event must be in
PostgreSQL exactly once. The long soak's numbers are in docs/PERFORMANCE.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from releases import PROJECT_ROOT

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def soak(testbed) -> dict:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.zero_downtime", "--soak", "1", "--workers", "2", "--idle-clients", "6",
         "--fresh-clients", "2", "--baseline-s", "4", "--json"],
        cwd=PROJECT_ROOT, env={**os.environ, "INGESTCTL_ROOT": str(PROJECT_ROOT)},
        capture_output=True, text=True, timeout=1200, check=False)
    lines = completed.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("{"), f"exit {completed.returncode}\n{completed.stdout}\n{completed.stderr}"
    return {"code": completed.returncode, "report": json.loads(lines[-1]), "text": completed.stdout}


def test_no_request_fails_through_any_switch(soak):
    report = soak["report"]
    assert report["failed_outside_bad_releases"] == 0, soak["text"]
    assert soak["code"] == 0, soak["text"]


def test_every_kind_of_switch_ran_under_load(soak):
    kinds = {phase["kind"] for phase in soak["report"]["phases"]}
    assert {"deploy", "rollback-app", "config", "bad-release"} <= kinds, kinds
    assert soak["report"]["requests"] > 1000, soak["text"]


def test_every_acknowledged_event_is_in_postgresql_exactly_once(soak):
    report = soak["report"]
    assert report["acknowledged_events"] > 0 and report["exactly_once"], soak["text"]
