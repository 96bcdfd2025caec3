"""Pruning after a deploy: old release images and config versions go in one command round, what runs stays."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

from ingestctl import fleetview, pipeline
from ingestctl.ledger import LedgerEntry
from ingestctl.runcontext import Release

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def image(n: int) -> str:
    return "sha256:" + f"{n:x}" * 64


def cfg(n: int) -> str:
    return f"c0ffee{n:06d}"


def entry(n: int) -> LedgerEntry:
    return LedgerEntry(id=f"20261201T1200{n:02d}Z-00000{n}", kind="deploy", env="local", release=f"v{n}",
                       image_id=image(n)[:71], config_version=cfg(n), who="ana@laptop",
                       started=T0 + timedelta(minutes=n), finished=T0 + timedelta(minutes=n, seconds=30),
                       outcome="success")


class Recorder:
    def __init__(self):
        self.events = []

    def event(self, kind, message, **fields):
        self.events.append((kind, message, fields))


def test_old_images_and_configs_go_in_one_round_and_what_runs_stays(monkeypatch):
    entries = [entry(n) for n in range(1, 6)]  # v1..v5; v5 is the new release
    reads, rounds = [], []
    monkeypatch.setattr(fleetview, "read_ledger", lambda env, reporter, io: reads.append(env) or entries)
    io = SimpleNamespace(run_commands=lambda command_for, hosts=None: rounds.append({h: command_for(h) for h in hosts}))
    reporter = Recorder()
    env = SimpleNamespace(data=SimpleNamespace(keep_releases=2), all_hosts=["db1", "app2"])
    ctx = SimpleNamespace(name="local", env=env, reporter=reporter, config=SimpleNamespace(version=cfg(5)), io=io)
    # v2 is still the standby on app2 (an older one kept warm): neither its image nor its config may go.
    before = {"db1": {"image_id": entries[3].image_id, "config_version": cfg(4)},
              "app2": {"image_id": entries[3].image_id, "config_version": cfg(4),
                       "standby": {"image_id": entries[1].image_id, "config_version": cfg(2)}}}
    pipeline.prune_old(ctx, Release("v5", "ingest:v5", entries[4].image_id, None), before)

    assert reads == ["local"], "the ledger is read once for both"
    [round_] = rounds
    assert set(round_) == {"db1", "app2"}
    command = round_["app2"]
    assert entries[0].image_id in command and entries[2].image_id in command
    assert entries[1].image_id not in command and entries[3].image_id not in command
    assert f"/opt/ingest/config/{cfg(1)}" in command and f"/opt/ingest/config/{cfg(3)}" in command
    assert cfg(2) not in command and cfg(4) not in command and cfg(5) not in command
    steps = [fields for kind, _message, fields in reporter.events if kind == "step"]
    assert [sorted(s) for s in steps] == [["images", "step"], ["config_versions", "step"]]
