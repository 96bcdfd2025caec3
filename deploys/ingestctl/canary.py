"""The weighted canary of a deploy's first batch (inventory data `canary_weight` below 100).

Each host of the batch starts the new release in its idle slot and its proxy sends only `canary_weight` percent
of its requests there, the rest to the previous release, still live. The batch's gates then judge the new slot
by its own requests (the gate's probes reach it alone, and /metrics is its), so a small share does not dilute
an error ratio. When they pass, the rollout switches the hosts whole as without a canary; when they fail, the
automatic rollback points the proxy back at the previous slot only and removes the canary.
"""

from __future__ import annotations

import time

from ingestctl import pyinfra_runner as runner
from ingestctl.gatekeeper import gate_batch, raise_gate_failure, report_gate
from ingestctl.operations import release as release_ops
from ingestctl.runcontext import Context, Release, Run


def canary_calls(ctx: Context, release: Release, config_version: str, weight: int) -> list[runner.OperationCall]:
    from ingestctl.switching import release_kwargs

    return [
        runner.OperationCall(
            release_ops.release_canary,
            kwargs=dict(name=f"Ensure ingest release {release.version} takes {weight}% of the traffic",
                        **release_kwargs(ctx, release, config_version)),
        )
    ]


def canary_step(ctx: Context, run: Run, number: int, hosts: list[str], release: Release, config_version: str,
                weight: int, switched: list[str]) -> bool:
    """Give RELEASE WEIGHT percent of HOSTS' traffic and gate it. True when every host ran the canary and its
    gates passed (the full switch then needs only a health check); False when no host needed one (already live,
    or nothing live to share with). Raises GateFailed on a failed gate; SWITCHED names every host changed."""
    from ingestctl.switching import converge, is_transient, switch_failure

    reporter = ctx.reporter
    result, touched = converge(ctx, canary_calls(ctx, release, config_version, weight), hosts,
                               time.monotonic() + min(30.0, ctx.env.data.rollback_deadline_s), is_transient)
    changed = [h for h in hosts if h in touched]
    switched += [h for h in changed if h not in switched]
    if result.failed:
        raise switch_failure(ctx, run, number, result)
    if not changed:
        return False
    reporter.event("step", f"batch {number}: canary: {weight}% of {', '.join(changed)}'s traffic on "
                   f"{release.version}", step="canary", batch=number, hosts=changed, weight=weight,
                   release=release.version, config_version=config_version)
    for gate in gate_batch(ctx, changed, on_wait=lambda m: reporter.event("progress", m), version=release.version,
                           canary=True):
        gate.numbers["canary_weight"] = weight  # the ledger keeps a gate's numbers: the share it judged under
        run.gates.append({**gate.as_dict(), "batch": number})
        report_gate(reporter, gate, batch=number)
        if not gate.passed:
            raise_gate_failure(gate)
    return len(changed) == len(hosts)
