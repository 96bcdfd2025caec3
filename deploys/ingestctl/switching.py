"""Moving hosts between releases: the switch operations, their retries until a deadline, the gated rollout
batch by batch, and the rollback that puts switched hosts back (exit 3; exit 4 with every host's state)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from ingestctl import config as config_mod
from ingestctl import gates
from ingestctl import pyinfra_runner as runner
from ingestctl.canary import canary_step
from ingestctl.errors import GateFailed, RollbackFailed
from ingestctl.facts.release import REJECTED
from ingestctl.gatekeeper import gate_batch, raise_gate_failure, report_gate
from ingestctl.operations import release as release_ops
from ingestctl.runcontext import SLOT_NOT_READY, Checkpoints, Context, Release, Run, host_states


def release_kwargs(ctx: Context, release: Release, config_version: str) -> dict:
    """What every slot operation (`release_live`, `release_canary`) is told about RELEASE and the host's proxy."""
    return dict(
        release=release.version,
        image=release.image,
        image_id=release.image_id,
        config_version=config_version,
        infra_images=ctx.infra_images,
        ports=ctx.ports,
        clients=ctx.client_limits,
        canary_weight=ctx.env.data.canary_weight,
        ready_timeout_s=int(ctx.env.data.health_timeout_s),
    )


def switch_calls(ctx: Context, release: Release, config_version: str,
                 clear_failed_idle: bool = False, keep_standby: bool | None = None) -> list[runner.OperationCall]:
    """The slot switch to RELEASE. `keep_standby=False` drains the slot it leaves instead of keeping it warm:
    after an automatic rollback, the release that failed must not stay up as the standby."""
    return [
        runner.OperationCall(
            release_ops.release_live,
            kwargs=dict(
                name=f"Ensure ingest release {release.version} is current",
                **release_kwargs(ctx, release, config_version),
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


def database_call(ctx: Context, cfg: config_mod.ServiceConfig) -> runner.OperationCall:
    """PostgreSQL and Redis running on the db host with CFG's passwords, the app role in place."""
    return runner.OperationCall(release_ops.database_running,
                                kwargs=dict(name="Ensure PostgreSQL and Redis are running", **ctx.database_kwargs(cfg)))


# Failures worth a second try: the container runtime or the SSH transport hiccuped, not the release itself.
TRANSIENT_ERRORS = (
    "OCI runtime", "connection reset", "Connection reset", "Broken pipe", "broken pipe", "EOF",
    "Error response from daemon", "Cannot connect to the Docker daemon", "timed out", "Timeout", "SSH",
    "Socket exception", "No existing session",
)


def is_transient(failure: str) -> bool:
    return SLOT_NOT_READY not in failure and any(marker in failure for marker in TRANSIENT_ERRORS)


# The forward switch tries a host SSH cannot reach this many times in all. Each attempt has already waited out
# the connect timeout: one retry rides out a blip, more only hold the run before it fails the same way.
UNREACHED_ATTEMPTS = 2


def converge(ctx: Context, calls: list[runner.OperationCall], hosts: list[str], deadline: float,
             retryable: Callable[[str], bool],
             unreached_attempts: int | None = None) -> tuple[runner.RunResult, set[str]]:
    """Run CALLS on HOSTS, then again on the hosts whose failure is RETRYABLE, with backoff, until DEADLINE
    (monotonic), and at most UNREACHED_ATTEMPTS times on a host SSH never reached (None: until the deadline,
    as a rollback does). Every switch step is idempotent and reads the host afresh, so a retry picks up where
    the failed attempt stopped. Returns the last result per host and the hosts any attempt changed or failed on."""
    results: dict[str, runner.HostResult] = {}
    touched: set[str] = set()
    unreached: dict[str, int] = {}
    pending, delay, attempt = list(hosts), 1.0, 1
    while True:
        result = ctx.io.run_operations(calls, hosts=pending, raise_on_error=False)
        results.update(result.hosts)
        touched.update(result.changed_hosts)
        # A host SSH never reached was not changed by this attempt: it has nothing to roll back.
        touched.update(r.host for r in result.failed if r.reached)
        for r in result.failed:
            unreached[r.host] = unreached.get(r.host, 0) + (0 if r.reached else 1)
        again = [r for r in result.failed if retryable(r.describe_failure())
                 and (r.reached or unreached_attempts is None or unreached[r.host] < unreached_attempts)]
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


def switch_failure(ctx: Context, run: Run, number: int, result: runner.RunResult) -> GateFailed:
    """The error for batch NUMBER's failed switch (or canary); a slot that never got ready is the health gate's."""
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
        report_gate(ctx.reporter, gate, batch=number)
    return GateFailed("switch failed: " + "; ".join(failures.values()))


def rollout(ctx: Context, run: Run, batches: list[list[str]], release: Release, config_version: str,
            checkpoints: Checkpoints, switched: list[str], metrics: bool = True, canary_weight: int = 100) -> None:
    """Switch batch after batch to RELEASE with CONFIG_VERSION, each batch gated on health and live metrics
    (health only with `metrics=False`: an app rollback returns to a known-good release as fast as it can).
    With CANARY_WEIGHT below 100, the first batch's hosts send only that share to RELEASE while it is gated.

    SWITCHED grows as hosts change, so the caller can roll exactly those back when this raises.
    """
    reporter = ctx.reporter
    for number, hosts in enumerate(batches, start=1):
        checkpoints.check(f"batch {number}")
        started = time.time()
        reporter.event("step", f"batch {number} of {len(batches)}: {', '.join(hosts)}", step="rollout",
                       batch=number, batches=len(batches), hosts=hosts)
        # A canary's gates judged the new release on these hosts already: the full switch needs only health.
        canaried = (number == 1 and canary_weight < 100 and metrics
                    and canary_step(ctx, run, number, hosts, release, config_version, canary_weight, switched))
        # Transient errors are retried briefly; a release that never gets ready is not (that is the health gate).
        result, touched = converge(ctx, switch_calls(ctx, release, config_version), hosts,
                                   time.monotonic() + min(30.0, ctx.env.data.rollback_deadline_s), is_transient,
                                   unreached_attempts=UNREACHED_ATTEMPTS)
        changed = [h for h in hosts if h in touched]
        switched += [h for h in changed if h not in switched]  # a canary host may be in it already
        if result.failed:
            raise switch_failure(ctx, run, number, result)
        if changed:
            reporter.event("step", f"batch {number}: {', '.join(changed)} live on {release.version}", step="switched",
                           batch=number, hosts=changed, release=release.version, config_version=config_version)
        else:
            reporter.event("step", f"batch {number}: already live (noop)", step="rollout", batch=number)
            run.step(f"batch {number}", started)
            continue
        for gate in gate_batch(ctx, changed, on_wait=lambda m: reporter.event("progress", m),
                               metrics=metrics and not canaried, version=release.version):
            run.gates.append({**gate.as_dict(), "batch": number})
            report_gate(reporter, gate, batch=number)
            if not gate.passed:
                raise_gate_failure(gate)
        run.step(f"batch {number}", started)
