"""`ingestctl verify ENV`: the testinfra suite in tests/infra, pointed at ENV's hosts over SSH."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ingestctl import inventory, paths
from ingestctl.output import Reporter

# How long a host's master connection outlives its last command; the run closes them itself when it ends.
CONTROL_PERSIST_S = 30


def ssh_config_text(env: inventory.Environment, control_dir: Path | None = None) -> str:
    """One Host block per inventory host, so test output names hosts and SSH gets the inventory's options.

    With CONTROL_DIR, each host's commands share one master connection: testinfra runs one `ssh` per command,
    and a handshake per command would be most of the suite's time.
    """
    blocks = []
    for name, spec in env.hosts.items():
        lines = [f"Host {name}", f"  HostName {spec.ssh_hostname}", f"  Port {spec.ssh_port}"]
        if spec.ssh_user:
            lines.append(f"  User {spec.ssh_user}")
        if spec.ssh_key:
            lines += [f"  IdentityFile {spec.ssh_key}", "  IdentitiesOnly yes"]
        if spec.ssh_known_hosts_file:
            lines.append(f"  UserKnownHostsFile {spec.ssh_known_hosts_file}")
        if spec.ssh_strict_host_key_checking:
            lines.append(f"  StrictHostKeyChecking {spec.ssh_strict_host_key_checking}")
        lines += ["  BatchMode yes", "  LogLevel ERROR"]
        if control_dir is not None:
            lines += ["  ControlMaster auto", f"  ControlPath {control_dir}/%C",
                      f"  ControlPersist {CONTROL_PERSIST_S}"]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def pytest_command(env: inventory.Environment, ssh_config: Path, extra: list[str]) -> list[str]:
    root = paths.project_root()
    hosts = ",".join(f"ssh://{name}" for name in env.hosts)
    # `-o addopts=`: the checkout's addopts run the test suite in parallel (pytest-xdist, a test extra), which an
    # operator's install need not have and the host checks do not want; `timeout` and the rest still apply.
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-q",
               str(root / "tests" / "infra"),
               f"--hosts={hosts}", f"--ssh-config={ssh_config}", f"--ingest-env={env.name}"]
    keys = {spec.ssh_key for spec in env.hosts.values()}
    if len(keys) == 1 and None not in keys:
        # One key for the fleet: the suite also checks that key file's mode.
        command.append(f"--ssh-identity-file={keys.pop()}")
    return [*command, *extra]


def run(env_name: str, reporter: Reporter, extra: list[str]) -> int:
    env = inventory.load(env_name)
    with tempfile.TemporaryDirectory(prefix="ingestctl-verify-") as tmp:
        config = Path(tmp) / "ssh_config"
        config.write_text(ssh_config_text(env, Path(tmp)))
        config.chmod(0o600)
        command = pytest_command(env, config, extra)
        reporter.event("step", f"verify {env_name}: testinfra on {', '.join(env.hosts)}", step="verify")
        try:
            completed = subprocess.run(command, cwd=paths.project_root(), env={**os.environ}, check=False)
        finally:
            for name in env.hosts:  # no master connection outlives the run
                subprocess.run(["ssh", "-F", str(config), "-O", "exit", name], capture_output=True, check=False)
    reporter.event("summary", f"verify {env_name}: " + ("passed" if completed.returncode == 0 else "FAILED"),
                   exit_code=completed.returncode)
    return completed.returncode
