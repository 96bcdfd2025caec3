"""A fleet's host I/O: direct reads and small commands outside pyinfra's operation model, and the runs of
operations that converge state (ingestctl.operations).

Reads and commands are for what is not convergence: facts for planning, the deploy lock, the ledger. One SSH
connection round per call. The orchestrator reaches hosts through a `FleetIO` (the run's `Context.io`):
`SshFleet` in production, an in-memory fleet behind the same interface in the executor's unit tests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

from gevent.pool import Pool
from pyinfra.api import Config, State
from pyinfra.api.connect import connect_all, disconnect_all
from pyinfra.api.exceptions import PyinfraError

from ingestctl import pyinfra_runner as runner
from ingestctl import sshpool
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
    `require_all=False`: then only the reachable hosts are yielded (for clean-up that must reach what it can),
    and a host this process already failed to connect to is not tried again (sshpool)."""
    inventory = runner.load_inventory(env)
    limit = runner.select_hosts(inventory, hosts)
    wanted = limit if limit is not None else list(inventory)
    parallel = runner.pool_size(wanted)
    state = State(inventory, Config(CONNECT_TIMEOUT=10, FAIL_PERCENT=None, PARALLEL=parallel), initial_limit=limit)
    if not require_all:
        state.limit_hosts = [host for host in wanted if not sshpool.found_unreachable(host)]
    try:
        try:
            connect_all(state)
        except PyinfraError:
            pass  # reported below, host by host
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
    return SshFleet(env).get_facts(fact_cls, hosts, require_all, **fact_kwargs)


def on_every_host(active: Mapping[str, Any], call: Callable[[str, Any], Any]) -> dict[str, Any]:
    """CALL(name, host) on every host at once, results in the hosts' order.

    Greenlets, as pyinfra runs hosts: under the console script (gevent-patched sockets) the SSH round trips
    overlap, so a fleet's read or write costs one round, not one per host. An exception on a host is raised
    here, after every host has finished.
    """
    names = list(active)
    results = Pool(runner.pool_size(active.values())).map(lambda name: call(name, active[name]), names)
    return dict(zip(names, results, strict=True))


def at_once(*reads: Callable[[], Any]) -> list[Any]:
    """Every one of READS at once (over one host's connection, say), their results in order."""
    return Pool(len(reads)).map(lambda read: read(), reads)


def run_on(
    active: Mapping[str, Any], command_for: Mapping[str, str] | Callable[[str], str]
) -> dict[str, CommandResult]:
    """Run one shell command per already-connected host, every host at once. Never raises on exit codes."""
    return on_every_host(active, lambda name, host: run_command(
        name, host, command_for[name] if isinstance(command_for, Mapping) else command_for(name)))


def run_command(name: str, host: Any, command: str) -> CommandResult:
    """COMMAND on one connected HOST (named NAME), its output. Never raises on the exit code."""
    # The inventory's `sudo: True` (pyinfra's `_sudo` data) applies here as it does to operations.
    ok, output = host.run_shell_command(
        command, print_output=False, print_input=False, _sudo=bool(host.data.get("_sudo")),
        **runner.command_timeout(host),
    )
    return CommandResult(name, ok, "\n".join(output.stdout_lines), "\n".join(output.stderr_lines))


def run_commands(
    env: str, command_for: Mapping[str, str] | Callable[[str], str], hosts: Iterable[str] | None = None
) -> dict[str, CommandResult]:
    """Run one shell command per host (same or per-host) and return its output. Never raises on exit codes."""
    return SshFleet(env).run_commands(command_for, hosts)


class FleetIO(ABC):
    """One environment's hosts as the orchestrator reaches them. Three primitives: connected hosts (each with
    `get_fact`, `run_shell_command` and `data`, as pyinfra's Host has them), a run of operations, a run of a
    `@deploy`. Facts and commands are built on the first."""

    @abstractmethod
    def connected(self, hosts: Iterable[str] | None = None,
                  require_all: bool = True) -> AbstractContextManager[dict[str, Any]]:
        """Connected hosts by name; an unreachable one is a HostError unless `require_all=False`."""

    @abstractmethod
    def run_operations(self, calls: Sequence[runner.OperationCall], hosts: Iterable[str] | None = None,
                       raise_on_error: bool = True) -> runner.RunResult:
        """CALLS in order on every selected host (each operation on all hosts before the next)."""

    @abstractmethod
    def run_deploy(self, deploy_func: Callable[..., Any], hosts: Iterable[str] | None = None,
                   raise_on_error: bool = True, **kwargs: Any) -> runner.RunResult:
        """A `@deploy` function on every selected host."""

    def get_facts(self, fact_cls: type, hosts: Iterable[str] | None = None, require_all: bool = True,
                  **fact_kwargs: Any) -> dict[str, Any]:
        """One fact from each selected host (from each reachable one, with `require_all=False`)."""
        with self.connected(hosts, require_all=require_all) as active:
            return on_every_host(active, lambda _name, host: host.get_fact(fact_cls, **fact_kwargs))

    def run_commands(self, command_for: Mapping[str, str] | Callable[[str], str],
                     hosts: Iterable[str] | None = None) -> dict[str, CommandResult]:
        """One shell command per host (same or per-host) and its output. Never raises on exit codes."""
        selected = list(command_for) if isinstance(command_for, Mapping) and hosts is None else hosts
        with self.connected(selected) as active:
            return run_on(active, command_for)


class SshFleet(FleetIO):
    """The inventory's hosts over SSH, through pyinfra."""

    def __init__(self, env: str):
        self.env = env

    def connected(self, hosts: Iterable[str] | None = None,
                  require_all: bool = True) -> AbstractContextManager[dict[str, Any]]:
        return connected(self.env, hosts, require_all=require_all)

    def run_operations(self, calls: Sequence[runner.OperationCall], hosts: Iterable[str] | None = None,
                       raise_on_error: bool = True) -> runner.RunResult:
        return runner.run_operations(self.env, calls, hosts=hosts, raise_on_error=raise_on_error)

    def run_deploy(self, deploy_func: Callable[..., Any], hosts: Iterable[str] | None = None,
                   raise_on_error: bool = True, **kwargs: Any) -> runner.RunResult:
        return runner.run_deploy(self.env, deploy_func, hosts=hosts, raise_on_error=raise_on_error, **kwargs)
