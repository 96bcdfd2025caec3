"""The testbed state file, its SSH config, the key pair, and the engine/prober failure messages."""

from __future__ import annotations

import os
import socket
import stat

import pytest
from ingestctl.errors import ConfigError, EnvironmentMissing
from ingestctl.testbed import engine, keys, probe
from ingestctl.testbed import state as state_mod
from ingestctl.testbed.state import HostState


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("INGESTCTL_ROOT", str(tmp_path))
    monkeypatch.setenv("INGESTCTL_TESTBED", "tb-unit")
    return tmp_path


def _sample() -> state_mod.TestbedState:
    return state_mod.TestbedState(
        name="tb-unit",
        network="tb-unit-net",
        storage_driver="overlay2",
        security_mode="explicit-caps",
        ssh_user="root",
        ssh_key="/k/id_ed25519",
        hosts=[
            HostState("db1", "172.30.0.2", 22, ["db", "app"], "tb-unit-db1"),
            HostState("app2", "172.30.0.3", 22, ["app"], "tb-unit-app2"),
        ],
    )


def test_load_without_state_says_to_run_testbed_up(root):
    with pytest.raises(ConfigError) as info:
        state_mod.load()
    message = str(info.value)
    assert "testbed 'tb-unit' is not up" in message
    assert "INGESTCTL_TESTBED=tb-unit ingestctl testbed up" in message


def test_save_then_load_round_trips_under_the_testbed_directory(root):
    path = state_mod.save(_sample())
    assert path == root / ".testbed" / "tb-unit" / "state.json"
    loaded = state_mod.load()
    assert loaded == _sample()
    assert [h.name for h in loaded.hosts_with_role("app")] == ["db1", "app2"]
    assert loaded.host("app2").address == "172.30.0.3"
    with pytest.raises(ConfigError, match="no host 'app9'"):
        loaded.host("app9")


def test_state_in_the_wrong_shape_is_a_config_error(root):
    path = state_mod.state_path()
    path.parent.mkdir(parents=True)
    path.write_text('{"name": "tb-unit"}')
    with pytest.raises(ConfigError, match="not in the expected shape"):
        state_mod.load()
    path.write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        state_mod.load()


def test_remove_deletes_state_and_ssh_config(root):
    state_mod.save(_sample())
    state_mod.write_ssh_config(_sample())
    state_mod.remove("tb-unit")
    assert not (root / ".testbed" / "tb-unit").exists()


def test_ssh_config_names_each_host_without_pinning_keys():
    text = state_mod.ssh_config_text(_sample())
    assert text.split("\n\n")[0] == (
        "Host db1 172.30.0.2\n"
        "    HostName 172.30.0.2\n"
        "    Port 22\n"
        "    User root\n"
        "    IdentityFile /k/id_ed25519\n"
        "    IdentitiesOnly yes\n"
        "    StrictHostKeyChecking no\n"
        "    UserKnownHostsFile /dev/null\n"
        "    LogLevel ERROR"
    )
    assert "Host app2 172.30.0.3" in text


def test_key_pair_is_generated_once_with_mode_0600(tmp_path):
    private = tmp_path / "keys" / "id_ed25519"
    path, public = keys.ensure_key_pair(private)
    assert path == private
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.startswith("ssh-ed25519 ") and public.endswith(" ingestctl-testbed")
    before = private.read_bytes()
    assert keys.ensure_key_pair(private) == (private, public)
    assert private.read_bytes() == before


def test_a_world_readable_key_is_refused_with_the_fix(tmp_path):
    private = tmp_path / "id_ed25519"
    keys.ensure_key_pair(private)
    os.chmod(private, 0o644)
    with pytest.raises(ConfigError, match=r"mode 0644.*chmod 600"):
        keys.ensure_key_pair(private)


def test_missing_docker_is_one_line_naming_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no docker, no dockerd
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    with pytest.raises(EnvironmentMissing) as info:
        engine.docker_client()
    message = str(info.value)
    assert "apt-get install docker.io" in message and "docker group" in message
    assert "\n" not in message


def test_probe_reports_a_closed_port_without_ssh():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port now: the probe must say so rather than hang or raise.
    health = probe.check_host("db1", "127.0.0.1", port, "root", "/nonexistent", timeout=2)
    assert (health.sshd, health.docker, health.ready) == (False, False, False)
    assert f"no TCP answer on port {port}" in health.detail


def test_probe_reports_a_port_that_is_not_ssh():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        import threading

        def answer():
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        health = probe.check_host("app2", "127.0.0.1", port, "root", "/nonexistent", timeout=2)
        thread.join(5)
    assert not health.sshd and "without an SSH banner" in health.detail
