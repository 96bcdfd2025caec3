"""`ingestctl deploy`: preflight, lock, build and ship, migrate, roll out in gated batches, roll back on failure.

Planning (inventory, secrets, config version, batches) happens before any host is contacted, so a bad input
exits 2 with nothing touched. Each host step is a pyinfra run through `ingestctl.pyinfra_runner`; the gates
between batches are in `ingestctl.gates`. Any failure after the first host switched rolls every switched host
back to what it ran before, re-checks its health and exits 3; a failing rollback exits 4 with each host's state.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import shlex
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ingestctl import config as config_mod
from ingestctl import fleet, gates, hostlayout, hostvalues, paths
from ingestctl import inventory as inventory_mod
from ingestctl import pyinfra_runner as runner
from ingestctl import secrets as secrets_mod
from ingestctl.errors import ConfigError, GateFailed, IngestctlError, RollbackFailed
from ingestctl.facts.release import REJECTED, IngestState, SchemaHead
from ingestctl.operations import release as release_ops
from ingestctl.output import Reporter

# What `hostlayout.wait_slot_ready` prints when a new slot never answers ready within the timeout.
SLOT_NOT_READY = "not ready after"


class Aborted(IngestctlError):
    """`ingestctl abort ENV` or Ctrl-C asked the running deploy to stop and roll back (exit 3)."""

    exit_code = 3


@dataclass(frozen=True)
class Release:
    version: str
    image: str
    image_id: str
    schema_head: str | None = None


def current_user() -> str:
    """The operator's login name; CI containers often run with a uid that has no passwd entry."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid{os.getuid()}"


@dataclass
class Context:
    """Everything validated at the edge: the environment, its secrets and config, and derived settings."""

    env: inventory_mod.Environment
    reporter: Reporter
    config: config_mod.ServiceConfig
    ports: hostlayout.Ports
    who: str = field(default_factory=lambda: f"{current_user()}@{socket.gethostname()}")

    @property
    def name(self) -> str:
        return self.env.name

    @property
    def infra_images(self) -> dict[str, str]:
        return {
            "POSTGRES_IMAGE": self.env.data.postgres_image,
            "REDIS_IMAGE": self.env.data.redis_image,
            "PROXY_IMAGE": self.env.data.proxy_image,
        }

    @property
    def max_body_bytes(self) -> int:
        # The proxy's backstop sits at the configuration's upper bound; the api enforces the real limit.
        return 104857600

    def base_url(self, host: str, port: int | None = None) -> str:
        address = self.env.hosts[host].ssh_hostname
        return f"http://{address}:{port or self.ports.public}"

    def db_address(self, for_host: str) -> str:
        return self.env.hosts[self.env.db_host].ssh_hostname


def prepare(env_name: str, reporter: Reporter, overrides: Mapping[str, str] | None = None) -> Context:
    """Preflight: validate the inventory, secrets and config. Raises ConfigError (exit 2); touches no host."""
    env = inventory_mod.load(env_name)
    values = secrets_mod.validated(env.secrets_path())
    cfg = config_mod.ServiceConfig.build(env.data.config, values)
    if overrides:
        cfg = cfg.with_changes(overrides)
    ports = hostlayout.Ports(public=env.data.app_port)
    reporter.event("step", f"preflight: inventory {env.source or env_name} and secrets valid", step="preflight",
                   env=env_name, hosts=env.all_hosts, config_version=cfg.version)
    return Context(env=env, reporter=reporter, config=cfg, ports=ports)


def abort_flag(env_name: str):
    """Where `ingestctl abort ENV` leaves its request for the running deploy (checked between steps).

    Keyed by the environment's hosts too: several sandboxes (INGESTCTL_TESTBED) share one state directory, and
    an abort meant for one of them must neither stop nor be swallowed by a deploy to another.
    """
    env = inventory_mod.load(env_name)
    target = ",".join(f"{spec.ssh_hostname}:{spec.ssh_port}" for spec in env.hosts.values())
    return paths.state_dir() / f"abort-{env_name}-{hashlib.sha256(target.encode()).hexdigest()[:12]}"


class Checkpoints:
    """Between steps, stop when asked: by `ingestctl abort ENV` or by Ctrl-C (SIGINT) or SIGTERM."""

    def __init__(self, env_name: str):
        self.flag = abort_flag(env_name)
        self.flag.unlink(missing_ok=True)
        self.signalled: str | None = None

    def install(self) -> None:
        def handler(signum, _frame):
            self.signalled = signal.Signals(signum).name

        self._previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def uninstall(self) -> None:
        for sig, previous in getattr(self, "_previous", {}).items():
            signal.signal(sig, previous)

    def check(self, where: str) -> None:
        if self.flag.exists():
            self.flag.unlink(missing_ok=True)
            raise Aborted(f"aborted by `ingestctl abort` before {where}")
        if self.signalled:
            raise Aborted(f"aborted by {self.signalled} before {where}")


def host_states(ctx: Context, hosts: Iterable[str] | None = None) -> dict[str, dict | None]:
    return fleet.get_facts(ctx.name, IngestState, hosts=hosts)


def switch_calls(ctx: Context, release: Release, config_version: str,
                 clear_failed_idle: bool = False, keep_standby: bool | None = None) -> list[runner.OperationCall]:
    """The slot switch to RELEASE. `keep_standby=False` drains the slot it leaves instead of keeping it warm:
    after an automatic rollback, the release that failed must not stay up as the standby."""
    return [
        runner.OperationCall(
            release_ops.release_live,
            kwargs=dict(
                name=f"Ensure ingest release {release.version} is current",
                release=release.version,
                image=release.image,
                image_id=release.image_id,
                config_version=config_version,
                infra_images=ctx.infra_images,
                ports=ctx.ports,
                max_body_bytes=ctx.max_body_bytes,
                ready_timeout_s=int(ctx.env.data.health_timeout_s),
                drain_grace_s=ctx.env.data.drain_grace_s,
                schema_head=release.schema_head,
                keep_standby=ctx.env.data.keep_standby if keep_standby is None else keep_standby,
                clear_failed_idle=clear_failed_idle,
            ),
        )
    ]


def config_calls(ctx: Context, cfg: config_mod.ServiceConfig) -> list[runner.OperationCall]:
    return [
        runner.OperationCall(
            release_ops.config_version_present,
            kwargs=dict(
                name=f"Ensure ingest config {cfg.version} is present",
                version=cfg.version,
                env_text=config_mod.render_env_file(cfg, secrets_dir="/run/secrets"),
                secret_files=config_mod.render_secret_files(cfg),
                app_uid=ctx.env.data.app_uid,
            ),
        )
    ]


def gate_batch(ctx: Context, hosts: list[str], on_wait: Callable[[str], None],
               metrics: bool = True) -> Iterator[gates.GateResult]:
    """Health, then live metrics, on the hosts just switched; the first failure ends it.

    Yields each result as soon as it is known, so the event stream shows the health gate before the metric
    window starts (CI and `ingestctl abort` react to it), not both at once at the end.
    """
    urls = {host: ctx.base_url(host) for host in hosts}
    health = gates.health_gate(urls, ctx.env.data.health_timeout_s, on_wait=on_wait)
    yield health
    if metrics and health.passed:
        yield gates.metric_gate(
            urls,
            ctx.env.data.metric_window_s,
            ctx.env.data.max_error_ratio,
            ctx.env.data.max_p95_ms,
            probe=query_probe(ctx),
            min_requests=ctx.env.data.metric_min_requests,
        )


def query_probe(ctx: Context) -> Callable[[Any, str], None]:
    """A real read request per call, authenticated like a client, so the metric gate judges live traffic."""
    from ingest.tools.credentials import mint_read_token

    token = mint_read_token(ctx.config.secrets["JWT_SECRET"], ttl_seconds=600, subject="ingestctl-gate")
    headers = {"Authorization": f"Bearer {token}"}

    def probe(client, base: str):
        return client.get(base + "/api/v1/events", params={"limit": 10}, headers=headers)

    return probe


# Failures worth a second try: the container runtime or the SSH transport hiccuped, not the release itself.
TRANSIENT_ERRORS = (
    "OCI runtime", "connection reset", "Connection reset", "Broken pipe", "broken pipe", "EOF",
    "Error response from daemon", "Cannot connect to the Docker daemon", "timed out", "Timeout", "SSH",
    "Socket exception", "No existing session",
)


def is_transient(failure: str) -> bool:
    return SLOT_NOT_READY not in failure and any(marker in failure for marker in TRANSIENT_ERRORS)


def converge(ctx: Context, calls: list[runner.OperationCall], hosts: list[str], deadline: float,
             retryable: Callable[[str], bool]) -> tuple[runner.RunResult, set[str]]:
    """Run CALLS on HOSTS, then again on the hosts whose failure is RETRYABLE, with backoff, until DEADLINE
    (monotonic). Every switch step is idempotent and reads the host afresh, so a retry picks up where the
    failed attempt stopped. Returns the last result per host and the hosts any attempt changed or failed on."""
    results: dict[str, runner.HostResult] = {}
    touched: set[str] = set()
    pending, delay, attempt = list(hosts), 1.0, 1
    while True:
        result = runner.run_operations(ctx.name, calls, hosts=pending, raise_on_error=False)
        results.update(result.hosts)
        touched.update(result.changed_hosts)
        touched.update(r.host for r in result.failed)
        again = [r for r in result.failed if retryable(r.describe_failure())]
        if not again or time.monotonic() + delay > deadline:
            return runner.RunResult(results), touched
        for failed in again:
            ctx.reporter.event("retry", f"{failed.host}: attempt {attempt} failed, retrying in {delay:g}s: "
                               f"{failed.describe_failure()[-300:]}", host=failed.host, attempt=attempt)
        time.sleep(delay)
        pending, delay, attempt = [r.host for r in again], min(delay * 2, 8.0), attempt + 1


def rollback_hosts(ctx: Context, before: Mapping[str, dict | None], hosts: list[str], reason: str) -> list[str]:
    """Put each of HOSTS back on what it ran before (release, image and config), then re-check health.

    Raises RollbackFailed (exit 4) naming every host's state when any host cannot be restored.
    """
    reporter = ctx.reporter
    reporter.event("rollback", f"rolling back {', '.join(hosts)}: {reason}", hosts=hosts, reason=reason)
    restored: list[str] = []
    failures: list[str] = []
    # Hosts that ran the same thing before go back together, in one parallel run.
    groups: dict[tuple[str, str, str], list[str]] = {}
    first_deploy: list[str] = []
    for host in hosts:
        previous = before.get(host)
        unusable = sorted(set((previous or {}).get(REJECTED) or {}) & {"release", "image", "image_id",
                                                                        "config_version"})
        if unusable:
            failures.append(f"{host}: its state.json before this run had values that failed their check "
                            f"({', '.join(unusable)}): cannot tell what to return to")
            continue
        if not previous or not previous.get("release"):
            first_deploy.append(host)
            continue
        groups.setdefault((previous["release"], previous["image_id"], previous["config_version"]), []).append(host)
    # A rollback keeps converging until its deadline: one transient error must not leave a host on the release
    # that failed its gate.
    deadline = time.monotonic() + ctx.env.data.rollback_deadline_s
    if first_deploy:
        # Nothing ran there before: going back means taking the failed release out of service.
        withdraw = runner.OperationCall(release_ops.release_withdrawn, kwargs=dict(
            name="Ensure the failed first release is out of service", drain_grace_s=1))
        result, _ = converge(ctx, [withdraw], first_deploy, deadline, retryable=lambda _failure: True)
        failures.extend(r.describe_failure() for r in result.failed)
        withdrawn = [h for h in first_deploy if h not in {r.host for r in result.failed}]
        if withdrawn:
            reporter.event("rollback", f"{', '.join(withdrawn)}: first deploy, nothing to return to: the failed "
                           "release was taken out of service", hosts=withdrawn, outcome="withdrawn")
    for group in groups.values():
        previous = before[group[0]]
        release = Release(previous["release"], previous["image"], previous["image_id"], previous.get("schema_head"))
        result, _ = converge(
            ctx, switch_calls(ctx, release, previous["config_version"], clear_failed_idle=True, keep_standby=False),
            group, deadline, retryable=lambda _failure: True,
        )
        failures.extend(r.describe_failure() for r in result.failed)
        restored.extend(h for h in group if h not in {r.host for r in result.failed})
    if restored:
        health = gates.health_gate({h: ctx.base_url(h) for h in restored}, ctx.env.data.health_timeout_s)
        if not health.passed:
            failures.append(health.message)
    if failures:
        states = describe_fleet(ctx)
        raise RollbackFailed(
            "SEV-1: rollback failed: " + "; ".join(failures) + "\nfleet state:\n" + states
        )
    reporter.event("rollback", f"rolled back {', '.join(restored)}; health re-checked", hosts=restored,
                   outcome="rolled-back")
    return restored


def describe_fleet(ctx: Context) -> str:
    """One line per host: what it runs now, for the SEV-1 report. Never raises."""
    try:
        states = host_states(ctx)
    except Exception as exc:  # the report must come out even when hosts are unreachable
        return f"  (could not read host state: {exc})"
    lines = []
    for host in ctx.env.all_hosts:
        state = states.get(host)
        if state is None:
            lines.append(f"  {host}: no release recorded (or unreachable)")
        else:
            lines.append(
                f"  {host}: release {state.get('release')} image {(state.get('image_id') or '')[:19]} "
                f"config {state.get('config_version')} slot {state.get('slot')}"
            )
    return "\n".join(lines)


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def env_for_bench(ctx: Context) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        BENCH_PROFILE=ctx.env.data.bench_profile,
        BENCH_FAIL_THRESHOLD_MS=str(ctx.env.data.bench_fail_threshold_ms),
        BENCH_FAIL_P95_THRESHOLD_MS=str(ctx.env.data.bench_fail_p95_threshold_ms),
        API_KEY=ctx.config.secrets["API_KEY"],
        JWT_SECRET=ctx.config.secrets["JWT_SECRET"],
    )
    return env


def report_gate(reporter: Reporter, gate: gates.GateResult, **extra: Any) -> None:
    fields = {k: v for k, v in gate.as_dict().items() if k != "message"}
    reporter.event("gate", gate.message, **fields, **extra)


def raise_gate_failure(result: gates.GateResult) -> None:
    raise GateFailed(f"{result.name} gate failed: {result.message}")



# ----- the deploy -------------------------------------------------------------------------------------------

def ship_images(ctx: Context, release: Release) -> None:
    """Every host gets the app and proxy images; the db host also its database images. Noop when present."""
    common = [release.image, ctx.infra_images["PROXY_IMAGE"]]
    images_for = {
        host: common + ([ctx.infra_images["POSTGRES_IMAGE"], ctx.infra_images["REDIS_IMAGE"]]
                        if host == ctx.env.db_host else [])
        for host in ctx.env.all_hosts
    }
    result = runner.run_deploy(ctx.name, release_ops.images_for_role_shipped, images_for=images_for)
    ctx.reporter.event("step", "images: " + (f"shipped to {', '.join(result.changed_hosts)}"
                                             if result.changed_hosts else "already on every host (noop)"),
                       step="ship", changed=result.changed_hosts)


def prepare_hosts(ctx: Context, cfg: config_mod.ServiceConfig) -> None:
    """Layout, compose file and the config version on every host; the database running on the db host."""
    compose_for = {
        host: hostlayout.render_compose(host, ctx.env.hosts[host].roles, ctx.db_address(host), ctx.env.data.app_uid,
                                        ctx.ports, stop_grace_s=ctx.env.data.drain_grace_s)
        for host in ctx.env.all_hosts
    }
    layout_call = runner.OperationCall(
        release_ops.layout_present,
        kwargs=dict(name="Ensure ingest host layout is present", compose_for=compose_for,
                    infra_images=ctx.infra_images, app_uid=ctx.env.data.app_uid, ports=ctx.ports,
                    max_body_bytes=ctx.max_body_bytes),
    )
    database_call = runner.OperationCall(
        release_ops.database_running,
        kwargs=dict(name="Ensure PostgreSQL and Redis are running", password=cfg.secrets["POSTGRES_PASSWORD"],
                    postgres_uid=ctx.env.data.postgres_uid, infra_images=ctx.infra_images),
    )
    runner.run_operations(ctx.name, [layout_call, *config_calls(ctx, cfg), database_call])
    ctx.reporter.event("step", f"config {cfg.version} and layout present on {len(ctx.env.all_hosts)} host(s)",
                       step="config", config_version=cfg.version)


def migrate(ctx: Context, release: Release, cfg: config_mod.ServiceConfig, run_id: str,
            before: str | None) -> dict[str, Any]:
    """Restore point, then `alembic upgrade head` in a one-off container of the new image, on the db host.

    BEFORE is the database's head as read under the lock.
    """
    from ingestctl.operations.release import schema_migrated

    db = ctx.env.db_host
    if before == release.schema_head:
        ctx.reporter.event("step", f"schema already at {before}: no migration", step="migrate",
                           schema_before=before, schema_after=before)
        return {"schema_before": before, "schema_after": before, "restore_point": None}
    restore_point = f"{hostlayout.BASE}/backups/{run_id}-{before or 'empty'}.dump"
    ctx.reporter.event("step", f"migrating schema {before or 'empty'} -> {release.schema_head} "
                       f"(restore point {restore_point})", step="migrate", schema_before=before,
                       target=release.schema_head)
    result = runner.run_operations(
        ctx.name,
        [runner.OperationCall(
            schema_migrated,
            kwargs=dict(name=f"Ensure schema is at {release.schema_head}", image=release.image,
                        config_version=cfg.version, infra_images=ctx.infra_images,
                        restore_point=restore_point, alembic_args=("upgrade", "head"),
                        _timeout=ctx.env.data.migration_timeout_s),
        )],
        hosts=[db], raise_on_error=False,
    )
    after = fleet.get_facts(ctx.name, SchemaHead, hosts=[db])[db]
    if result.failed:
        raise GateFailed(
            f"migration gate failed: {result.failed[0].describe_failure()}; schema is at {after} "
            f"(restore point {restore_point}); no app host was changed"
        )
    return {"schema_before": before, "schema_after": after, "restore_point": restore_point}


@dataclass
class Run:
    """What one deploy or rollback did, for the summary, the --json stream and the ledger."""

    id: str
    kind: str
    env: str
    who: str
    started: float = field(default_factory=time.time)
    steps: list[dict[str, Any]] = field(default_factory=list)
    gates: list[dict[str, Any]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def step(self, name: str, started: float) -> None:
        self.steps.append({"name": name, "started": round(started, 3), "duration_s": round(time.time() - started, 2)})


def deploy(env_name: str, reporter: Reporter, version: str | None = None, batch: str | None = None,
           skip_bench: bool = False, dry: bool = False, lock_wait_s: float = 0.0,
           allow_incompatible: bool = False) -> Run:
    from ingestctl import images as images_mod
    from ingestctl import plan as plan_mod

    ctx = prepare(env_name, reporter)
    plan_mod.parse_batch_spec(batch, plan_mod.rollout_order(ctx.env))  # a bad --batch exits 2 before the build
    if dry:
        return dry_run(ctx, batch, version, skip_bench, allow_incompatible)

    run = Run(new_run_id(), "deploy", env_name, ctx.who)

    started = time.time()
    built = images_mod.build_app_image(version, progress=lambda m: reporter.event("progress", m, step="build"))
    release = Release(built.version, built.name, built.id,
                      (built.labels or {}).get(images_mod.LABEL_SCHEMA_HEAD))
    run.facts.update(release=release.version, image=release.image, image_id=release.image_id,
                     config_version=ctx.config.version, skip_bench=skip_bench,
                     release_schema_head=release.schema_head)
    run.step("build", started)
    reporter.event("step", f"image {release.image} ({release.image_id[:19]}) ready", step="build",
                   image=release.image, image_id=release.image_id, cached=built.cached)

    with guarded(ctx, run, lock_wait_s, f"deploy {env_name} --version {release.version}") as guard:
        run.facts["previous"] = {h: (s or {}).get("release") for h, s in guard.before.items()}
        # The plan --dry prints, built from what the hosts say under the lock: its checks guard the real run.
        plan = deploy_plan(ctx, release.version, release.image, batch, skip_bench, allow_incompatible,
                           guard.before, guard.schema_head)
        report_plan(reporter, plan)
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
        run.facts.update(migrate(ctx, release, ctx.config, run.id, guard.schema_head))
        run.step("migrate", started)

        try:
            rollout(ctx, run, plan.batches, release, ctx.config.version, guard.checkpoints, guard.switched)
            benchmark_gate(ctx, run, skip_bench, switched=bool(guard.switched))
        except Exception as exc:
            if plan.incompatible and run.facts.get("schema_after") != plan.schema_head_before:
                # The old release cannot run on the new schema: undo the migrations before it returns.
                downgrade_before_rollback(ctx, run, plan, release, exc)
            raise
        if guard.switched:
            started = time.time()
            prune_images(ctx, release, guard.before)
            run.step("prune", started)
    return run


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


def benchmark_gate(ctx: Context, run: Run, skip_bench: bool, switched: bool) -> None:
    reporter = ctx.reporter
    if switched and not skip_bench:
        started = time.time()
        script = str(paths.project_root() / "scripts" / "benchmark_queries.py")
        urls = [ctx.base_url(h) for h in ctx.env.app_hosts]
        reporter.event("progress", f"benchmark gate: profile {ctx.env.data.bench_profile} on {len(urls)} host(s)")
        gate = gates.bench_gate(urls, script, env_for_bench(ctx))
        run.gates.append(gate.as_dict())
        report_gate(reporter, gate)
        run.step("benchmark", started)
        if not gate.passed:
            raise_gate_failure(gate)
    elif skip_bench:
        run.gates.append({"gate": "benchmark", "passed": None, "message": "skipped (--skip-bench)"})
        reporter.event("gate", "benchmark gate skipped (--skip-bench)", gate="benchmark", skipped=True)


def downgrade_before_rollback(ctx: Context, run: Run, plan, release: Release, cause: Exception) -> None:
    """--allow-incompatible and a failed gate: run the declared data-safe downgrade back to the head the old
    release runs on, with the new image (it carries the revisions), to an absolute revision. RollbackFailed
    (exit 4) with the restore point when a migration is not data-safe or the downgrade fails: the hosts then
    stay on the new release, which runs on the schema it left."""
    from ingestctl import migrations as migrations_mod
    from ingestctl.operations.release import schema_migrated

    target = plan.schema_head_before
    restore_point = run.facts.get("restore_point")
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
    result = runner.run_operations(ctx.name, [runner.OperationCall(schema_migrated, kwargs=dict(
        name=f"Ensure schema is at {target or 'empty'}", image=release.image, config_version=ctx.config.version,
        infra_images=ctx.infra_images, restore_point=f"{hostlayout.BASE}/backups/{run.id}-downgrade.dump",
        alembic_args=("downgrade", target or "base"), _timeout=ctx.env.data.migration_timeout_s))],
        hosts=[db], raise_on_error=False)
    run.facts["schema_after"] = fleet.get_facts(ctx.name, SchemaHead, hosts=[db])[db]
    if result.failed:
        raise RollbackFailed(
            f"SEV-1: {cause}; the schema downgrade to {target} failed: {result.failed[0].describe_failure()}; "
            f"schema is at {run.facts['schema_after']}; every app host stays on {release.version}; "
            f"restore point {restore_point}") from cause


def prune_images(ctx: Context, release: Release, before: Mapping[str, dict | None]) -> None:
    """Keep the last `keep_releases` releases' images on the hosts; remove older ones. Never the live release
    or the standby, and never an image a container still uses (`docker image rm` refuses those)."""
    from ingestctl import fleetview
    from ingestctl import ledger as ledger_mod

    protected = {release.image_id} | {
        image_id for state in before.values() if state
        for image_id in (state.get("image_id"), (state.get("standby") or {}).get("image_id")) if image_id
    }
    try:
        items = ledger_mod.releases_to_prune(fleetview.read_ledger(ctx.name, ctx.reporter),
                                             ctx.env.data.keep_releases)
        ids = sorted({i for item in items for i in item.image_ids} - protected)
        if not ids:
            return
        # Image IDs come from the hosts' ledgers: untrusted, so quoted (and validated when the ledger is parsed).
        command = " ".join(["for i in", *map(shlex.quote, ids),
                            '; do docker image rm "$i" >/dev/null 2>&1 || true; done'])
        fleet.run_commands(ctx.name, lambda _h: command, hosts=ctx.env.all_hosts)
        ctx.reporter.event("step", f"pruned {len(ids)} old release image(s) (keeping {ctx.env.data.keep_releases})",
                           step="prune", images=ids)
    except IngestctlError as exc:  # pruning is housekeeping: report it, never fail a good deploy over it
        ctx.reporter.event("error", f"could not prune old images: {exc}")


@dataclass
class Guard:
    before: dict[str, dict | None]
    checkpoints: Checkpoints
    switched: list[str] = field(default_factory=list)
    schema_head: str | None = None


@contextmanager
def guarded(ctx: Context, run: Run, lock_wait_s: float, command: str) -> Iterator[Guard]:
    """The frame of every mutating action: lock, remember what each host ran, and on any failure after a
    host switched, put the switched hosts back (exit 3; exit 4 if that fails). Always: ledger, then unlock."""
    checkpoints = Checkpoints(ctx.name)
    checkpoints.install()
    guard = Guard(before={}, checkpoints=checkpoints)
    # One SSH round for the lock and the state it protects: every round trip counts in a 3 a.m. rollback.
    with fleet.connected(ctx.name) as active:
        acquire_lock(ctx, run, lock_wait_s, command, active)
        try:
            guard.before = {name: host.get_fact(IngestState) for name, host in active.items()}
            guard.schema_head = active[ctx.env.db_host].get_fact(SchemaHead)
        except Exception:  # e.g. a forged schema head: nothing changed yet, so the lock must not stay behind
            from ingestctl import lock as lock_mod

            fleet.run_on(active, lambda _h: lock_mod.release_command(run.facts["lock_token"]))
            checkpoints.uninstall()
            raise
    outcome = "failed"
    try:
        yield guard
        outcome = "success" if guard.switched else "noop"
    except RollbackFailed:
        outcome = "rollback-failed"
        raise
    except Exception as exc:  # any failure after a switch, expected or not, must put the fleet back
        run.facts["message"] = str(exc)
        if guard.switched:
            rollback_hosts(ctx, guard.before, guard.switched, str(exc))
            outcome = "rolled-back"
            raise GateFailed(f"{exc}; rolled back {', '.join(guard.switched)} to what they ran before") from exc
        outcome = "aborted" if isinstance(exc, Aborted) else "failed"
        if isinstance(exc, (GateFailed, Aborted)):
            raise GateFailed(f"{exc}; no host was switched") from exc
        raise
    finally:
        checkpoints.uninstall()
        run.facts["outcome"] = outcome
        run.facts["switched"] = guard.switched
        finish(ctx, run)


def rollout(ctx: Context, run: Run, batches: list[list[str]], release: Release, config_version: str,
            checkpoints: Checkpoints, switched: list[str], metrics: bool = True) -> None:
    """Switch batch after batch to RELEASE with CONFIG_VERSION, each batch gated on health and live metrics
    (health only with `metrics=False`: an app rollback returns to a known-good release as fast as it can).

    SWITCHED grows as hosts change, so the caller can roll exactly those back when this raises.
    """
    reporter = ctx.reporter
    for number, hosts in enumerate(batches, start=1):
        checkpoints.check(f"batch {number}")
        started = time.time()
        reporter.event("step", f"batch {number} of {len(batches)}: {', '.join(hosts)}", step="rollout",
                       batch=number, batches=len(batches), hosts=hosts)
        # Transient errors are retried briefly; a release that never gets ready is not (that is the health gate).
        result, touched = converge(ctx, switch_calls(ctx, release, config_version), hosts,
                                   time.monotonic() + min(30.0, ctx.env.data.rollback_deadline_s), is_transient)
        failed = [r.host for r in result.failed]
        changed = [h for h in hosts if h in touched]
        switched += changed
        if failed:
            failures = {r.host: r.describe_failure() for r in result.failed}
            not_ready = [h for h, text in failures.items() if SLOT_NOT_READY in text]
            if not_ready:
                # The switch waits on the host for the new slot's readiness before the proxy moves to it, so a
                # release that never gets ready fails inside the switch: that is the health gate failing.
                timeout = ctx.env.data.health_timeout_s
                gate = gates.GateResult(
                    "health", False,
                    f"health gate failed: {', '.join(not_ready)} not ready within {timeout:g}s; "
                    "traffic never moved to the new release",
                    numbers={"timeout_s": timeout, "not_ready": ", ".join(not_ready)},
                )
                run.gates.append({**gate.as_dict(), "batch": number})
                report_gate(reporter, gate, batch=number)
            raise GateFailed("switch failed: " + "; ".join(failures.values()))
        if changed:
            reporter.event("step", f"batch {number}: {', '.join(changed)} live on {release.version}", step="switched",
                           batch=number, hosts=changed, release=release.version, config_version=config_version)
        else:
            reporter.event("step", f"batch {number}: already live (noop)", step="rollout", batch=number)
            run.step(f"batch {number}", started)
            continue
        for gate in gate_batch(ctx, changed, on_wait=lambda m: reporter.event("progress", m), metrics=metrics):
            run.gates.append({**gate.as_dict(), "batch": number})
            report_gate(reporter, gate, batch=number)
            if not gate.passed:
                raise_gate_failure(gate)
        run.step(f"batch {number}", started)


def dry_run(ctx: Context, batch: str | None, version: str | None, skip_bench: bool,
            allow_incompatible: bool = False) -> Run:
    """--dry: the plan, from this checkout and a read-only look at the hosts. Nothing is changed anywhere."""
    from ingestctl import images as images_mod

    version = version or images_mod.checkout_version(paths.project_root())
    with fleet.connected(ctx.name) as active:  # one round for both facts
        states = {name: host.get_fact(IngestState) for name, host in active.items()}
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
    result = fleet.run_commands(ctx.name, {host: f"cat {shlex.quote(path)}"})[host]
    if not result.ok:
        return None
    tunables = config_mod.tunables_from_env_file(result.stdout, where=f"{host}:{path}")
    return {**tunables, **{k: secrets_mod.MASK for k in secrets_mod.REQUIRED}}


def summarise(run: Run, reporter: Reporter) -> None:
    facts = run.facts
    total = round(time.time() - run.started, 1)
    outcome = facts.get("outcome")
    switched = facts.get("switched") or []
    message = (
        f"{run.kind} {facts.get('release')} to {run.env}: {outcome}"
        + (f", {len(switched)} host(s) switched" if switched else ", every host already current")
        + f", config {facts.get('config_version')}, in {total}s"
    )
    reporter.event("summary", message, run_id=run.id, outcome=outcome, duration_s=total, release=facts.get("release"),
                   switched=switched, steps=run.steps, gates=run.gates)


# ----- lock and ledger ---------------------------------------------------------------------------------------

def acquire_lock(ctx: Context, run: Run, wait_s: float, command: str, active: Mapping[str, Any]) -> None:
    """Take the deploy lock on every (connected) host, or none: a partial take is released before waiting or
    failing."""
    from datetime import UTC, datetime

    from ingestctl import lock as lock_mod

    record = lock_mod.new_record(who=ctx.who, command=command, release=run.facts.get("release"),
                                 now=datetime.now(UTC))
    run.facts["lock_token"] = record.token
    deadline = time.monotonic() + wait_s
    while True:
        results = fleet.run_on(active, lambda _h: lock_mod.acquire_command(record))
        statuses = {h: lock_mod.parse_output(r.stdout, h) for h, r in results.items()}
        held = {h: s for h, s in statuses.items() if s.state != "acquired"}
        if not held:
            ctx.reporter.event("step", f"deploy lock taken on {len(statuses)} host(s)", step="lock")
            return
        taken = [h for h, s in statuses.items() if s.state == "acquired"]
        if taken:
            fleet.run_on({h: active[h] for h in taken}, lambda _h: lock_mod.release_command(record.token))
        host, status = sorted(held.items())[0]
        if time.monotonic() >= deadline:
            holder = status.record
            alive = None
            if holder is not None and holder.machine == socket.gethostname():
                alive = _pid_alive(holder.pid)
            raise lock_mod.held_error(ctx.name, host, holder, datetime.now(UTC), alive)
        ctx.reporter.event("progress", f"waiting for the deploy lock held on {host} "
                           f"({max(0, deadline - time.monotonic()):.0f}s left)")
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


OUTCOMES = {"noop": "success", "rollback-failed": "failed"}


def ledger_entry(ctx: Context, run: Run):
    """The ledger's record of RUN: steps, gates, outcome and durations. Never holds a secret."""
    from datetime import UTC, datetime

    from ingestctl import ledger as ledger_mod

    facts = run.facts

    def at(ts: float) -> datetime:
        return datetime.fromtimestamp(ts, UTC)

    return ledger_mod.LedgerEntry(
        id=run.id,
        kind=run.kind,
        env=run.env,
        release=facts.get("release"),
        image_id=facts.get("image_id"),
        config_version=facts.get("config_version"),
        schema_head_before=facts.get("schema_before"),
        schema_head_after=facts.get("schema_after"),
        release_schema_head=facts.get("release_schema_head"),
        who=run.who,
        started=at(run.started),
        finished=datetime.now(UTC),
        steps=[ledger_mod.Step(name=s["name"], started=at(s["started"]), duration_s=s["duration_s"])
               for s in run.steps],
        gates=[ledger_mod.GateResult(name=g["gate"], passed=bool(g.get("passed")),
                                     numbers=_flat_numbers(g.get("numbers") or {}))
               for g in run.gates if g.get("passed") is not None],
        outcome=OUTCOMES.get(facts.get("outcome", "failed"), facts.get("outcome", "failed")),
        duration_s=round(time.time() - run.started, 2),
        time_to_healthy_s=facts.get("time_to_healthy_s"),
        hosts=list(facts.get("switched") or []),
        previous_release=_single(facts.get("previous")),
        previous_config_version=facts.get("previous_config_version"),
        restore_point=facts.get("restore_point"),
        bench_skipped=bool(facts.get("skip_bench")),
        message=facts.get("message"),
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

    token = run.facts.get("lock_token")
    try:
        line = ledger_mod.serialise(ledger_entry(ctx, run), ctx.config.secrets)
        append = ledger_mod.append_command(line)
    except Exception as exc:  # the ledger must not mask the deploy's result, nor keep the lock held
        ctx.reporter.event("error", f"could not write the ledger: {exc}")
        append = "false"
    unlock = lock_mod.release_command(token) if token else "true"
    try:
        # Every host that answers gets the record and its lock back, even when another host dropped out.
        with fleet.connected(ctx.name, require_all=False) as active:
            results = fleet.run_on(active, lambda _h: f"({append}); ledger=$?; {unlock}; exit $ledger")
    except Exception as exc:
        ctx.reporter.event("error", f"could not record the run or release the deploy lock: {exc}; "
                           f"run `ingestctl lock break {ctx.name}` once you have checked the hosts")
        return
    unreachable = sorted(set(ctx.env.all_hosts) - set(results))
    if unreachable:
        ctx.reporter.event("error", f"{', '.join(unreachable)} unreachable: the run is not in their ledger and "
                           f"their deploy lock may still be held; once they answer: `ingestctl lock break {ctx.name}`")
    failed = [f"{h}: {r.stderr.strip()[:200]}" for h, r in results.items() if not r.ok]
    if failed:
        ctx.reporter.event("error", "ledger append failed on " + "; ".join(failed))


def read_locks(env_name: str) -> dict[str, Any]:
    """Each reachable host's lock status (lock.LockStatus); unreachable hosts are left out."""
    from ingestctl import lock as lock_mod

    env = inventory_mod.load(env_name)
    with fleet.connected(env_name, env.all_hosts, require_all=False) as active:
        results = fleet.run_on(active, lambda _h: lock_mod.read_command())
    return {host: lock_mod.parse_output(result.stdout, host) for host, result in results.items()}


def describe_holder(record) -> str:
    return f"{record.who} (pid {record.pid} on {record.machine}, `{record.command}`, since {record.started:%H:%M:%S})"


def show_lock(env_name: str, reporter: Reporter) -> dict[str, Any]:
    """`ingestctl lock show ENV`: who holds the deploy lock on each host."""
    statuses = read_locks(env_name)
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
