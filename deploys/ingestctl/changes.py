"""What a run tells the outside world when it ends badly or changes the fleet: the incident draft a failed deploy
leaves in the ledger, and change events to the inventory's webhooks (CDEvents, delivered in the background).

Nothing here may change a run's outcome: a failure to record a draft or to queue an event is a warning.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ingestctl import cdevents, webhooks
from ingestctl.errors import GateFailed, RollbackFailed
from ingestctl.output import Reporter
from ingestctl.runcontext import Context, Run


def _emit(env_name: str, reporter: Reporter | None, build, *args: Any, **kwargs: Any) -> None:
    try:
        webhooks.for_env(env_name).emit(build(*args, **kwargs))
    except Exception as exc:  # an inventory or payload problem must not fail the run it reports
        if reporter is not None:
            reporter.event("warning", f"warning: change event not sent: {exc}")


@contextmanager
def observed_deploy(ctx: Context, run: Run) -> Iterator[None]:
    """Around a deploy's guarded body: events at start and end; on exit 3 or 4, the incident draft."""
    env, release = ctx.name, run.facts.release
    _emit(env, ctx.reporter, cdevents.pipeline_started, env, run.id, release)
    try:
        yield
    except (GateFailed, RollbackFailed) as exc:
        for gate in run.gates:
            if gate.get("passed") is False:
                _emit(env, ctx.reporter, cdevents.gate_failed, env, run.id, gate["gate"], gate.get("numbers") or {},
                      gate.get("message"))
        if run.facts.outcome == "rolled-back":
            previous = {v for v in run.facts.previous.values() if v}
            _emit(env, ctx.reporter, cdevents.service_changed, "service.rolledback", env,
                  previous.pop() if len(previous) == 1 else None, None, run.id, release)
        _emit(env, ctx.reporter, cdevents.pipeline_finished, env, run.id, release, "failure", exc.exit_code, str(exc))
        open_draft(ctx, run, exc.exit_code)
        raise
    except BaseException as exc:
        _emit(env, ctx.reporter, cdevents.pipeline_finished, env, run.id, release, "error",
              getattr(exc, "exit_code", 1), str(exc)[:500])
        raise
    if run.facts.switched:
        first = not any(run.facts.previous.values())
        _emit(env, ctx.reporter, cdevents.service_changed, "service.deployed" if first else "service.upgraded", env,
              release, run.facts.image_id, run.id)
    _emit(env, ctx.reporter, cdevents.pipeline_finished, env, run.id, release, "success", 0)


def open_draft(ctx: Context, run: Run, exit_code: int) -> None:
    """The incident draft of a deploy that ended with EXIT_CODE 3 or 4, on every host that answers."""
    from ingestctl import incident_store, incidents, runlock

    try:
        entry = runlock.ledger_entry(ctx, run)
        event = incidents.draft_for_run(entry, exit_code, incident_store.now())
        incident_store.append(ctx.name, event, ctx.config.secrets)
    except Exception as exc:  # the run's own exit code is what CI and on-call act on: never mask it
        ctx.reporter.event("warning", f"warning: could not open the incident draft: {exc}; open one with "
                           f"`ingestctl incident open {ctx.name} --sev N --title ...`")
        return
    ctx.reporter.event("incident", f"incident draft {event.incident} (SEV-{event.sev}) opened for run {run.id}: "
                       f"confirm it with `ingestctl incident close {ctx.name} {event.incident}` or dismiss it with "
                       "--dismiss; `ingestctl incident report` writes its report", incident=event.incident,
                       sev=event.sev, run_id=run.id, status="draft")
    incident_event(ctx.name, event, incidents.fold([event])[0], ctx.reporter)


def incident_event(env_name: str, event, incident, reporter: Reporter | None = None) -> None:
    """incident.detected when one opens, incident.resolved when it is closed (a dismissed draft sends nothing
    more: it was never an incident)."""
    kind = {"open": "incident.detected", "close": "incident.resolved"}.get(event.action)
    if kind:
        _emit(env_name, reporter, cdevents.incident, kind, env_name, incident.id, incident.title, incident.sev,
              None, incident.status, incident.run_id)


def rolled_back(env_name: str, run: Run, reporter: Reporter) -> None:
    """A successful `rollback app`: the service was rolled back."""
    if run.kind == "rollback-app" and run.facts.switched:
        _emit(env_name, reporter, cdevents.service_changed, "service.rolledback", env_name, run.facts.release,
              run.facts.image_id, run.id)
