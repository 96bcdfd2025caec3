#!/usr/bin/env python3
"""Run the test suite N times, each from a fresh clone, and report every test that failed at least once.

    python scripts/flaky_runs.py --runs 3 [--ref HEAD] [--pytest-args "-m e2e"] [--json]

Each run clones REF of this repository into a temporary directory, sets it up with the README's own
`scripts/setup.sh` (so a missing install step shows here as it would in CI), and runs pytest there with a
JUnit report. Every run gets its own sandbox name (INGESTCTL_E2E_TESTBED), so runs never share hosts or state.
The report lists, per test that failed in any run, how many runs it failed in and the first line of each error;
the wall time of every run goes beside it. Exit 0 when every run passed, 1 otherwise, 2 on bad arguments.
With --json the last line is one JSON object with the same content.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RunOutcome:
    number: int
    exit_code: int
    wall_s: float
    tests: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # test id -> first line of its error


def failures_from_junit(path: Path) -> tuple[int, dict[str, str]]:
    """(tests run, {test id: first line of its failure or error}) from a pytest JUnit XML report."""
    if not path.exists():
        return 0, {}
    tests, failed = 0, {}
    for case in ET.parse(path).getroot().iter("testcase"):
        tests += 1
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
            message = (problem.get("message") or problem.text or "").strip().splitlines()
            failed[test_id] = (message[0] if message else "failed")[:300]
    return tests, failed


def run_once(number: int, ref: str, pytest_args: list[str], timeout_s: float, keep: bool) -> RunOutcome:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"flaky-run-{number}-") as tmp:
        clone = Path(tmp) / "checkout"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        subprocess.run(["git", "-C", str(clone), "checkout", "--quiet", ref], check=True)
        report = Path(tmp) / "junit.xml"
        env = {**os.environ, "CI": "true", "INGESTCTL_E2E_TESTBED": f"ingest-flaky{number}",
               "INGESTCTL_KEEP_TESTBED": "1" if keep else "0"}
        command = (f"bash scripts/setup.sh >setup.log 2>&1 && .venv/bin/pytest -p no:cacheprovider "
                   f"--junitxml={shlex.quote(str(report))} {' '.join(map(shlex.quote, pytest_args))}")
        log = Path(tmp) / "pytest.log"
        with log.open("w") as out:
            try:
                code = subprocess.run(["bash", "-c", command], cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      timeout=timeout_s, check=False).returncode
            except subprocess.TimeoutExpired:
                code = 124
        tests, failures = failures_from_junit(report)
        if code != 0 and not failures:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            failures = {"(run)": f"exit {code}: " + " | ".join(tail)[:300]}
    return RunOutcome(number, code, round(time.monotonic() - started, 1), tests, failures)


def render(outcomes: list[RunOutcome]) -> str:
    lines = [f"run {o.number}: exit {o.exit_code}, {o.tests} tests, {len(o.failures)} failed, {o.wall_s:.0f} s"
             for o in outcomes]
    flaky: dict[str, list[tuple[int, str]]] = {}
    for outcome in outcomes:
        for test_id, message in outcome.failures.items():
            flaky.setdefault(test_id, []).append((outcome.number, message))
    if not flaky:
        lines.append(f"no test failed in {len(outcomes)} run(s)")
    for test_id, seen in sorted(flaky.items()):
        lines.append(f"FAILED in {len(seen)} of {len(outcomes)} run(s): {test_id}")
        lines.extend(f"    run {number}: {message}" for number, message in seen)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="how many fresh-clone runs (default 3)")
    parser.add_argument("--ref", default="HEAD", help="the commit to test (default HEAD; commit your work first)")
    parser.add_argument("--pytest-args", default="", help="arguments for pytest, e.g. '-m e2e' (default: all)")
    parser.add_argument("--timeout", type=float, default=5400, help="seconds per run before it is stopped")
    parser.add_argument("--keep-testbed", action="store_true", help="leave each run's sandbox up")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 20:
        print(f"flaky_runs: --runs must be between 1 and 20, found {args.runs}", file=sys.stderr)
        return 2
    outcomes = []
    for number in range(1, args.runs + 1):
        outcome = run_once(number, args.ref, shlex.split(args.pytest_args), args.timeout, args.keep_testbed)
        print(f"run {number}: exit {outcome.exit_code} in {outcome.wall_s:.0f} s "
              f"({len(outcome.failures)} failed)", flush=True)
        outcomes.append(outcome)
    print(render(outcomes))
    if args.json:
        print(json.dumps({"runs": [asdict(o) for o in outcomes],
                          "passed": all(o.exit_code == 0 for o in outcomes)}))
    return 0 if all(o.exit_code == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
