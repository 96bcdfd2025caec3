"""A deploy never silently undoes a secret rotated with `config set`; the live config is read back through a shell.

The transport is faked (a local shell over a directory laid out as a host's /opt/ingest); the config files are the
real renderings, read back by the real command.
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from ingestctl import config, fleet, fleetview, hostlayout, liveconfig
from ingestctl.errors import ConfigError
from ingestctl.ledger import LedgerEntry

SECRETS = {"POSTGRES_PASSWORD": "pg-9f8e7d6c5b4a3210", "API_KEY": "key-0123456789abcdef0123",
           "JWT_SECRET": "jwt-" + "a1b2c3d4" * 5, "REDIS_PASSWORD": "redis-0123456789abcdef"}
ROTATED_KEY = "key-rotated-9876543210fedcba"
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def write_config_on_host(root, cfg: config.ServiceConfig) -> None:
    base = root / "config" / cfg.version
    (base / "secrets").mkdir(parents=True)
    (base / "app.env").write_text(config.render_env_file(cfg, secrets_dir="/run/secrets"))
    for name, value in config.render_secret_files(cfg).items():
        (base / "secrets" / name).write_text(value)


def entry(n: int, kind: str, version: str, **more) -> LedgerEntry:
    return LedgerEntry(id=f"20261201T1200{n:02d}Z-00000{n}", kind=kind, env="local", release="v1",
                       config_version=version, who="ana@laptop", started=T0 + timedelta(minutes=n),
                       finished=T0 + timedelta(minutes=n, seconds=30), outcome="success", **more)


@pytest.fixture
def fleet_of(monkeypatch, tmp_path):
    """(ctx, live config) for a fleet whose app hosts run `live`, its ledger being `entries`."""

    def make(checkout: config.ServiceConfig, live: config.ServiceConfig, entries: list[LedgerEntry]):
        write_config_on_host(tmp_path, live)

        def run_commands(command_for, hosts=None):
            return {host: _shell(command.replace(hostlayout.BASE, str(tmp_path)), host)
                    for host, command in command_for.items()}

        monkeypatch.setattr(fleetview, "read_ledger", lambda _env, _reporter, _io: entries)
        env = SimpleNamespace(app_hosts=["app2", "app3"], secrets_path=lambda: "secrets/local.env")
        ctx = SimpleNamespace(name="local", env=env, config=checkout, reporter=None,
                              io=SimpleNamespace(run_commands=run_commands))
        before = {"db1": None, "app2": {"config_version": live.version}, "app3": {"config_version": live.version}}
        return ctx, before

    return make


def _shell(command: str, host: str) -> fleet.CommandResult:
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=False)
    return fleet.CommandResult(host, done.returncode == 0, done.stdout, done.stderr)


def test_a_deploy_that_would_undo_a_rotation_is_refused_naming_the_secret_and_the_fix(fleet_of):
    checkout = config.ServiceConfig.build({}, SECRETS)
    live = checkout.with_changes({"API_KEY": ROTATED_KEY})
    rotation = entry(2, "config-set", live.version, rotated_secrets=["API_KEY"])
    ctx, before = fleet_of(checkout, live, [entry(1, "deploy", checkout.version), rotation])
    with pytest.raises(ConfigError) as refused:
        liveconfig.refuse_reverting_rotations(ctx, before)
    text = str(refused.value)
    assert text.startswith("deploy refused, nothing was changed:")
    assert f"API_KEY: rotated by `config set` (run {rotation.id}, ana@laptop)" in text
    assert "secrets/local.env" in text and "ingestctl rollback config local" in text
    assert ROTATED_KEY not in text and SECRETS["API_KEY"] not in text


def test_a_deploy_whose_secrets_carry_the_rotated_value_goes_ahead(fleet_of):
    live = config.ServiceConfig.build({}, SECRETS).with_changes({"API_KEY": ROTATED_KEY})
    updated_checkout = live.with_changes({"INGEST_MAX_BATCH_ITEMS": "500"})  # and a new tunable besides
    entries = [entry(1, "deploy", "c0ffee000001"), entry(2, "config-set", live.version, rotated_secrets=["API_KEY"])]
    ctx, before = fleet_of(updated_checkout, live, entries)
    liveconfig.refuse_reverting_rotations(ctx, before)


def test_without_a_live_rotation_the_live_config_is_not_even_read(fleet_of):
    checkout = config.ServiceConfig.build({}, SECRETS)
    live = checkout.with_changes({"INGEST_MAX_BATCH_ITEMS": "500"})
    ctx, before = fleet_of(checkout, live, [entry(1, "deploy", checkout.version),
                                            entry(2, "config-set", live.version)])
    ctx.io.run_commands = lambda *a, **k: pytest.fail("no host read without a rotation")
    liveconfig.refuse_reverting_rotations(ctx, before)
