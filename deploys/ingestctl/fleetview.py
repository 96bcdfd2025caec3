"""Read-only views of an environment: `status` (what each host runs now) and `history` (the ledger)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from ingestctl import fleet, hostvalues, inventory, ledger, lock
from ingestctl.facts.release import REJECTED, DeployLockLines, IngestState, SchemaHead
from ingestctl.facts.together import HostFacts
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
    """One row per host, from one SSH round (every host at once, each host's reads in one command) and the app
    hosts' readiness, all asked at once. An unreachable host is a row saying so, never an error: status is what
    on-call runs when something is down."""
    env = inventory.load(env_name)
    locks: dict[str, lock.LockStatus] = {}
    head, head_warning = None, None

    def read(name: str, host: Any) -> HostFacts:
        facts = HostFacts(host)
        try:
            facts.read_together(IngestState, DeployLockLines, *([SchemaHead] if name == env.db_host else []))
        except hostvalues.HostValueError:
            pass  # a forged value: what it left unread is read on its own below, where it is named
        return facts

    def app_readiness() -> dict[str, str]:
        urls = {h: f"http://{env.hosts[h].ssh_hostname}:{env.data.app_port}"
                for h in env.all_hosts if "app" in env.hosts[h].roles}
        found = fleet.at_once(*[lambda url=url: readiness(url) for url in urls.values()]) if urls else []
        return dict(zip(urls, found, strict=True))

    with fleet.connected(env_name, env.all_hosts, require_all=False) as active:
        facts, health = fleet.at_once(lambda: fleet.on_every_host(active, read), app_readiness)
        states = {name: facts[name].get(IngestState) for name in active}
        for name in active:
            try:
                locks[name] = lock.parse_output(facts[name].get(DeployLockLines), name)
            except hostvalues.HostValueError as exc:
                locks[name] = lock.LockStatus("held", None, f"{name}: {exc}")
        if env.db_host in active:
            try:
                head = facts[env.db_host].get(SchemaHead)
            except hostvalues.HostValueError as exc:  # show the rest of the table
                head_warning = f"{env.db_host}: {exc}; not used"
    rows = []
    for host in env.all_hosts:
        if host not in active:
            rows.append({"host": host, "roles": ",".join(env.hosts[host].roles), "release": "unreachable",
                         "image": None, "config": None, "schema": None,
                         "health": health.get(host, "n/a"), "standby": None, "lock": "unknown",
                         "warnings": [f"{host}: unreachable over SSH; its row shows only what HTTP says"]})
            continue
        state = states.get(host) or {}
        lock_status = locks[host]
        holder = lock_status.record
        warnings = [f"{host}: {problem}; not used" for problem in state.get(REJECTED, {}).values()]
        if lock_status.rejected:
            warnings.append(lock_status.rejected)
        if head_warning and host == env.db_host:
            warnings.append(head_warning)
        rows.append({
            "host": host,
            "roles": ",".join(env.hosts[host].roles),
            "release": state.get("release"),
            "image": state.get("image_id"),
            "config": state.get("config_version"),
            "schema": head,
            "health": health.get(host, "n/a"),
            "standby": (state.get("standby") or {}).get("release"),
            "lock": "free" if lock_status.state == "free" else f"held by {holder.who if holder else '?'}",
            "warnings": warnings,  # values read from the host that failed their check (see hostvalues)
        })
    return rows


def show_status(env_name: str, reporter: Reporter) -> list[dict[str, Any]]:
    rows = status_rows(env_name)
    for row in rows:
        for warning in row["warnings"]:
            reporter.event("warning", f"warning: {warning}", host=row["host"])
    reporter.table(f"{env_name}: hosts", STATUS_COLUMNS,
                   [[row[c] if c != "image" else (row[c] or "")[:19] for c in STATUS_COLUMNS] for row in rows])
    return rows


def read_ledger(env_name: str, reporter: Reporter | None = None,
                io: fleet.FleetIO | None = None) -> list[ledger.LedgerEntry]:
    """Every host's ledger, merged: a host that lost its copy does not lose the environment's history.

    Lines a host's copy holds that are unreadable or not in the shape ingestctl writes (forged) are left out;
    with REPORTER, each is a warning naming the host and the line. Nothing read here is ever written back to
    a host: each run appends only its own entry, so a forged line stays in the one copy it was put in.
    """
    env = inventory.load(env_name)
    io = io or fleet.SshFleet(env_name)
    outputs = io.run_commands(lambda _h: ledger.read_command(), hosts=env.all_hosts)
    return merged_ledger({host: ledger.parse(out.stdout + "\n", source=ledger.LEDGER_PATH)
                          for host, out in outputs.items()}, reporter)


def merged_ledger(copies: Mapping[str, ledger.ParsedLedger], reporter: Reporter | None) -> list[ledger.LedgerEntry]:
    """One history from every host's parsed copy (`read_ledger`, or `runlock.guarded` under the lock); with
    REPORTER, each line a copy set aside is a warning naming its host."""
    if reporter is not None:
        for host, copy in copies.items():
            for skipped in copy.skipped:
                reporter.event("warning", f"warning: {host}:{skipped}", host=host, line=skipped.line)
    return ledger.merge({host: copy.entries for host, copy in copies.items()})


def read_locks(env_name: str) -> dict[str, lock.LockStatus]:
    """Each reachable host's deploy-lock status; unreachable hosts are left out."""
    env = inventory.load(env_name)
    with fleet.connected(env_name, env.all_hosts, require_all=False) as active:
        results = fleet.run_on(active, lambda _h: lock.read_command())
    return {host: lock.parse_output(result.stdout, host) for host, result in results.items()}


def show_history(env_name: str, reporter: Reporter) -> list[ledger.LedgerEntry]:
    """The merged ledger, newest first; a run that never finalized and holds no live lock is `interrupted`."""
    from datetime import UTC, datetime

    entries = read_ledger(env_name, reporter)
    if any(entry.outcome == "running" for entry in entries):
        now = datetime.now(UTC)
        live_runs = {status.record.run_id for status in read_locks(env_name).values()
                     if status.record and status.record.run_id
                     and not lock.expired(status.record, now, lock.runner_alive(status.record))}
        states = fleet.get_facts(env_name, IngestState, require_all=False)
        live_on: dict[str, list[str]] = {}
        for host, state in sorted(states.items()):
            if state and state.get("release"):
                live_on.setdefault(state["release"], []).append(host)
        entries = ledger.mark_interrupted(entries, live_runs, live_on)
    reporter.table(f"{env_name}: ledger", ledger.HISTORY_COLUMNS, ledger.history_rows(entries))
    return entries
