"""What a deploy tells the outside world (`changes.observed_deploy`): the events it queues and the incident draft a
failed run leaves. The hosts are faked at the store's edge (`incident_store.append`); the notifier is real."""

from __future__ import annotations

import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
from ingestctl import changes, incident_store, incidents, webhooks
from ingestctl.errors import ConfigError, GateFailed, RollbackFailed
from ingestctl.output import Reporter
from ingestctl.runcontext import Run


class Recorder(webhooks.Notifier):
    """A notifier with no URL that keeps what it was asked to send."""

    def __init__(self):
        super().__init__([])
        self.sent: list[dict] = []

    def emit(self, payload):
        self.sent.append(payload)


@pytest.fixture
def world(monkeypatch):
    notifier = Recorder()
    appended: list[tuple[str, incidents.IncidentEvent]] = []
    monkeypatch.setattr(webhooks, "for_env", lambda _env: notifier)
    monkeypatch.setattr(incident_store, "append", lambda env, event, _secrets: appended.append((env, event)) or ["a"])
    reporter = Reporter(json_mode=True)
    ctx = SimpleNamespace(name="local", reporter=reporter, config=SimpleNamespace(secrets={"API_KEY": "k" * 24}))
    run = Run("20240501T120000-abcdef", "deploy", "local", "ci@runner", started=time.time() - 30)
    run.facts = replace(run.facts, release="v2", image_id="sha256:" + "ab" * 32, config_version="c0ffee000001",
                     previous={"app1": "v1", "app2": "v1"})
    return SimpleNamespace(ctx=ctx, run=run, notifier=notifier, appended=appended)


def types(notifier: Recorder) -> list[str]:
    return [p["context"]["type"].split(".", 2)[2].rsplit(".", 3)[0] for p in notifier.sent]


def fail_after_canary(run: Run, gate: str = "metrics") -> None:
    """What `guarded` leaves when the canary's gate fails: the gate, the switched host, the rolled-back outcome."""
    run.gates.append({"gate": "health", "passed": True, "numbers": {}, "at": time.time() - 5})
    run.gates.append({"gate": gate, "passed": False, "numbers": {"app1": {"error_ratio": 0.4}}, "at": time.time(),
                      "message": f"{gate} gate failed"})
    run.facts = replace(run.facts, outcome="rolled-back", switched=["app1"])
    raise GateFailed(f"{gate} gate failed; rolled back app1")


def test_a_gate_failure_after_traffic_opens_a_sev2_draft_and_sends_every_event(world, capsys):
    with pytest.raises(GateFailed), changes.observed_deploy(world.ctx, world.run):
        fail_after_canary(world.run)
    [(env, event)] = world.appended
    assert env == "local" and event.draft and event.sev == 2 and event.run_id == world.run.id
    assert types(world.notifier) == ["pipelinerun.started", "testcaserun.finished", "service.rolledback",
                                     "pipelinerun.finished", "incident.detected"]
    finished = world.notifier.sent[3]
    assert finished["subject"]["content"]["outcome"] == "failure" and finished["customData"]["exitCode"] == 3
    assert world.notifier.sent[2]["customData"]["release"] == "v1"  # rolled back to
    assert world.notifier.sent[4]["subject"]["id"] == event.incident
    out = capsys.readouterr().out
    assert '"type": "incident"' in out and event.incident in out


def test_a_failed_rollback_opens_a_sev1_draft(world):
    with pytest.raises(RollbackFailed), changes.observed_deploy(world.ctx, world.run):
        world.run.facts = replace(world.run.facts, outcome="rollback-failed", switched=["app1"])
        raise RollbackFailed("app1 did not come back")
    assert world.appended[0][1].sev == 1


def test_readiness_failing_before_traffic_is_sev3(world):
    with pytest.raises(GateFailed), changes.observed_deploy(world.ctx, world.run):
        world.run.gates.append({"gate": "health", "passed": False, "numbers": {"timeout_s": 60}, "at": time.time()})
        world.run.facts = replace(world.run.facts, outcome="failed", switched=[])
        raise GateFailed("health gate failed; no host was switched")
    assert world.appended[0][1].sev == 3
    assert "service.rolledback" not in types(world.notifier)


def test_a_draft_that_cannot_be_written_never_masks_the_exit_code(world, monkeypatch, capsys):
    def unreachable(*_args):
        raise ConfigError("cannot reach any host")

    monkeypatch.setattr(incident_store, "append", unreachable)
    with pytest.raises(GateFailed), changes.observed_deploy(world.ctx, world.run):
        fail_after_canary(world.run)
    assert "could not open the incident draft: cannot reach any host" in capsys.readouterr().out


def test_a_successful_deploy_sends_upgraded_or_deployed_and_opens_nothing(world):
    with changes.observed_deploy(world.ctx, world.run):
        world.run.facts = replace(world.run.facts, outcome="success", switched=["app1", "app2"])
    assert types(world.notifier) == ["pipelinerun.started", "service.upgraded", "pipelinerun.finished"]
    assert world.notifier.sent[2]["subject"]["content"]["outcome"] == "success" and not world.appended
    world.notifier.sent.clear()
    world.run.facts.previous = {"app1": None, "app2": None}
    with changes.observed_deploy(world.ctx, world.run):
        pass
    assert types(world.notifier) == ["pipelinerun.started", "service.deployed", "pipelinerun.finished"]


def test_a_refused_deploy_reports_an_error_and_no_draft(world):
    with pytest.raises(ConfigError), changes.observed_deploy(world.ctx, world.run):
        raise ConfigError("lock")
    assert types(world.notifier) == ["pipelinerun.started", "pipelinerun.finished"]
    assert world.notifier.sent[1]["subject"]["content"]["outcome"] == "error" and not world.appended
