"""Direct reads and small commands on a fleet's hosts, outside pyinfra's operation model.

Operations converge state (ingestctl.operations); this module is for what is not convergence: reading facts
for planning, taking and releasing the deploy lock, appending to the ledger. One SSH connection round per call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from gevent.pool import Pool
from pyinfra.api import Config, State
from pyinfra.api.connect import connect_all, disconnect_all
from pyinfra.api.exceptions import PyinfraError

from ingestctl import pyinfra_runner as runner
from ingestctl.errors import HostError


@dataclass(frozen=True)
class CommandResult:
    host: str
    ok: bool
    stdout: str
    stderr: str


@contextmanager
def connected(env: str, hosts: Iterable[str] | None = None, require_all: bool = True) -> Iterator[dict[str, Any]]:
    """Connected pyinfra Host objects by name. An unreachable host is a HostError naming it, unless
    `require_all=False`: then only the reachable hosts are yielded (for clean-up that must reach what it can)."""
    inventory = runner.load_inventory(env)
    limit = runner.select_hosts(inventory, hosts)
    state = State(inventory, Config(CONNECT_TIMEOUT=10, FAIL_PERCENT=None), initial_limit=limit)
    try:
        try:
            connect_all(state)
        except PyinfraError:
            pass  # reported below, host by host
        wanted = limit if limit is not None else list(inventory)
        active = {host.name: host for host in state.inventory.get_active_hosts()}
        missing = [host.name for host in wanted if host.name not in active]
        if missing and require_all:
            raise HostError(
                f"cannot reach host(s) {', '.join(missing)} over SSH; check the inventory and that sshd "
                "answers (`ingestctl testbed status` for the sandbox)"
            )
        yield {name: active[name] for name in (h.name for h in wanted) if name in active}
    finally:
        disconnect_all(state)


def get_facts(env: str, fact_cls: type, hosts: Iterable[str] | None = None, require_all: bool = True,
              **fact_kwargs: Any) -> dict[str, Any]:
    """One fact from each selected host (from each reachable one, with `require_all=False`)."""
    with connected(env, hosts, require_all=require_all) as active:
        return on_every_host(active, lambda _name, host: host.get_fact(fact_cls, **fact_kwargs))


def on_every_host(active: Mapping[str, Any], call: Callable[[str, Any], Any]) -> dict[str, Any]:
    """CALL(name, host) on every host at once, results in the hosts' order.

    Greenlets, as pyinfra runs hosts: under the console script (gevent-patched sockets) the SSH round trips
    overlap, so a fleet's read or write costs one round, not one per host. An exception on a host is raised
    here, after every host has finished.
    """
    names = list(active)
    results = Pool(max(1, len(names))).map(lambda name: call(name, active[name]), names)
    return dict(zip(names, results, strict=True))


def run_on(
    active: Mapping[str, Any], command_for: Mapping[str, str] | Callable[[str], str]
) -> dict[str, CommandResult]:
    """Run one shell command per already-connected host, every host at once. Never raises on exit codes."""

    def run(name: str, host: Any) -> CommandResult:
        command = command_for[name] if isinstance(command_for, Mapping) else command_for(name)
        # The inventory's `sudo: True` (pyinfra's `_sudo` data) applies here as it does to operations.
        ok, output = host.run_shell_command(
            command, print_output=False, print_input=False, _sudo=bool(host.data.get("_sudo")),
            **runner.command_timeout(host),
        )
        return CommandResult(name, ok, "\n".join(output.stdout_lines), "\n".join(output.stderr_lines))

    return on_every_host(active, run)


def run_commands(
    env: str, command_for: Mapping[str, str] | Callable[[str], str], hosts: Iterable[str] | None = None
) -> dict[str, CommandResult]:
    """Run one shell command per host (same or per-host) and return its output. Never raises on exit codes."""
    selected = list(command_for) if isinstance(command_for, Mapping) and hosts is None else hosts
    with connected(env, selected) as active:
        return run_on(active, command_for)
