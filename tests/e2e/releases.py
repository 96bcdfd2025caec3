"""Real releases for end-to-end tests, good and deliberately broken.

A release is this checkout, optionally with files changed, built into `ingest:<version>` and deployed by the
real `ingestctl`. A broken release is a genuinely broken build (a readiness check that fails, a slow query
path, a migration that errors), not a mock: `variant()` copies the checkout into a temporary directory, applies
the changes, and points `ingestctl` at the copy with INGESTCTL_ROOT. The copy shares the sandbox state
(`.testbed/`) and the secrets (`secrets/`) through symlinks, so it deploys to the same session testbed.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHARED = (".testbed", "secrets")
SKIP = {".git", ".venv", ".testbed", "secrets", ".build", "wheelhouse", "__pycache__", ".pytest_cache",
        ".ruff_cache"}


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def events(self) -> list[dict]:
        """The --json event stream (one JSON object per stdout line)."""
        found = []
        for line in self.stdout.splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return found

    def summary(self) -> dict:
        summaries = [e for e in self.events if e.get("type") == "summary"]
        assert summaries, f"no summary event in output:\n{self.stdout[-2000:]}\n{self.stderr[-2000:]}"
        return summaries[-1]

    def explain(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-4000:]}"


# Everything `ingestctl` printed in this session, and every secret value a test made up on the way: the session's
# closing scan (conftest.py `testbed`) looks for each secret in all of it.
OUTPUTS: list[str] = []
MADE_UP_SECRETS: dict[str, str] = {}


def ingestctl(*args: str, root: Path = PROJECT_ROOT, env: Mapping[str, str] | None = None,
              timeout: float = 1200, nice: int = 0) -> Result:
    """Run the real console script against ROOT (a checkout), output captured; at niceness NICE when above 0."""
    executable = shutil.which("ingestctl", path=str(Path(sys.executable).parent)) or "ingestctl"
    completed = subprocess.run(
        [*(["nice", "-n", str(nice)] if nice > 0 else []), executable, *args], cwd=root, env={**os.environ, "INGESTCTL_ROOT": str(root), **(env or {})},
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    OUTPUTS.append(completed.stdout + completed.stderr)
    return Result(completed.returncode, completed.stdout, completed.stderr)


def remember_secret(name: str, value: str) -> str:
    """A secret value a test handed to `ingestctl` (a rotation): the closing scan looks for it too."""
    MADE_UP_SECRETS[f"{name} (made up by a test)"] = value
    return value


# What a host keeps that anyone with access to it can read: the ledger, every container's `docker inspect` and
# logs, and every image's history. Secrets belong only in the 0600 files under /opt/ingest/config.
HOST_TRACES = (
    "cat /var/lib/ingest/ledger.jsonl 2>/dev/null; "
    'for c in $(docker ps -aq); do docker inspect "$c"; docker logs "$c" 2>&1; done; '
    'for i in $(docker images -q | sort -u); do docker history --no-trunc "$i"; done'
)


def secret_leaks(testbed, secret_values: Mapping[str, str]) -> list[str]:
    """Where any of SECRET_VALUES ({name: value}) shows: this session's output, or a sandbox host's traces."""
    return output_leaks(secret_values) + host_leaks(testbed, secret_values)


def output_leaks(secret_values: Mapping[str, str]) -> list[str]:
    """Which of SECRET_VALUES shows in what `ingestctl` printed in this process."""
    return leaks_in({f"ingestctl output #{n}": text for n, text in enumerate(OUTPUTS, 1)}, secret_values)


def host_leaks(testbed, secret_values: Mapping[str, str]) -> list[str]:
    """Which of SECRET_VALUES shows in a sandbox host's ledger, docker inspect, logs or image history."""
    from ingestctl.testbed.probe import run_ssh

    places = {}
    for host in testbed.hosts:
        code, out, err = run_ssh(host.address, host.ssh_port, testbed.ssh_user, testbed.ssh_key,
                                 f"sudo -n sh -c {shlex.quote(HOST_TRACES)}" if testbed.sudo else HOST_TRACES,
                                 timeout=300)
        assert code == 0, f"{host.name}: reading the ledger, docker inspect/logs/history failed: {err[-500:]}"
        places[f"{host.name} (ledger, docker inspect, docker logs, docker history)"] = out + err
    return leaks_in(places, secret_values)


def leaks_in(places: Mapping[str, str], secret_values: Mapping[str, str]) -> list[str]:
    return [f"{name} in {place}" for place, text in places.items()
            for name, value in secret_values.items() if value and value in text]


def link_or_copy(source: str, destination: str) -> None:
    """A hard link where it can be one; a copy across file systems (Debian 13's /tmp is a tmpfs, apart from the
    checkout) or where links are refused."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


@functools.cache
def filled_wheelhouse() -> Path:
    """The checkout's wheelhouse, filled for the base image once a process: a variant copied without it would
    download the lock's wheels from PyPI again, each."""
    from ingestctl.images import fill_wheelhouse

    fill_wheelhouse(PROJECT_ROOT, lambda _message: None)
    return PROJECT_ROOT / "service" / "wheelhouse"


def variant(tmp_path: Path, changes: Mapping[str, Callable[[str], str] | str]) -> Path:
    """A copy of the checkout with CHANGES applied: {relative path: new text, or a function of the old text}."""
    root = tmp_path / "checkout"

    def ignore(directory: str, names: list[str]) -> set[str]:
        return {n for n in names if n in SKIP or n.endswith(".pyc")}

    shutil.copytree(PROJECT_ROOT, root, ignore=ignore, symlinks=True)
    for name in SHARED:
        (PROJECT_ROOT / name).mkdir(exist_ok=True)
        (root / name).symlink_to(PROJECT_ROOT / name)
    # The wheelhouse is big and identical: hard links where they can be (a symlink would leave the build context).
    shutil.copytree(filled_wheelhouse(), root / "service" / "wheelhouse", copy_function=link_or_copy)
    for relative, change in changes.items():
        path = root / relative
        old = path.read_text() if path.exists() else ""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(change(old) if callable(change) else change)
    # The image build hashes git-tracked files: make the copy its own repository with the change committed.
    git = ["git", "-c", "user.name=e2e", "-c", "user.email=e2e@localhost", "-C", str(root)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "e2e variant"], check=True)
    return root


def version_of(base_url: str) -> str | None:
    import httpx

    try:
        return httpx.get(base_url + "/version", timeout=5).json().get("version")
    except (httpx.HTTPError, ValueError):
        return None


def app_urls(testbed) -> dict[str, str]:
    """Each app host's public URL (the proxy on port 8000) on the sandbox network."""
    return {h.name: f"http://{h.address}:8000" for h in testbed.hosts if "app" in h.roles}
