"""`ingestctl incident open|note|close|list|report`: incidents kept on the hosts beside the ledger.

Like `history` and the rollbacks, these work from any checkout: what they read and write lives on the hosts.
They do not take the deploy lock (see `incidents`): on-call notes an incident while a rollback holds it.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import click

from ingestctl import incident_report, incident_store, incidents
from ingestctl.clikit import json_option, reporting
from ingestctl.errors import ConfigError
from ingestctl.ledger import new_entry_id, who_am_i
from ingestctl.output import Reporter

_AGO = re.compile(r"([0-9]{1,6})([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(value: str | None, now: datetime) -> datetime | None:
    """--since: an ISO 8601 time (no offset means UTC) or how long ago (`90s`, `15m`, `2h`, `1d`); never later
    than NOW."""
    if value is None:
        return None
    found = _AGO.fullmatch(value.strip())
    if found:
        return now - timedelta(**{_UNITS[found.group(2)]: int(found.group(1))})
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"--since: expected an ISO 8601 time like 2024-05-01T12:00:00Z or a duration ago like "
                          f"15m or 2h, found {value!r}") from None
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    if moment > now:
        raise ConfigError(f"--since: {value} is in the future; give when the first failing signal was seen")
    return moment


@click.group("incident")
def incident() -> None:
    """Incidents in the ledger, and the runbook's incident report pre-filled from it."""


def _event(env: str, incident_id: str, action: str, **fields) -> incidents.IncidentEvent:
    now = incident_store.now()
    return incidents.IncidentEvent(id=new_entry_id(now), incident=incident_id, action=action, env=env, at=now,
                                   who=who_am_i(), **fields)


def _emit(env: str, event: incidents.IncidentEvent, found: incidents.Incident) -> None:
    from ingestctl import changes

    changes.incident_event(env, event, found)


@incident.command("open")
@click.argument("env")
@click.option("--sev", type=click.Choice(["1", "2", "3"]), required=True, help="SEV-1, SEV-2 or SEV-3 (runbook).")
@click.option("--title", required=True, help="One line: what is wrong.")
@click.option("--since", metavar="TIME", help="First failing signal: ISO 8601 time or 15m/2h ago. Default: now.")
@json_option
@reporting
def open_command(env: str, sev: str, title: str, since: str | None, reporter: Reporter) -> None:
    """Open an incident on ENV (recorded on every host)."""
    now = incident_store.now()
    event = _event(env, incidents.new_incident_id(now), "open", sev=int(sev),
                   title=incidents.check_title(title, "--title"), since=parse_since(since, now))
    hosts = incident_store.append(env, event, incident_store.known_secrets(env))
    _emit(env, event, incidents.fold([event])[0])
    reporter.event("summary", f"incident {event.incident} opened: SEV-{sev} {title}", incident=event.incident,
                   env=env, sev=int(sev), hosts=hosts)


@incident.command("note")
@click.argument("env")
@click.argument("incident_id", metavar="ID")
@click.argument("text")
@json_option
@reporting
def note_command(env: str, incident_id: str, text: str, reporter: Reporter) -> None:
    """Add a timestamped note (what was seen, what was done) to incident ID."""
    text = incidents.check_note(text, "TEXT")
    found = incidents.find(incident_store.load(env, reporter), env, incident_id)
    hosts = incident_store.append(env, _event(env, found.id, "note", text=text), incident_store.known_secrets(env))
    reporter.event("summary", f"note added to {found.id}", incident=found.id, hosts=hosts)


@incident.command("close")
@click.argument("env")
@click.argument("incident_id", metavar="ID")
@click.option("--dismiss", is_flag=True, help="Not an incident (e.g. a draft for a deliberate abort): dismiss it.")
@click.option("--reason", help="Why it is closed or dismissed (kept in the report).")
@json_option
@reporting
def close_command(env: str, incident_id: str, dismiss: bool, reason: str | None, reporter: Reporter) -> None:
    """Close incident ID (a draft is confirmed and closed), or dismiss it with --dismiss."""
    if reason is not None:
        incidents.check_note(reason, "--reason")
    events = incident_store.read_events(env, reporter)
    found = incidents.find(incidents.fold(events), env, incident_id)
    if not found.is_open:
        raise ConfigError(f"incident {found.id} is already {found.status} (by {found.closed_by}); nothing to do")
    event = _event(env, found.id, "dismiss" if dismiss else "close", text=reason)
    hosts = incident_store.append(env, event, incident_store.known_secrets(env))
    closed = incidents.find(incidents.fold([*events, event]), env, found.id)
    _emit(env, event, closed)
    reporter.event("summary", f"incident {found.id} {closed.status}", incident=found.id, status=closed.status,
                   hosts=hosts)


LIST_COLUMNS = ["id", "status", "sev", "opened (UTC)", "title", "run", "closed (UTC)"]


@incident.command("list")
@click.argument("env")
@json_option
@reporting
def list_command(env: str, reporter: Reporter) -> None:
    """ENV's incidents, newest first: drafts a failed deploy opened, open and closed ones."""
    found = incident_store.load(env, reporter)
    rows = [[i.id, i.status, f"SEV-{i.sev}", f"{i.opened_at:%Y-%m-%d %H:%M:%S}", i.title, i.run_id or "",
             f"{i.closed_at:%Y-%m-%d %H:%M:%S}" if i.closed_at else ""] for i in reversed(found)]
    reporter.table(f"{env}: incidents", LIST_COLUMNS, rows)


@incident.command("report")
@click.argument("env")
@click.argument("incident_id", metavar="ID")
@click.option("--format", "fmt", type=click.Choice(["md", "json"]), default="md", show_default=True,
              help="Markdown for the ticket, JSON for tools.")
@reporting
def report_command(env: str, incident_id: str, fmt: str, reporter: Reporter) -> None:  # noqa: ARG001 - errors only
    """The runbook's incident report for ID, pre-filled from the ledger (timeline, gates, MTTD, MTTR)."""
    from rich.console import Console

    # stdout is the report itself: warnings about lines read from hosts go to stderr.
    warnings = Reporter()
    warnings.console = Console(stderr=True, highlight=False, soft_wrap=True)
    found = incidents.find(incident_store.load(env, warnings), env, incident_id)
    report = incident_report.build(found, incident_store.ledger(env, warnings), incident_store.now())
    if fmt == "json":
        click.echo(json.dumps(incident_report.to_json(report), ensure_ascii=False, indent=2))
    else:
        click.echo(incident_report.to_markdown(report))
