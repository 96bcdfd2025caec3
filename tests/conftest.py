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


# Under pytest-xdist (`-n 2`, pyproject.toml) the end-to-end files that share the session sandbox run as one
# stream on one worker, and everything else beside it (tests/suite_streams.py). `--e2e-sandboxes per-file` (for
# more cores) runs each test file whole on one worker instead, an end-to-end file on that worker's own sandbox
# testbed (tests/e2e/conftest.py), longest first by these minutes per file (docs/PERFORMANCE.md); a stale
# figure only costs balance. (`loadgroup` would say it more exactly, but pytest 9.2 broke it: pytest-xdist#1386.)
MINUTES = {
    "e2e/test_bad_releases.py": 15, "e2e/test_bare_hosts.py": 11, "e2e/test_rollbacks.py": 10,
    "e2e/test_deploy.py": 8, "e2e/test_runbook.py": 8, "e2e/test_testbed.py": 5,
    "e2e/test_slo.py": 5, "e2e/test_config_rollout.py": 4, "e2e/test_security.py": 4, "e2e/test_install.py": 2,
}


def pytest_addoption(parser):
    parser.addoption(
        "--e2e-sandboxes", choices=("one", "per-file"), default="one",
        help="under pytest-xdist: `one` sandbox for every end-to-end file, run as one stream on one worker beside "
             "the rest (the default: 2 cores); `per-file`: each file on any worker, against that worker's own "
             "sandbox (more cores)",
    )


def one_sandbox(config) -> bool:
    return config.getoption("e2e_sandboxes") == "one"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadfile" or not one_sandbox(config):
        return None  # pytest-xdist's own scheduler
    from suite_streams import SandboxStreamScheduling

    return SandboxStreamScheduling(config, log)


def scheduling_weight(path: Path, tests_root: Path) -> float:
    relative = path.relative_to(tests_root)
    if relative.parts[0] != "e2e":
        return 0
    return MINUTES.get(relative.as_posix(), 1)


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # one process: the files in their own order
        return
    if one_sandbox(config):
        from suite_streams import rank

        items.sort(key=lambda item: rank(item.nodeid))  # stable: the stream keeps the files' own order
        return
    tests_root = Path(__file__).parent
    items.sort(key=lambda item: -scheduling_weight(item.path, tests_root))
