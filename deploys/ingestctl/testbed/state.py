"""The testbed's state file: what `testbed up` started, read by the inventory, the tests and `status`.

Layout under `.testbed/` (git-ignored):
    id_ed25519, id_ed25519.pub   the SSH key pair, shared by every testbed on this checkout (0600)
    <name>/state.json            one testbed (INGESTCTL_TESTBED, default ingest-tb)
    <name>/ssh_config            OpenSSH config for its hosts (testinfra, humans: `ssh -F ... db1`)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ingestctl import paths
from ingestctl.errors import ConfigError
from ingestctl.testbed.hostspec import testbed_name


@dataclass
class HostState:
    name: str
    address: str
    ssh_port: int
    roles: list[str]
    container: str = ""
    # The host's Debian release on a bare testbed (`testbed up --bare`); "" on a ready-made one.
    suite: str = ""


@dataclass
class TestbedState:
    name: str
    network: str
    storage_driver: str
    security_mode: str
    ssh_user: str
    ssh_key: str
    hosts: list[HostState] = field(default_factory=list)
    ssh_config: str = ""
    # `testbed up --bare`: hosts with sshd and a sudo user only, for `ingestctl setup`. `sudo`: the inventory
    # reaches root through sudo (the `deploy` user) rather than logging in as root.
    bare: bool = False
    sudo: bool = False
    # The controller's address on the sandbox network (its gateway): where the benchmarks reach PostgreSQL from.
    gateway: str = ""
    # The sandbox's Prometheus (ready-made testbeds only): `inventories/local.py` sets prometheus_url from it.
    prometheus_url: str = ""

    @property
    def app_host_count(self) -> int:
        """App hosts beside db1 (`testbed up --hosts N`)."""
        return len([host for host in self.hosts if host.name != "db1"])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict, source: Path) -> TestbedState:
        try:
            hosts = [HostState(**host) for host in data["hosts"]]
            return cls(**{**data, "hosts": hosts})
        except (KeyError, TypeError) as exc:
            raise ConfigError(
                f"{source}: testbed state is not in the expected shape ({exc}); "
                "run `ingestctl testbed down` then `ingestctl testbed up`"
            ) from exc

    def host(self, name: str) -> HostState:
        for host in self.hosts:
            if host.name == name:
                return host
        raise ConfigError(f"testbed {self.name} has no host {name!r}; it has {[h.name for h in self.hosts]}")

    def hosts_with_role(self, role: str) -> list[HostState]:
        return [host for host in self.hosts if role in host.roles]


def testbed_dir(name: str | None = None) -> Path:
    return paths.state_dir() / (name or testbed_name())


def state_path(name: str | None = None) -> Path:
    return testbed_dir(name) / "state.json"


def key_path() -> Path:
    return paths.state_dir() / "id_ed25519"


def load(name: str | None = None) -> TestbedState:
    """The running testbed's state; a ConfigError saying to run `ingestctl testbed up` when there is none."""
    name = name or testbed_name()
    path = state_path(name)
    if not path.is_file():
        hint = "" if name == "ingest-tb" else f"INGESTCTL_TESTBED={name} "
        raise ConfigError(f"testbed {name!r} is not up (no {path}); run `{hint}ingestctl testbed up`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); run `ingestctl testbed down` then `up`") from exc
    return TestbedState.from_dict(data, path)


def save(state: TestbedState) -> Path:
    path = state_path(state.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(state.to_json())
    os.replace(tmp, path)
    return path


def remove(name: str) -> None:
    directory = testbed_dir(name)
    for child in ("state.json", "ssh_config", "state.tmp"):
        (directory / child).unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        pass


def ssh_config_text(state: TestbedState) -> str:
    """An OpenSSH config naming each host, so `ssh -F FILE db1` and testinfra's ssh backend just work."""
    blocks = []
    for host in state.hosts:
        blocks.append(
            f"Host {host.name} {host.address}\n"
            f"    HostName {host.address}\n"
            f"    Port {host.ssh_port}\n"
            f"    User {state.ssh_user}\n"
            f"    IdentityFile {state.ssh_key}\n"
            "    IdentitiesOnly yes\n"
            # Sandbox hosts get fresh host keys on every `up`: there is nothing to pin.
            "    StrictHostKeyChecking no\n"
            "    UserKnownHostsFile /dev/null\n"
            "    LogLevel ERROR\n"
        )
    return "\n".join(blocks)


def write_ssh_config(state: TestbedState) -> Path:
    path = testbed_dir(state.name) / "ssh_config"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(ssh_config_text(state))
    return path
