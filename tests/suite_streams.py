"""How the suite is spread over pytest-xdist workers (`-n 2`, pyproject.toml).

The end-to-end modules share a deployed sandbox (tests/e2e/conftest.py `testbed`): each one starts from the
fleet the previous left, so a stream of them runs in file order on one worker. There are two streams, each on a
worker's own sandbox:
- the main stream, first, on one worker from the start;
- a second stream of the shorter modules, on the other worker once it has run what has no business with a
  sandbox (the unit and service tests, seconds each) and the modules that start sandboxes of their own (the bare
  hosts).

A deploy to the sandbox keeps the 2 cores about 40% busy: most of its time is waiting on gate windows and slot
starts, so the two streams overlap well. Their latency gates still hold: the sandbox's windows are short and
its thresholds generous (docs/PERFORMANCE.md, 2026-12-07). With more cores, `--e2e-sandboxes per-file` gives
every end-to-end file a worker's own sandbox instead.
"""

from __future__ import annotations

from xdist.scheduler import LoadFileScheduling

# The names of the two work units that hold the end-to-end files deploying to a worker's session sandbox.
SANDBOX_STREAM = "tests/e2e (the session sandbox, in file order)"
SECOND_STREAM = "tests/e2e (a second session sandbox, in file order)"
# The second stream's files: about a quarter of the end-to-end minutes, so that both workers end together.
SECOND_SANDBOX = frozenset({
    "tests/e2e/test_ci_examples.py", "tests/e2e/test_compose_files.py", "tests/e2e/test_config_rollout.py",
    "tests/e2e/test_install.py", "tests/e2e/test_registry.py", "tests/e2e/test_security.py",
    "tests/e2e/test_ship.py", "tests/e2e/test_slo.py", "tests/e2e/test_testbed.py",
})
# End-to-end files that start and tear down a sandbox of their own, so they need no place in a stream.
OWN_SANDBOX = frozenset({"tests/e2e/test_bare_hosts.py"})


def file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def stream_of(nodeid: str) -> str:
    """The work unit a test belongs to: the sandbox stream, or its own file."""
    path = file_of(nodeid)
    if not path.startswith("tests/e2e/") or path in OWN_SANDBOX:
        return path
    return SECOND_STREAM if path in SECOND_SANDBOX else SANDBOX_STREAM


def rank(nodeid: str) -> int:
    """Collection order under xdist: the main stream first, then the files that need no sandbox, then the files
    with a sandbox of their own, then the second stream. The main stream takes one worker at once; the other
    runs the seconds-long files while the stream builds the sandbox images, then the sandboxes of its own
    (which wait on that build's lock)."""
    stream = stream_of(nodeid)
    if stream == SANDBOX_STREAM:
        return 0
    if stream == SECOND_STREAM:
        return 3
    return 2 if file_of(nodeid) in OWN_SANDBOX else 1


class SandboxStreamScheduling(LoadFileScheduling):
    """LoadFileScheduling with the sandbox-sharing end-to-end files in two units, each sent whole to one worker.

    Units are handed out in collection order (`--no-loadscope-reorder`), which `rank` sets."""

    def _split_scope(self, nodeid: str) -> str:
        return stream_of(nodeid)
