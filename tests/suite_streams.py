"""How the suite is spread over pytest-xdist workers (`-n 2`, pyproject.toml).

The end-to-end modules share one deployed sandbox (tests/e2e/conftest.py `testbed`): each one starts from the
fleet the previous left, so they run in file order on one worker, one stream. What has no business with that
sandbox runs beside it on the other worker: the unit and service tests (CPU, seconds each) and the modules that
start sandboxes of their own (the bare hosts). On 2 cores a second sandbox stream would not pay: two modules side
by side pushed the gates' latency past their thresholds (docs/PERFORMANCE.md, 2026-12-02). With more cores,
`--e2e-sandboxes per-file` gives every end-to-end file a worker's own sandbox instead.
"""

from __future__ import annotations

from xdist.scheduler import LoadFileScheduling

# The name of the one work unit that holds every end-to-end file deploying to the session sandbox.
SANDBOX_STREAM = "tests/e2e (the session sandbox, in file order)"
# End-to-end files that start and tear down a sandbox of their own, so they need no place in the stream.
OWN_SANDBOX = frozenset({"tests/e2e/test_bare_hosts.py"})


def file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def stream_of(nodeid: str) -> str:
    """The work unit a test belongs to: the sandbox stream, or its own file."""
    path = file_of(nodeid)
    if path.startswith("tests/e2e/") and path not in OWN_SANDBOX:
        return SANDBOX_STREAM
    return path


def rank(nodeid: str) -> int:
    """Collection order under xdist: the stream first, then the files that need no sandbox, then the files with a
    sandbox of their own. The stream takes one worker at once; the other runs the seconds-long files while the
    stream builds the sandbox images, and starts its own sandbox (which waits on that build's lock) after."""
    if stream_of(nodeid) == SANDBOX_STREAM:
        return 0
    return 2 if file_of(nodeid) in OWN_SANDBOX else 1


class SandboxStreamScheduling(LoadFileScheduling):
    """LoadFileScheduling with every sandbox-sharing end-to-end file in one unit, sent whole to one worker.

    Units are handed out in collection order (`--no-loadscope-reorder`), which `rank` sets."""

    def _split_scope(self, nodeid: str) -> str:
        return stream_of(nodeid)
