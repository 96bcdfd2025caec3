"""`ingestctl verify`'s SSH config: the inventory's options per host, and one shared connection per host."""

from __future__ import annotations

from pathlib import Path

from ingestctl import inventory, verify


def _env() -> inventory.Environment:
    return inventory.environment(
        name="staging",
        data={},
        hosts={"db1": {"ssh_hostname": "10.0.0.5", "ssh_user": "deploy", "ssh_key": "/k/id", "roles": ["db", "app"],
                       "ssh_known_hosts_file": "/k/known_hosts", "ssh_strict_host_key_checking": "yes"}},
    )


def test_each_host_gets_the_inventory_options_and_a_shared_master_connection():
    text = verify.ssh_config_text(_env(), Path("/tmp/v"))
    assert text == (
        "Host db1\n  HostName 10.0.0.5\n  Port 22\n  User deploy\n  IdentityFile /k/id\n  IdentitiesOnly yes\n"
        "  UserKnownHostsFile /k/known_hosts\n  StrictHostKeyChecking yes\n  BatchMode yes\n  LogLevel ERROR\n"
        "  ControlMaster auto\n  ControlPath /tmp/v/%C\n  ControlPersist 30\n"
    )


def test_without_a_control_directory_every_command_connects_on_its_own():
    assert "Control" not in verify.ssh_config_text(_env())
