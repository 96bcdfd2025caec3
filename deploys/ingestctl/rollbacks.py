"""One-shot rollbacks (application, schema, configuration) and gated config rollouts.

Each is the runbook's step made safe: decided from the ledger, the hosts' facts and the checkout's migrations
before any host changes (refusals exit 2 and change nothing), then run inside `runlock.guarded`, which takes
the lock, puts switched hosts back on any failure (exit 3, or 4 if that fails) and writes the ledger.
"""

from __future__ import annotations

import shlex
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from ingestctl import config as config_mod
from ingestctl import fleet, fleetview, gates, hostlayout, migrations, plan
from ingestctl import pyinfra_runner as runner
from ingestctl.errors import ConfigError, GateFailed, RollbackFailed
from ingestctl.facts import together
from ingestctl.facts.release import REJECTED, ImageMigrations, SchemaHead, SchemaRecord
from ingestctl.gatekeeper import report_gate
from ingestctl.liveconfig import read_live_config
from ingestctl.operations import release as release_ops
from ingestctl.output import Reporter
from ingestctl.runcontext import Context, Release, Run, host_states, new_run_id, prepare
from ingestctl.runlock import guarded
from ingestctl.switching import config_calls, database_call, rollout


def begin(kind: str, env_name: str, reporter: Reporter) -> tuple[Context, Run]:
    """Preflight (inventory, secrets, config: exit 2 on any problem, no host touched) and the run's record."""
    run = Run(new_run_id(), kind, env_name, "")  # first: time to healthy counts from the command's start
    ctx = prepare(env_name, reporter)
    run.who = ctx.who
    return ctx, run


# What a host runs, as state.json records it: a rollback plans from these.
LIVE_FIELDS = ("release", "image", "image_id", "config_version", "schema_head")


def rejected_live_fields(state: Mapping) -> dict[str, str]:
    """The LIVE_FIELDS of STATE that failed their check when read (facts.release.checked_state): now None."""
    return {key: why for key, why in (state.get(REJECTED) or {}).items() if key in LIVE_FIELDS}


def live_release(ctx: Context, states: Mapping[str, dict | None]) -> tuple[str, dict]:
    """(an app host, what it runs): what the app hosts run now. Mixed versions (a half-finished run) are named.

    An app host whose state.json holds forged values is left out with a warning rather than blocking the
    rollback: the rollback switches it like every app host, which rewrites its state.json. Only when no app
    host's state can be trusted is there nothing to plan from.
    """
    app_states = {h: states.get(h) for h in ctx.env.app_hosts}
    missing = [h for h, s in app_states.items() if not s]
    if missing:
        raise ConfigError(f"nothing to roll back on {', '.join(missing)}: no release is live there; "
                          f"deploy first (`ingestctl deploy {ctx.name}`)")
    trusted: dict[str, dict] = {}
    for host, state in app_states.items():
        assert state is not None
        rejected = rejected_live_fields(state)
        if rejected:
            ctx.reporter.event("warning", f"warning: {host}: {'; '.join(rejected.values())}; what it runs is unknown, "
                               "it is switched with the others", host=host)
        else:
            trusted[host] = state
    if not trusted:
        raise ConfigError(f"no app host's state.json can be trusted ({', '.join(app_states)}: see the warnings); "
                          f"deploy a release by version to rewrite them: `ingestctl deploy {ctx.name} --version "
                          "RELEASE`")
    releases = Counter((s["release"], s["config_version"]) for s in trusted.values())
    if len(releases) > 1:
        detail = ", ".join(f"{h}: {s['release']} / config {s['config_version']}" for h, s in trusted.items())
        raise ConfigError(f"the fleet is mixed ({detail}); finish or redo the last deploy before rolling back")
    return next(iter(trusted.items()))


def stopped_for_dry_run(dry: bool, reporter: Reporter) -> bool:
    """--dry: the plan above was decided exactly as the real run decides it; stop before the lock."""
    if dry:
        reporter.event("summary", "dry run: nothing was changed", dry=True)
    return dry


def all_at_once(ctx: Context) -> list[list[str]]:
    """Rollbacks switch every app host in one batch: the fastest way back, still gated by health."""
    return [plan.rollout_order(ctx.env)]


def health_only(ctx: Context, run: Run, hosts: list[str]) -> float:
    """Health gate after a rollback switch; returns seconds from the run's start to every host healthy."""
    gate = gates.health_gate({h: ctx.base_url(h) for h in hosts}, ctx.env.data.health_timeout_s)
    run.gates.append(gate.as_dict())
    report_gate(ctx.reporter, gate)
    if not gate.passed:
        raise GateFailed(gate.message)
    return round(time.time() - run.started, 2)


def switch_all(ctx: Context, run: Run, guard, release: Release, config_version: str, metrics: bool) -> None:
    """Every app host to RELEASE + CONFIG_VERSION at once, gated on health (and live metrics if asked)."""
    rollout(ctx, run, all_at_once(ctx), release, config_version, guard.checkpoints, guard.switched, metrics)


# ----- rollback app -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AppRollback:
    """An app rollback's plan: from what the app hosts run (CURRENT) to RELEASE, with the schema check, decided
    from the ledger (ENTRIES), the hosts' STATES and the database's head and record of its migrations."""

    current: dict
    release: Release
    check: migrations.AppliedRollbackCheck
    db_head: str | None
    schema_after: str | None
    entries: list
    states: Mapping[str, dict | None]


def rollback_app(env_name: str, reporter: Reporter, to: str | None = None, lock_wait_s: float = 0.0,
                 with_schema: bool = False, dry: bool = False) -> Run:
    """The live app hosts back on the previous known-good release (or TO), judged from what the hosts and the
    database record, so it works from any checkout. WITH_SCHEMA also brings the schema down to the target's head
    when the revisions in between are not backward-compatible but declare data-safe downgrades.

    Decided under the lock from the lock round's own reads (`guarded(decide=...)`); --dry decides the same plan
    from the same reads, taken without the lock."""
    ctx, run = begin("rollback-app", env_name, reporter)
    return execute_app_rollback(ctx, run, to, lock_wait_s, with_schema, dry)


def execute_app_rollback(ctx: Context, run: Run, to: str | None, lock_wait_s: float, with_schema: bool,
                         dry: bool) -> Run:
    """`rollback_app` past its preflight: on CTX's hosts (over SSH, or the executor tests' in-memory fleet)."""
    env_name, reporter = ctx.name, ctx.reporter

    def decide(entries: list, states: Mapping[str, dict | None], db_head: str | None, applied: list) -> AppRollback:
        return plan_app_rollback(ctx, run, entries, states, db_head, applied, to, with_schema)

    if dry:
        # Everything the plan needs, read at once: one round, not three.
        entries, states, (db_head, applied) = fleet.at_once(
            lambda: fleetview.read_ledger(env_name, reporter, ctx.io), lambda: host_states(ctx),
            lambda: schema_record(ctx))
        decide(entries, states, db_head, applied)
        stopped_for_dry_run(dry, reporter)
        return run
    with guarded(ctx, run, lock_wait_s, f"rollback app {env_name}",
                 decide=lambda g: decide(g.history, g.before, g.schema_head, g.applied)) as guard:
        chosen = guard.plan
        release, check = chosen.release, chosen.check
        config_version = chosen.current["config_version"]
        started = time.time()
        warm = warm_everywhere(ctx, guard.before, release)
        if not warm:
            ensure_image_available(ctx, release)
        run.step("images", started)
        if check.needs_downgrade:
            started = time.time()
            carrier = downgrade_image(ctx, chosen.entries, chosen.states, chosen.db_head)
            downgrade_schema(ctx, run, carrier, config_version, chosen.db_head, chosen.schema_after)
            run.step("downgrade", started)
        elif warm:
            # Nothing has changed on any host since the lock's round read the switch's facts: the switch takes
            # them rather than spend a round (and a `docker ps` a host) reading them again.
            for name in ctx.env.app_hosts:
                if name in guard.facts:
                    together.hand_over(name, release_ops.handed_switch(guard.facts[name], config_version))
        started = time.time()
        switch_all(ctx, run, guard, release, config_version, metrics=False)
        run.facts.time_to_healthy_s = round(time.time() - run.started, 2)
        run.step("switch", started)
        if check.needs_downgrade:
            unavailable = round(time.time() - started + run.steps[-2]["duration_s"], 2)
            run.facts.unavailable_s = unavailable
            reporter.event("step", f"schema and app back on {chosen.schema_after} / {release.version}; the api was "
                           f"unavailable for at most {unavailable}s", step="switch", unavailable_s=unavailable)
    return run


def plan_app_rollback(ctx: Context, run: Run, entries: list, states: Mapping[str, dict | None],
                      db_head: str | None, applied: list, to: str | None, with_schema: bool) -> AppRollback:
    """The plan, its facts on RUN and its `plan` event; ConfigError (exit 2, nothing changed) when there is
    nothing safe to roll back to."""
    env_name = ctx.name
    _host, current = live_release(ctx, states)
    target = plan.rollback_target(entries, to, current=current["release"])
    if not target.image_id:
        raise ConfigError(f"release {target.release}: the ledger has no image ID for it; deploy it by version instead")
    check = migrations.check_app_rollback_applied(applied, db_head, target.code_schema_head(), env=env_name,
                                                  with_schema=with_schema)
    release = Release(target.release, f"ingest:{target.release}", target.image_id, target.code_schema_head())
    schema_after = target.code_schema_head() if check.needs_downgrade else db_head
    facts = run.facts
    facts.release, facts.image_id, facts.config_version = release.version, release.image_id, current["config_version"]
    facts.previous = {h: (s or {}).get("release") for h, s in states.items()}
    facts.release_schema_head, facts.schema_before, facts.schema_after = release.schema_head, db_head, schema_after
    schema_note = (f"schema {db_head} -> {schema_after} first: the api is unavailable from the downgrade until the "
                   "switch is healthy" if check.needs_downgrade else f"schema {db_head} compatible")
    ctx.reporter.event("plan", f"rollback app {env_name}: {current['release']} -> {release.version} "
                       f"(config {current['config_version']} kept, {schema_note})",
                       from_release=current["release"], to_release=release.version, hosts=ctx.env.app_hosts,
                       schema_before=db_head, schema_after=schema_after)
    return AppRollback(current, release, check, db_head, schema_after, entries, states)


def schema_record(ctx: Context) -> tuple[str | None, list]:
    """The database's head and its own record of applied migrations, read in one query from the db host."""
    db = ctx.env.db_host
    with ctx.io.connected([db]) as active:
        return active[db].get_fact(SchemaRecord)


def require_unmoved_schema(under_lock: str | None, planned: str | None, env: str) -> None:
    """Decisions are made before the lock; if the schema moved meanwhile (another run), they no longer hold."""
    if under_lock != planned:
        raise ConfigError(f"the database's schema moved from {planned or 'empty'} to {under_lock or 'empty'} while "
                          f"this command waited for the lock; nothing was changed: run `ingestctl status {env}` "
                          "and decide again")


def downgrade_schema(ctx: Context, run: Run, carrier: str, config_version: str, db_head: str | None,
                     target: str | None) -> None:
    """Restore point, then `alembic downgrade TARGET` (an absolute revision, never a relative -N) in a one-off
    container of CARRIER, the image that knows the revisions it removes. RollbackFailed (exit 4) if it fails."""
    restore_point = f"{hostlayout.BASE}/backups/{run.id}-{db_head}.dump"
    run.facts.restore_point = restore_point
    db = ctx.env.db_host
    result = ctx.io.run_operations(
        [runner.OperationCall(
            release_ops.schema_migrated,
            kwargs=dict(name=f"Ensure schema is at {target or 'empty'}", image=carrier, config_version=config_version,
                        infra_images=ctx.infra_images, restore_point=restore_point,
                        alembic_args=("downgrade", target or "base"), target_head=target,
                        _timeout=ctx.env.data.migration_timeout_s),
        )],
        hosts=[db], raise_on_error=False,
    )
    after = ctx.io.get_facts(SchemaHead, hosts=[db])[db]
    run.facts.schema_after = after
    if result.failed:
        raise RollbackFailed(f"SEV-1: schema downgrade failed: {result.failed[0].describe_failure()}; schema is at "
                             f"{after}; restore point {restore_point}")
    ctx.reporter.event("step", f"schema at {after or 'empty'} (restore point {restore_point})", step="downgrade",
                       schema_after=after, restore_point=restore_point)


def warm_everywhere(ctx: Context, states: Mapping[str, dict | None], release: Release) -> bool:
    """Every app host records RELEASE's image as its warm standby: a running container holds its image, so there
    is nothing to ship or check (if the record is false, the switch starts the slot and fails on the image)."""
    standbys = [(states.get(h) or {}).get("standby") or {} for h in ctx.env.app_hosts]
    return all(s.get("image_id") == release.image_id and s.get("image") == release.image for s in standbys)


def ensure_image_available(ctx: Context, release: Release) -> None:
    """The target image is normally still on every host; if it was pruned, ship it again from this machine."""
    from ingestctl.local_images import local_image_id

    try:
        local = local_image_id(release.image)
    except Exception:  # not on this machine either: hosts must still have it, which shipping verifies
        local = None
    if local is not None and local != release.image_id:
        raise ConfigError(f"{release.image} on this machine is {local[:19]}, not the ledger's "
                          f"{release.image_id[:19]}; rebuild or retag it before rolling back")
    from ingestctl.operations.shipping import images_shipped

    ctx.io.run_deploy(images_shipped, images=[release.image], hosts=ctx.env.app_hosts)


# ----- rollback schema --------------------------------------------------------------------------------------

def rollback_schema(env_name: str, reporter: Reporter, steps: int = 1, lock_wait_s: float = 0.0,
                    dry: bool = False) -> Run:
    """Undo the newest STEPS migrations when each is data-safe and no running release needs them. Planned from
    the migrations inside the image that added the database's head (any checkout works), run to an absolute
    revision, and re-checked under the lock."""
    ctx, run = begin("rollback-schema", env_name, reporter)
    db = ctx.env.db_host
    db_head = ctx.io.get_facts(SchemaHead, hosts=[db])[db]
    states = host_states(ctx)
    # Removing schema under a release that needs it loses data: a host whose record of what it runs was forged
    # could need anything, so it blocks the downgrade instead of being left out.
    unknown = {h: why for h, s in states.items() if s and (why := rejected_live_fields(s))}
    if unknown:
        detail = "; ".join(f"{h}: {'; '.join(why.values())}" for h, why in unknown.items())
        raise ConfigError(f"cannot tell which schema the releases on {', '.join(unknown)} need ({detail}); "
                          f"deploy a release by version to rewrite their state.json first")
    live = next((s for s in states.values() if s), None)
    if live is None:
        raise ConfigError(f"no release is live on {env_name}: nothing to run the downgrade with")
    if db_head is None:
        raise ConfigError("nothing to roll back: the database has no migration applied")
    carrier_image = downgrade_image(ctx, fleetview.read_ledger(env_name, reporter, ctx.io), states, db_head)
    revisions = image_revisions(ctx, carrier_image)
    running_heads = {s.get("schema_head") for s in states.values() if s}
    to_undo = migrations.plan_schema_rollback(revisions, db_head, steps, running_heads, env=env_name)
    new_head = to_undo[-1].down_revision  # to_undo is newest first: the oldest one's parent is the new head
    run.facts.schema_before, run.facts.release = db_head, live["release"]
    run.facts.config_version = live["config_version"]
    names = ", ".join(m.name for m in to_undo)
    reporter.event("plan", f"rollback schema {env_name}: {db_head} -> {new_head or 'empty'} (undo {names}, "
                   f"code from {carrier_image})", schema_before=db_head, schema_after=new_head,
                   undo=[m.name for m in to_undo])
    if stopped_for_dry_run(dry, reporter):
        return run
    with guarded(ctx, run, lock_wait_s, f"rollback schema {env_name} --steps {steps}") as guard:
        require_unmoved_schema(guard.schema_head, db_head, env_name)
        started = time.time()
        downgrade_schema(ctx, run, carrier_image, live["config_version"], db_head, new_head)
        run.step("downgrade", started)
        run.facts.time_to_healthy_s = health_only(ctx, run, ctx.env.app_hosts)
    return run


def image_revisions(ctx: Context, image: str) -> list[migrations.Migration]:
    """The migration chain as IMAGE carries it, read on the db host and parsed statically (never imported)."""
    db = ctx.env.db_host
    files = ctx.io.get_facts(ImageMigrations, hosts=[db], image=image)[db] or {}
    if not files:
        raise ConfigError(f"{db}: found no migrations inside {image} (/app/alembic/versions); is it an ingest image?")
    return migrations.order_chain(migrations.parse_migration(name, text, f"{image}:/app/alembic/versions/{name}.py")
                                  for name, text in sorted(files.items()))


def downgrade_image(ctx: Context, entries, states: Mapping[str, dict | None], db_head: str) -> str:
    """An image whose migrations include DB_HEAD, present on the db host: the one-off downgrade container must
    know the revisions it removes. The normal case is an older release live (rolled back first, as the refusal
    asks), so the image is the latest known-good release built for DB_HEAD, found in the ledger."""
    from ingestctl.images import image_name
    from ingestctl.ledger import RELEASE_KINDS

    candidates = [s["image"] for s in states.values() if s and s.get("image") and s.get("schema_head") == db_head]
    candidates += [image_name(e.release) for e in sorted(entries, key=lambda e: (e.started, e.id), reverse=True)
                   if e.succeeded and e.kind in RELEASE_KINDS and e.release and e.code_schema_head() == db_head]
    db = ctx.env.db_host
    for image in dict.fromkeys(candidates):
        # Checked when read (state.json, ledger); quoted all the same, as every value put in a command here.
        if ctx.io.run_commands({db: f"docker image inspect {shlex.quote(image)} >/dev/null 2>&1"})[db].ok:
            return image
    raise ConfigError(
        f"no image that knows schema head {db_head!r} is on {db} (looked for: {', '.join(candidates) or 'none'}); "
        f"the downgrade must run with the release that added it: ship it with `ingestctl image ship {ctx.name}` "
        "or deploy that release again, then retry")


# ----- config set / rollback config / show ------------------------------------------------------------------

def config_set(env_name: str, reporter: Reporter, assignments: list[str], lock_wait_s: float = 0.0,
               dry: bool = False) -> Run:
    ctx, run = begin("config-set", env_name, reporter)
    changes = config_mod.parse_assignments(assignments, ctx.config.secrets)
    if "POSTGRES_PASSWORD" in changes:
        raise ConfigError("POSTGRES_PASSWORD: the database's own password cannot be rotated by a config rollout; "
                          "change it with ALTER ROLE on the database first, then update the secrets file and deploy")
    states = host_states(ctx)
    host, current = live_release(ctx, states)
    live = read_live_config(ctx, host, current["config_version"])
    new = live.with_changes(changes)
    diff = plan.config_diff(live.masked(), new.masked())
    if new.version == live.version:
        reporter.event("summary", f"config {live.version} already has these values: nothing to do",
                       config_version=live.version)
        return run
    release = Release(current["release"], current["image"], current["image_id"], current.get("schema_head"))
    facts = run.facts
    facts.release, facts.image_id, facts.release_schema_head = release.version, release.image_id, release.schema_head
    facts.config_version, facts.previous_config_version = new.version, live.version
    facts.rotated_secrets = sorted(k for k in changes if k in config_mod.SECRET_KEYS)
    reporter.event("plan", f"config {live.version} -> {new.version}: " + "; ".join(map(str, diff)),
                   config_before=live.version, config_after=new.version,
                   changes=[{"key": c.key, "old": c.old, "new": c.new} for c in diff])
    if stopped_for_dry_run(dry, reporter):
        return run
    with guarded(ctx, run, lock_wait_s, f"config set {env_name}") as guard:
        started = time.time()
        # A new REDIS_PASSWORD reaches Redis first (a restart): slots still on the old config rate-limit in
        # process (degrade mode) until the rollout switches them.
        calls = [*config_calls(ctx, new), *([database_call(ctx, new)] if "REDIS_PASSWORD" in changes else [])]
        ctx.io.run_operations(calls)
        run.step("config", started)
        from ingestctl.plan import parse_batch_spec, rollout_order

        rollout(ctx, run, parse_batch_spec(None, rollout_order(ctx.env)), release, new.version,
                guard.checkpoints, guard.switched)
    return run


def rollback_config(env_name: str, reporter: Reporter, to: str | None = None, lock_wait_s: float = 0.0,
                    dry: bool = False) -> Run:
    ctx, run = begin("rollback-config", env_name, reporter)
    entries = fleetview.read_ledger(env_name, reporter, ctx.io)
    states = host_states(ctx)
    _host, current = live_release(ctx, states)
    target = plan.config_rollback_target(entries, to, current=current["config_version"])
    marker = shlex.quote(f"{hostlayout.BASE}/config/{target}/.complete")
    present = ctx.io.run_commands(lambda _h: f"test -f {marker}", hosts=ctx.env.app_hosts)
    absent = [h for h, r in present.items() if not r.ok]
    if absent:
        raise ConfigError(f"config {target} is no longer on {', '.join(absent)}; set the values again with "
                          f"`ingestctl config set {env_name} KEY=VALUE...`")
    release = Release(current["release"], current["image"], current["image_id"], current.get("schema_head"))
    facts = run.facts
    facts.release, facts.image_id, facts.release_schema_head = release.version, release.image_id, release.schema_head
    facts.config_version, facts.previous_config_version = target, current["config_version"]
    reporter.event("plan", f"rollback config {env_name}: {current['config_version']} -> {target}",
                   config_before=current["config_version"], config_after=target)
    if stopped_for_dry_run(dry, reporter):
        return run
    with guarded(ctx, run, lock_wait_s, f"rollback config {env_name} -> {target}") as guard:
        started = time.time()
        switch_all(ctx, run, guard, release, target, metrics=True)
        run.facts.time_to_healthy_s = round(time.time() - run.started, 2)
        run.step("switch", started)
    return run


def config_show(env_name: str, reporter: Reporter) -> list[dict]:
    ctx = prepare(env_name, reporter)
    states = host_states(ctx)
    rows = []
    for host in ctx.env.all_hosts:
        state = states.get(host)
        if not state or not state.get("config_version"):  # none live, or a forged one (a warning says which)
            for why in rejected_live_fields(state or {}).values():
                reporter.event("warning", f"warning: {host}: {why}; not used", host=host)
            rows.append({"host": host, "config_version": None, "config": {}})
            continue
        live = read_live_config(ctx, host, state["config_version"])
        rows.append({"host": host, "config_version": live.version, "config": live.masked()})
    if reporter.json_mode:
        for row in rows:
            reporter.event("config", **row)
    else:
        keys = sorted({k for row in rows for k in row["config"]})
        reporter.table(f"{env_name}: live config (secrets masked)", ["key", *[r["host"] for r in rows]],
                       [["version", *[r["config_version"] or "-" for r in rows]]]
                       + [[k, *[r["config"].get(k, "") for r in rows]] for k in keys])
    return rows
