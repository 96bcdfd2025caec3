"""`testbed up --bare` and `--hosts N`: the hosts, their images and Debian releases, the state, the probe, the
refusal to silently rebuild a running testbed as another kind, and `inventories/local.py` following `sudo`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from ingestctl.errors import ConfigError
from ingestctl.testbed import commands, hostspec, images, lifecycle, probe
from ingestctl.testbed import state as state_mod
from ingestctl.testbed.hostspec import HostSpec
from ingestctl.testbed.state import HostState


def test_default_hosts_are_unchanged_and_hosts_n_adds_app_hosts():
    assert hostspec.testbed_hosts() == hostspec.DEFAULT_HOSTS
    assert [h.name for h in hostspec.testbed_hosts(4)] == ["db1", "app2", "app3", "app4", "app5"]
    assert [h.roles for h in hostspec.testbed_hosts(1)] == [("db", "app"), ("app",)]


def test_bare_hosts_mix_debian_releases():
    assert hostspec.testbed_hosts(2, bare=True) == (
        HostSpec("db1", ("db", "app"), "bookworm"),
        HostSpec("app2", ("app",), "trixie"),
        HostSpec("app3", ("app",), "trixie"),
    )


@pytest.mark.parametrize("bad", [0, -1, hostspec.MAX_APP_HOSTS + 1, True, "2"])
def test_hosts_n_is_bounded(bad):
    with pytest.raises(ConfigError, match="--hosts: expected a number of app hosts from 1 to"):
        hostspec.testbed_hosts(bad)


def test_bare_images_have_recipes_per_release_and_ready_made_keys_are_unchanged():
    assert images.READY_MADE_KEYS == ("sandbox-host", "postgres", "redis", "proxy", "prometheus")
    assert images.BARE_KEYS == ("sandbox-bare-bookworm", "sandbox-bare-trixie", "postgres", "redis", "proxy")
    assert images.SANDBOX_IMAGES["sandbox-bare-bookworm"].base == "bookworm-python"
    assert images.SANDBOX_IMAGES["sandbox-bare-trixie"].base == "trixie"
    assert images.BARE_IMAGES == {"bookworm": "ingest-sandbox-bare:bookworm", "trixie": "ingest-sandbox-bare:trixie"}
    context = images.SANDBOX_IMAGES["sandbox-bare-trixie"].context_dir()
    dockerfile = (context / "Dockerfile").read_text()
    assert "docker" not in dockerfile.split("apt-get install")[1].split("&& rm")[0], "a bare host has no Docker"
    assert "NOPASSWD: ALL" in dockerfile and "useradd" in dockerfile
    assert "PermitRootLogin no" in (context / "sshd_config").read_text()


def test_bare_container_spec_uses_the_release_image_and_the_same_engine_settings():
    host = hostspec.testbed_hosts(2, bare=True)[0]
    spec = hostspec.container_spec("ingest-bare-u", host, hostspec.EXPLICIT_CAPS, "ssh-ed25519 AAA k",
                                   image=lifecycle._host_image(host, True))
    assert spec.image == "ingest-sandbox-bare:bookworm"
    assert spec.host_config["Binds"][0] == "ingest-bare-u-db1-docker:/var/lib/docker:rw"
    assert spec.environment["INNER_BRIDGE_IP"] == hostspec.INNER_BRIDGE_IP
    assert lifecycle._host_image(hostspec.testbed_hosts()[1], False) == hostspec.SANDBOX_IMAGE


def _state(bare=True, app_hosts=2) -> state_mod.TestbedState:
    specs = hostspec.testbed_hosts(app_hosts, bare=bare)
    return state_mod.TestbedState(
        name="ingest-bare-u", network="ingest-bare-u-net", storage_driver="overlay2", security_mode="explicit-caps",
        ssh_user="deploy" if bare else "root", ssh_key="/k", bare=bare, sudo=bare,
        hosts=[HostState(h.name, f"172.30.0.{i + 2}", 22, list(h.roles), f"ingest-bare-u-{h.name}",
                         h.suite if bare else "") for i, h in enumerate(specs)],
    )


def test_state_round_trips_bare_fields_and_reads_older_files(tmp_path, monkeypatch):
    monkeypatch.setenv("INGESTCTL_ROOT", str(tmp_path))
    state_mod.save(_state())
    loaded = state_mod.load("ingest-bare-u")
    assert loaded == _state() and loaded.sudo and loaded.app_host_count == 2
    assert loaded.host("db1").suite == "bookworm"
    older = json.loads(_state(bare=False).to_json())
    for key in ("bare", "sudo"):
        older.pop(key)
    for host in older["hosts"]:
        host.pop("suite")
    path = state_mod.state_path("ingest-bare-u")
    path.write_text(json.dumps(older))
    loaded = state_mod.load("ingest-bare-u")
    assert loaded.bare is False and loaded.sudo is False and loaded.hosts[0].suite == ""


def test_a_running_testbed_is_never_silently_rebuilt_as_another_kind():
    lifecycle._check_kind(_state(), None, None)
    lifecycle._check_kind(_state(), True, 2)
    with pytest.raises(ConfigError, match="it is bare, ready-made was asked for"):
        lifecycle._check_kind(_state(), False, None)
    with pytest.raises(ConfigError, match="it has 2 app hosts beside db1, --hosts 4 was asked for") as info:
        lifecycle._check_kind(_state(), None, 4)
    assert "INGESTCTL_TESTBED=ingest-bare-u ingestctl testbed down" in str(info.value)


def test_bare_probe_needs_sudo_not_docker():
    health = probe._bare_health("db1", "a", 22, "deploy", f"{probe.SUDO_OK}\n", "")
    assert health.ready and health.sudo and not health.docker
    assert "ingestctl setup local" in health.detail
    health = probe._bare_health("db1", "a", 22, "deploy", f"{probe.SUDO_OK}\n20.10.24+dfsg1 overlay2\n", "")
    assert health.ready and health.docker and health.storage_driver == "overlay2" and health.detail == ""
    health = probe._bare_health("db1", "a", 22, "deploy", "", "sudo: a password is required")
    assert not health.ready and "a password is required" in health.detail
    assert probe.BARE_PROBE_COMMAND.startswith("sudo -n true && echo sudo-ok; sudo -n docker info")


def test_status_json_reports_each_hosts_ssh_user_and_sudo(monkeypatch):
    testbed = _state()
    health = [probe._bare_health(h.name, h.address, 22, "deploy", f"{probe.SUDO_OK}\n", "") for h in testbed.hosts]
    monkeypatch.setattr(lifecycle, "status", lambda name=None: (testbed, health))
    result = CliRunner().invoke(commands.testbed, ["status", "--json"])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.output.splitlines()]
    hosts = [e for e in events if e["type"] == "host"]
    assert [(e["name"], e["ssh_user"], e["sudo"], e["suite"]) for e in hosts] == [
        ("db1", "deploy", True, "bookworm"), ("app2", "deploy", True, "trixie"), ("app3", "deploy", True, "trixie")]
    assert events[-1]["type"] == "summary" and events[-1]["bare"] is True


def test_up_passes_bare_and_hosts_through(monkeypatch):
    seen = {}

    def fake_up(progress, name=None, bare=None, app_hosts=None):
        seen.update(bare=bare, app_hosts=app_hosts)
        testbed = _state(app_hosts=3)
        return lifecycle.UpResult(testbed, [probe._bare_health(h.name, h.address, 22, "deploy", "sudo-ok", "")
                                            for h in testbed.hosts], already_up=False)

    monkeypatch.setattr(lifecycle, "up", fake_up)
    result = CliRunner().invoke(commands.testbed, ["up", "--bare", "--hosts", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert seen == {"bare": True, "app_hosts": 3}
    summary = json.loads(result.output.splitlines()[-1])
    assert summary["hosts"] == ["db1", "app2", "app3", "app4"] and summary["sudo"] is True
    seen.clear()
    CliRunner().invoke(commands.testbed, ["up"])
    assert seen == {"bare": None, "app_hosts": None}


def test_local_inventory_follows_the_testbeds_sudo(tmp_path, monkeypatch):
    from ingestctl import inventory

    monkeypatch.setenv("INGESTCTL_TESTBED", "ingest-bare-u")
    real_root = inventory.paths.project_root()
    (tmp_path / "inventories").mkdir()
    (tmp_path / "inventories" / "local.py").write_text((real_root / "inventories" / "local.py").read_text())
    monkeypatch.setenv("INGESTCTL_ROOT", str(tmp_path))
    state_mod.save(_state())
    env = inventory.load("local")
    assert env.hosts["app2"].sudo is True and env.hosts["app2"].ssh_user == "deploy"
    assert env.host_data("db1")["_sudo"] is True
    state_mod.save(_state(bare=False))
    env = inventory.load("local")
    assert env.hosts["app2"].sudo is False and env.hosts["app2"].ssh_user == "root"
