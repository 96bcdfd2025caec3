"""`ingestctl setup ENV`: what a deploy target needs, as pure values and commands, and the run that applies it.

A bare Debian 12 (bookworm) or 13 (trixie) host, reached over SSH as the inventory's user (root, or a user with
passwordless sudo), becomes a deploy target:

- Docker from Debian's own packages: `docker.io` (engine), `docker-cli` (13 only: 12's docker.io still carries
  the CLI), `docker-compose` (13: Compose v2, `docker compose`; 12: v1, `docker-compose`), enabled and running;
- /etc/docker/daemon.json: log rotation for every container (json-file, 10 MB x 5) and live-restore;
- the service's system user and group `ingest` (uid = gid = the inventory's `app_uid`);
- the release's directories: /opt/ingest (and config/, backups/, proxy/, db/) and /var/lib/ingest (ledger, lock);
- on the db host, an nftables table so that PostgreSQL (5432) and Redis (6379) answer only the environment's app
  hosts and the host itself, and PostgreSQL also the inventory's `db_clients`;
- /etc/ingest/setup.json, the record `deploy`'s preflight reads (`setup_problems`).

The operations live in `ingestctl.operations.host_setup`, the facts in `ingestctl.facts.host`. Everything here is
either pure (unit-tested by exact value) or the thin run/check layer over `pyinfra_runner` and `fleet`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import shlex
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ingestctl import hostlayout
from ingestctl.errors import ConfigError, HostError

BASE = hostlayout.BASE
SERVICE_ACCOUNT = "ingest"
SETUP_VERSION = 1
SETUP_RECORD = "/etc/ingest/setup.json"
DAEMON_JSON_PATH = "/etc/docker/daemon.json"
# Rotation for every container's log (the engine default, json-file, grows without bound), and live-restore so
# that restarting the engine (a package upgrade, a daemon.json change) does not stop the service.
DAEMON_CONFIG: dict[str, Any] = {
    "live-restore": True,
    "log-driver": "json-file",
    "log-opts": {"max-file": "5", "max-size": "10m"},
}
DAEMON_JSON = json.dumps(DAEMON_CONFIG, indent=2, sort_keys=True) + "\n"
# Directories (mode) the release uses; the same modes `operations.release.layout_present` gives them.
DIRECTORIES: tuple[tuple[str, str], ...] = (
    (BASE, "755"),
    (f"{BASE}/config", "711"),
    (f"{BASE}/backups", "700"),
    (f"{BASE}/proxy", "755"),
    (f"{BASE}/db", "700"),
    ("/var/lib/ingest", "750"),
    ("/etc/ingest", "755"),
)
POSTGRES_PORT = 5432
NFT_TABLE = "inet ingest"
FIREWALL_FILE = "/etc/ingest/firewall.nft"
# On /run (emptied at boot, like the kernel's rules): the sha256 of the rules file last loaded.
FIREWALL_MARKER = "/run/ingest-firewall.loaded"
FIREWALL_UNIT_NAME = "ingest-firewall.service"
FIREWALL_UNIT_FILE = f"/etc/systemd/system/{FIREWALL_UNIT_NAME}"
# Its own unit rather than Debian's nftables.service, whose /etc/nftables.conf starts with `flush ruleset`
# and would wipe Docker's rules on a reload. Ordered before docker so published ports are never unguarded.
FIREWALL_UNIT = f"""[Unit]
Description=ingest: PostgreSQL and Redis answer only the environment's app hosts (nftables table {NFT_TABLE})
Wants=network-pre.target
Before=network-pre.target docker.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/nft -f {FIREWALL_FILE}
ExecStop=/bin/sh -c 'nft delete table {NFT_TABLE} || true'

[Install]
WantedBy=multi-user.target
"""
SUPPORTED = "Debian 12 (bookworm) and 13 (trixie)"
DOCKERD_LOG = "/var/log/dockerd.log"
DOCKER_DEFAULTS = "/etc/default/docker"


def account_conflict(found: Mapping[str, str], account: str, uid: int) -> str | None:
    """Why the service account cannot be created as asked (its uid or name taken by another), or None."""
    for kind in ("user", "group"):
        holder = found.get(kind) or ""
        if holder and holder != f"{account}:{uid}":
            name, _, ident = holder.partition(":")
            what = f"id {uid} belongs to {kind} {name!r}" if ident == str(uid) else f"{kind} {account!r} has id {ident}"
            return (
                f"cannot create the service {kind} {account} with id {uid}: {what}; free it, or set the inventory's "
                "app_uid to a free id"
            )
    return None


def fix_command(env_name: str) -> str:
    return f"ingestctl setup {env_name}"


def not_ready(host_name: str, problem: str) -> HostError:
    return HostError(f"host {host_name}: {problem}")


# ----- packages ---------------------------------------------------------------------------------------------


def debian_major(release: Mapping[str, str]) -> int | None:
    """12 for bookworm, 13 for trixie, from /etc/os-release (VERSION_ID, else the codename); None if unknown."""
    if release.get("id") != "debian":
        return None
    version = (release.get("version_id") or "").split(".")[0]
    if version.isdigit():
        return int(version)
    return {"bookworm": 12, "trixie": 13, "forky": 14}.get(release.get("codename") or "")


def packages_for(release: Mapping[str, str], host_name: str = "host") -> tuple[str, ...]:
    """Debian's own packages for Docker's engine, CLI and Compose, and nftables, on this release."""
    major = debian_major(release)
    if major is None or major < 12:
        found = " ".join(v for v in (release.get("id"), release.get("version_id"), release.get("codename")) if v)
        raise HostError(
            f"host {host_name}: `ingestctl setup` supports {SUPPORTED}, found {found or 'no /etc/os-release'}"
        )
    if major == 12:
        # bookworm: docker.io carries the CLI; docker-compose is Compose v1 (`docker-compose`).
        return ("docker.io", "docker-compose", "nftables")
    # trixie and later: the CLI is its own package; docker-compose is Compose v2 (`docker compose`).
    return ("docker.io", "docker-cli", "docker-compose", "nftables")


def compose_generation(release: Mapping[str, str]) -> str:
    return "v1 (docker-compose)" if debian_major(release) == 12 else "v2 (docker compose)"


def apt_install_command(packages: Iterable[str]) -> str:
    """Install from the distribution, keeping any configuration file the admin already has (confold)."""
    names = " ".join(shlex.quote(name) for name in packages)
    return (
        "export DEBIAN_FRONTEND=noninteractive; apt-get update -q && "
        "apt-get install -y -q --no-install-recommends "
        "-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold " + names
    )


# ----- the Docker engine ------------------------------------------------------------------------------------

_ANSWERS = "timeout 10 docker info >/dev/null 2>&1"


def wait_engine_command(timeout_s: int = 60) -> str:
    return (
        f"for i in $(seq 1 {timeout_s * 2}); do {_ANSWERS} && exit 0; sleep 0.5; done; "
        f"echo 'the Docker engine did not answer within {timeout_s}s' >&2; exit 1"
    )


# Without systemd (containers): dockerd in the background, in its own session so that it outlives the SSH
# command, with /etc/default/docker's DOCKER_OPTS (Debian's place for them), overlay2 first and vfs when
# overlay2 cannot run (no volume under /var/lib/docker): the sandbox entrypoint's own logic.
_START_ENGINE = r"""
if timeout 10 docker info >/dev/null 2>&1; then exit 0; fi
DOCKER_OPTS=
if [ -r {defaults} ]; then . {defaults}; fi
try_start() {{
    setsid dockerd $DOCKER_OPTS "$@" >>{log} 2>&1 </dev/null &
    pid=$!
    i=0
    while [ "$i" -lt 120 ]; do
        if timeout 5 docker info >/dev/null 2>&1; then return 0; fi
        if ! kill -0 "$pid" 2>/dev/null; then return 1; fi
        i=$((i + 1)); sleep 0.5
    done
    kill "$pid" 2>/dev/null; return 1
}}
case " $DOCKER_OPTS " in
    *--storage-driver*) try_start ;;
    *) try_start --storage-driver=overlay2 || {{
           echo "overlay2 did not start; falling back to vfs" >>{log}
           rm -rf /var/lib/docker/overlay2 /var/lib/docker/image/overlay2
           try_start --storage-driver=vfs; }} ;;
esac || {{ echo "dockerd did not start; the end of {log}:" >&2; tail -n 15 {log} >&2; exit 1; }}
"""


def start_engine_command() -> str:
    script = _START_ENGINE.format(defaults=DOCKER_DEFAULTS, log=DOCKERD_LOG).strip()
    return f"sh -c {shlex.quote(script)}"


def restart_engine_command(systemd: bool) -> str:
    """Apply a daemon.json change. live-restore keeps the containers running while the engine restarts.

    Without systemd the engine is restarted with the very arguments it runs with (read from /proc), whoever
    started it (this setup, or a sandbox entrypoint with its own storage driver and address pools).
    """
    if systemd:
        return "systemctl restart docker.service && " + wait_engine_command()
    script = (
        'pid=$(cat /var/run/docker.pid 2>/dev/null || true); '
        'if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then exit 0; fi; '
        "args=$(tr '\\0' '\\n' < /proc/$pid/cmdline | tail -n +2 | tr '\\n' ' '); "
        'kill "$pid"; i=0; while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 120 ]; do i=$((i + 1)); sleep 0.5; done; '
        f'setsid dockerd $args >>{DOCKERD_LOG} 2>&1 </dev/null & '
    )
    wait = shlex.quote(wait_engine_command())
    return f"sh -c {shlex.quote(script)}; sh -c {wait} || {start_engine_command()}"


# ----- firewall ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sources:
    """Who may reach the db host's ports: the app hosts (every port), and the inventory's `db_clients`
    (networks, PostgreSQL only: what pg_hba.conf admits them to)."""

    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    db_clients_v4: tuple[str, ...] = ()
    db_clients_v6: tuple[str, ...] = ()


def resolve(address: str, resolver: Callable[[str], list[str]] | None = None) -> list[str]:
    """An inventory address as IP addresses: a literal as is, a name through DNS (from this machine)."""
    try:
        return [str(ipaddress.ip_address(address))]
    except ValueError:
        pass
    lookup = resolver or _dns
    try:
        found = sorted(set(lookup(address)))
    except OSError as exc:
        raise ConfigError(f"cannot resolve app host address {address!r} for the db host's firewall: {exc}") from exc
    if not found:
        raise ConfigError(f"app host address {address!r} resolves to nothing; the db host's firewall needs its IP")
    return found


def _dns(name: str) -> list[str]:
    return [info[4][0] for info in socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)]


def allowed_sources(
    addresses: Iterable[str], resolver: Callable[[str], list[str]] | None = None, db_clients: Iterable[str] = ()
) -> Sources:
    ips = {ip for address in addresses for ip in resolve(address, resolver)}
    v4 = sorted((ip for ip in ips if ipaddress.ip_address(ip).version == 4), key=ipaddress.ip_address)
    v6 = sorted((ip for ip in ips if ipaddress.ip_address(ip).version == 6), key=ipaddress.ip_address)
    networks = [ipaddress.ip_network(client, strict=False) for client in db_clients]
    # nftables refuses overlapping elements in an interval set: merge them first (10.0.0.5 inside 10.0.0.0/24).
    clients = {
        version: tuple(str(net) for net in ipaddress.collapse_addresses(n for n in networks if n.version == version))
        for version in (4, 6)
    }
    return Sources(tuple(v4), tuple(v6), clients[4], clients[6])


def firewall_rules(sources: Sources, ports: Iterable[int]) -> str:
    """The nftables table for the db host: PORTS answer loopback and SOURCES only; nothing else is touched.

    Declaring the table, deleting it and defining it again in one file is one atomic transaction: loading it
    replaces the previous version without a moment unguarded, and never touches another table.
    """
    port_set = ", ".join(str(port) for port in sorted(set(ports)))
    lines = [
        "#!/usr/sbin/nft -f",
        "# Written by `ingestctl setup`: PostgreSQL and Redis answer only the environment's app hosts.",
        f"table {NFT_TABLE} {{}}",
        f"delete table {NFT_TABLE}",
        f"table {NFT_TABLE} {{",
        "    set app_hosts_v4 {",
        "        type ipv4_addr",
    ]
    if sources.ipv4:
        lines.append(f"        elements = {{ {', '.join(sources.ipv4)} }}")
    lines += ["    }", "    set app_hosts_v6 {", "        type ipv6_addr"]
    if sources.ipv6:
        lines.append(f"        elements = {{ {', '.join(sources.ipv6)} }}")
    lines.append("    }")
    clients = {"v4": ("ip", "ipv4_addr", sources.db_clients_v4), "v6": ("ip6", "ipv6_addr", sources.db_clients_v6)}
    client_rules = []
    for family, (keyword, kind, elements) in clients.items():
        if elements:  # no set at all without db_clients: an environment without them keeps the same file
            lines += [f"    set db_clients_{family} {{", f"        type {kind}", "        flags interval",
                      f"        elements = {{ {', '.join(elements)} }}", "    }"]
            client_rules.append(f"        tcp dport {POSTGRES_PORT} {keyword} saddr @db_clients_{family} accept")
    lines += [
        "    chain input {",
        "        type filter hook input priority 0; policy accept;",
        f"        tcp dport {{ {port_set} }} jump db_ports",
        "    }",
        "    chain db_ports {",
        '        iifname "lo" accept',
        "        ip saddr @app_hosts_v4 accept",
        "        ip6 saddr @app_hosts_v6 accept",
        *client_rules,
        "        counter drop",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def load_firewall_command() -> str:
    """Check the rules (`nft -c`), load them, and record which file was loaded."""
    rules = shlex.quote(FIREWALL_FILE)
    return (
        f"nft -c -f {rules} && nft -f {rules} && "
        f"sha256sum {rules} | cut -d' ' -f1 > {shlex.quote(FIREWALL_MARKER)}"
    )


# ----- the plan for one environment -------------------------------------------------------------------------


@dataclass(frozen=True)
class SetupPlan:
    env: str
    app_uid: int
    firewall: str
    record: str
    hosts: tuple[str, ...] = field(default_factory=tuple)


def setup_record(env_name: str) -> str:
    return json.dumps({"env": env_name, "setup_version": SETUP_VERSION}, sort_keys=True) + "\n"


def plan_for(env_name: str, resolver: Callable[[str], list[str]] | None = None) -> SetupPlan:
    """Everything `setup` decides on this machine before connecting: a ConfigError (exit 2) touches no host."""
    from ingestctl import inventory as inventory_mod

    env = inventory_mod.load(env_name)
    app_addresses = [env.hosts[name].ssh_hostname for name in env.app_hosts]
    ports = (POSTGRES_PORT, hostlayout.Ports(public=env.data.app_port).redis)
    return SetupPlan(
        env=env_name,
        app_uid=env.data.app_uid,
        firewall=firewall_rules(allowed_sources(app_addresses, resolver, env.data.db_clients), ports),
        record=setup_record(env_name),
        hosts=tuple(env.all_hosts),
    )


def operation_calls(setup: SetupPlan) -> list:
    """The operations, in order, with their arguments: the same list for every host (they read their host)."""
    from ingestctl.operations import host_setup as ops
    from ingestctl.pyinfra_runner import OperationCall

    # apt and the first engine start take minutes on a slow mirror: more than the inventory's command bound.
    slow = {"_timeout": 1800}
    return [
        OperationCall(ops.directories_present, kwargs={"name": "Ensure ingest directories exist"}),
        OperationCall(ops.docker_daemon_configured, kwargs={"name": "Ensure Docker log rotation (daemon.json)"}),
        OperationCall(ops.packages_installed,
                      kwargs={"name": "Ensure Docker, Compose and nftables are installed", **slow}),
        OperationCall(ops.docker_running, kwargs={"name": "Ensure the Docker engine is enabled and running", **slow}),
        OperationCall(ops.compose_available, kwargs={"name": "Ensure Docker Compose answers"}),
        OperationCall(ops.service_account_present, kwargs={"name": "Ensure the ingest service account exists",
                                                           "uid": setup.app_uid}),
        OperationCall(ops.firewall_configured, kwargs={"name": "Ensure the db firewall (nftables) is loaded",
                                                       "rules": setup.firewall}),
        OperationCall(ops.setup_recorded, kwargs={"name": "Record the setup", "record": setup.record}),
    ]


@dataclass(frozen=True)
class HostOutcome:
    host: str
    success: bool
    changed: tuple[str, ...]
    unchanged: tuple[str, ...]
    error: str | None = None
    noops: tuple[str, ...] = ()


def run_setup(env_name: str, hosts: Iterable[str] | None = None, dry: bool = False) -> dict[str, HostOutcome]:
    """Apply (or with DRY only evaluate) the setup on every host; per host what changed and what did not."""
    setup = plan_for(env_name)
    calls = operation_calls(setup)
    if dry:
        return _dry_run(env_name, calls, hosts)
    from ingestctl import pyinfra_runner as runner

    result = runner.run_operations(env_name, calls, hosts=hosts, raise_on_error=False)
    outcomes = {}
    for name, host_result in result.hosts.items():
        error = None if host_result.success else host_result.describe_failure()
        outcomes[name] = HostOutcome(
            host=name,
            success=host_result.success,
            changed=tuple(op.name for op in host_result.operations if op.changed),
            unchanged=tuple(op.name for op in host_result.operations if op.success and not op.changed),
            error=error,
            noops=host_result.noops,
        )
    return outcomes


def _dry_run(env_name: str, calls, hosts) -> dict[str, HostOutcome]:
    """pyinfra's change detection alone: connect, evaluate each operation against the host's facts, run nothing.

    Each operation reads the host as it is now, so on a bare host everything after the package install shows
    as a change (its tools are not there yet), which is what a first `setup` will do.
    """
    from pyinfra.api import Config, State
    from pyinfra.api.connect import connect_all, disconnect_all
    from pyinfra.api.exceptions import PyinfraError
    from pyinfra.api.operation import add_op
    from pyinfra.api.state import StateStage

    from ingestctl import pyinfra_runner as runner

    inventory = runner.load_inventory(env_name)
    limit = runner.select_hosts(inventory, hosts)
    state = State(inventory, Config(FAIL_PERCENT=None, CONNECT_TIMEOUT=10), initial_limit=limit)
    outcomes: dict[str, HostOutcome] = {}
    pyinfra_logger = logging.getLogger("pyinfra")
    previous_level = pyinfra_logger.level
    pyinfra_logger.setLevel(logging.ERROR)
    try:
        state.set_stage(StateStage.Connect)
        try:
            connect_all(state)
        except PyinfraError:
            pass
        state.set_stage(StateStage.Prepare)
        active = {host.name: host for host in state.inventory.get_active_hosts()}
        for host in limit if limit is not None else list(inventory):
            if host.name not in active:
                outcomes[host.name] = HostOutcome(host.name, False, (), (), error=f"host {host.name}: not reachable")
                continue
            changed, unchanged = [], []
            try:
                for call in calls:
                    meta = add_op(state, call.func, host=host, **call.kwargs)[host]
                    (changed if meta.will_change else unchanged).append(call.kwargs["name"])
            except Exception as exc:  # noqa: BLE001 - pyinfra raises many types while preparing; report per host
                outcomes[host.name] = HostOutcome(host.name, False, tuple(changed), tuple(unchanged),
                                                  error=f"host {host.name}: {type(exc).__name__}: {exc}")
                continue
            outcomes[host.name] = HostOutcome(host.name, True, tuple(changed), tuple(unchanged))
    finally:
        disconnect_all(state)
        pyinfra_logger.setLevel(previous_level)
    return outcomes


# ----- is a host set up? (deploy's preflight) -----------------------------------------------------------------


def readiness_problems(found: Mapping[str, Any]) -> list[str]:
    """What keeps a host from taking a deploy, from `facts.host.parse_readiness` output; [] when ready."""
    problems = []
    if not found.get("docker_cli"):
        problems.append("Docker is not installed (no `docker` command)")
    elif not found.get("engine"):
        problems.append("the Docker engine is not running (`docker version` does not reach it)")
    if not found.get("compose"):
        problems.append("Docker Compose is missing (neither `docker compose` nor `docker-compose`)")
    if found.get("missing_tools"):
        problems.append(f"missing tools: {', '.join(found['missing_tools'])}")
    return problems


def setup_problems(env_name: str, hosts: Iterable[str] | None = None) -> dict[str, list[str]]:
    """{host: [what is missing]} for every host of ENV that cannot take a deploy yet; {} when all can.

    One SSH round trip per host, read-only (through sudo where the inventory says so). An unreachable host
    is a problem of its own. Each problem is fixed by `fix_command(env_name)` (`ingestctl setup ENV`).
    Hosts set up by hand (Docker and Compose present) pass: the setup record is not required.
    """
    from ingestctl import fleet
    from ingestctl import pyinfra_runner as runner
    from ingestctl.facts.host import READINESS_COMMAND

    inventory = runner.load_inventory(env_name)
    wanted = [host.name for host in (runner.select_hosts(inventory, hosts) or list(inventory))]
    problems: dict[str, list[str]] = {}
    with fleet.connected(env_name, wanted, require_all=False) as active:
        for name in wanted:
            if name not in active:
                problems[name] = ["not reachable over SSH (or sudo refused)"]
        results = fleet.run_on(active, lambda _name: READINESS_COMMAND)
    return {**problems, **problems_in(results)}


def problems_in(results: Mapping[str, Any]) -> dict[str, list[str]]:
    """{host: [what is missing]} from each host's READINESS_COMMAND result (fleet.CommandResult)."""
    from ingestctl.facts.host import parse_readiness

    problems: dict[str, list[str]] = {}
    for name, result in results.items():
        listed = readiness_problems(parse_readiness(result.stdout))
        if not result.ok and not listed:
            listed = [f"the readiness check failed: {(result.stderr or result.stdout).strip()[-200:]}"]
        if listed:
            problems[name] = listed
    return problems


def describe_problems(env_name: str, problems: Mapping[str, list[str]]) -> str:
    """One message naming every host that is not set up and the command that fixes it (for exit 2)."""
    parts = [f"{host}: {'; '.join(found)}" for host, found in sorted(problems.items())]
    return (
        f"{len(problems)} host(s) of {env_name} are not set up for a deploy — {' | '.join(parts)}; "
        f"fix: `{fix_command(env_name)}` (nothing was changed on any host)"
    )
