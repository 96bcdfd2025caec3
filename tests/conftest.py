"""Suite-wide rules. In CI (CI=true) a skipped test is a failure: CI installs every prerequisite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped in CI, where every prerequisite must be installed: {reason}"


# Under pytest-xdist (`-n auto --dist loadfile`, see pyproject.toml) each test file runs whole on one worker, so an
# end-to-end module's fixtures (the deployed baselines) are built once, on that worker's own sandbox testbed
# (tests/e2e/conftest.py). (`loadgroup` would say it more exactly, but pytest 9.2 broke it: pytest-xdist#1386.)
# Minutes per e2e module on one 2-core worker (docs/PERFORMANCE.md). Workers take files in this order, longest
# first, so the long modules start at once and the unit and service files (seconds each) fill in at the end;
# a stale figure only costs balance.
MINUTES = {
    "e2e/test_bad_releases.py": 15, "e2e/test_bare_hosts.py": 11, "e2e/test_rollbacks.py": 10,
    "e2e/test_deploy.py": 8, "e2e/test_runbook.py": 8, "e2e/test_testbed.py": 5,
    "e2e/test_slo.py": 5, "e2e/test_config_rollout.py": 4, "e2e/test_security.py": 4, "e2e/test_install.py": 2,
}


def scheduling_weight(path: Path, tests_root: Path) -> float:
    relative = path.relative_to(tests_root)
    if relative.parts[0] != "e2e":
        return 0
    return MINUTES.get(relative.as_posix(), 1)


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # one process: the files in their own order
        return
    tests_root = Path(__file__).parent
    items.sort(key=lambda item: -scheduling_weight(item.path, tests_root))
