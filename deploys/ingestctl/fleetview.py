"""Read-only views of an environment: `status` (what each host runs now) and `history` (the ledger)."""

from __future__ import annotations

from typing import Any

import httpx

from ingestctl import fleet, inventory, ledger, lock
from ingestctl.facts.release import IngestState, SchemaHead
from ingestctl.output import Reporter

STATUS_COLUMNS = ["host", "roles", "release", "image", "config", "schema", "health", "standby", "lock"]


def readiness(base_url: str) -> str:
    """ready | degraded | unready (HTTP code) | down, from /health/ready."""
    try:
        response = httpx.get(base_url + "/health/ready", timeout=3.0)
    except httpx.HTTPError:
        return "down"
    if response.status_code == 200:
        return "ready"
    try:
        status = response.json().get("status")
    except ValueError:
        status = None
    return "degraded" if status == "degraded" else f"unready ({response.status_code})"


def status_rows(env_name: str) -> list[dict[str, Any]]:
    env = inventory.load(env_name)
    states = fleet.get_facts(env_name, IngestState)
    head = fleet.get_facts(env_name, SchemaHead, hosts=[env.db_host])[env.db_host]
    locks = fleet.run_commands(env_name, lambda _h: lock.read_command(), hosts=env.all_hosts)
    rows = []
    for host in env.all_hosts:
        state = states.get(host) or {}
        lock_status = lock.parse_output(locks[host].stdout, host)
        holder = lock_status.record
        rows.append({
            "host": host,
            "roles": ",".join(env.hosts[host].roles),
            "release": state.get("release"),
            "image": state.get("image_id"),
            "config": state.get("config_version"),
            "schema": head,
            "health": readiness(f"http://{env.hosts[host].ssh_hostname}:{env.data.app_port}")
            if "app" in env.hosts[host].roles else "n/a",
            "standby": (state.get("standby") or {}).get("release"),
            "lock": "free" if lock_status.state == "free" else f"held by {holder.who if holder else '?'}",
        })
    return rows


def show_status(env_name: str, reporter: Reporter) -> list[dict[str, Any]]:
    rows = status_rows(env_name)
    reporter.table(f"{env_name}: hosts", STATUS_COLUMNS,
                   [[row[c] if c != "image" else (row[c] or "")[:19] for c in STATUS_COLUMNS] for row in rows])
    return rows


def read_ledger(env_name: str) -> list[ledger.LedgerEntry]:
    """Every host's ledger, merged: a host that lost its copy does not lose the environment's history."""
    env = inventory.load(env_name)
    outputs = fleet.run_commands(env_name, lambda _h: ledger.read_command(), hosts=env.all_hosts)
    return ledger.merge({host: ledger.parse(out.stdout + "\n", source=f"{host}:{ledger.LEDGER_PATH}").entries
                         for host, out in outputs.items()})


def show_history(env_name: str, reporter: Reporter) -> list[ledger.LedgerEntry]:
    entries = read_ledger(env_name)
    reporter.table(f"{env_name}: ledger", ledger.HISTORY_COLUMNS, ledger.history_rows(entries))
    return entries
