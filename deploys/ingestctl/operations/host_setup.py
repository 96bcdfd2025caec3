"""pyinfra operations that turn a bare Debian 12/13 host into a deploy target (`ingestctl setup`).

Each reads the host through facts (`ingestctl.facts.host`) and reports a noop with its reason when the host is
already as asked, so a second `setup` changes nothing. Everything comes from the distribution's own packages;
nothing is downloaded from elsewhere. Files are written through stdin (`secretfiles`), never via /tmp.

Where the init system matters (starting the Docker engine, loading the firewall at boot), real servers and VMs
have systemd; the sandbox's bare hosts are containers without it, and get the same result by hand.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from ingestctl import hostsetup as plan
from ingestctl.facts.host import (
    Account,
    DirectoryModes,
    DockerEngine,
    FileStates,
    FirewallState,
    InitSystem,
    OsRelease,
    SystemdUnit,
)
from ingestctl.facts.release import ComposeBinary
from ingestctl.operations import secretfiles
from pyinfra import host, state
from pyinfra.api import operation
from pyinfra.facts.deb import DebPackages


def _is_systemd() -> bool:
    return host.get_fact(InitSystem) == "systemd"


def _executing() -> bool:
    """False while pyinfra only looks for changes (and for `setup --dry`): then tools that an earlier operation
    installs are legitimately missing, and their absence means "will change", not an error."""
    return bool(state.is_executing)


@operation()
def packages_installed(extra: Sequence[str] = ()):
    """Ensure Docker's engine, CLI and Compose (v2 on Debian 13, v1 on 12) and nftables are installed from Debian.

    apt-get runs only when something is missing, so a set-up host answers with a noop and no `apt-get update`.
    """
    release = host.get_fact(OsRelease)
    wanted = [*plan.packages_for(release, host.name), *extra]
    installed = host.get_fact(DebPackages) or {}
    missing = [name for name in wanted if name not in installed]
    if not missing:
        host.noop(f"packages already installed: {', '.join(wanted)}")
        return
    yield plan.apt_install_command(missing)


@operation()
def docker_daemon_configured(config_text: str = plan.DAEMON_JSON):
    """Ensure /etc/docker/daemon.json (log rotation for every container, live-restore) is in place.

    A running engine is restarted to apply a change; with live-restore the containers keep running meanwhile.
    """
    state = host.get_fact(FileStates, paths=[plan.DAEMON_JSON_PATH]).get(plan.DAEMON_JSON_PATH)
    if secretfiles.in_place(state, config_text, "644", "0", "0"):
        host.noop(f"{plan.DAEMON_JSON_PATH} already in place")
        return
    yield secretfiles.write_command(plan.DAEMON_JSON_PATH, config_text, mode="644", user="0", group="0")
    if host.get_fact(DockerEngine) is not None:
        yield plan.restart_engine_command(systemd=_is_systemd())


@operation()
def docker_running():
    """Ensure the Docker engine is enabled and running: `systemctl enable --now docker` where PID 1 is systemd
    (every real Debian server); elsewhere (containers) dockerd is started in the background, as the sandbox
    entrypoint does, with overlay2 falling back to vfs, and the options in /etc/default/docker."""
    answering = host.get_fact(DockerEngine)
    if _is_systemd():
        unit = host.get_fact(SystemdUnit, unit="docker.service")
        if answering and unit["enabled"] == "enabled" and unit["active"] == "active":
            host.noop(f"docker {answering} enabled and running (systemd)")
            return
        yield "systemctl enable --now docker.service"
        yield plan.wait_engine_command()
        return
    if answering:
        host.noop(f"docker {answering} running (no systemd on this host: started by ingestctl setup)")
        return
    yield plan.start_engine_command()


@operation()
def compose_available():
    """Check that the Compose the release asks for answers (`docker compose` v2, else `docker-compose` v1)."""
    binary = host.get_fact(ComposeBinary)
    if binary is not None:
        host.noop(f"compose: {binary}")
        return
    if not _executing():
        yield "true  # compose arrives with the packages"
        return
    raise plan.not_ready(host.name, "neither `docker compose` nor `docker-compose` answers after installing Docker")


@operation()
def service_account_present(uid: int, account: str = plan.SERVICE_ACCOUNT):
    """Ensure the service's system user and group (uid = gid = the inventory's app_uid) exist, without a login."""
    name = account
    found = host.get_fact(Account, uid=uid, account=name)
    if found["user"] == f"{name}:{uid}" and found["group"] == f"{name}:{uid}":
        host.noop(f"user and group {name} ({uid}) exist")
        return
    problem = plan.account_conflict(found, name, uid)
    if problem:
        raise plan.not_ready(host.name, problem)
    if not found["group"]:
        yield f"groupadd --system --gid {uid} {name}"
    if not found["user"]:
        yield (
            f"useradd --system --uid {uid} --gid {uid} --home-dir {plan.BASE} --no-create-home "
            f"--shell /usr/sbin/nologin --comment 'ingest service' {name}"
        )


@operation()
def directories_present(directories: Sequence[tuple[str, str]] = plan.DIRECTORIES):
    """Ensure the release's directories exist with their modes (root-owned): /opt/ingest and /var/lib/ingest."""
    wanted = {path: f"root:root {mode}" for path, mode in directories}
    found = host.get_fact(DirectoryModes, paths=list(wanted))
    wrong = [path for path, mode in wanted.items() if found.get(path) != mode]
    if not wrong:
        host.noop(f"directories in place: {', '.join(wanted)}")
        return
    for path in wrong:
        quoted = shlex.quote(path)
        yield f"mkdir -p {quoted} && chown root:root {quoted} && chmod {wanted[path].split()[1]} {quoted}"


@operation()
def firewall_configured(rules: str):
    """On the db host, ensure the nftables table that lets only the environment's app hosts (and the host itself)
    reach PostgreSQL and Redis is in /etc/ingest/firewall.nft, loaded, and loaded again at boot.

    The table is the host's only ingest rule set and leaves every other port and table alone (Docker's own
    rules included). Where PID 1 is systemd, the unit `ingest-firewall.service` loads it at boot; elsewhere
    (containers) rules live as long as the container, and `setup` loads them again.
    """
    if "db" not in host.groups:
        host.noop("not the db host: PostgreSQL and Redis do not run here")
        return
    nft = host.get_fact(FirewallState, table=plan.NFT_TABLE, marker=plan.FIREWALL_MARKER)
    if not nft["nft"] and not _executing():
        yield "true  # nftables arrives with the packages"
        return
    if not nft["nft"]:
        raise plan.not_ready(
            host.name,
            f"nftables cannot run here ({nft['error'] or 'unknown error'}): PostgreSQL and Redis would answer "
            "any address. Give the host (container) CAP_NET_ADMIN, or filter ports 5432 and 6379 upstream",
        )
    systemd = _is_systemd()
    files = host.get_fact(FileStates, paths=[plan.FIREWALL_FILE, plan.FIREWALL_UNIT_FILE])
    rules_ok = secretfiles.in_place(files.get(plan.FIREWALL_FILE), rules, "644", "0", "0")
    unit_ok = not systemd or secretfiles.in_place(
        files.get(plan.FIREWALL_UNIT_FILE), plan.FIREWALL_UNIT, "644", "0", "0"
    )
    loaded_ok = nft["loaded"] and nft["loaded_sha256"] == secretfiles.sha256(rules)
    enabled_ok = not systemd or host.get_fact(SystemdUnit, unit=plan.FIREWALL_UNIT_NAME)["enabled"] == "enabled"
    if rules_ok and unit_ok and loaded_ok and enabled_ok:
        host.noop(f"firewall table {plan.NFT_TABLE} loaded from {plan.FIREWALL_FILE}")
        return
    if not rules_ok:
        yield secretfiles.write_command(plan.FIREWALL_FILE, rules, mode="644", user="0", group="0")
    if not loaded_ok or not rules_ok:
        yield plan.load_firewall_command()
    if systemd and not unit_ok:
        yield secretfiles.write_command(plan.FIREWALL_UNIT_FILE, plan.FIREWALL_UNIT, mode="644", user="0", group="0")
        yield "systemctl daemon-reload"
    if systemd and not (unit_ok and enabled_ok):
        yield f"systemctl enable {plan.FIREWALL_UNIT_NAME}"


@operation()
def setup_recorded(record: str):
    """Ensure /etc/ingest/setup.json records what `setup` made of this host (read by `deploy`'s preflight)."""
    state = host.get_fact(FileStates, paths=[plan.SETUP_RECORD]).get(plan.SETUP_RECORD)
    if secretfiles.in_place(state, record, "644", "0", "0"):
        host.noop(f"{plan.SETUP_RECORD} up to date")
        return
    yield secretfiles.write_command(plan.SETUP_RECORD, record, mode="644", user="0", group="0")
