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


# Under pytest-xdist (`-n`, on by default in pyproject.toml) each end-to-end module runs whole on one worker, so
# its module fixtures (the deployed baselines) are built once, on that worker's own sandbox testbed
# (tests/e2e/conftest.py). The other tests form one group: the service tests start their own servers on free
# ports, and together they take a few minutes, about one e2e module's worth.
LOCAL_GROUP = "unit-and-service"
# Minutes per group on one 2-core worker (docs/PERFORMANCE.md). Workers take groups in this order, longest first,
# so the long modules start at once and the short ones fill in; a stale figure only costs balance.
MINUTES = {
    "e2e/test_bad_releases.py": 15, "e2e/test_bare_hosts.py": 11, "e2e/test_rollbacks.py": 10,
    "e2e/test_deploy.py": 8, "e2e/test_runbook.py": 8, LOCAL_GROUP: 6, "e2e/test_testbed.py": 5,
    "e2e/test_config_rollout.py": 4, "e2e/test_security.py": 4, "e2e/test_install.py": 2,
}


def xdist_group(path: Path, tests_root: Path) -> str:
    """The group a test file's tests run in: its own module for tests/e2e, else the one local group."""
    relative = path.relative_to(tests_root)
    return relative.as_posix() if relative.parts[0] == "e2e" else LOCAL_GROUP


def pytest_collection_modifyitems(config, items):
    if config.getoption("dist", default="no") == "no":
        return
    tests_root = Path(__file__).parent
    for item in items:
        item.add_marker(pytest.mark.xdist_group(xdist_group(item.path, tests_root)))
    items.sort(key=lambda item: -MINUTES.get(xdist_group(item.path, tests_root), 1))
