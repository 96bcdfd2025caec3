"""Incidents on the hosts: read every host's copy (merged, forged lines left out with a warning) and append an
event to every host that answers, in one SSH round each. The model and its checks are in `incidents`."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from ingestctl import fleet, fleetview, incidents, inventory
from ingestctl import secrets as secrets_mod
from ingestctl.errors import ConfigError, HostError
from ingestctl.ledger import LedgerEntry
from ingestctl.output import Reporter


def known_secrets(env_name: str) -> dict[str, str]:
    """This checkout's secrets for ENV, to keep them out of incident notes; none when it has none (incident
    commands work from any checkout, like `history`)."""
    try:
        return secrets_mod.load(inventory.load(env_name).secrets_path())
    except ConfigError:
        return {}


def read_events(env_name: str, reporter: Reporter | None = None) -> list[incidents.IncidentEvent]:
    env = inventory.load(env_name)
    with fleet.connected(env_name, env.all_hosts, require_all=False) as active:
        if not active:
            raise HostError(f"cannot reach any host of {env_name} over SSH; incidents live on the hosts")
        outputs = fleet.run_on(active, lambda _h: incidents.read_command())
    copies = {}
    for host, out in outputs.items():
        parsed = incidents.parse(out.stdout + "\n", source=f"{host}:{incidents.INCIDENTS_PATH}")
        copies[host] = parsed.events
        if reporter is not None:
            for skipped in parsed.skipped:
                reporter.event("warning", f"warning: {skipped}", host=host, line=skipped.line)
    return incidents.merge(copies)


def load(env_name: str, reporter: Reporter | None = None) -> list[incidents.Incident]:
    return incidents.fold(read_events(env_name, reporter))


def append(env_name: str, event: incidents.IncidentEvent, secrets: Mapping[str, str]) -> list[str]:
    """EVENT appended on every host that answers; the hosts it reached. None reached is a HostError."""
    line = incidents.serialise(event, secrets)  # ConfigError (exit 2) before any host is contacted
    env = inventory.load(env_name)
    with fleet.connected(env_name, env.all_hosts, require_all=False) as active:
        results = fleet.run_on(active, lambda _h: incidents.append_command(line))
    written = [host for host, result in results.items() if result.ok]
    if not written:
        problems = "; ".join(f"{h}: {r.stderr.strip()[:200]}" for h, r in results.items()) or "no host answered"
        raise HostError(f"could not record the incident event on any host of {env_name}: {problems}")
    return written


def ledger(env_name: str, reporter: Reporter | None = None) -> list[LedgerEntry]:
    return fleetview.read_ledger(env_name, reporter)


def now() -> datetime:
    return datetime.now(UTC)
