"""Plan, then act: the pure decisions a deploy or rollback makes before any host changes.

Batches from `--batch`, the release and config a rollback returns to, the masked config diff, and the
`DeployPlan` that `--dry` prints and `--json` emits as its `plan` event.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from ingestctl import ledger as ledger_mod
from ingestctl.config import SECRET_KEYS
from ingestctl.errors import ConfigError
from ingestctl.inventory import Environment
from ingestctl.ledger import LedgerEntry
from ingestctl.migrations import Migration
from ingestctl.secrets import MASK

T = TypeVar("T")

_COUNT = re.compile(r"^\s*(-?\d+)\s*$")
_PERCENT = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*%\s*$")
_BATCH_HELP = "a number of hosts per batch (e.g. 2) or a percentage of the hosts (e.g. 50%)"


# --- batches -----------------------------------------------------------------------------------------


def batch_sizes(spec: str | int | None, n_hosts: int) -> list[int]:
    """How many hosts each batch switches. None: one canary host, then all the rest."""
    if n_hosts < 1:
        raise ConfigError("rollout: expected at least one app host in the inventory, found none")
    if spec is None:
        return [1] if n_hosts == 1 else [1, n_hosts - 1]
    text = str(spec)
    if (match := _COUNT.match(text)) is not None:
        size = int(match.group(1))
        if size < 1:
            raise ConfigError(f"--batch: expected {_BATCH_HELP}, at least 1 host; found {text!r}")
    elif (match := _PERCENT.match(text)) is not None:
        percent = float(match.group(1))
        if percent <= 0 or percent > 100:
            raise ConfigError(f"--batch: expected a percentage above 0% and at most 100%, found {text!r}")
        # Round up: 50% of 3 hosts is 2, never 1.5 or 0.
        size = max(1, math.ceil(n_hosts * percent / 100 - 1e-9))
    else:
        raise ConfigError(f"--batch: expected {_BATCH_HELP}, found {text!r}")
    size = min(size, n_hosts)
    return [size] * (n_hosts // size) + ([n_hosts % size] if n_hosts % size else [])


def parse_batch_spec(spec: str | int | None, hosts: Sequence[T]) -> list[list[T]]:
    """Split `hosts` (already in rollout order) into batches according to `--batch`."""
    batches, start = [], 0
    for size in batch_sizes(spec, len(hosts)):
        batches.append(list(hosts[start:start + size]))
        start += size
    return batches


def rollout_order(env: Environment) -> list[str]:
    """App hosts in inventory order, the db host last.

    The db host also carries PostgreSQL and Redis: keeping it out of the canary batch means a bad
    release is caught on a host whose trouble cannot spill onto the data stores, and it changes last.
    """
    db = env.db_host
    return [h for h in env.app_hosts if h != db] + [h for h in env.app_hosts if h == db]


# --- what to roll back to ------------------------------------------------------------------------------


def previous_release(entries: Sequence[LedgerEntry], current: str | None = None) -> LedgerEntry | None:
    """The entry that made the last known-good release before the current one live, or None.

    `current` is the release the hosts report; without it, the ledger's live release is used.
    """
    stack = ledger_mod.release_stack(entries)
    if current is not None:
        # The ledger may lag the hosts (a run died before writing): read the stack from `current` down.
        positions = [i for i, e in enumerate(stack) if e.release == current]
        if positions:
            stack = stack[:positions[-1] + 1]
    if not stack:
        return None
    live = current if current is not None else stack[-1].release
    for entry in reversed(stack):
        if entry.release != live:
            return _best_entry(entries, entry.release)  # type: ignore[arg-type]
    return None


def _best_entry(entries: Sequence[LedgerEntry], release: str) -> LedgerEntry:
    """The latest successful deploy of `release` (it knows the release's own schema head), else any success."""
    successes = [e for e in entries if e.release == release and e.succeeded and e.kind in ledger_mod.RELEASE_KINDS]
    deploys = [e for e in successes if e.kind == "deploy"]
    return max(deploys or successes, key=lambda e: (e.started, e.id))


def _known_good(entries: Sequence[LedgerEntry]) -> list[str]:
    seen: list[str] = []
    for e in sorted(entries, key=lambda e: (e.started, e.id)):
        if e.succeeded and e.kind in ledger_mod.RELEASE_KINDS and e.release and e.release not in seen:
            seen.append(e.release)
    return seen


def rollback_target(entries: Sequence[LedgerEntry], to: str | None = None,
                    current: str | None = None) -> LedgerEntry:
    """The entry of the release `rollback app` goes to: `to`, or the previous known-good one."""
    stack = ledger_mod.release_stack(entries)
    live = current if current is not None else (stack[-1].release if stack else None)
    if to is None:
        target = previous_release(entries, current)
        if target is None:
            if live is None:
                raise ConfigError("nothing to roll back to: the ledger records no successful deploy yet")
            raise ConfigError(f"nothing to roll back to: {live} is the only known-good release left in the ledger "
                              "(earlier ones were already rolled back past); name one with --to RELEASE "
                              "(see `ingestctl history ENV`)")
        return target
    known = _known_good(entries)
    if to not in known:
        failed = any(e.release == to for e in entries)
        why = "it never went live successfully" if failed else "the ledger has no such release"
        raise ConfigError(f"--to {to}: unknown release ({why}); known-good releases: "
                          f"{', '.join(reversed(known)) or 'none'}")
    if to == live:
        raise ConfigError(f"--to {to}: that release is already live; nothing to roll back")
    return _best_entry(entries, to)


def previous_config(entries: Sequence[LedgerEntry], current: str | None = None) -> str | None:
    """The config version live before the current one, or None."""
    stack = ledger_mod.config_stack(entries)
    if current is not None:
        positions = [i for i, e in enumerate(stack) if e.config_version == current]
        if positions:
            stack = stack[:positions[-1] + 1]
    live = current if current is not None else (stack[-1].config_version if stack else None)
    for entry in reversed(stack):
        if entry.config_version != live:
            return entry.config_version
    return None


def config_rollback_target(entries: Sequence[LedgerEntry], to: str | None = None,
                           current: str | None = None) -> str:
    """The config version `rollback config` restores: `to` (a prefix is fine if unique), or the previous one."""
    stack = ledger_mod.config_stack(entries)
    live = current if current is not None else (stack[-1].config_version if stack else None)
    if to is None:
        target = previous_config(entries, current)
        if target is None:
            raise ConfigError(f"nothing to roll back to: no config version before {live or 'the current one'} "
                              "in the ledger; name one with --to CONFIG_VERSION (see `ingestctl history ENV`)")
        return target
    known = []
    for e in sorted(entries, key=lambda e: (e.started, e.id)):
        if e.succeeded and e.config_version and e.config_version not in known:
            known.append(e.config_version)
    matches = [v for v in known if v.startswith(to)] if to else []
    if len(matches) != 1:
        what = "is ambiguous" if matches else "is unknown"
        raise ConfigError(f"--to {to}: config version {what}; known versions, newest first: "
                          f"{', '.join(reversed(known)) or 'none'}")
    if matches[0] == live:
        raise ConfigError(f"--to {to}: config version {matches[0]} is already live; nothing to roll back")
    return matches[0]


# --- config diff ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigChange:
    key: str
    old: str | None  # None: absent before; already masked for secrets
    new: str | None

    def __str__(self) -> str:
        if self.old is None:
            return f"+ {self.key}={self.new}"
        if self.new is None:
            return f"- {self.key}={self.old}"
        note = " (rotated)" if self.key in SECRET_KEYS else ""
        return f"~ {self.key}: {self.old} -> {self.new}{note}"


def config_diff(old: Mapping[str, str] | None, new: Mapping[str, str]) -> list[ConfigChange]:
    """What changes between two full configs (secrets included), sorted by key, secret values masked."""
    old = old or {}

    def shown(key: str, value: str | None) -> str | None:
        return None if value is None else (MASK if key in SECRET_KEYS else value)

    changes = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if before != after:
            changes.append(ConfigChange(key, shown(key, before), shown(key, after)))
    return changes


# --- the plan ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeployPlan:
    env: str
    release: str
    image: str
    hosts: list[str]
    db_host: str
    batches: list[list[str]]
    config_version: str
    previous_config_version: str | None
    config_changes: list[ConfigChange]
    schema_head_before: str | None
    schema_head_after: str | None
    migrations: list[Migration]
    skip_bench: bool = False
    bench_profile: str | None = None
    gates: dict[str, float] = field(default_factory=dict)
    previous_release: str | None = None
    allow_incompatible: bool = False
    # The share of batch 1's traffic the new release gets while gated (100: the hosts switch whole).
    canary_weight: int = 100

    @property
    def incompatible(self) -> list[Migration]:
        """Migrations the release still running elsewhere cannot run alongside (undeclared counts as such)."""
        return [m for m in self.migrations if m.backward_compatible is not True]

    def as_event(self) -> dict[str, Any]:
        """The `plan` event of the --json stream. Holds no secret: config changes are already masked."""
        return {
            "env": self.env, "release": self.release, "previous_release": self.previous_release,
            "image": self.image, "hosts": self.hosts, "db_host": self.db_host, "batches": self.batches,
            "config_version": self.config_version, "previous_config_version": self.previous_config_version,
            "config_changes": [{"key": c.key, "old": c.old, "new": c.new} for c in self.config_changes],
            "schema_head_before": self.schema_head_before, "schema_head_after": self.schema_head_after,
            "migrations": [{"name": m.name, "revision": m.revision,
                            "backward_compatible": m.backward_compatible} for m in self.migrations],
            "skip_bench": self.skip_bench, "bench_profile": self.bench_profile, "gates": self.gates,
            "allow_incompatible": self.allow_incompatible, "canary_weight": self.canary_weight,
        }

    def render(self) -> list[str]:
        """The --dry output, one line per item."""
        lines = [f"deploy {self.release} to {self.env}"
                 + (f" (live now: {self.previous_release})" if self.previous_release else " (first deploy)"),
                 f"  image: {self.image}",
                 f"  hosts: {', '.join(self.hosts)} (db: {self.db_host})"]
        for number, batch in enumerate(self.batches, start=1):
            line = f"  batch {number} of {len(self.batches)}: {', '.join(batch)}"
            if number == 1 and self.canary_weight < 100:
                line += (f" (canary: {self.canary_weight}% of their traffic to {self.release}, the rest on "
                         f"{self.previous_release}, until the gates pass; then all)")
            lines.append(line)
        config = f"  config: {self.config_version}"
        if self.previous_config_version == self.config_version:
            config += " (unchanged)"
        elif self.previous_config_version:
            config += f" (was {self.previous_config_version})"
        lines.append(config)
        lines += [f"    {change}" for change in self.config_changes]
        if self.migrations:
            lines.append(f"  migrations: {self.schema_head_before or 'empty'} -> {self.schema_head_after}")
            for m in self.migrations:
                compat = "" if m.backward_compatible else " (not backward-compatible: app rollback past it is refused)"
                lines.append(f"    {m.name}{compat}")
            if self.incompatible:
                lines.append("    --allow-incompatible: every app host switches in one batch after the migration; "
                             "a gate failure runs the data-safe downgrade before the old release returns")
        else:
            lines.append(f"  migrations: none (schema at {self.schema_head_after or 'empty'})")
        if self.gates:
            lines.append("  gates: " + ", ".join(f"{k}={v:g}" for k, v in self.gates.items()))
        lines.append("  benchmark gate: skipped (--skip-bench)" if self.skip_bench
                     else f"  benchmark gate: profile {self.bench_profile}")
        return lines


def gate_thresholds(env: Environment) -> dict[str, float]:
    d = env.data
    return {"health_timeout_s": d.health_timeout_s, "metric_window_s": d.metric_window_s,
            "max_error_ratio": d.max_error_ratio, "max_p95_ms": d.max_p95_ms,
            "bench_fail_threshold_ms": d.bench_fail_threshold_ms,
            "bench_fail_p95_threshold_ms": d.bench_fail_p95_threshold_ms}


def build_deploy_plan(*, env: Environment, release: str, image: str, batch_spec: str | None,
                      old_config: Mapping[str, str] | None, new_config: Mapping[str, str],
                      config_version: str, previous_config_version: str | None,
                      revisions: Sequence[Migration], db_head: str | None,
                      previous_release: str | None = None, skip_bench: bool = False,
                      allow_incompatible: bool = False) -> DeployPlan:
    """Everything `deploy` will do, decided before any host changes. Raises ConfigError on bad input.

    --dry prints this plan; the real deploy builds the same one from the facts it reads under the lock and
    executes it, so the checks here (migration range, compatibility) guard both.
    """
    from ingestctl.migrations import chain_head, revisions_between

    head = chain_head(revisions)
    order = rollout_order(env)
    plan = DeployPlan(
        env=env.name, release=release, image=image, hosts=env.all_hosts, db_host=env.db_host,
        batches=parse_batch_spec(batch_spec, order), config_version=config_version,
        previous_config_version=previous_config_version, config_changes=config_diff(old_config, new_config),
        schema_head_before=db_head, schema_head_after=head,
        migrations=revisions_between(revisions, db_head, head), skip_bench=skip_bench,
        bench_profile=env.data.bench_profile, gates=gate_thresholds(env), previous_release=previous_release,
        allow_incompatible=allow_incompatible,
        # A first deploy has no previous release to leave the rest of the traffic on.
        canary_weight=env.data.canary_weight if previous_release else 100,
    )
    if plan.incompatible and previous_release:
        if not allow_incompatible:
            raise ConfigError(incompatible_refusal(plan, env.name))
        # One batch after the migration: no host is left on the old release against the new schema (so no canary,
        # which would leave the old release serving a share of it).
        plan = replace(plan, batches=[list(order)], canary_weight=100)
    return plan


def incompatible_refusal(plan: DeployPlan, env: str) -> str:
    first = plan.incompatible[0]
    declared = ("declares backward_compatible = False" if first.backward_compatible is False
                else "does not declare backward_compatible")
    return (
        f"{first.name}: {declared}: during a rolling deploy the hosts still on {plan.previous_release} would run "
        f"against its schema, and an automatic rollback would return them to a release that cannot run on it. "
        "Ship it as two releases (expand/contract): first a release whose migration only adds (new columns "
        "nullable or with defaults, new tables) and whose code works with the old and the new shape; once every "
        "host runs it, a second release that removes the old shape. Or, accepting a one-batch switch, pass "
        f"--allow-incompatible: `ingestctl deploy {env} --allow-incompatible` migrates, switches every app host at "
        "once, and on a gate failure runs the migrations' declared data-safe downgrade before the old release "
        "returns. No host was changed"
    )
