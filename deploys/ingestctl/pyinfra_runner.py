"""Run pyinfra operations and deploys from Python against `inventories/ENV.py`, or a subset of its hosts.

The deploy orchestrator calls `run_deploy` / `run_operations` between gates, batch by batch, several times in
one process. Every call builds a fresh Inventory and State, so runs never share hosts, facts or connections.
Results come back per host (success, changed vs noop, error text); `RunResult.raise_for_failures()` turns
failures into one `HostError` that names each failed host and operation.

The inventory file is executed here rather than through `pyinfra_cli`, because importing `pyinfra_cli`
gevent-monkey-patches the whole process (sockets, threads, subprocess) as a side effect.
"""

from __future__ import annotations

import logging
import re
import runpy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gevent.pool import Pool
from pyinfra.api import BaseStateCallback, Config, Inventory, State
from pyinfra.api.command import FunctionCommand
from pyinfra.api.connect import connect_all, disconnect_all
from pyinfra.api.deploy import add_deploy
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.operation import add_op
from pyinfra.api.operations import run_ops
from pyinfra.api.state import StateStage
from pyinfra.context import ctx_host, ctx_state

from ingestctl import paths, sshpool
from ingestctl.errors import ConfigError, HostError, IngestctlError

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Enough of a failing command's stderr to explain it, without flooding a report.
ERROR_TAIL_LINES = 12
# What pyinfra logs after any failed operation: the line before it says why.
GENERIC_FAILURE = re.compile(r"^Error: executed \d+ commands?$")


@dataclass(frozen=True)
class OperationResult:
    name: str
    success: bool
    changed: bool
    error: str | None = None


@dataclass(frozen=True)
class HostResult:
    host: str
    success: bool
    operations: tuple[OperationResult, ...] = ()
    error: str | None = None
    noops: tuple[str, ...] = ()
    reached: bool = True  # False: SSH never connected, so nothing ran there

    @property
    def changed(self) -> bool:
        return any(op.changed for op in self.operations)

    def describe_failure(self) -> str:
        if self.error:
            return f"host {self.host}: {self.error}"
        failed = [op for op in self.operations if not op.success]
        if failed:
            op = failed[0]
            return f"host {self.host}: operation '{op.name}' failed: {op.error or 'no error output'}"
        return f"host {self.host}: {self.error or 'failed'}"


@dataclass(frozen=True)
class RunResult:
    hosts: Mapping[str, HostResult]

    @property
    def failed(self) -> list[HostResult]:
        return [result for result in self.hosts.values() if not result.success]

    @property
    def changed_hosts(self) -> list[str]:
        return [name for name, result in self.hosts.items() if result.changed]

    def raise_for_failures(self) -> None:
        if self.failed:
            raise HostError("; ".join(result.describe_failure() for result in self.failed))


@dataclass(frozen=True)
class OperationCall:
    """One operation to add: `OperationCall(server.shell, kwargs={"commands": ["true"], "name": "..."})`."""

    func: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


def inventory_path(env: str | Path) -> Path:
    """`local` -> <root>/inventories/local.py; an existing path is taken as is."""
    candidate = Path(env)
    if candidate.suffix == ".py":
        path = candidate if candidate.is_absolute() else paths.project_root() / candidate
    else:
        path = paths.project_root() / "inventories" / f"{env}.py"
    if not path.is_file():
        available = sorted(p.stem for p in (paths.project_root() / "inventories").glob("*.py"))
        raise ConfigError(
            f"inventory for environment {str(env)!r} not found at {path}; "
            f"expected one of: {', '.join(available) or 'none (inventories/ is empty)'}"
        )
    return path


def _is_group(key: str, value: Any) -> bool:
    """Same rule as the pyinfra CLI: module-level lists of hosts, or (hosts, data) tuples."""
    if key.startswith("_"):
        return False
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict):
        value = value[0]
    if not isinstance(value, list):
        return False
    return all(
        isinstance(item, str) or (isinstance(item, tuple) and isinstance(item[0], str)) for item in value
    )


def load_inventory(env: str | Path, data: Mapping[str, Any] | None = None) -> Inventory:
    """Build a pyinfra Inventory from an inventory file; DATA overrides host data like `pyinfra --data`."""
    path = inventory_path(env)
    try:
        attrs = runpy.run_path(str(path))
    except Exception as exc:
        raise ConfigError(f"inventory {path} failed to load: {type(exc).__name__}: {exc}") from exc
    groups: dict[str, tuple[list, dict]] = {}
    for key, value in attrs.items():
        if _is_group(key, value):
            groups[key] = value if isinstance(value, tuple) else (value, {})
    all_hosts, all_data = groups.pop("all", ([], {}))
    names = [item[0] if isinstance(item, tuple) else item for item in all_hosts]
    for hosts, _ in groups.values():
        for item in hosts:
            name = item[0] if isinstance(item, tuple) else item
            if name not in names:
                names.append(name)
                all_hosts = [*all_hosts, item]
    if not all_hosts:
        raise ConfigError(f"inventory {path} defines no hosts (expected module-level lists of host names)")
    groups.setdefault(path.stem, (names, {}))
    inventory = Inventory((list(all_hosts), dict(all_data)), override_data=dict(data or {}), **groups)
    sshpool.pool_connections(inventory)
    return inventory


def select_hosts(inventory: Inventory, hosts: Iterable[str] | None) -> list | None:
    """The Host objects for HOSTS (names), or None for the whole inventory. Unknown names are a ConfigError."""
    if hosts is None:
        return None
    wanted = list(hosts)
    known = {host.name: host for host in inventory}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise ConfigError(f"hosts {', '.join(unknown)} are not in the inventory; it has {', '.join(known)}")
    if not wanted:
        raise ConfigError("an empty host subset was requested; pass None to run on every host")
    return [known[name] for name in wanted]


class _Collector(BaseStateCallback, logging.Handler):
    """Keeps what pyinfra reports only through callbacks and log lines: connect errors and noop reasons."""

    def __init__(self) -> None:
        logging.Handler.__init__(self, level=logging.INFO)
        self.connect_errors: dict[str, str] = {}
        self.noops: dict[str, list[str]] = {}
        self.warnings: list[str] = []

    def host_connect_error(self, state, host, error):
        self.connect_errors[host.name] = str(error)

    def emit(self, record: logging.LogRecord) -> None:
        message = ANSI.sub("", record.getMessage())
        match = re.match(r"^\[(?P<host>[^\]]+)\]\s+noop: (?P<reason>.*)$", message)
        if match:
            # Operations are evaluated twice (change detection, then execution): keep each reason once.
            reasons = self.noops.setdefault(match["host"], [])
            if match["reason"] not in reasons:
                reasons.append(match["reason"])
        elif record.levelno >= logging.WARNING:
            self.warnings.append(message)

    def last_message(self, host_name: str) -> str | None:
        """The newest warning or error pyinfra logged for HOST_NAME, without its `[host]` prefix."""
        prefix = f"[{host_name}]"
        for message in reversed(self.warnings):
            text = message[len(prefix):].strip()
            if message.startswith(prefix) and not GENERIC_FAILURE.match(text):
                return text
        return None


def run_operations(
    env: str | Path,
    calls: Sequence[OperationCall],
    hosts: Iterable[str] | None = None,
    data: Mapping[str, Any] | None = None,
    raise_on_error: bool = True,
) -> RunResult:
    """Add CALLS in order on every selected host, then run them (each operation on all hosts before the next).
    How often each is evaluated: see `_run`."""

    def add(state: State, host) -> None:
        for call in calls:
            add_op(state, call.func, *call.args, host=host, **{**command_timeout(host), **call.kwargs})

    return _run(env, add, hosts, data, raise_on_error)


# inventory's `parallelism` default, for hosts without inventory data (the executor's in-memory fleet).
DEFAULT_PARALLELISM = 50


def pool_size(hosts: Iterable[Any]) -> int:
    """Hosts worked on at once: all of HOSTS, up to the inventory's `parallelism`."""
    hosts = list(hosts)
    limit = min((_parallelism(h) for h in hosts), default=1)
    return max(1, min(len(hosts), limit))


def _parallelism(host: Any) -> int:
    data = getattr(host, "data", None)  # a pyinfra Host; anything without inventory data gets the default
    return int((data.get("parallelism") if data is not None else None) or DEFAULT_PARALLELISM)


def command_timeout(host) -> dict[str, int]:
    """pyinfra's per-command `_timeout` from the inventory's `command_timeout_s`: a hung dockerd or SSH channel
    fails the step instead of holding the fleet's lock for ever. Calls may set their own `_timeout`."""
    timeout = host.data.get("command_timeout_s")
    return {"_timeout": int(timeout)} if timeout else {}


def run_deploy(
    env: str | Path,
    deploy_func: Callable[..., Any],
    *args: Any,
    hosts: Iterable[str] | None = None,
    data: Mapping[str, Any] | None = None,
    raise_on_error: bool = True,
    **kwargs: Any,
) -> RunResult:
    """Run a `@deploy` function on every selected host."""

    def add(state: State, host) -> None:
        add_deploy(state, deploy_func, *args, host=host, **kwargs)

    return _run(env, add, hosts, data, raise_on_error)


def _run(env, add, hosts, data, raise_on_error: bool) -> RunResult:
    """Connect, add the operations (ADD) on every host, run them, and collect what happened on each host.

    A host with one operation has it evaluated once, when it runs, as `pyinfra -y` does: reading its facts first
    to learn whether it would change something only doubles the round trips (a switch, the path a rollback waits
    on; the image check). When any host has several, every operation is first evaluated on every host up to its
    first command, as pyinfra prepares them, so a problem any of them finds (a missing image, a value on a host
    that fails its check) stops the run before the first one changes a host.
    """
    inventory = load_inventory(env, data)
    limit = select_hosts(inventory, hosts)
    # FAIL_PERCENT None: one host failing never stops the others; the caller decides from the results.
    parallel = pool_size(limit if limit is not None else list(inventory))
    # Operations are only registered while added; `_evaluate_before_running` does pyinfra's change check itself.
    state = State(inventory, Config(FAIL_PERCENT=None, CONNECT_TIMEOUT=10, PARALLEL=parallel), initial_limit=limit,
                  check_for_changes=False)
    state.print_noop_info = True
    collector = _Collector()
    state.add_callback_handler(collector)
    pyinfra_logger = logging.getLogger("pyinfra")
    previous_level = pyinfra_logger.level
    pyinfra_logger.setLevel(logging.INFO)
    pyinfra_logger.addHandler(collector)
    prepare_errors: dict[str, str] = {}
    try:
        state.set_stage(StateStage.Connect)
        try:
            connect_all(state)
        except PyinfraError:
            pass  # every host failed to connect: reported per host below
        state.set_stage(StateStage.Prepare)
        _raise_local_error(_prepare_every_host(state, add, prepare_errors))
        if any(len(state.ops[host]) > 1 for host in state.inventory.get_active_hosts()):
            _raise_local_error(_prepare_every_host(state, _evaluate_before_running, prepare_errors))
        _fail_only_their_host(state, prepare_errors)
        state.set_stage(StateStage.Execute)
        if state.active_hosts:
            try:
                run_ops(state)
            except PyinfraError:
                pass  # "No hosts remaining!": every host failed; reported per host below
        state.set_stage(StateStage.Disconnect)
    finally:
        try:
            disconnect_all(state)
        finally:
            pyinfra_logger.removeHandler(collector)
            pyinfra_logger.setLevel(previous_level)
    result = _collect(state, limit, collector, prepare_errors)
    if raise_on_error:
        result.raise_for_failures()
    return result


def _raise_local_error(errors: list[IngestctlError | None]) -> None:
    """The first local problem (missing image, bad inventory data) of a preparation: no host is at fault."""
    for error in errors:
        if error is not None:
            raise error


def _evaluate_before_running(state: State, host) -> None:
    """pyinfra's change check: each of HOST's operations evaluated up to its first command (reading its facts),
    in order, before any runs. Nothing is executed.

    An operation that yields no command here, with none before it on HOST yielding one, was decided from the
    host as it will be when it runs (nothing of ours runs there before it): it is a no-op, and is not evaluated
    again, its facts read a second time, when it runs. That is most of a no-op deploy's reads."""
    settled = True
    with ctx_host.use(host):  # the operations' `host`, as pyinfra sets it while adding them
        for op_data in list(state.ops[host].values()):
            first = next(iter(op_data.command_generator()), None)
            if settled and first is None:
                op_data.command_generator = _no_commands
            else:
                settled = False


def _no_commands() -> Iterator[Any]:
    return iter(())


def _prepare_every_host(state: State, add, prepare_errors: dict[str, str]) -> list[IngestctlError | None]:
    """ADD on every active host at once, as the pyinfra CLI prepares hosts (one greenlet each; pyinfra keeps the
    current host greenlet-local): an operation's facts are read on all hosts in one round, not host by host.
    An error while preparing fails only its host; an IngestctlError is returned, to be raised by the caller."""

    def prepare(host) -> IngestctlError | None:
        try:
            add(state, host)
        except IngestctlError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - pyinfra raises many types while preparing; each fails only this host
            prepare_errors[host.name] = f"preparing operations failed: {type(exc).__name__}: {exc}"
            state.active_hosts.discard(host)
            state.failed_hosts.add(host)
        return None

    hosts = sorted(state.inventory.get_active_hosts(), key=lambda h: h.name)
    # The current state is one global, which add_op sets and then resets to what it was: set here, around every
    # greenlet, one host finishing can no longer unset it under another.
    with ctx_state.use(state):
        return Pool(pool_size(hosts)).map(prepare, hosts)


def _fail_only_their_host(state: State, errors: dict[str, str]) -> None:
    """While operations run, what preparing does for them (a lone operation is evaluated only then):
    - an exception there would escape pyinfra's per-host handling and stop every host: it fails only its host's
      operation instead, and is kept as that host's error;
    - a fact that fails (pyinfra fails the host and hands the operation the fact's default) stops the operation
      before its next command, which was decided from that default."""

    def contained(generate, host):
        def commands():
            try:
                for command in generate():
                    if host in state.failed_hosts:
                        return  # reported as after a failed preparation: the host failed, with pyinfra's words
                    yield command
            except Exception as exc:  # noqa: BLE001 - as while preparing: each fails only this host
                if host in state.failed_hosts and not isinstance(exc, IngestctlError):
                    return  # a fact failed on the last host left, and pyinfra said "No hosts remaining!"
                errors[host.name] = (str(exc) if isinstance(exc, IngestctlError)
                                     else f"evaluating the operation failed: {type(exc).__name__}: {exc}")
                yield FunctionCommand(_failed, (), {})
        return commands

    for host in state.inventory.get_active_hosts():
        for op_data in state.ops[host].values():
            op_data.command_generator = contained(op_data.command_generator, host)


def _failed(state, host) -> bool:
    return False


def _collect(state: State, limit, collector: _Collector, prepare_errors: dict[str, str]) -> RunResult:
    results: dict[str, HostResult] = {}
    selected = limit if limit is not None else sorted(state.inventory, key=lambda h: h.name)
    for host in selected:
        operations = []
        for op_hash in state.get_op_order():
            op_data = state.ops[host].get(op_hash)
            if op_data is None:
                continue
            meta = op_data.operation_meta
            name = ", ".join(sorted(state.get_op_meta(op_hash).names))
            if not meta.is_complete():
                operations.append(
                    OperationResult(name, success=False, changed=False, error="not run: host failed earlier")
                )
                continue
            error = None
            if meta.did_error():
                lines = meta.stderr_lines or meta.stdout_lines
                # A Python callback (e.g. an image stream over OpenSSH) reports through the host's log.
                error = ("\n".join(lines[-ERROR_TAIL_LINES:]) or collector.last_message(host.name)
                         or "command failed without output")
            operations.append(
                OperationResult(name, success=meta.did_succeed(), changed=meta.did_change(), error=error)
            )
        error = collector.connect_errors.get(host.name) or prepare_errors.get(host.name)
        if error is None and host in state.failed_hosts and all(op.success for op in operations):
            mentions = [line for line in collector.warnings if f"[{host.name}]" in line]
            error = "; ".join(mentions[-3:]) or "failed while collecting facts (see pyinfra log)"
        if error is None and host not in state.activated_hosts:
            error = "not connected"
        success = error is None and all(op.success for op in operations)
        results[host.name] = HostResult(
            host=host.name,
            success=success,
            operations=tuple(operations),
            error=error,
            noops=tuple(collector.noops.get(host.name, ())),
            reached=host.name not in collector.connect_errors and host in state.activated_hosts,
        )
    return RunResult(hosts=results)
