"""`ingestctl setup`: the packages per Debian release, the firewall, the facts, the operations' decisions and the
deploy preflight's readiness check, by exact value. The real thing runs in tests/e2e/test_bare_hosts.py."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from ingestctl import hostsetup
from ingestctl.errors import ConfigError, HostError
from ingestctl.facts import host as facts
from ingestctl.fleet import CommandResult
from ingestctl.operations import host_setup as ops

BOOKWORM = {"id": "debian", "version_id": "12", "codename": "bookworm"}
TRIXIE = {"id": "debian", "version_id": "13", "codename": "trixie"}


# ----- packages ---------------------------------------------------------------------------------------------

def test_bookworm_gets_compose_v1_and_the_cli_inside_docker_io():
    assert hostsetup.packages_for(BOOKWORM) == ("docker.io", "docker-compose", "nftables")
    assert hostsetup.compose_generation(BOOKWORM) == "v1 (docker-compose)"


def test_trixie_gets_the_separate_cli_and_compose_v2():
    assert hostsetup.packages_for(TRIXIE) == ("docker.io", "docker-cli", "docker-compose", "nftables")
    assert hostsetup.compose_generation(TRIXIE) == "v2 (docker compose)"
    # Debian testing has no VERSION_ID: the codename decides.
    assert hostsetup.packages_for({"id": "debian", "version_id": "", "codename": "trixie"})[2] == "docker-compose"


@pytest.mark.parametrize("release", [
    {"id": "debian", "version_id": "11", "codename": "bullseye"},
    {"id": "ubuntu", "version_id": "24.04", "codename": "noble"},
    {"id": "", "version_id": "", "codename": ""},
])
def test_other_systems_are_refused_naming_what_is_supported(release):
    with pytest.raises(HostError, match=r"host app2: `ingestctl setup` supports Debian 12 \(bookworm\) and 13"):
        hostsetup.packages_for(release, "app2")


def test_apt_install_keeps_existing_config_files_and_runs_unattended():
    assert hostsetup.apt_install_command(["docker.io", "nftables"]) == (
        "export DEBIAN_FRONTEND=noninteractive; apt-get update -q && apt-get install -y -q --no-install-recommends "
        "-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold docker.io nftables"
    )


def test_daemon_json_rotates_container_logs_and_keeps_containers_over_restarts():
    config = json.loads(hostsetup.DAEMON_JSON)
    assert config == {"live-restore": True, "log-driver": "json-file",
                      "log-opts": {"max-file": "5", "max-size": "10m"}}


def test_engine_start_without_systemd_mirrors_the_sandbox_entrypoint():
    command = hostsetup.start_engine_command()
    assert command.startswith("sh -c '")
    for piece in ("setsid dockerd $DOCKER_OPTS", "--storage-driver=overlay2", "--storage-driver=vfs",
                  ". /etc/default/docker", "/var/log/dockerd.log", "if timeout 10 docker info"):
        assert piece in command, piece
    assert hostsetup.restart_engine_command(systemd=True).startswith("systemctl restart docker.service && ")
    assert "kill \"$pid\"" in hostsetup.restart_engine_command(systemd=False)


# ----- firewall ---------------------------------------------------------------------------------------------

def test_firewall_rules_let_only_app_hosts_and_loopback_reach_the_database_ports():
    rules = hostsetup.firewall_rules(hostsetup.Sources(("10.0.0.3", "10.0.0.2"), ("fd00::2",)), [6379, 5432])
    assert rules == """#!/usr/sbin/nft -f
# Written by `ingestctl setup`: PostgreSQL and Redis answer only the environment's app hosts.
table inet ingest {}
delete table inet ingest
table inet ingest {
    set app_hosts_v4 {
        type ipv4_addr
        elements = { 10.0.0.3, 10.0.0.2 }
    }
    set app_hosts_v6 {
        type ipv6_addr
        elements = { fd00::2 }
    }
    chain input {
        type filter hook input priority 0; policy accept;
        tcp dport { 5432, 6379 } jump db_ports
    }
    chain db_ports {
        iifname "lo" accept
        ip saddr @app_hosts_v4 accept
        ip6 saddr @app_hosts_v6 accept
        counter drop
    }
}
"""


def test_empty_address_families_give_empty_sets():
    rules = hostsetup.firewall_rules(hostsetup.Sources(("10.0.0.2",), ()), [5432, 6379])
    assert "elements" not in rules.split("set app_hosts_v6")[1].split("}")[0]


def test_db_clients_reach_postgresql_only_as_merged_networks():
    sources = hostsetup.allowed_sources(["10.0.0.2"], db_clients=["10.0.0.0/24", "10.0.0.5", "172.18.0.1", "fd00::/64"])
    assert sources.db_clients_v4 == ("10.0.0.0/24", "172.18.0.1/32") and sources.db_clients_v6 == ("fd00::/64",)
    rules = hostsetup.firewall_rules(sources, [5432, 6379])
    assert "set db_clients_v4 {\n        type ipv4_addr\n        flags interval\n" \
           "        elements = { 10.0.0.0/24, 172.18.0.1/32 }\n    }" in rules
    assert "        tcp dport 5432 ip saddr @db_clients_v4 accept\n" \
           "        tcp dport 5432 ip6 saddr @db_clients_v6 accept\n        counter drop" in rules


def test_without_db_clients_the_firewall_file_is_as_before():
    sources = hostsetup.allowed_sources(["10.0.0.2"])
    assert "db_clients" not in hostsetup.firewall_rules(sources, [5432, 6379])


def test_allowed_sources_resolve_names_and_sort_by_family():
    resolver = {"app2.internal": ["10.0.1.22", "fd00::22"], "app3.internal": ["10.0.1.3"]}.__getitem__
    found = hostsetup.allowed_sources(["app2.internal", "10.0.1.21", "app3.internal", "10.0.1.21"], resolver)
    assert found == hostsetup.Sources(("10.0.1.3", "10.0.1.21", "10.0.1.22"), ("fd00::22",))


def test_an_unresolvable_app_host_is_a_config_error_before_any_host_is_touched():
    def fail(name):
        raise OSError("Name or service not known")

    with pytest.raises(ConfigError, match="cannot resolve app host address 'app9.example'"):
        hostsetup.allowed_sources(["app9.example"], fail)


def test_firewall_load_checks_before_it_loads_and_records_the_file():
    assert hostsetup.load_firewall_command() == (
        "nft -c -f /etc/ingest/firewall.nft && nft -f /etc/ingest/firewall.nft && "
        "sha256sum /etc/ingest/firewall.nft | cut -d' ' -f1 > /run/ingest-firewall.loaded"
    )
    assert "ExecStart=/usr/sbin/nft -f /etc/ingest/firewall.nft" in hostsetup.FIREWALL_UNIT
    assert "flush ruleset" not in hostsetup.FIREWALL_UNIT


# ----- facts ------------------------------------------------------------------------------------------------

def test_fact_parsers():
    assert facts.InitSystem().process(["systemd"]) == "systemd"
    assert facts.InitSystem().process(["docker-init"]) == "docker-init"
    assert facts.OsRelease().process(["debian", "12", "bookworm"]) == BOOKWORM
    assert facts.DockerEngine().process([]) is None
    assert facts.DockerEngine().process(["26.1.5+dfsg1"]) == "26.1.5+dfsg1"
    assert facts.FileStates().process(["600 0 0 root root abc /etc/x y", "- - - - - - /etc/none"]) == {
        "/etc/x y": {"sha256": "abc", "mode": "600", "uid": "0", "gid": "0", "user": "root", "group": "root"},
        "/etc/none": None,
    }
    assert facts.FirewallState().process(["nft=missing"]) == {
        "nft": False, "error": "nft is not installed", "loaded": False, "loaded_sha256": ""}
    assert facts.FirewallState().process(["nft=error", "error=Operation not permitted"])["error"] == (
        "Operation not permitted")
    assert facts.FirewallState().process(["nft=ok", "loaded=yes", "marker=abc"]) == {
        "nft": True, "error": "", "loaded": True, "loaded_sha256": "abc"}
    assert facts.SystemdUnit().process(["enabled=", "active="]) == {"enabled": "not-found", "active": "unknown"}
    assert facts.Account().process(["user=ingest:10001", "group="]) == {"user": "ingest:10001", "group": ""}
    assert facts.DirectoryModes().process(["root:root 755 /opt/ingest", "- - /var/lib/ingest"]) == {
        "/opt/ingest": "root:root 755", "/var/lib/ingest": None}


def test_readiness_parsing_and_problems():
    ready = facts.parse_readiness(
        "init=docker-init\nos=debian 13 trixie\ndocker_cli=yes\nengine=26.1.5\ncompose=docker compose\n"
        "missing_tools=\nsetup={\"env\": \"local\"}\n"
    )
    assert ready["compose"] == "docker compose" and ready["engine"] == "26.1.5" and ready["setup"]
    assert hostsetup.readiness_problems(ready) == []
    bare = facts.parse_readiness("init=systemd\nos=debian 12 bookworm\ndocker_cli=no\nengine=\ncompose=\n"
                                 "missing_tools=flock\nsetup=\n")
    assert hostsetup.readiness_problems(bare) == [
        "Docker is not installed (no `docker` command)",
        "Docker Compose is missing (neither `docker compose` nor `docker-compose`)",
        "missing tools: flock",
    ]
    stopped = {**ready, "engine": None}
    assert hostsetup.readiness_problems(stopped) == [
        "the Docker engine is not running (`docker version` does not reach it)"]


def test_account_conflicts_are_named():
    assert hostsetup.account_conflict({"user": "", "group": ""}, "ingest", 10001) is None
    assert hostsetup.account_conflict({"user": "ingest:10001", "group": "ingest:10001"}, "ingest", 10001) is None
    message = hostsetup.account_conflict({"user": "bob:10001", "group": ""}, "ingest", 10001)
    assert "id 10001 belongs to user 'bob'" in message and "app_uid" in message


# ----- operations' decisions (a fake host) ------------------------------------------------------------------

class FakeHost:
    def __init__(self, facts_by_name, name="db1", groups=("db", "app")):
        self.facts = facts_by_name
        self.name = name
        self.groups = groups
        self.noops: list[str] = []

    def get_fact(self, fact, **kwargs):
        value = self.facts[fact.__name__]
        return value(**kwargs) if callable(value) else value

    def noop(self, message):
        self.noops.append(message)


class FakeState:
    def __init__(self, executing):
        self.is_executing = executing


def commands(op, fake, executing=True, monkeypatch=None, **kwargs):
    monkeypatch.setattr(ops, "host", fake)
    monkeypatch.setattr(ops, "state", FakeState(executing))
    return [str(c) for c in op._inner(**kwargs)]


def test_packages_run_apt_only_for_what_is_missing(monkeypatch):
    fake = FakeHost({"OsRelease": TRIXIE, "DebPackages": {"docker.io": ["26"], "nftables": ["1"]}})
    assert commands(ops.packages_installed, fake, monkeypatch=monkeypatch) == [
        hostsetup.apt_install_command(["docker-cli", "docker-compose"])]
    fake = FakeHost({"OsRelease": BOOKWORM, "DebPackages": {"docker.io": [], "docker-compose": [], "nftables": []}})
    assert commands(ops.packages_installed, fake, monkeypatch=monkeypatch) == []
    assert fake.noops == ["packages already installed: docker.io, docker-compose, nftables"]


def test_engine_start_is_systemctl_where_pid1_is_systemd_and_by_hand_elsewhere(monkeypatch):
    systemd = FakeHost({"InitSystem": "systemd", "DockerEngine": None,
                        "SystemdUnit": {"enabled": "disabled", "active": "inactive"}})
    assert commands(ops.docker_running, systemd, monkeypatch=monkeypatch)[0] == "systemctl enable --now docker.service"
    running = FakeHost({"InitSystem": "systemd", "DockerEngine": "26.1",
                        "SystemdUnit": {"enabled": "enabled", "active": "active"}})
    assert commands(ops.docker_running, running, monkeypatch=monkeypatch) == []
    container = FakeHost({"InitSystem": "docker-init", "DockerEngine": None})
    assert commands(ops.docker_running, container, monkeypatch=monkeypatch) == [hostsetup.start_engine_command()]
    container = FakeHost({"InitSystem": "docker-init", "DockerEngine": "20.10.24"})
    assert commands(ops.docker_running, container, monkeypatch=monkeypatch) == []
    assert "no systemd on this host" in container.noops[0]


def test_missing_compose_is_a_change_while_planning_and_an_error_when_executing(monkeypatch):
    fake = FakeHost({"ComposeBinary": None}, name="app2")
    assert commands(ops.compose_available, fake, executing=False, monkeypatch=monkeypatch) != []
    with pytest.raises(HostError, match="host app2: neither `docker compose` nor `docker-compose`"):
        commands(ops.compose_available, fake, executing=True, monkeypatch=monkeypatch)


def test_firewall_is_for_the_db_host_only_and_reloads_only_on_change(monkeypatch):
    rules = hostsetup.firewall_rules(hostsetup.Sources(("10.0.0.2",)), [5432, 6379])
    app = FakeHost({}, name="app2", groups=("app",))
    assert commands(ops.firewall_configured, app, monkeypatch=monkeypatch, rules=rules) == []
    in_place = {"sha256": hostsetup_sha(rules), "mode": "644", "uid": "0", "gid": "0", "user": "root",
                "group": "root"}
    loaded = FakeHost({
        "InitSystem": "docker-init",
        "FirewallState": {"nft": True, "error": "", "loaded": True, "loaded_sha256": hostsetup_sha(rules)},
        "FileStates": {hostsetup.FIREWALL_FILE: in_place, hostsetup.FIREWALL_UNIT_FILE: None},
    })
    assert commands(ops.firewall_configured, loaded, monkeypatch=monkeypatch, rules=rules) == []
    flushed = FakeHost({**loaded.facts, "FirewallState": {"nft": True, "error": "", "loaded": False,
                                                          "loaded_sha256": ""}})
    assert commands(ops.firewall_configured, flushed, monkeypatch=monkeypatch, rules=rules) == [
        hostsetup.load_firewall_command()]


def test_a_host_where_nft_cannot_run_fails_clearly(monkeypatch):
    fake = FakeHost({"FirewallState": {"nft": False, "error": "Operation not permitted", "loaded": False,
                                       "loaded_sha256": ""}})
    with pytest.raises(HostError, match="nftables cannot run here \\(Operation not permitted\\)"):
        commands(ops.firewall_configured, fake, monkeypatch=monkeypatch, rules="x")


def hostsetup_sha(text):
    from ingestctl.operations.secretfiles import sha256

    return sha256(text)


# ----- the preflight check ------------------------------------------------------------------------------------

def test_setup_problems_names_each_host_and_the_fix(monkeypatch):
    from contextlib import contextmanager

    from ingestctl import fleet
    from ingestctl import pyinfra_runner as runner

    class Inv(list):
        pass

    class H:
        def __init__(self, name):
            self.name = name

    monkeypatch.setattr(runner, "load_inventory", lambda env: Inv([H("db1"), H("app2"), H("app3")]))
    monkeypatch.setattr(runner, "select_hosts", lambda inv, hosts: None)

    @contextmanager
    def connected(env, hosts, require_all=True):
        assert require_all is False
        yield {"db1": object(), "app2": object()}

    ready = ("docker_cli=yes\nengine=26\ncompose=docker compose\nmissing_tools=\n")
    outputs = {"db1": CommandResult("db1", True, ready, ""),
               "app2": CommandResult("app2", True, "docker_cli=no\nengine=\ncompose=\nmissing_tools=\n", "")}
    monkeypatch.setattr(fleet, "connected", connected)
    monkeypatch.setattr(fleet, "run_on", lambda active, command: {name: outputs[name] for name in active})
    problems = hostsetup.setup_problems("staging")
    assert problems == {
        "app2": ["Docker is not installed (no `docker` command)",
                 "Docker Compose is missing (neither `docker compose` nor `docker-compose`)"],
        "app3": ["not reachable over SSH (or sudo refused)"],
    }
    message = hostsetup.describe_problems("staging", problems)
    assert message.startswith("2 host(s) of staging are not set up for a deploy — app2: Docker is not installed")
    assert "app3: not reachable" in message and "fix: `ingestctl setup staging`" in message


def test_setup_command_reports_no_change_and_failures(monkeypatch):
    from ingestctl import setup_cli

    monkeypatch.setattr(hostsetup, "plan_for", lambda env: hostsetup.SetupPlan(env, 10001, "", "", ("db1", "app2")))
    outcomes = {"db1": hostsetup.HostOutcome("db1", True, (), ("a",)),
                "app2": hostsetup.HostOutcome("app2", True, (), ("a",))}
    monkeypatch.setattr(hostsetup, "run_setup", lambda env, hosts=None, dry=False: outcomes)
    result = CliRunner().invoke(setup_cli.setup, ["local", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["outcome"] == "noop" and summary["changed_hosts"] == []
    outcomes["app2"] = hostsetup.HostOutcome("app2", False, (), (), error="host app2: apt-get failed")
    result = CliRunner().invoke(setup_cli.setup, ["local"])
    assert result.exit_code == 2
    assert "1 host(s) not set up: host app2: apt-get failed" in result.output


# A `docker` that answers as an engine and a Compose plugin would, and notes every call in $CALLS.
FAKE_DOCKER = """#!/bin/sh
echo "$*" >> "$CALLS"
case "$1 $2" in
  "version --format") echo 27.5.1 ;;
  "compose version") [ -n "$HAS_COMPOSE" ] && echo "Docker Compose version v2.32.4" || exit 1 ;;
  *) exit 1 ;;
esac
"""


def readiness_on_a_fake_host(tmp_path, plugin_dir: str | None, has_compose: bool) -> tuple[dict, list[str]]:
    import shutil
    import subprocess

    bin_dir, home, calls = tmp_path / "bin", tmp_path / "home", tmp_path / "calls"
    bin_dir.mkdir()
    home.mkdir()
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    if plugin_dir is not None:
        (home / plugin_dir).mkdir(parents=True)
        (home / plugin_dir / "docker-compose").write_text("#!/bin/sh\n")
        (home / plugin_dir / "docker-compose").chmod(0o755)
    for tool in ("timeout", "cat"):  # what the command runs besides docker; no docker-compose v1 from this machine
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(bin_dir), "HOME": str(home), "CALLS": str(calls),
           "HAS_COMPOSE": "yes" if has_compose else ""}
    done = subprocess.run(["/bin/sh", "-c", facts.READINESS_COMMAND], capture_output=True, text=True, env=env,
                          timeout=30, check=True)
    return facts.parse_readiness(done.stdout), calls.read_text().splitlines() if calls.exists() else []


def test_readiness_finds_the_compose_plugin_where_docker_looks_without_running_it(tmp_path):
    found, calls = readiness_on_a_fake_host(tmp_path, ".docker/cli-plugins", has_compose=False)
    assert (found["engine"], found["compose"]) == ("27.5.1", "docker compose")
    assert calls == ["version --format {{.Server.Version}}"]  # the engine asked; neither `info` nor `compose`


def test_readiness_asks_compose_itself_when_its_plugin_is_elsewhere(tmp_path):
    found, calls = readiness_on_a_fake_host(tmp_path, None, has_compose=True)
    assert found["compose"] == "docker compose"
    assert "compose version" in calls


def test_readiness_without_compose_anywhere_names_it_missing(tmp_path):
    found, _calls = readiness_on_a_fake_host(tmp_path, None, has_compose=False)
    assert found["compose"] is None
    assert "Docker Compose is missing" in " ".join(hostsetup.readiness_problems(found))
