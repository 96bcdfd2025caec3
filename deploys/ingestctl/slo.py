"""SLOs and the error budget: `ingestctl slo ENV`, and the deploy's budget check (the seed's policy: no production
change while the availability budget is exhausted, unless it is an emergency).

The budget arithmetic and the deploy decision are pure and unit-tested; `evaluate` asks Prometheus.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import click

from ingestctl import prometheus as promql
from ingestctl.clikit import json_option, reporting
from ingestctl.errors import ConfigError
from ingestctl.inventory import Environment
from ingestctl.output import Reporter
from ingestctl.prometheus import Prometheus, PrometheusError
from ingestctl.slospec import SLOs


@dataclass(frozen=True)
class Budget:
    """An error budget: the share of bad requests allowed, what the window spent, how fast the burn window
    spends it (1.0 spends exactly the budget over the window)."""

    allowed_ratio: float
    bad_ratio: float | None  # over the SLO window; None without requests
    burn_bad_ratio: float | None  # over the burn window

    @property
    def remaining(self) -> float:
        """The share of the budget left: 1.0 untouched, 0 or less exhausted."""
        if self.bad_ratio is None:
            return 1.0
        return 1.0 - self.bad_ratio / self.allowed_ratio

    @property
    def burn_rate(self) -> float:
        return 0.0 if self.burn_bad_ratio is None else self.burn_bad_ratio / self.allowed_ratio

    @property
    def exhausted(self) -> bool:
        return self.remaining <= 0


@dataclass(frozen=True)
class SLOStatus:
    name: Literal["availability", "latency"]
    objective: str
    value: float | None  # availability: share of good requests; latency: p95 in ms
    requests: float
    budget: Budget
    window: str
    burn_window: str
    queries: dict[str, str]

    @property
    def value_text(self) -> str:
        if self.value is None:
            return "no requests"
        return f"{self.value * 100:.3f}%" if self.name == "availability" else f"p95 {self.value:g} ms"

    def as_dict(self) -> dict[str, Any]:
        return {"slo": self.name, "objective": self.objective, "value": self.value, "requests": round(self.requests),
                "window": self.window, "burn_window": self.burn_window,
                "budget_remaining": round(self.budget.remaining, 4), "burn_rate": round(self.budget.burn_rate, 3),
                "allowed_ratio": self.budget.allowed_ratio, "bad_ratio": self.budget.bad_ratio,
                "exhausted": self.budget.exhausted, "queries": self.queries}


@dataclass(frozen=True)
class DeployDecision:
    allowed: bool
    message: str
    emergency: bool = False


def deploy_decision(statuses: list[SLOStatus], policy: Literal["refuse", "report"],
                    emergency: bool) -> DeployDecision:
    """Refuse while an availability budget is exhausted under the "refuse" policy, unless EMERGENCY. Latency
    budgets are shown, never enforced: the seed's policy is about the error budget."""
    spent = [s for s in statuses if s.name == "availability" and s.budget.exhausted]
    if not spent:
        return DeployDecision(True, "error budget: " + (describe(statuses) or "no SLO declared"), emergency)
    detail = describe(spent)
    if emergency:
        return DeployDecision(True, f"EMERGENCY deploy with the availability error budget exhausted ({detail}); "
                              "recorded in the ledger as an emergency change", True)
    if policy == "report":
        return DeployDecision(True, f"availability error budget exhausted ({detail}); error_budget_policy is "
                              "'report', so the deploy goes ahead")
    return DeployDecision(False, f"availability error budget exhausted ({detail}): the error budget policy allows "
                          "no change until it recovers; fix forward with `--emergency` (recorded in the ledger), "
                          "or roll back (`ingestctl rollback app`), which is never blocked")


def describe(statuses: list[SLOStatus]) -> str:
    return "; ".join(f"{s.name} {s.value_text} vs {s.objective}, budget {s.budget.remaining * 100:.1f}% left, "
                     f"burn rate {s.budget.burn_rate:.2f}" for s in statuses)


def _ratio(value: float | None) -> float | None:
    return None if value is None else min(max(value, 0.0), 1.0)


def evaluate(prom: Prometheus, slos: SLOs) -> list[SLOStatus]:
    """Each declared SLO's value, budget and burn rate, read from Prometheus now (every query at once: a deploy
    waits for them)."""
    asked: dict[str, dict[str, str]] = {}
    if slos.availability is not None:
        slo = slos.availability
        asked["availability"] = {"requests": promql.requests_query(slo.window),
                                 "error_ratio": promql.error_ratio_query(slo.window),
                                 "burn_error_ratio": promql.error_ratio_query(slo.burn_window)}
    if slos.latency is not None:
        slo = slos.latency
        asked["latency"] = {"requests": promql.requests_query(slo.window),
                            "p95": promql.quantile_query(0.95, slo.window),
                            "slower_ratio": promql.slower_ratio_query(slo.bound_le, slo.window),
                            "burn_slower_ratio": promql.slower_ratio_query(slo.bound_le, slo.burn_window)}
    pairs = [(name, key, query) for name, queries in asked.items() for key, query in queries.items()]
    with ThreadPoolExecutor(max_workers=max(1, len(pairs))) as pool:
        results = list(pool.map(lambda pair: prom.scalar(pair[2]), pairs))
    value = {(name, key): result for (name, key, _query), result in zip(pairs, results, strict=True)}
    statuses = []
    if slos.availability is not None:
        slo, queries = slos.availability, asked["availability"]
        bad = _ratio(value["availability", "error_ratio"])
        statuses.append(SLOStatus(
            "availability", f"{slo.target * 100:g}% of requests without 5xx over {slo.window}",
            None if bad is None else 1 - bad, value["availability", "requests"] or 0.0,
            Budget(slo.allowed_error_ratio, bad, _ratio(value["availability", "burn_error_ratio"])),
            slo.window, slo.burn_window, queries))
    if slos.latency is not None:
        slo, queries = slos.latency, asked["latency"]
        p95 = value["latency", "p95"]
        statuses.append(SLOStatus(
            "latency", f"p95 <= {slo.p95_ms:g} ms over {slo.window}",
            None if p95 is None else round(p95 * 1000, 1), value["latency", "requests"] or 0.0,
            Budget(slo.allowed_slow_ratio, _ratio(value["latency", "slower_ratio"]),
                   _ratio(value["latency", "burn_slower_ratio"])),
            slo.window, slo.burn_window, queries))
    return statuses


def read_statuses(env: Environment) -> list[SLOStatus]:
    """ENV's SLOs from its Prometheus; ConfigError when the inventory names no Prometheus or no SLOs."""
    where = env.source or f"inventories/{env.name}.py"
    if not env.data.prometheus_url:
        raise ConfigError(f"{where}: data.prometheus_url is not set; SLOs are read from Prometheus: add "
                          "\"prometheus_url\": \"http://HOST:9090\" (and \"slos\") to the inventory's data")
    if env.data.slos is None:
        raise ConfigError(f"{where}: data.slos is not set; declare e.g. \"slos\": {{\"availability\": "
                          "{\"target\": 0.999, \"window\": \"30d\"}, \"latency\": {\"p95_ms\": 250}}")
    with Prometheus(env.data.prometheus_url) as prom:
        return evaluate(prom, env.data.slos)


def check_before_deploy(env: Environment, reporter: Reporter, emergency: bool) -> bool:
    """The seed's error budget policy, before anything is built or any host is touched. ConfigError (exit 2)
    when the deploy is refused. Returns whether this is an emergency change (to be recorded)."""
    if env.data.slos is None or env.data.slos.availability is None:
        if emergency:
            reporter.event("step", "EMERGENCY deploy (--emergency): recorded in the ledger", step="budget",
                           emergency=True)
        return emergency
    try:
        statuses = read_statuses(env)
    except PrometheusError as exc:
        if emergency or env.data.error_budget_policy == "report":
            reporter.event("step", f"error budget unknown ({exc}); going ahead"
                           + (" as an EMERGENCY deploy" if emergency else ""), step="budget", emergency=emergency)
            return emergency
        raise ConfigError(f"cannot read the error budget: {exc}; no host was touched; `--emergency` deploys "
                          "without it (recorded in the ledger)") from exc
    decision = deploy_decision(statuses, env.data.error_budget_policy, emergency)
    if not decision.allowed:
        raise ConfigError(f"deploy refused: {decision.message}; no host was touched")
    reporter.event("step", decision.message, step="budget", emergency=decision.emergency,
                   slos=[s.as_dict() for s in statuses])
    return decision.emergency


@click.command("slo")
@click.argument("env")
@json_option
@reporting
def slo_command(env: str, reporter: Reporter) -> None:
    """ENV's SLOs from Prometheus: current value, error budget remaining and burn rate."""
    from ingestctl import inventory

    environment = inventory.load(env)
    statuses = read_statuses(environment)
    if reporter.json_mode:
        for status in statuses:
            reporter.event("slo", **status.as_dict())
    else:
        reporter.table(f"SLOs of {env} (Prometheus {environment.data.prometheus_url})",
                       ["slo", "objective", "current", "requests", "budget left", "burn rate"],
                       [[s.name, s.objective, s.value_text, round(s.requests), f"{s.budget.remaining * 100:.1f}%",
                         f"{s.budget.burn_rate:.2f} over {s.burn_window}"] for s in statuses])
    exhausted = [s.name for s in statuses if s.budget.exhausted]
    reporter.event("summary", f"{env}: error budget exhausted for {', '.join(exhausted)}" if exhausted
                   else f"{env}: every SLO within its error budget", env=env, exhausted=exhausted,
                   policy=environment.data.error_budget_policy)
