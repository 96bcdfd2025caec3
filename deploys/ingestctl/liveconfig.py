"""The config a host runs, read back with its secrets, and the guard that keeps a deploy from undoing a rotation.

A secret rotated with `config set` lives only on the hosts: the checkout's secrets (file or environment) still
hold the old value, and a deploy made from them would put it back without a word. So a deploy that would change a
secret the ledger says `config set` rotated is refused until the checkout's secrets carry the rotated value.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping

from ingestctl import config as config_mod
from ingestctl import hostlayout, hostvalues
from ingestctl import secrets as secrets_mod
from ingestctl.errors import ConfigError
from ingestctl.runcontext import Context


def read_live_config(ctx: Context, host: str, version: str) -> config_mod.ServiceConfig:
    """The full config VERSION as written on HOST, secrets included (read into memory, never printed)."""
    hostvalues.CONFIG_VERSION.check(version, f"{host}: config version")
    base = f"{hostlayout.BASE}/config/{version}"
    quoted = shlex.quote(base)
    command = (f"cat {quoted}/app.env && for f in {quoted}/secrets/*; do [ -f \"$f\" ] || continue; "
               "printf '\\n#ingestctl-secret %s\\n' \"$(basename \"$f\")\"; cat \"$f\"; done")
    result = ctx.io.run_commands({host: command})[host]
    if not result.ok:
        raise ConfigError(f"{host}: config {version} is not readable at {base}: {result.stderr.strip()[:200]}")
    env_part, *secret_parts = result.stdout.split("\n#ingestctl-secret ")
    tunables = config_mod.tunables_from_env_file(env_part, where=f"{host}:{base}/app.env")
    secret_values = {}
    for part in secret_parts:
        name, _, value = part.partition("\n")
        secret_values[name.strip()] = value.rstrip("\n")
    if "POSTGRES_PASSWORD" in secret_values:
        secret_values["POSTGRES_PASSWORD"] = _owner_password(ctx, host, secret_values["POSTGRES_PASSWORD"])
    return config_mod.ServiceConfig.build(tunables, secret_values)


def _owner_password(ctx: Context, host: str, on_host: str) -> str:
    """The owner's POSTGRES_PASSWORD behind a host's config, which holds the app role's (derived) one.

    Only this checkout's secrets know the owner's; they must be the ones the host's config was made from (a
    config written before the app role existed holds the owner's itself).
    """
    owner = ctx.config.secrets.get("POSTGRES_PASSWORD", "")
    if on_host in (secrets_mod.app_database_password(owner), owner):
        return owner
    raise ConfigError(f"{host}: the live config's database password was not made from this checkout's "
                      "POSTGRES_PASSWORD; run from the checkout (or with the secrets) that deployed it")


def refuse_reverting_rotations(ctx: Context, before: Mapping[str, dict | None]) -> None:
    """ConfigError (exit 2, nothing changed yet) when this deploy's config would undo a `config set` rotation.

    Reads the ledger, and the live config only when a rotation is still live: most deploys pay one read.
    """
    from ingestctl import fleetview
    from ingestctl import ledger as ledger_mod

    rotations = ledger_mod.live_rotations(fleetview.read_ledger(ctx.name, ctx.reporter, ctx.io))
    live = {h: s["config_version"] for h, s in before.items()
            if s and s.get("config_version") and h in ctx.env.app_hosts}
    if not rotations or not live or set(live.values()) == {ctx.config.version}:
        return
    host, version = sorted(live.items())[0]
    running = read_live_config(ctx, host, version)
    reverted = sorted(name for name in rotations if running.secrets.get(name) != ctx.config.secrets.get(name))
    if not reverted:
        return
    source = ctx.env.secrets_path()
    lines = [f"{name}: rotated by `config set` (run {rotations[name].id}, {rotations[name].who}); this checkout's "
             f"{name} is not the rotated value, so the deploy would silently undo the rotation" for name in reverted]
    raise ConfigError(
        "deploy refused, nothing was changed:\n  " + "\n  ".join(lines)
        + f"\n  put the rotated value where this deploy reads secrets ({source}, or {reverted[0]} / "
          f"{reverted[0]}_FILE in the environment) and deploy again; or undo the rotation first with "
          f"`ingestctl rollback config {ctx.name}`")
