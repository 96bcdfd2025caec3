"""`rollback app`, executed against the in-memory fleet of test_deploy_executor: the real planner, lock, ledger
and health gate; the hosts' state.json, ledgers and schema in memory.

The plan is decided under the lock from the lock round's own reads: nothing can move between the decision and
the switch, and the hosts are read once, not once to plan and again under the lock."""

from __future__ import annotations

import pytest
import test_deploy_executor as memfleet
from ingestctl import ledger, lock, rollbacks, runcontext
from ingestctl.errors import ConfigError
from test_deploy_executor import ENV, assert_finalised_and_unlocked, deploy

world = memfleet.world  # the fixture: a checkout and three in-memory hosts serving HTTP

PLAN_FACTS = {"IngestState", "LedgerCopy", "SchemaRecord"}


def rollback(world, to: str | None = None, dry: bool = False) -> runcontext.Run:
    run = runcontext.Run(runcontext.new_run_id(), "rollback-app", ENV, world.ctx.who)
    world.run = run
    return rollbacks.execute_app_rollback(world.ctx, run, to, lock_wait_s=0.0, with_schema=False, dry=dry)


def deployed(world, *releases: str) -> None:
    for release in releases:
        deploy(world, release)
    world.fleet.commands.clear()
    world.fleet.reads.clear()


def test_an_app_rollback_switches_every_app_host_back_to_the_previous_release(world):
    deployed(world, "v1", "v2")
    run = rollback(world)
    assert world.fleet.live_releases() == {"app2": "v1", "app3": "v1"}
    assert (run.facts.release, run.facts.outcome) == ("v1", "success")
    assert_finalised_and_unlocked(world, "success")


def test_an_app_rollback_reads_what_it_decides_from_only_after_taking_the_lock(world):
    deployed(world, "v1", "v2")
    rollback(world)
    first_lock = next(i for i, (_host, command) in enumerate(world.fleet.commands) if lock.LOCK_DIR in command)
    reads = [(ran_before, fact) for ran_before, _host, fact in world.fleet.reads if fact in PLAN_FACTS]
    assert reads and all(ran_before > first_lock for ran_before, _fact in reads), (first_lock, reads)
    # Each host's state.json and ledger once, the schema once: nothing read twice to plan and then to guard.
    assert sorted(fact for _i, fact in reads) == sorted(["IngestState"] * 3 + ["LedgerCopy"] * 3 + ["SchemaRecord"])


def test_an_app_rollback_refused_under_the_lock_releases_it_and_writes_no_ledger_line(world):
    deployed(world, "v1", "v2")
    before = {name: len(host.ledger()) for name, host in world.fleet.hosts.items()}
    with pytest.raises(ConfigError, match="v9") as refused:
        rollback(world, to="v9")
    assert refused.value.exit_code == 2
    assert world.fleet.live_releases() == {"app2": "v2", "app3": "v2"}
    assert any(lock.LOCK_DIR in command for _host, command in world.fleet.commands)  # taken, then released
    assert all(host.lock_state().state == "free" for host in world.fleet.hosts.values())
    assert {name: len(host.ledger()) for name, host in world.fleet.hosts.items()} == before


def test_a_dry_app_rollback_prints_the_same_plan_without_the_lock_or_a_change(world):
    deployed(world, "v1", "v2")
    rollback(world, dry=True)
    plans = [fields for kind, _m, fields in world.reporter.events if kind == "plan"]
    assert (plans[-1]["from_release"], plans[-1]["to_release"]) == ("v2", "v1")
    assert world.fleet.live_releases() == {"app2": "v2", "app3": "v2"}
    assert not any(lock.LOCK_DIR in command or "ledger-append" in command for _host, command in world.fleet.commands)


def test_a_forged_ledger_line_read_under_the_lock_is_a_warning_naming_its_host(world):
    deployed(world, "v1", "v2")
    path = world.fleet.hosts["app3"].root / "ledger.jsonl"
    path.write_text(path.read_text() + '{"id": "forged", "kind": "deploy;rm -rf /"}\n')
    rollback(world)
    warnings = [message for kind, message, _f in world.reporter.events if kind == "warning"]
    assert any(message.startswith(f"warning: app3:{ledger.LEDGER_PATH} line") for message in warnings), warnings
    assert world.fleet.live_releases() == {"app2": "v1", "app3": "v1"}
