"""Where ingestctl finds the checkout it runs from and keeps its local state."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def project_root() -> Path:
    """The checkout ingestctl runs in: INGESTCTL_ROOT, else the nearest parent holding inventories/."""
    env = os.environ.get("INGESTCTL_ROOT")
    if env:
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / "inventories").is_dir() and (candidate / "service").is_dir():
            return candidate
    # Installed editable from the checkout: deploys/ingestctl/paths.py -> root is two levels up.
    return Path(__file__).resolve().parents[2]


def state_dir() -> Path:
    """Git-ignored local state: testbed keys and host list, build cache."""
    return project_root() / ".testbed"


def secrets_file(env: str) -> Path:
    """The environment's secrets file (KEY=VALUE lines, mode 0600, git-ignored)."""
    return project_root() / "secrets" / f"{env}.env"


# One in-process lock per lock file, taken before the flock. Two open files of one process are two flock
# holders that exclude each other, and under the pyinfra CLI (gevent) a blocking flock stops every greenlet:
# three hosts' deploy.py building the image at once would wait forever on each other. A threading lock is
# cooperative there, since the CLI patches threading.
_in_process: dict[Path, threading.Lock] = {}
_in_process_guard = threading.Lock()


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes and between threads or greenlets of this process (flock on PATH,
    created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _in_process_guard:
        inner = _in_process.setdefault(path.resolve(), threading.Lock())
    with inner, open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
