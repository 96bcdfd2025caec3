"""The gates as a run applies them between batches: health then live metrics on the hosts just switched (with
real, authenticated probe requests), and the benchmark gate after the rollout. The arithmetic is in `gates`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from ingestctl import gates, paths
from ingestctl.errors import GateFailed
from ingestctl.hostlayout import CANARY_HEADER
from ingestctl.output import Reporter
from ingestctl.runcontext import Context, Run


def gate_batch(ctx: Context, hosts: list[str], on_wait: Callable[[str], None],
               metrics: bool = True, version: str | None = None, canary: bool = False) -> Iterator[gates.GateResult]:
    """Health, then live metrics, on the hosts just switched; the first failure ends it. With a
    `prometheus_url` the metrics are release VERSION's, by PromQL; without one, two scrapes of each host.
    On a CANARY host the probes ask the proxy for the new slot alone, whose /metrics the proxy serves then.

    Yields each result as soon as it is known, so the event stream shows the health gate before the metric
    window starts (CI and `ingestctl abort` react to it), not both at once at the end.
    """
    urls = {host: ctx.base_url(host) for host in hosts}
    health = gates.health_gate(urls, ctx.env.data.health_timeout_s, on_wait=on_wait)
    yield health
    data = ctx.env.data
    if metrics and health.passed and data.prometheus_url and version:
        from ingestctl.promgate import prometheus_metric_gate

        on_wait(f"metric gate: {data.metric_window_s:g}s window on {', '.join(hosts)}, judged by Prometheus "
                f"at {data.prometheus_url}")
        yield prometheus_metric_gate(data.prometheus_url, version, urls, data.metric_window_s,
                                     data.max_error_ratio, data.max_p95_ms, probe=query_probe(ctx, canary),
                                     min_requests=data.metric_min_requests)
    elif metrics and health.passed:
        yield gates.metric_gate(
            urls,
            ctx.env.data.metric_window_s,
            ctx.env.data.max_error_ratio,
            ctx.env.data.max_p95_ms,
            probe=query_probe(ctx, canary),
            min_requests=ctx.env.data.metric_min_requests,
        )


def query_probe(ctx: Context, canary: bool = False) -> Callable[[Any, str], None]:
    """A real read request per call, authenticated like a client, so the metric gate judges live traffic. With
    CANARY, to the canary's slot alone: a probe that hit the previous release would judge nothing."""
    from ingest.tools.credentials import mint_read_token

    token = mint_read_token(ctx.config.secrets["JWT_SECRET"], ttl_seconds=600, subject="ingestctl-gate")
    headers = {"Authorization": f"Bearer {token}", **({CANARY_HEADER: "1"} if canary else {})}

    def probe(client, base: str):
        return client.get(base + "/api/v1/events", params={"limit": 10}, headers=headers)

    return probe


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
