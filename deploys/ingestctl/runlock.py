"""The frame of every mutating action: the deploy lock (a lease renewed in the background, taken over from a dead
holder), the journal line at start, the final ledger entry and the unlock, and the rollback of switched hosts
when anything fails. Also `lock show` and `lock break`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ingestctl import fleet, fleetview
from ingestctl.errors import ConfigError, GateFailed, HostError, IngestctlError, RollbackFailed
from ingestctl.facts import together
from ingestctl.facts.host import Readiness
from ingestctl.facts.release import IngestState, LedgerCopy, SchemaHead, SchemaRecord
from ingestctl.facts.together import HostFacts, TogetherRead
from ingestctl.output import Reporter
from ingestctl.runcontext import Aborted, Checkpoints, Context, Run
from ingestctl.switching import rollback_hosts


class LeaseKeeper:
    """Renews the run's deploy-lock lease in the background, every quarter of its TTL, on every host that
    answers. A renewal that finds the lock in other hands (our lease ran out while this process was stopped
    or cut off, and another command took over) marks the lease lost: the run stops at its next checkpoint."""

    def __init__(self, ctx: Context, record):
        from datetime import timedelta

        self.ctx = ctx
        self.record = record
        self.ttl = timedelta(seconds=ctx.env.data.lock_ttl_s)
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.wait(self.ttl.total_seconds() / 4):
            self.renew_once()

    def renew_once(self) -> None:
        from datetime import UTC, datetime

        from ingestctl import lock as lock_mod

        renewed = self.record.renewed(datetime.now(UTC), self.ttl)
        try:
            with self.ctx.io.connected(self.ctx.env.all_hosts, require_all=False) as active:
                results = fleet.run_on(active, lambda _h: lock_mod.renew_command(renewed))
        except Exception as exc:  # try again at the next tick; a host that stays silent lets its lease run out
            self.ctx.reporter.event("progress", f"could not renew the deploy lock's lease: {exc}")
            return
        for host, result in results.items():
            try:
                status = lock_mod.parse_output(result.stdout, host)
            except IngestctlError:
                continue
            if status.state == "lost":
                holder = describe_holder(status.record) if status.record else "an unreadable record"
                self.lost = f"{host} now holds the lock of {holder} (our lease ran out)"
        self.record = renewed


@dataclass
class Guard:
    before: dict[str, dict | None]
    checkpoints: Checkpoints
    switched: list[str] = field(default_factory=list)
    schema_head: str | None = None
    # With `guarded(decide=...)`: the rest of what the plan is decided from, read under the lock, and the plan.
    applied: list = field(default_factory=list)
    history: list = field(default_factory=list)
    plan: Any = None
    # Each host's facts as the lock's round read them (`facts_under_lock`).
    facts: dict[str, HostFacts] = field(default_factory=dict)


@contextmanager
def guarded(ctx: Context, run: Run, lock_wait_s: float, command: str, check_setup: bool = False,
            decide: Callable[[Guard], Any] | None = None) -> Iterator[Guard]:
    """The frame of every mutating action: lock, remember what each host ran, and on any failure after a
    host switched, put the switched hosts back (exit 3; exit 4 if that fails). Always: ledger, then unlock.

    CHECK_SETUP (deploy): every host must be set up (Docker, Compose, tools), read in the same connection as the
    lock; otherwise exit 2 naming each host and `ingestctl setup ENV`, with the lock released and nothing changed.

    DECIDE (an app rollback): the plan is decided under the lock, from the guard's reads, which then also hold
    the merged ledger (`history`) and the database's record of its migrations (`applied`): as `terraform apply`
    plans under the state lock, so nothing can move between the decision and the change, and no round is spent
    reading the same hosts twice. Its return value is `guard.plan`. A refusal (ConfigError) releases the lock,
    writes no ledger line and changes nothing, as one before the lock would.
    """
    checkpoints = Checkpoints(ctx.name)
    checkpoints.install()
    guard = Guard(before={}, checkpoints=checkpoints)
    # One SSH round for the lock and the state it protects: every round trip counts in a 3 a.m. rollback. The reads
    # run in the lock's own command, after it is taken, so nothing is read that could move before the lock.
    with ctx.io.connected() as active:
        reads = {name: TogetherRead.of(*facts_under_lock(ctx, name, check_setup, for_plan=decide is not None))
                 for name in active}
        record, guard.facts = acquire_lock(ctx, run, lock_wait_s, command, active, reads)
        try:
            if check_setup:
                require_set_up(ctx, fleet.on_every_host(active, lambda name, _h: guard.facts[name].get(Readiness)))
            read_under_lock(ctx, active, guard, for_plan=decide is not None)
            if decide is not None:
                guard.plan = decide(guard)
            journal_start(ctx, run, active)
        except Exception:  # e.g. a forged schema head: nothing changed yet, so the lock must not stay behind
            from ingestctl import lock as lock_mod

            fleet.run_on(active, lambda _h: lock_mod.release_command(run.facts.lock_token))
            checkpoints.uninstall()
            raise
    checkpoints.lease = LeaseKeeper(ctx, record).start()
    outcome = "failed"
    try:
        yield guard
        outcome = "success" if guard.switched else "noop"
    except RollbackFailed:
        outcome = "rollback-failed"
        raise
    except Exception as exc:  # any failure after a switch, expected or not, must put the fleet back
        run.facts.message = str(exc)
        if guard.switched:
            try:
                rollback_hosts(ctx, guard.before, guard.switched, str(exc))
            except RollbackFailed:  # raised here, not by the body: the clause above does not see it
                outcome = "rollback-failed"
                raise
            outcome = "rolled-back"
            raise GateFailed(f"{exc}; rolled back {', '.join(guard.switched)} to what they ran before") from exc
        outcome = "aborted" if isinstance(exc, Aborted) else "failed"
        # Exit 2 promises that no host was touched; past the lock, a host step may have written files (config,
        # images), so a failed step reports as a failed run that left every host on what it ran (exit 3).
        if isinstance(exc, (GateFailed, Aborted, HostError)):
            raise GateFailed(f"{exc}; no host was switched: every host still runs what it ran before") from exc
        raise
    finally:
        together.forget_handed()  # facts handed to a switch that never ran must not reach a later one
        checkpoints.uninstall()
        checkpoints.lease.stop()
        run.facts.outcome = outcome
        run.facts.switched = guard.switched
        finish(ctx, run)


def facts_under_lock(ctx: Context, name: str, check_setup: bool, for_plan: bool) -> list:
    """What host NAME's lock command reads once the lock is taken: what it runs, the schema head (the db host),
    with CHECK_SETUP whether it can take a deploy, and FOR_PLAN its ledger, the database's record of its
    migrations and the switch's own facts (`switch_ahead()`), which a warm rollback hands to its switch."""
    from ingestctl.operations.release import switch_ahead

    db = name == ctx.env.db_host
    if not for_plan:
        return [IngestState, *([SchemaHead] if db else []), *([Readiness] if check_setup else [])]
    return [IngestState, LedgerCopy, *([SchemaRecord] if db else []), *([Readiness] if check_setup else []),
            *switch_ahead()]


def read_under_lock(ctx: Context, active: Mapping[str, Any], guard: Guard, for_plan: bool) -> None:
    """What each host runs and the database's schema head, into GUARD, from what the lock's round read
    (`guard.facts`; a fact it could not read is read on its own here, every host at once). FOR_PLAN: also every
    host's ledger and the database's record of its migrations."""
    db = ctx.env.db_host
    facts = guard.facts
    guard.before = fleet.on_every_host(active, lambda name, _h: facts[name].get(IngestState))
    if not for_plan:
        guard.schema_head = facts[db].get(SchemaHead)
        return
    guard.schema_head, guard.applied = facts[db].get(SchemaRecord)
    ledgers = fleet.on_every_host(active, lambda name, _h: facts[name].get(LedgerCopy))
    guard.history = fleetview.merged_ledger(ledgers, ctx.reporter)


def require_set_up(ctx: Context, readiness: Mapping[str, dict | None]) -> None:
    """ConfigError naming every connected host that cannot take a deploy yet (its `Readiness`; None when the
    check itself failed there), and the command that fixes it."""
    from ingestctl import hostsetup

    def problems_of(values: dict | None) -> list[str]:
        if values is None:
            return ["the readiness check failed on the host (its shell could not run it)"]
        return hostsetup.readiness_problems(values)

    problems = {name: found for name, found in ((name, problems_of(values)) for name, values in readiness.items())
                if found}
    if problems:
        raise ConfigError(hostsetup.describe_problems(ctx.name, problems))


def journal_start(ctx: Context, run: Run, active: Mapping[str, Any]) -> None:
    """The run's ledger entry, outcome `running`, on every host before anything changes: a run killed before it
    finishes still shows in `history` (as `interrupted`, once its lock is gone or its lease ran out)."""
    from ingestctl import ledger as ledger_mod

    line = ledger_mod.serialise(ledger_entry(ctx, run, running=True), ctx.config.secrets)
    fleet.run_on(active, lambda _h: ledger_mod.append_command(line))


def acquire_lock(ctx: Context, run: Run, wait_s: float, command: str, active: Mapping[str, Any],
                 reads: Mapping[str, TogetherRead] | None = None) -> tuple[Any, dict[str, HostFacts]]:
    """Take the deploy lock on every (connected) host, or on none: whatever a host answers or raises, a partial
    take is released before waiting or failing. A holder whose lease ran out (or whose pid is gone on this
    machine) is taken over and named in the run's ledger entry. READS run in each host's lock command, once the
    lock is taken there. Returns our lock record and each host's facts, as its READS gave them."""
    from datetime import UTC, datetime, timedelta

    from ingestctl import lock as lock_mod

    ttl = timedelta(seconds=ctx.env.data.lock_ttl_s)
    record = lock_mod.new_record(who=ctx.who, command=command, release=run.facts.release,
                                 now=datetime.now(UTC), ttl=ttl, run_id=run.id)
    run.facts.lock_token = record.token
    deadline = time.monotonic() + wait_s
    commands: dict[str, str] = {}
    takeovers = 0
    while True:
        answers = take_lock_everywhere(active, record, commands, reads or {})
        statuses = {h: answer.status for h, answer in answers.items()}
        held = {h: s for h, s in statuses.items() if s.state != "acquired"}
        if not held:
            ctx.reporter.event("step", f"deploy lock taken on {len(statuses)} host(s) (lease {ttl.seconds}s)",
                               step="lock")
            return record, {h: answer.facts for h, answer in answers.items() if answer.facts is not None}
        commands = {}
        now = datetime.now(UTC)
        for host, status in held.items():
            holder = status.record
            if (status.state == "held" and holder is not None and takeovers < 3
                    and lock_mod.expired(holder, now, lock_mod.runner_alive(holder))):
                # Its runner is gone: take the lock over (atomically, only if it is still that holder's) and say so.
                commands[host] = lock_mod.takeover_command(holder.token, record.renewed(now, ttl))
                run.facts.lock_takeover = (f"took over the expired deploy lock of {describe_holder(holder)}"
                                              + (f", run {holder.run_id}" if holder.run_id else ""))
        if commands:
            takeovers += 1  # bounded: a record our takeover cannot match must not spin for ever
            ctx.reporter.event("step", run.facts.lock_takeover, step="lock", hosts=sorted(commands))
            continue
        failed = {h: s for h, s in held.items() if s.state == "failed"}
        if failed:
            raise ConfigError("cannot take the deploy lock: " + "; ".join(s.rejected or h for h, s in failed.items())
                              + "; no host was changed")
        host, status = sorted(held.items())[0]
        if time.monotonic() >= deadline:
            raise lock_mod.held_error(ctx.name, host, status.record, now, lock_mod.runner_alive(status.record))
        ctx.reporter.event("progress", f"waiting for the deploy lock held on {host} "
                           f"({max(0, deadline - time.monotonic()):.0f}s left)")
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))


# Joins a host's lock command and the reads that follow it once the lock is taken there (`:` names them in `ps`).
READS_AFTER_LOCK = " && { : reads under the deploy lock; "


@dataclass(frozen=True)
class LockAnswer:
    """One host's answer to the lock's round: its lock status, the lines its reads printed (none where it did not
    take the lock), and those lines taken as facts (None without reads)."""

    status: Any  # lock.LockStatus
    read_lines: list[str]
    facts: HostFacts | None


def take_lock_everywhere(active: Mapping[str, Any], record, commands: Mapping[str, str],
                         reads: Mapping[str, TogetherRead]) -> dict[str, LockAnswer]:
    """One acquire (or the given takeover) per host, then that host's READS if it took the lock. All or nothing:
    unless every host answered `acquired`, the lock is released wherever we got it, even when a host's command
    failed or the transport raised."""
    from ingestctl import lock as lock_mod

    def command_for(host: str) -> str:
        taking = commands.get(host) or lock_mod.acquire_command(record)
        return f"{taking}{READS_AFTER_LOCK}{reads[host].command}; }}" if host in reads else taking

    def answer_of(name: str, host: Any) -> LockAnswer:
        result = fleet.run_command(name, host, command_for(name))
        lines = result.stdout.splitlines()
        # The reads' output starts at their first fence; the lock's is what comes before it.
        fence = reads[name].nonce if name in reads else None
        start = next((i for i, line in enumerate(lines) if fence and line.startswith(fence)), len(lines))
        try:
            status = lock_mod.parse_output(lines[:start], name)
        except IngestctlError as exc:  # the lock command failed there (disk full, no mkdir): not acquired
            status = lock_mod.LockStatus("failed", None, f"{name}: {exc} {result.stderr.strip()[:200]}")
        # Taken here, in this host's own greenlet, while slower hosts still answer: a long ledger's parse (20 us a
        # line) then costs the round no time of its own.
        facts = HostFacts(host).take(reads[name], lines[start:]) if name in reads else None
        return LockAnswer(status, lines[start:], facts)

    try:
        answers = fleet.on_every_host(active, answer_of)
    except Exception:
        fleet.run_on(active, lambda _h: lock_mod.release_command(record.token))  # removes only ours
        raise
    taken = {h: active[h] for h, answer in answers.items() if answer.status.state == "acquired"}
    if len(taken) < len(answers) and taken:
        fleet.run_on(taken, lambda _h: lock_mod.release_command(record.token))
    return answers


OUTCOMES = {"noop": "success", "rollback-failed": "failed"}


def ledger_entry(ctx: Context, run: Run, running: bool = False):
    """The ledger's record of RUN: steps, gates, outcome and durations. Never holds a secret."""
    from datetime import UTC, datetime

    from ingestctl import ledger as ledger_mod

    facts = run.facts
    outcome = facts.outcome or "failed"

    def at(ts: float) -> datetime:
        return datetime.fromtimestamp(ts, UTC)

    return ledger_mod.LedgerEntry(
        id=run.id,
        kind=run.kind,
        env=run.env,
        release=facts.release,
        image_id=facts.image_id,
        config_version=facts.config_version,
        schema_head_before=facts.schema_before,
        schema_head_after=facts.schema_after,
        release_schema_head=facts.release_schema_head,
        who=run.who,
        started=at(run.started),
        finished=None if running else datetime.now(UTC),
        steps=[ledger_mod.Step(name=s["name"], started=at(s["started"]), duration_s=s["duration_s"])
               for s in run.steps],
        gates=[ledger_mod.GateResult(name=g["gate"], passed=bool(g.get("passed")),
                                     numbers=_flat_numbers(g.get("numbers") or {}),
                                     at=at(g["at"]) if g.get("at") else None)
               for g in run.gates if g.get("passed") is not None],
        outcome="running" if running else OUTCOMES.get(outcome, outcome),
        duration_s=round(time.time() - run.started, 2),
        time_to_healthy_s=facts.time_to_healthy_s,
        hosts=list(facts.switched),
        previous_release=_single(facts.previous),
        previous_config_version=facts.previous_config_version,
        restore_point=facts.restore_point,
        bench_skipped=facts.skip_bench,
        emergency=facts.emergency,
        message=facts.message,
        lock_takeover=facts.lock_takeover,
        rotated_secrets=list(facts.rotated_secrets),
    )


def _single(per_host: Mapping[str, Any] | None) -> Any:
    values = {v for v in (per_host or {}).values() if v}
    return values.pop() if len(values) == 1 else None


def _flat_numbers(numbers: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Gate numbers flattened to `host.p95_ms`-style keys with scalar values, as the ledger stores them."""
    flat: dict[str, Any] = {}
    for key, value in numbers.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flat_numbers(value, f"{name}."))
        elif value is None or isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def finish(ctx: Context, run: Run) -> None:
    """Always: record the run in every host's ledger, then release the lock (one command per host). Failures
    here are reported, never allowed to hide the run's own outcome."""
    from ingestctl import ledger as ledger_mod
    from ingestctl import lock as lock_mod

    token = run.facts.lock_token
    try:
        line = ledger_mod.serialise(ledger_entry(ctx, run), ctx.config.secrets)
        append = ledger_mod.append_command(line)
    except Exception as exc:  # the ledger must not mask the deploy's result, nor keep the lock held
        ctx.reporter.event("error", f"could not write the ledger: {exc}")
        append = "false"
    unlock = lock_mod.release_command(token) if token else "true"
    try:
        # Every host that answers gets the record and its lock back, even when another host dropped out.
        with ctx.io.connected(require_all=False) as active:
            results = fleet.run_on(active, lambda _h: f"({append}); ledger=$?; {unlock}; exit $ledger")
    except Exception as exc:
        ctx.reporter.event("error", f"could not record the run or release the deploy lock: {exc}; "
                           f"run `ingestctl lock break {ctx.name}` once you have checked the hosts")
        return
    unreachable = sorted(set(ctx.env.all_hosts) - set(results))
    if unreachable:
        ctx.reporter.event("error", f"{', '.join(unreachable)} unreachable: the run is not in their ledger and "
                           "their deploy lock stays until the next command takes it over (this run's pid is gone "
                           "or its lease runs out)")
    failed = [f"{h}: {r.stderr.strip()[:200]}" for h, r in results.items() if not r.ok]
    if failed:
        ctx.reporter.event("error", "ledger append failed on " + "; ".join(failed))


def describe_holder(record) -> str:
    return f"{record.who} (pid {record.pid} on {record.machine}, `{record.command}`, since {record.started:%H:%M:%S})"


def show_lock(env_name: str, reporter: Reporter) -> dict[str, Any]:
    """`ingestctl lock show ENV`: who holds the deploy lock on each host."""
    from ingestctl import fleetview

    statuses = fleetview.read_locks(env_name)
    for host, status in sorted(statuses.items()):
        if status.state == "free":
            what = "free"
        elif status.record is not None:
            what = f"held by {describe_holder(status.record)}"
        else:
            what = "held, record unreadable" + (f" ({status.rejected})" if status.rejected else "")
        reporter.event("step", f"{host}: {what}", host=host, state=status.state,
                       holder=status.record.who if status.record else None,
                       token=status.record.token if status.record else None)
    return statuses


def break_lock(env_name: str, reporter: Reporter, force: bool = False,
               confirm: Callable[[str], bool] | None = None) -> None:
    """Break the deploy lock on purpose: shows it first, then removes only the lock it showed (by token), after
    CONFIRM says yes or with FORCE. A lock taken meanwhile by another run is left alone."""
    from ingestctl import lock as lock_mod

    statuses = show_lock(env_name, reporter)
    held = {host: status for host, status in statuses.items() if status.state != "free"}
    if not held:
        reporter.event("summary", f"no deploy lock held on {env_name}", outcome="noop")
        return
    if not force and not (confirm and confirm(f"break the deploy lock on {', '.join(sorted(held))}?")):
        raise ConfigError(f"the deploy lock on {', '.join(sorted(held))} was left in place; check that its run is "
                          f"really gone, then run `ingestctl lock break {env_name} --force` (or answer yes)")
    commands = {host: lock_mod.break_command(status.record.token if status.record else None)
                for host, status in held.items()}
    results = fleet.run_commands(env_name, commands)
    for host, result in sorted(results.items()):
        status = lock_mod.parse_output(result.stdout, host)
        shown = held[host].record
        if status.state == "broken":
            what = f"broke the lock of {describe_holder(shown)}" if shown else "broke an unreadable lock"
        elif status.state == "not-ours":
            what = "left alone: the lock changed hands since it was shown"
        else:
            what = "no lock held any more"
        reporter.event("step", f"{host}: {what}", host=host, state=status.state)
