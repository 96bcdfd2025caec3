"""Switch retries: transient host errors are retried until the deadline; a release that never got ready is not."""

import time

import pytest
from ingestctl import pyinfra_runner as runner
from ingestctl import runcontext, switching


class Reporter:
    def __init__(self):
        self.events = []

    def event(self, kind, message="", **fields):
        self.events.append((kind, message, fields))


class Ctx:
    name = "test"

    def __init__(self):
        self.reporter = Reporter()
        self.io = None


class ScriptedFleet:
    """The fleet I/O's run of operations (what `switching` uses of it), answering from a script."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def run_operations(self, calls_, hosts, raise_on_error):
        self.calls.append(list(hosts))
        errors = self.answers.pop(0)
        return runner.RunResult({
            h: runner.HostResult(h, errors.get(h) is None, error=errors.get(h),
                                 # Nothing ran on a host SSH never reached.
                                 operations=() if errors.get(h) == UNREACHABLE else
                                 (runner.OperationResult("switch", errors.get(h) is None, True),),
                                 reached=errors.get(h) != UNREACHABLE)
            for h in hosts
        })


def scripted(monkeypatch, ctx, answers):
    """CTX's hosts answer runs of operations from a script: one dict {host: error or None} per call."""
    ctx.io = ScriptedFleet(answers)
    clock = [1000.0]  # a fake monotonic clock that only sleeping moves
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(time, "sleep", lambda seconds: clock.__setitem__(0, clock[0] + seconds))
    return ctx.io.calls


UNREACHABLE = "ssh: Could not connect to app3: timed out"
OCI = "OCI runtime exec failed: exec failed: read init-p: connection reset by peer: unknown"


def test_a_transient_exec_failure_is_retried_on_that_host_only(monkeypatch):
    ctx = Ctx()
    calls = scripted(monkeypatch, ctx, [{"app2": OCI}, {}])
    result, touched = switching.converge(ctx, [], ["app2", "app3"], 1060.0, switching.is_transient)
    assert calls == [["app2", "app3"], ["app2"]]
    assert not result.failed and touched == {"app2", "app3"}
    assert [e[0] for e in ctx.reporter.events] == ["retry"]
    assert "app2" in ctx.reporter.events[0][1]


def test_a_slot_that_never_got_ready_is_not_retried(monkeypatch):
    ctx = Ctx()
    calls = scripted(monkeypatch, ctx, [{"app2": f"api_green on port 8002 {runcontext.SLOT_NOT_READY} 60s"}])
    result, _ = switching.converge(ctx, [], ["app2"], 1060.0, switching.is_transient)
    assert calls == [["app2"]] and [r.host for r in result.failed] == ["app2"]


def test_retries_stop_at_the_deadline_and_report_the_last_failure(monkeypatch):
    ctx = Ctx()
    calls = scripted(monkeypatch, ctx, [{"app2": OCI}] * 3)
    result, _ = switching.converge(ctx, [], ["app2"], 1002.5, lambda _f: True)
    # Backoff 1 s, then 2 s: the third attempt would start past the 2.5 s deadline.
    assert len(calls) == 2 and result.failed[0].error == OCI


def test_the_forward_switch_tries_an_unreachable_host_twice_not_until_the_deadline(monkeypatch):
    ctx = Ctx()
    calls = scripted(monkeypatch, ctx, [{"app2": OCI, "app3": UNREACHABLE}, {"app2": OCI, "app3": UNREACHABLE},
                                        {"app2": OCI}, {}])
    result, touched = switching.converge(ctx, [], ["app2", "app3"], 1030.0, switching.is_transient,
                                         unreached_attempts=switching.UNREACHED_ATTEMPTS)
    # app3 gets its one retry; app2, reached and failing transiently, keeps being retried until it converges.
    assert calls == [["app2", "app3"], ["app2", "app3"], ["app2"], ["app2"]]
    assert [r.host for r in result.failed] == ["app3"] and touched == {"app2"}


def test_a_rollback_keeps_trying_an_unreachable_host_until_its_deadline(monkeypatch):
    ctx = Ctx()
    calls = scripted(monkeypatch, ctx, [{"app3": UNREACHABLE}] * 3 + [{}])
    result, _ = switching.converge(ctx, [], ["app3"], 1030.0, lambda _f: True)
    assert len(calls) == 4 and not result.failed


@pytest.mark.parametrize("failure,transient", [
    (OCI, True), ("ssh: Socket exception: Connection reset by peer", True),
    ("host app2: operation 'x' failed: no such image ingest:v9", False),
])
def test_transient_errors_are_told_apart(failure, transient):
    assert switching.is_transient(failure) is transient


def rollback_ctx(monkeypatch):
    """A Context-shaped object for rollback_hosts: inventory data and base URLs, nothing that reaches a host."""
    from types import SimpleNamespace

    from ingestctl import gates

    ctx = Ctx()
    ctx.env = SimpleNamespace(data=SimpleNamespace(rollback_deadline_s=60.0, health_timeout_s=5.0))
    ctx.base_url = lambda host: f"http://{host}:8000"
    checked = []
    monkeypatch.setattr(gates, "health_gate", lambda urls, timeout: checked.append(sorted(urls)) or
                        gates.GateResult("health", True, "ready"))
    monkeypatch.setattr(switching, "switch_calls", lambda *a, **k: ["switch"])
    return ctx, checked


def test_a_first_deploy_that_fails_is_withdrawn_not_a_failed_rollback(monkeypatch):
    ctx, checked = rollback_ctx(monkeypatch)
    calls = scripted(monkeypatch, ctx, [{}, {}])
    before = {"app2": None, "app3": {"release": "v1", "image": "ingest:v1", "image_id": "sha256:1",
                                     "config_version": "c1"}}
    restored = switching.rollback_hosts(ctx, before, ["app2", "app3"], "metrics gate failed")
    assert calls == [["app2"], ["app3"]]  # the withdrawal, then the switch back for the host that had v1
    assert restored == ["app3"] and checked == [["app3"]]
    assert any(fields.get("outcome") == "withdrawn" for _k, _m, fields in ctx.reporter.events)


def test_a_rollback_that_cannot_converge_by_its_deadline_is_sev1(monkeypatch):
    from ingestctl.errors import RollbackFailed

    ctx, _checked = rollback_ctx(monkeypatch)
    scripted(monkeypatch, ctx, [{"app2": OCI}] * 10)
    monkeypatch.setattr(switching, "describe_fleet", lambda _ctx: "  app2: release v2")
    before = {"app2": {"release": "v1", "image": "ingest:v1", "image_id": "sha256:1", "config_version": "c1"}}
    with pytest.raises(RollbackFailed, match="SEV-1.*app2.*OCI runtime"):
        switching.rollback_hosts(ctx, before, ["app2"], "metrics gate failed")
    retries = [m for kind, m, _f in ctx.reporter.events if kind == "retry"]
    assert len(retries) >= 4, retries  # 1+2+4+8+8+8+8 s of backoff fit in the 60 s deadline
