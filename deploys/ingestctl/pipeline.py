"""`ingestctl deploy`: build, plan under the lock, ship, migrate, roll out in gated batches, roll back on failure.

The plan (`plan.build_deploy_plan`) is what `--dry` prints; the real run builds the same plan from the facts it
reads under the lock and executes it, so the plan's checks (migration range, compatibility) guard both. Each
host step is a pyinfra run (`switching`), the gates are in `gatekeeper`, lock and ledger in `runlock`.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Mapping

from ingestctl import config as config_mod
from ingestctl import fleet, hostlayout, hostvalues, paths
from ingestctl import pyinfra_runner as runner
from ingestctl import secrets as secrets_mod
from ingestctl.changes import observed_deploy
from ingestctl.errors import GateFailed, IngestctlError, RollbackFailed
from ingestctl.facts.release import IngestState, SchemaHead
from ingestctl.gatekeeper import benchmark_gate
from ingestctl.liveconfig import refuse_reverting_rotations
from ingestctl.operations import release as release_ops
from ingestctl.output import Reporter
from ingestctl.runcontext import Context, Release, Run, new_run_id, prepare
from ingestctl.runlock import guarded
from ingestctl.switching import config_calls, database_call, rollout


def ship_images(ctx: Context, release: Release) -> None:
    """Every host gets the app and proxy images; the db host also its database images. Noop when present."""
    # The inventory's references: a digest-pinned one is resolved here and hosts get its image ID under name:tag.
    references = ctx.infra_references
    common = [release.image, references["PROXY_IMAGE"]]
    images_for = {
        host: common + ([references["POSTGRES_IMAGE"], references["REDIS_IMAGE"]]
                        if host == ctx.env.db_host else [])
        for host in ctx.env.all_hosts
    }
    result = ctx.io.run_deploy(release_ops.images_for_role_shipped, images_for=images_for,
                               progress=lambda sent: ctx.reporter.event("progress", sent.describe(), step="ship"))
    ctx.reporter.event("step", "images: " + (f"shipped to {', '.join(result.changed_hosts)}"
                                             if result.changed_hosts else "already on every host (noop)"),
                       step="ship", changed=result.changed_hosts)


def prepare_hosts(ctx: Context, cfg: config_mod.ServiceConfig) -> None:
    """Layout, compose file and the config version on every host; the database running on the db host."""
    compose_for = {host: ctx.compose_file(host) for host in ctx.env.all_hosts}
    layout_call = runner.OperationCall(
        release_ops.layout_present,
        kwargs=dict(name="Ensure ingest host layout is present", compose_for=compose_for,
                    infra_images=ctx.infra_images, app_uid=ctx.env.data.app_uid),
    )
    ctx.io.run_operations([layout_call, *config_calls(ctx, cfg), database_call(ctx, cfg)])
    ctx.reporter.event("step", f"config {cfg.version} and layout present on {len(ctx.env.all_hosts)} host(s)",
                       step="config", config_version=cfg.version)


def migrate(ctx: Context, release: Release, cfg: config_mod.ServiceConfig, run: Run, before: str | None) -> None:
    """Restore point, then `alembic upgrade head` in a one-off container of the new image, on the db host.

    BEFORE is the database's head as read under the lock. The heads and the restore point go in RUN's facts.
    """
    from ingestctl.operations.release import schema_migrated

    db = ctx.env.db_host
    if before == release.schema_head:
        ctx.reporter.event("step", f"schema already at {before}: no migration", step="migrate",
                           schema_before=before, schema_after=before)
        run.facts.schema_before = run.facts.schema_after = before
        return
    restore_point = f"{hostlayout.BASE}/backups/{run.id}-{before or 'empty'}.dump"
    ctx.reporter.event("step", f"migrating schema {before or 'empty'} -> {release.schema_head} "
                       f"(restore point {restore_point})", step="migrate", schema_before=before,
                       target=release.schema_head)
    result = ctx.io.run_operations(
        [runner.OperationCall(
            schema_migrated,
            kwargs=dict(name=f"Ensure schema is at {release.schema_head}", image=release.image,
                        config_version=cfg.version, infra_images=ctx.infra_images,
                        restore_point=restore_point, alembic_args=("upgrade", "head"),
                        _timeout=ctx.env.data.migration_timeout_s),
        )],
        hosts=[db], raise_on_error=False,
    )
    after = ctx.io.get_facts(SchemaHead, hosts=[db])[db]
    run.facts.schema_before, run.facts.schema_after, run.facts.restore_point = before, after, restore_point
    if result.failed:
        raise GateFailed(
            f"migration gate failed: {result.failed[0].describe_failure()}; schema is at {after} "
            f"(restore point {restore_point}); no app host was changed"
        )


def deploy(env_name: str, reporter: Reporter, version: str | None = None, batch: str | None = None,
           skip_bench: bool = False, dry: bool = False, lock_wait_s: float = 0.0,
           allow_incompatible: bool = False, emergency: bool = False) -> Run:
    from ingestctl import images as images_mod
    from ingestctl import plan as plan_mod
    from ingestctl import slo

    ctx = prepare(env_name, reporter)
    plan_mod.parse_batch_spec(batch, plan_mod.rollout_order(ctx.env))  # a bad --batch exits 2 before the build
    if dry:
        return dry_run(ctx, batch, version, skip_bench, allow_incompatible)

    # The error budget policy, before anything is built or any host touched (exit 2 when refused).
    emergency = slo.check_before_deploy(ctx.env, reporter, emergency)
    run = Run(new_run_id(), "deploy", env_name, ctx.who)
    run.facts.emergency = emergency

    started = time.time()
    built = images_mod.build_app_image(version, progress=lambda m: reporter.event("progress", m, step="build"))
    release = Release(built.version, built.name, built.id,
                      (built.labels or {}).get(images_mod.LABEL_SCHEMA_HEAD))
    run.step("build", started)
    reporter.event("step", f"image {release.image} ({release.image_id[:19]}) ready", step="build",
                   image=release.image, image_id=release.image_id, cached=built.cached)

    with observed_deploy(ctx, run):
        execute_deploy(ctx, run, release, batch, skip_bench, lock_wait_s, allow_incompatible)
    return run


def execute_deploy(ctx: Context, run: Run, release: Release, batch: str | None = None, skip_bench: bool = False,
                   lock_wait_s: float = 0.0, allow_incompatible: bool = False) -> None:
    """The deploy of a built RELEASE, everything that reaches the hosts (through `ctx.io`): lock, plan from the
    hosts' facts, ship, config, migrate, gated rollout, benchmark, prune; rollback, ledger and unlock in
    `guarded`. Raises what the CLI turns into the exit code (LockHeld 2, GateFailed 3, RollbackFailed 4)."""
    facts = run.facts
    facts.release, facts.image, facts.image_id = release.version, release.image, release.image_id
    facts.config_version, facts.skip_bench, facts.release_schema_head = (ctx.config.version, skip_bench,
                                                                         release.schema_head)
    with guarded(ctx, run, lock_wait_s, f"deploy {ctx.name} --version {release.version}", check_setup=True) as guard:
        run.facts.previous = {h: (s or {}).get("release") for h, s in guard.before.items()}
        # The plan --dry prints, built from what the hosts say under the lock: its checks guard the real run.
        plan = deploy_plan(ctx, release.version, release.image, batch, skip_bench, allow_incompatible,
                           guard.before, guard.schema_head)
        report_plan(ctx.reporter, plan)
        refuse_reverting_rotations(ctx, guard.before)
        guard.checkpoints.check("shipping images")
        started = time.time()
        ship_images(ctx, release)
        run.step("ship", started)

        guard.checkpoints.check("writing config")
        started = time.time()
        prepare_hosts(ctx, ctx.config)
        run.step("config", started)

        guard.checkpoints.check("migrating")
        started = time.time()
        migrate(ctx, release, ctx.config, run, guard.schema_head)
        run.step("migrate", started)

        try:
            rollout(ctx, run, plan.batches, release, ctx.config.version, guard.checkpoints, guard.switched,
                    canary_weight=plan.canary_weight)
            benchmark_gate(ctx, run, skip_bench, switched=bool(guard.switched))
        except Exception as exc:
            if plan.incompatible and run.facts.schema_after != plan.schema_head_before:
                # The old release cannot run on the new schema: undo the migrations before it returns.
                downgrade_before_rollback(ctx, run, plan, release, exc)
            raise
        if guard.switched:
            started = time.time()
            prune_old(ctx, release, guard.before)
            run.step("prune", started)


def deploy_plan(ctx: Context, release: str, image: str, batch: str | None, skip_bench: bool,
                allow_incompatible: bool, states: Mapping[str, dict | None], db_head: str | None):
    """The deploy's plan from the checkout and the hosts' facts (state.json per host, the database's head)."""
    from ingestctl import migrations as migrations_mod
    from ingestctl import plan as plan_mod

    live = {h: s for h, s in states.items() if s}
    current = next(iter(live.values()), None)
    previous_config = (current or {}).get("config_version")
    old_config = None
    if current and previous_config != ctx.config.version:  # an unchanged config has no diff to read
        old_config = read_host_config(ctx, next(iter(live)), previous_config)
    return plan_mod.build_deploy_plan(
        env=ctx.env, release=release, image=image, batch_spec=batch,
        old_config=old_config, new_config=ctx.config.masked(), config_version=ctx.config.version,
        previous_config_version=previous_config,
        revisions=migrations_mod.load_revisions(paths.project_root() / "service" / "alembic" / "versions"),
        db_head=db_head, previous_release=(current or {}).get("release"), skip_bench=skip_bench,
        allow_incompatible=allow_incompatible,
    )


def report_plan(reporter: Reporter, plan) -> None:
    if reporter.json_mode:
        reporter.event("plan", f"plan: {len(plan.batches)} batch(es): "
                       + " | ".join(", ".join(b) for b in plan.batches), **plan.as_event())
    else:
        for line in plan.render():
            reporter.event("plan", line)


def downgrade_before_rollback(ctx: Context, run: Run, plan, release: Release, cause: Exception) -> None:
    """--allow-incompatible and a failed gate: run the declared data-safe downgrade back to the head the old
    release runs on, with the new image (it carries the revisions), to an absolute revision. RollbackFailed
    (exit 4) with the restore point when a migration is not data-safe or the downgrade fails: the hosts then
    stay on the new release, which runs on the schema it left."""
    from ingestctl import migrations as migrations_mod
    from ingestctl.operations.release import schema_migrated

    target = plan.schema_head_before
    restore_point = run.facts.restore_point
    try:
        for migration in plan.migrations:
            migrations_mod.require_data_safe(migration, migrations_mod.restore_hint(ctx.name))
    except IngestctlError as exc:
        raise RollbackFailed(
            f"SEV-1: {cause}; the old release cannot run on the new schema and it cannot be downgraded: {exc}; "
            f"every app host stays on {release.version}; restore point {restore_point}") from cause
    ctx.reporter.event("rollback", f"downgrading schema {plan.schema_head_after} -> {target or 'empty'} before "
                       f"{plan.previous_release} returns (brief unavailability)", schema_target=target)
    db = ctx.env.db_host
    result = ctx.io.run_operations([runner.OperationCall(schema_migrated, kwargs=dict(
        name=f"Ensure schema is at {target or 'empty'}", image=release.image, config_version=ctx.config.version,
        infra_images=ctx.infra_images, restore_point=f"{hostlayout.BASE}/backups/{run.id}-downgrade.dump",
        alembic_args=("downgrade", target or "base"), _timeout=ctx.env.data.migration_timeout_s))],
        hosts=[db], raise_on_error=False)
    run.facts.schema_after = ctx.io.get_facts(SchemaHead, hosts=[db])[db]
    if result.failed:
        raise RollbackFailed(
            f"SEV-1: {cause}; the schema downgrade to {target} failed: {result.failed[0].describe_failure()}; "
            f"schema is at {run.facts.schema_after}; every app host stays on {release.version}; "
            f"restore point {restore_point}") from cause


def prune_old(ctx: Context, release: Release, before: Mapping[str, dict | None]) -> None:
    """Keep the last `keep_releases` releases' images and config versions on the hosts; remove older ones.

    Never what a slot runs or may return to: the new release and config, the live ones before this deploy (now
    the standby's), and every slot's; `docker image rm` also refuses an image a container still uses. Old config
    versions go with their secret files: a retired secret must not stay on disk. One ledger read, one command
    round per host.
    """
    from ingestctl import fleetview
    from ingestctl import ledger as ledger_mod

    states = [s for s in before.values() if s]
    kept_images = {release.image_id} | {
        image_id for state in states
        for image_id in (state.get("image_id"), (state.get("standby") or {}).get("image_id")) if image_id
    }
    kept_configs = {ctx.config.version}
    for state in states:
        kept_configs |= {state.get("config_version"), (state.get("standby") or {}).get("config_version")}
        kept_configs |= {value for variables in (state.get("slots") or {}).values()
                         for key, value in variables.items() if key.endswith("_CONFIG")}
    keep = ctx.env.data.keep_releases
    try:
        entries = fleetview.read_ledger(ctx.name, ctx.reporter, ctx.io)
        ids = sorted({i for item in ledger_mod.releases_to_prune(entries, keep) for i in item.image_ids}
                     - kept_images)
        versions = [v for v in ledger_mod.configs_to_prune(entries, keep)
                    if v not in kept_configs and hostvalues.CONFIG_VERSION.matches(v)]
        # Both come from the hosts' ledgers: untrusted, so quoted (and validated when the ledger is parsed).
        commands = []
        if ids:
            commands.append(" ".join(["for i in", *map(shlex.quote, ids),
                                      '; do docker image rm "$i" >/dev/null 2>&1 || true; done']))
        if versions:
            commands.append("rm -rf -- " + " ".join(shlex.quote(f"{hostlayout.BASE}/config/{v}") for v in versions))
        if not commands:
            return
        ctx.io.run_commands(lambda _h: "; ".join(commands), hosts=ctx.env.all_hosts)
        if ids:
            ctx.reporter.event("step", f"pruned {len(ids)} old release image(s) (keeping {keep})", step="prune",
                               images=ids)
        if versions:
            ctx.reporter.event("step", f"pruned {len(versions)} old config version(s) and their secret files "
                               f"(keeping {keep})", step="prune", config_versions=versions)
    except IngestctlError as exc:  # pruning is housekeeping: report it, never fail a good deploy over it
        ctx.reporter.event("error", f"could not prune old images and config versions: {exc}")


def dry_run(ctx: Context, batch: str | None, version: str | None, skip_bench: bool,
            allow_incompatible: bool = False) -> Run:
    """--dry: the plan, from this checkout and a read-only look at the hosts. Nothing is changed anywhere."""
    from ingestctl import images as images_mod

    version = version or images_mod.checkout_version(paths.project_root())
    with ctx.io.connected() as active:  # one round for both facts
        states = fleet.on_every_host(active, lambda _name, host: host.get_fact(IngestState))
        db_head = active[ctx.env.db_host].get_fact(SchemaHead)
    plan = deploy_plan(ctx, version, images_mod.image_name(version), batch, skip_bench, allow_incompatible,
                       states, db_head)
    report_plan(ctx.reporter, plan)
    ctx.reporter.event("summary", "dry run: nothing was changed", dry=True)
    return Run(new_run_id(), "deploy-dry", ctx.name, ctx.who)


def read_host_config(ctx: Context, host: str, version: str) -> dict[str, str] | None:
    """The tunables of config VERSION as written on HOST (secrets masked), or None when unreadable."""
    if not hostvalues.CONFIG_VERSION.matches(version):
        return None
    path = f"{hostlayout.BASE}/config/{version}/app.env"
    result = ctx.io.run_commands({host: f"cat {shlex.quote(path)}"})[host]
    if not result.ok:
        return None
    tunables = config_mod.tunables_from_env_file(result.stdout, where=f"{host}:{path}")
    return {**tunables, **{k: secrets_mod.MASK for k in secrets_mod.REQUIRED}}
