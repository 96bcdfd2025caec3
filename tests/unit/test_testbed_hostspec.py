"""Pure parts of the sandbox host description: capabilities, names, Engine API settings, docker run line."""

from __future__ import annotations

import pytest
from ingestctl.errors import ConfigError
from ingestctl.testbed import hostspec
from ingestctl.testbed.hostspec import EXPLICIT_CAPS, PRIVILEGED, HostSpec


def test_fallback_capabilities_are_all_but_the_four_ungrantable():
    assert hostspec.FALLBACK_CAPABILITIES == (
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
    )
    assert len(hostspec.ALL_CAPABILITIES) == 41  # CAP_LAST_CAP is 40 (CHECKPOINT_RESTORE)


def test_privileged_mode_is_just_privileged():
    assert hostspec.security_host_config(PRIVILEGED) == {"Privileged": True}


def test_explicit_caps_mode_matches_design_section_5():
    config = hostspec.security_host_config(EXPLICIT_CAPS)
    assert config == {
        "CapAdd": list(hostspec.FALLBACK_CAPABILITIES),
        "SecurityOpt": ["seccomp=unconfined", "apparmor=unconfined"],
        "MaskedPaths": [],
        "ReadonlyPaths": [],
        "DeviceCgroupRules": ["a *:* rwm"],
    }
    assert "Privileged" not in config


def test_unknown_security_mode_is_rejected_by_name():
    with pytest.raises(ValueError, match="'root'"):
        hostspec.security_host_config("root")


def test_container_spec_for_db1_in_fallback_mode():
    spec = hostspec.container_spec(
        "tb", HostSpec("db1", ("db", "app")), EXPLICIT_CAPS, "ssh-ed25519 AAAA test"
    )
    assert spec.create_kwargs() == {
        "image": "ingest-sandbox-host:latest",
        "name": "tb-db1",
        "hostname": "db1",
        "labels": {
            "io.ingest.testbed": "tb",
            "io.ingest.testbed.host": "db1",
            "io.ingest.testbed.roles": "db,app",
        },
        "environment": {
            "SSH_AUTHORIZED_KEY": "ssh-ed25519 AAAA test",
            "INNER_STORAGE_DRIVER": "auto",
            "INNER_BRIDGE_IP": "10.250.0.1/24",
            "INNER_ADDRESS_POOL": "base=10.251.0.0/16,size=24",
        },
        "detach": True,
        "host_config": {
            "Binds": ["tb-db1-docker:/var/lib/docker:rw", "/sys/fs/cgroup:/sys/fs/cgroup:rw"],
            "Tmpfs": {"/run": "rw,exec", "/tmp": "rw,exec"},
            "Init": True,
            "NetworkMode": "tb-net",
            "RestartPolicy": {"Name": "no"},
            **hostspec.security_host_config(EXPLICIT_CAPS),
        },
        "networking_config": {"EndpointsConfig": {"tb-net": {}}},
    }


def test_privileged_spec_does_not_bind_the_host_cgroup_tree():
    spec = hostspec.container_spec("tb", HostSpec("app2", ("app",)), PRIVILEGED, "k", storage_driver="vfs")
    assert spec.host_config["Binds"] == ["tb-app2-docker:/var/lib/docker:rw"]
    assert spec.host_config["Privileged"] is True
    assert spec.environment["INNER_STORAGE_DRIVER"] == "vfs"


def test_docker_run_args_reproduce_the_fallback_container_exactly():
    spec = hostspec.container_spec("tb", HostSpec("app3", ("app",)), EXPLICIT_CAPS, "secret-looking-key")
    args = hostspec.docker_run_args(spec)
    caps = [f"--cap-add={cap}" for cap in hostspec.FALLBACK_CAPABILITIES]
    assert args == [
        "docker",
        "run",
        "-d",
        "--init",
        "--name",
        "tb-app3",
        "--hostname",
        "app3",
        "--network",
        "tb-net",
        *caps,
        "--security-opt=seccomp=unconfined",
        "--security-opt=apparmor=unconfined",
        "--security-opt=systempaths=unconfined",
        "--device-cgroup-rule=a *:* rwm",
        "-v",
        "tb-app3-docker:/var/lib/docker:rw",
        "-v",
        "/sys/fs/cgroup:/sys/fs/cgroup:rw",
        "--tmpfs",
        "/run:rw,exec",
        "--tmpfs",
        "/tmp:rw,exec",
        "--label",
        "io.ingest.testbed=tb",
        "--label",
        "io.ingest.testbed.host=app3",
        "--label",
        "io.ingest.testbed.roles=app",
        "-e",
        "SSH_AUTHORIZED_KEY",
        "-e",
        "INNER_STORAGE_DRIVER",
        "-e",
        "INNER_BRIDGE_IP",
        "-e",
        "INNER_ADDRESS_POOL",
        "ingest-sandbox-host:latest",
    ]
    assert "secret-looking-key" not in " ".join(args)


def test_default_hosts_are_db1_app2_app3():
    assert hostspec.DEFAULT_HOSTS == (
        HostSpec("db1", ("db", "app")),
        HostSpec("app2", ("app",)),
        HostSpec("app3", ("app",)),
    )


def test_testbed_name_defaults_and_reads_the_environment():
    assert hostspec.testbed_name({}) == "ingest-tb"
    assert hostspec.testbed_name({"INGESTCTL_TESTBED": ""}) == "ingest-tb"
    assert hostspec.testbed_name({"INGESTCTL_TESTBED": "ci-7.e2e"}) == "ci-7.e2e"
    assert hostspec.network_name("ci") == "ci-net"
    assert hostspec.container_name("ci", "db1") == "ci-db1"
    assert hostspec.volume_name("ci", "db1") == "ci-db1-docker"


@pytest.mark.parametrize("bad", ["Upper", "-lead", "has space", "a/b", "x" * 42])
def test_testbed_name_rejects_what_docker_or_paths_cannot_hold(bad):
    with pytest.raises(ConfigError, match="INGESTCTL_TESTBED=") as info:
        hostspec.testbed_name({"INGESTCTL_TESTBED": bad})
    assert "expected lower-case letters" in str(info.value)
