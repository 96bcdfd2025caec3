"""A whole deploy, executed against an in-memory fleet: every exit code of `pipeline.execute_deploy`.

The planner, the executor, the gates, the lock and the ledger are the real ones. Only the hosts are fakes,
behind the interface the SSH fleet implements (`fleet.FleetIO`, the run's `Context.io`):
- each host's state.json and the database's head live in memory and are read through the real facts'
  `process` (so their value checks apply); operations are applied to that state;
- lock and ledger commands are the real shell commands, run by /bin/sh on a per-host temporary directory;
- each host's app answers HTTP on its own loopback address (health, /metrics, the probe's route), so the
  health and metric gates judge real answers. A release can be made to fail on one host (5xx answers) and a
  switch can be made to fail, which is how each scenario is set up.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from ingestctl import fleet, ledger, lock, pipeline, runcontext, runlock
from ingestctl import pyinfra_runner as runner
from ingestctl.errors import GateFailed, LockHeld, RollbackFailed
from ingestctl.facts.host import READINESS_COMMAND, Readiness, parse_readiness
from ingestctl.facts.release import IngestState, LedgerCopy, SchemaHead, SchemaRecord
from ingestctl.operations import release as release_ops

ENV = "memfleet"
HOSTS = {"db1": ("127.0.0.2", ["db"]), "app2": ("127.0.0.3", ["app"]), "app3": ("127.0.0.4", ["app"])}
# Where lock and ledger live on a host; each fake host keeps that directory under its own temporary root.
HOST_VAR = "/var/lib/ingest"
READY = ("init=docker-init\nos=debian 13 trixie\ndocker_cli=yes\nengine=26.1.5\ncompose=docker compose\n"
         "missing_tools=\nsetup={\"env\": \"memfleet\"}\n")
CHECKOUT_HEAD = "0002"  # the newest revision in service/alembic/versions
REVISIONS = ["0001", CHECKOUT_HEAD]


def image_id(release: str) -> str:
    return "sha256:" + (release.encode().hex() * 64)[:64]


# --- the in-memory fleet ---------------------------------------------------------------------------------

@dataclass
class MemoryHost:
    """One host as the orchestrator sees it through a connection: facts and shell commands."""

    name: str
    root: Path
    fleet: MemoryFleet
    state: dict | None = None
    images: set[str] = field(default_factory=set)
    configs: dict[str, str] = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # pyinfra's host.data: no sudo, no command timeout

    def get_fact(self, fact_cls, **_kwargs):
        self.fleet.reads.append((len(self.fleet.commands), self.name, fact_cls.__name__))
        if fact_cls is IngestState:
            return fact_cls().process(json.dumps(self.state).splitlines() if self.state else [])
        if fact_cls is SchemaHead:
            return fact_cls().process([self.fleet.schema_head or ""])
        if fact_cls is SchemaRecord:  # every revision up to the head applied, each compatible and data-safe
            head = self.fleet.schema_head
            applied = REVISIONS[: REVISIONS.index(head) + 1] if head else []
            return fact_cls().process([f"head|{head}"] * bool(head) + [f"applied|{r}|t|t" for r in applied])
        if fact_cls is Readiness:
            return parse_readiness(READY)
        if fact_cls is LedgerCopy:
            path = self.root / Path(ledger.LEDGER_PATH).name
            return fact_cls().process(path.read_text().splitlines() if path.exists() else [])
        if fact_cls.__name__ == "_RawLines":  # facts read together: not here, so each is read on its own
            return None
        raise AssertionError(f"{self.name}: the in-memory fleet has no fact {fact_cls.__name__}")

    def run_shell_command(self, command: str, **_kwargs):
        # The facts a lock command reads once it holds the lock are not answered here: each is read on its own.
        command = command.partition(runlock.READS_AFTER_LOCK)[0]
        self.fleet.commands.append((self.name, command))
        if command == READINESS_COMMAND:
            return True, output(READY)
        if HOST_VAR in command and "docker" not in command:  # lock and ledger: the real commands, in a real shell
            done = subprocess.run(["sh", "-c", command.replace(HOST_VAR, str(self.root))], capture_output=True,
                                  text=True, timeout=10, check=False)
            return done.returncode == 0, output(done.stdout, done.stderr)
        return False, output("", f"in-memory host {self.name}: unexpected command {command[:80]!r}")

    def ledger(self) -> list[ledger.LedgerEntry]:
        path = self.root / Path(ledger.LEDGER_PATH).name
        return ledger.parse(path.read_text() if path.exists() else "").entries

    def lock_command(self, command: str) -> lock.LockStatus:
        return lock.parse_output("\n".join(self.run_shell_command(command)[1].stdout_lines), self.name)

    def lock_state(self) -> lock.LockStatus:
        return self.lock_command(lock.read_command())


def output(stdout: str, stderr: str = ""):
    return SimpleNamespace(stdout_lines=stdout.splitlines(), stderr_lines=stderr.splitlines())


class MemoryFleet(fleet.FleetIO):
    """The environment's hosts in memory. FAIL_SWITCH: (host, release) pairs whose switch fails there."""

    def __init__(self, root: Path):
        self.hosts = {name: MemoryHost(name, root / name, self) for name in HOSTS}
        for host in self.hosts.values():
            host.root.mkdir(parents=True)
        self.schema_head: str | None = None
        self.image_heads: dict[str, str] = {}
        self.fail_switch: set[tuple[str, str]] = set()
        self.commands: list[tuple[str, str]] = []
        # (how many commands had run before it, host, fact class name), in order
        self.reads: list[tuple[int, str, str]] = []
        self.operations: list[tuple[str, str]] = []  # (host, operation name), in order

    @contextmanager
    def connected(self, hosts=None, require_all=True):
        yield {name: self.hosts[name] for name in (hosts or self.hosts)}

    def run_operations(self, calls, hosts=None, raise_on_error=True):
        results = {}
        for name in hosts or self.hosts:
            done = tuple(self.apply(self.hosts[name], call) for call in calls)
            results[name] = runner.HostResult(name, all(op.success for op in done), operations=done)
        result = runner.RunResult(results)
        if raise_on_error:
            result.raise_for_failures()
        return result

    def run_deploy(self, deploy_func, hosts=None, raise_on_error=True, **kwargs):
        assert deploy_func is release_ops.images_for_role_shipped, deploy_func
        results = {}
        for name in hosts or self.hosts:
            wanted = set(kwargs["images_for"][name])
            missing = wanted - self.hosts[name].images
            self.hosts[name].images |= wanted
            self.operations.append((name, "ship"))
            results[name] = runner.HostResult(name, True, (runner.OperationResult("ship", True, bool(missing)),))
        return runner.RunResult(results)

    def apply(self, host: MemoryHost, call: runner.OperationCall) -> runner.OperationResult:
        kwargs, name = call.kwargs, call.kwargs.get("name", "")
        self.operations.append((host.name, call.func.__name__))
        if call.func is release_ops.release_live:
            if (host.name, kwargs["release"]) in self.fail_switch:
                return runner.OperationResult(name, False, False, f"{host.name}: no space left on device")
            live = {"release": kwargs["release"], "image": kwargs["image"], "image_id": kwargs["image_id"],
                    "config_version": kwargs["config_version"], "schema_head": kwargs["schema_head"]}
            if host.state and all(host.state.get(k) == v for k, v in live.items()):
                return runner.OperationResult(name, True, False)
            slot = "green" if (host.state or {}).get("slot") == "blue" else "blue"
            # The slot it leaves stays up as the warm standby, as on a real host: a rollback to it is a flip.
            standby = {"image": host.state["image"], "image_id": host.state["image_id"]} if host.state else None
            host.state = {**live, "slot": slot, **({"standby": standby} if standby else {})}
            return runner.OperationResult(name, True, True)
        if call.func is release_ops.release_withdrawn:
            changed, host.state = host.state is not None, None
            return runner.OperationResult(name, True, changed)
        if call.func is release_ops.schema_migrated:
            verb, target = kwargs["alembic_args"]
            before = self.schema_head
            self.schema_head = self.image_heads[kwargs["image"]] if target == "head" else None if target == "base" \
                else target
            assert verb in ("upgrade", "downgrade")
            return runner.OperationResult(name, True, self.schema_head != before)
        if call.func is release_ops.config_version_present:
            changed = kwargs["version"] not in host.configs
            host.configs[kwargs["version"]] = kwargs["env_text"]
            return runner.OperationResult(name, True, changed)
        if call.func in (release_ops.layout_present, release_ops.database_running):
            return runner.OperationResult(name, True, False)
        raise AssertionError(f"the in-memory fleet cannot apply {call.func.__name__}")

    def live_releases(self) -> dict[str, str | None]:
        return {name: (host.state or {}).get("release") for name, host in self.hosts.items()
                if "app" in HOSTS[name][1]}


# --- the hosts' app over HTTP -----------------------------------------------------------------------------

class App(ThreadingHTTPServer):
    """HOST's api on its address: ready while a release is live there, 5xx on the probe's route when that
    release is in BROKEN, and the request counters the metric gate scrapes."""

    daemon_threads = True

    def __init__(self, address, host: MemoryHost, broken: set[tuple[str, str]]):
        self.host, self.broken, self.ok, self.errors = host, broken, 0, 0
        super().__init__(address, Handler)


class Handler(BaseHTTPRequestHandler):
    server: App
    protocol_version = "HTTP/1.1"  # keep-alive, as the gates' client uses it: the probes stay quick

    def do_GET(self):  # noqa: N802 - the name http.server dispatches to
        app, path = self.server, self.path.split("?")[0]
        release = (app.host.state or {}).get("release")
        if path == "/health/ready":
            self.answer(200 if release else 503, "ready" if release else "no release")
        elif path == "/metrics":
            body = "".join(
                f'ingest_http_requests_total{{route="/api/v1/events",status="{status}"}} {count}\n'
                for status, count in (("200", app.ok), ("500", app.errors))
            ) + "".join(
                f'ingest_http_request_duration_seconds_bucket{{route="/api/v1/events",le="{le}"}} '
                f"{app.ok + app.errors}\n" for le in ("0.05", "+Inf")
            )
            self.answer(200, "# TYPE ingest_http_requests_total counter\n"
                        "# TYPE ingest_http_request_duration_seconds histogram\n" + body)
        elif path == "/api/v1/events":
            if (app.host.name, release) in app.broken:
                app.errors += 1
                self.answer(500, "internal error")
            else:
                app.ok += 1
                self.answer(200, "[]")
        else:
            self.answer(404, "not found")

    def answer(self, status: int, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_args):  # quiet: the test asserts on the gates' verdicts
        pass


def free_port() -> int:
    """A port free on every host's loopback address (the inventory's app_port is one for all hosts)."""
    for _ in range(20):
        with socket.socket() as probe:
            probe.bind((HOSTS["db1"][0], 0))
            port = probe.getsockname()[1]
        try:
            for address, _roles in HOSTS.values():
                with socket.socket() as other:
                    other.bind((address, port))
            return port
        except OSError:
            continue
    raise AssertionError("no port free on every loopback address")


# --- the environment and the run -------------------------------------------------------------------------

class Recorder:
    json_mode = True

    def __init__(self):
        self.events: list[tuple[str, str, dict]] = []

    def event(self, kind, message="", **fields):
        self.events.append((kind, message, fields))

    def steps(self, step: str) -> list[dict]:
        return [fields for kind, _m, fields in self.events if fields.get("step") == step]


INVENTORY = """
from ingestctl.inventory import environment

_env = environment(name={env!r}, data={data!r}, hosts={hosts!r})
db = _env.group("db")
app = _env.group("app")
"""


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A checkout (inventory, secrets, the project's migrations) and three in-memory hosts serving HTTP."""
    root = tmp_path / "checkout"
    (root / "inventories").mkdir(parents=True)
    (root / "service" / "alembic").mkdir(parents=True)
    (root / "service" / "alembic" / "versions").symlink_to(
        Path(__file__).resolve().parents[2] / "service" / "alembic" / "versions")
    port = free_port()
    data = {"app_port": port, "metric_window_s": 0.1, "health_timeout_s": 1, "rollback_deadline_s": 0.5,
            "metric_min_requests": 1, "max_error_ratio": 0.05}
    hosts = {name: {"ssh_hostname": address, "roles": roles} for name, (address, roles) in HOSTS.items()}
    (root / "inventories" / f"{ENV}.py").write_text(INVENTORY.format(env=ENV, data=data, hosts=hosts))
    (root / "secrets").mkdir()
    secrets_file = root / "secrets" / f"{ENV}.env"
    secrets_file.write_text("".join(f"{key}={secrets.token_hex(24)}\n" for key in
                                    ("POSTGRES_PASSWORD", "API_KEY", "JWT_SECRET", "REDIS_PASSWORD")))
    secrets_file.chmod(0o600)
    monkeypatch.setenv("INGESTCTL_ROOT", str(root))

    memory = MemoryFleet(tmp_path / "hosts")
    broken: set[tuple[str, str]] = set()
    apps = [App((HOSTS[name][0], port), host, broken) for name, host in memory.hosts.items()]
    threads = [threading.Thread(target=app.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
               for app in apps]
    for thread in threads:
        thread.start()
    reporter = Recorder()
    ctx = runcontext.prepare(ENV, reporter)
    ctx.io = memory
    yield SimpleNamespace(ctx=ctx, fleet=memory, broken=broken, reporter=reporter)
    for app in apps:
        app.shutdown()
        app.server_close()


def live_on(world, release: str) -> None:
    """Every app host live on RELEASE with the current config, the database at the checkout's head."""
    schema_head = CHECKOUT_HEAD
    for name, host in world.fleet.hosts.items():
        if "app" in HOSTS[name][1]:
            host.state = {"release": release, "image": f"ingest:{release}", "image_id": image_id(release),
                          "config_version": world.ctx.config.version, "schema_head": schema_head, "slot": "blue"}
    world.fleet.schema_head = schema_head


def deploy(world, release: str) -> runcontext.Run:
    """Deploy RELEASE, built from the checkout (its image carries the migrations up to its head)."""
    schema_head = CHECKOUT_HEAD
    world.fleet.image_heads[f"ingest:{release}"] = schema_head
    run = runcontext.Run(runcontext.new_run_id(), "deploy", ENV, world.ctx.who)
    built = runcontext.Release(release, f"ingest:{release}", image_id(release), schema_head)
    world.run = run
    pipeline.execute_deploy(world.ctx, run, built, skip_bench=True)
    return run


def assert_finalised_and_unlocked(world, outcome: str) -> None:
    """Every host's ledger holds the run's final entry (not its `running` journal line), every lock is free."""
    for name, host in world.fleet.hosts.items():
        entries = {entry.id: entry for entry in host.ledger()}
        assert entries[world.run.id].outcome == outcome, name
        assert entries[world.run.id].finished is not None, name
        assert host.lock_state().state == "free", name


# --- the scenarios ---------------------------------------------------------------------------------------

def test_a_rolling_deploy_switches_both_batches_finalises_the_ledger_and_releases_the_lock(world):
    live_on(world, "v1")
    run = deploy(world, "v2")  # returns: exit 0
    assert world.fleet.live_releases() == {"app2": "v2", "app3": "v2"}
    assert [(s["batch"], s["hosts"]) for s in world.reporter.steps("switched")] == [(1, ["app2"]), (2, ["app3"])]
    assert [(g["gate"], g["batch"], g["passed"]) for g in run.gates if "batch" in g] == [
        ("health", 1, True), ("metrics", 1, True), ("health", 2, True), ("metrics", 2, True)]
    assert (run.facts.outcome, run.facts.switched, run.facts.previous) == \
        ("success", ["app2", "app3"], {"db1": None, "app2": "v1", "app3": "v1"})
    assert_finalised_and_unlocked(world, "success")
    entry = world.fleet.hosts["db1"].ledger()[-1]
    assert (entry.release, entry.previous_release, entry.hosts) == ("v2", "v1", ["app2", "app3"])
    # The image reached every host; the schema was already at the release's head, so nothing migrated.
    assert all("ingest:v2" in host.images for host in world.fleet.hosts.values())
    assert ("db1", "schema_migrated") not in world.fleet.operations


def test_a_gate_failure_in_batch_two_rolls_every_switched_host_back(world):
    live_on(world, "v1")
    world.broken.add(("app3", "v2"))
    with pytest.raises(GateFailed, match="metric gate failed: app3") as failed:
        deploy(world, "v2")
    assert failed.value.exit_code == 3
    assert world.fleet.live_releases() == {"app2": "v1", "app3": "v1"}
    assert [g["passed"] for g in world.run.gates if g.get("gate") == "metrics"] == [True, False]
    assert world.run.facts.outcome == "rolled-back"
    assert_finalised_and_unlocked(world, "rolled-back")


def test_a_rollback_that_fails_is_exit_4_naming_the_host(world):
    live_on(world, "v1")
    world.broken.add(("app3", "v2"))
    world.fleet.fail_switch.add(("app2", "v1"))  # the switch back fails on app2, at every attempt
    with pytest.raises(RollbackFailed, match=r"SEV-1.*app2.*no space left") as failed:
        deploy(world, "v2")
    assert failed.value.exit_code == 4
    assert world.fleet.live_releases() == {"app2": "v2", "app3": "v1"}
    assert "app2: release v2" in str(failed.value)  # the fleet's state, host by host, in the SEV-1 report
    assert world.run.facts.outcome == "rollback-failed"
    assert_finalised_and_unlocked(world, "failed")


def test_a_held_lock_is_exit_5_and_no_host_is_touched(world):
    from datetime import UTC, datetime, timedelta

    live_on(world, "v1")
    holder = lock.new_record(who="ana@laptop", command="deploy memfleet", release="v9", now=datetime.now(UTC),
                             ttl=timedelta(seconds=600), run_id="20261203T010000-abcdef")
    app3 = world.fleet.hosts["app3"]
    assert app3.lock_command(lock.acquire_command(holder)).state == "acquired"
    world.fleet.commands.clear()
    with pytest.raises(LockHeld, match="ana@laptop") as held:
        deploy(world, "v2")
    assert held.value.exit_code == 5  # docs/DEPLOYING.md: "the deploy lock is held by someone else"
    assert world.fleet.operations == []  # nothing shipped, written or switched
    assert world.fleet.live_releases() == {"app2": "v1", "app3": "v1"}
    assert app3.lock_state().record.token == holder.token  # the holder's lock stays; ours went everywhere
    assert all(host.lock_state().state == "free" for name, host in world.fleet.hosts.items() if name != "app3")
    assert not any(HOST_VAR + "/ledger" in command for _host, command in world.fleet.commands)


def test_a_first_deploy_that_fails_its_gate_is_withdrawn_with_exit_3(world):
    world.broken.add(("app3", "v1"))  # nothing deployed yet: no state.json anywhere, an empty database
    with pytest.raises(GateFailed, match="metric gate failed: app3") as failed:
        deploy(world, "v1")
    assert failed.value.exit_code == 3  # docs/RELIABILITY.md: withdrawn, not a SEV-1
    assert world.fleet.live_releases() == {"app2": None, "app3": None}
    assert world.fleet.schema_head == CHECKOUT_HEAD  # migrated before the rollout; the schema stays
    assert any(fields.get("outcome") == "withdrawn" for kind, _m, fields in world.reporter.events
               if kind == "rollback")
    assert_finalised_and_unlocked(world, "rolled-back")

