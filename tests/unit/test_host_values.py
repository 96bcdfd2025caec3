"""Values read back from hosts: the strict shapes (hostvalues), and where they are applied when parsing state.json,
facts, the merged ledger and the rollbacks' commands. A forged value is never used and never put in a command."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ingestctl import fleet, fleetview, hostlayout, hostvalues, images, ledger, lock, migrations, rollbacks, runcontext
from ingestctl.config import ServiceConfig
from ingestctl.errors import ConfigError
from ingestctl.facts.docker import DockerImage
from ingestctl.facts.release import REJECTED, ConfigVersions, DeployLockLines, IngestState, SchemaHead, checked_state
from ingestctl.hostvalues import HostValueError
from ingestctl.inventory import EnvData
from ingestctl.local_images import registry_reference
from pyinfra.api.exceptions import FactProcessError

ROOT = Path(__file__).resolve().parents[2]
RULES = {name: value for name, value in vars(hostvalues).items() if isinstance(value, hostvalues.HostValue)}
# Every rule but the display-only one admits only what a shell takes literally.
QUOTE_FREE = {name: rule for name, rule in RULES.items() if rule is not hostvalues.LOCK_COMMAND}
FORGED = [
    "$(touch /tmp/pwned)", "x$(touch /tmp/pwned)", "`touch /tmp/pwned`", "v1;touch /tmp/pwned", "v1 && id",
    "v1|id", "v1\ntouch /tmp/pwned", "v1\n", "v1'", 'v1"', "v1\\", "v1 ", "v1\t", "v1>x", "v1<x", "v1*", "v1[/x]",
    "~root", "v1#", "v1!", "-rf", "", "a" * 300,
]
SHELL_SENSITIVE = " \t\n$`;|&<>()'\"\\*?[]{}!#~"
IMG1, IMG2 = "sha256:" + "ab" * 32, "sha256:" + "cd" * 32
CFG1, CFG2 = "0123456789ab", "ba9876543210"


# --- the shapes --------------------------------------------------------------------------------------------

def test_every_value_the_project_writes_has_its_shape():
    version = "v1.4.2-3-gabc1234-dirty"  # git describe --tags --always --dirty
    assert hostvalues.RELEASE.matches(version) and hostvalues.RELEASE.matches("abc1234")
    production = EnvData(env="production")
    for reference in (images.image_name(version), production.postgres_image, production.redis_image,
                      production.proxy_image, "ingest-postgres:15", "ingest-redis:7", "ingest-proxy:1",
                      registry_reference("registry.ingest.example.internal:5000", images.image_name("1.4.2")),
                      f"library/postgres:16@sha256:{'0' * 64}", f"postgres@sha256:{'f' * 64}"):
        assert hostvalues.IMAGE_REF.matches(reference), reference
    secrets = {"POSTGRES_PASSWORD": "pg-9f8e7d6c5b4a3210", "API_KEY": "key-0123456789abcdef0123",
               "JWT_SECRET": "jwt-" + "a1b2c3d4" * 5}
    assert hostvalues.CONFIG_VERSION.matches(ServiceConfig.build({}, secrets).version)
    revisions = migrations.load_revisions(ROOT / "service" / "alembic" / "versions")
    assert revisions and all(hostvalues.SCHEMA_HEAD.matches(m.revision) for m in revisions)
    assert all(hostvalues.SLOT.matches(slot) for slot in hostlayout.SLOTS)
    run_id = runcontext.new_run_id()
    assert hostvalues.RUN_ID.matches(run_id) and hostvalues.RUN_ID.matches(ledger.new_entry_id(datetime.now(UTC)))
    assert hostvalues.RESTORE_POINT.matches(f"{hostlayout.BASE}/backups/{run_id}-0002.dump")
    assert hostvalues.RESTORE_POINT.matches(f"{hostlayout.BASE}/backups/{run_id}-empty.dump")
    record = lock.new_record(who="uid1000@ci-runner-7", command="deploy local --version v2", release="v2",
                             now=datetime.now(UTC))
    assert hostvalues.LOCK_TOKEN.matches(record.token) and hostvalues.HOST_NAME.matches(record.machine)
    assert hostvalues.WHO.matches(ledger.who_am_i()) and hostvalues.WHO.matches("e2e8-oncall@elsewhere")
    for command in ("deploy local --version v1.4.2-3-gabc1234", "rollback app local -> v1", "config set local",
                    "rollback schema local --steps 1", "ingestctl deploy local (e2e8 held lock)"):
        assert hostvalues.LOCK_COMMAND.matches(command), command


@pytest.mark.parametrize("value", FORGED)
@pytest.mark.parametrize("name", QUOTE_FREE)
def test_no_rule_accepts_a_forged_value(name, value):
    assert not RULES[name].matches(value)


@pytest.mark.parametrize("value", [v for v in FORGED if v not in ("v1 ", "v1>x")])
def test_the_display_only_lock_command_still_refuses_substitution_quotes_and_separators(value):
    assert not hostvalues.LOCK_COMMAND.matches(value)


@pytest.mark.parametrize(("name", "value"), [
    ("IMAGE_ID", "sha256:" + "AB" * 32), ("IMAGE_ID", "sha256:" + "a" * 63), ("IMAGE_ID", "md5:" + "a" * 64),
    ("IMAGE_REF", "ingest"), ("IMAGE_REF", "Ingest:v1"), ("IMAGE_REF", "ingest:.v1"), ("IMAGE_REF", "ingest:v1@x"),
    ("IMAGE_REF", "a:" + "b" * 300), ("RELEASE", ".v1"), ("RELEASE", "v" * 129), ("CONFIG_VERSION", "0123456789AB"),
    ("CONFIG_VERSION", "c1"), ("SLOT", "blue "), ("SLOT", "red"), ("SCHEMA_HEAD", "0002-x"), ("RUN_ID", "e001"),
    ("WHO", "ana"), ("WHO", "DOMAIN\\ana@laptop"), ("HOST_NAME", ".app2"), ("RESTORE_POINT", "/tmp/x.dump"),
    ("RESTORE_POINT", f"{hostlayout.BASE}/backups/../../etc/x.dump"), ("ENV_NAME", "Local"), ("LOCK_TOKEN", "ab-1"),
])
def test_near_misses_are_rejected(name, value):
    assert not RULES[name].matches(value)


@given(st.text(alphabet=st.sampled_from("abAB09._-:/@+=,%" + SHELL_SENSITIVE), max_size=40))
def test_an_accepted_value_never_needs_shell_quoting(text):
    for name, rule in QUOTE_FREE.items():
        if rule.matches(text):
            assert shlex.quote(text) == text, name


@pytest.mark.parametrize("name", sorted(set(QUOTE_FREE) - {"IMAGE_REF"}))
@given(data=st.data())
def test_generated_values_of_each_shape_are_accepted_and_quote_free(name, data):
    rule = QUOTE_FREE[name]
    value = data.draw(st.from_regex(rule.pattern, fullmatch=True))
    assert rule.matches(value) and shlex.quote(value) == value
    assert not rule.matches(value + data.draw(st.sampled_from(SHELL_SENSITIVE)))


_component = st.from_regex(re.compile(r"[a-z0-9]{1,8}(?:[._-][a-z0-9]{1,8}){0,2}"), fullmatch=True)
_tag = st.from_regex(re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}"), fullmatch=True)


@given(st.builds(
    lambda registry, path, tag, digest: f"{registry}{'/'.join(path)}{tag}{digest}",
    st.sampled_from(["", "registry.example:5000/", "localhost/"]), st.lists(_component, min_size=1, max_size=3),
    _tag.map(lambda t: ":" + t), st.sampled_from(["", "@sha256:" + "0" * 64]),
))
def test_image_references_of_the_docker_grammar_are_accepted_and_quote_free(reference):
    assert hostvalues.IMAGE_REF.matches(reference) and shlex.quote(reference) == reference


@given(st.text(alphabet=st.characters(codec="ascii"), max_size=140)
       | st.from_regex(hostvalues.RELEASE.pattern, fullmatch=True))
def test_release_is_exactly_a_valid_image_tag(text):
    assert hostvalues.RELEASE.matches(text) == images.valid_tag(text)


def test_image_ref_check_is_fast_on_adversarial_input():
    started = time.perf_counter()
    for text in ("a." * 127 + "!", "a-" * 127 + "!", ("a" * 61 + ".") * 4 + "!", "a/" * 127 + "!", "a__" * 84 + "!"):
        assert not hostvalues.IMAGE_REF.matches(text)
    assert time.perf_counter() - started < 1.0


def test_errors_name_the_field_the_shape_and_a_truncated_escaped_value():
    with pytest.raises(HostValueError) as err:
        hostvalues.IMAGE_ID.check("sha256:x$(touch /tmp/pwned)[/x]" + "y" * 5000, "image_id")
    text = str(err.value)
    assert text.startswith("image_id: expected an image ID sha256:<64 lower-case hex>, found 'sha256:x$(touch ")
    assert text.endswith("... (5031 characters)") and len(text) < 200
    assert "[" not in text.split("found", 1)[1], "square brackets would be rich markup in human output"
    assert err.value.field == "image_id" and isinstance(err.value, ConfigError)
    assert hostvalues.shown("a\nb") == "'a\\nb'"
    assert hostvalues.shown(["x"] * 100).startswith("list \\x5b'x', ")
    with pytest.raises(HostValueError, match=r"^pid: expected a process id from 1 to 4194304, found bool True$"):
        hostvalues.check_pid(True, "pid")
    assert hostvalues.check_pid(4242, "pid") == 4242


# --- state.json (the IngestState fact) ---------------------------------------------------------------------

def release_fields(release: str, image_id: str, config: str) -> dict:
    return {"release": release, "image": images.image_name(release), "image_id": image_id, "config_version": config,
            "schema_head": "0002"}


# As operations.release.release_live writes it: v2 live in green, v1 warm in blue.
STATE = {
    **release_fields("v2", IMG2, CFG2), "slot": "green",
    "slots": {"blue": hostlayout.slot_env("blue", "ingest:v1", "v1", CFG1),
              "green": hostlayout.slot_env("green", "ingest:v2", "v2", CFG2)},
    "previous": release_fields("v1", IMG1, CFG1),
    "standby": {**release_fields("v1", IMG1, CFG1), "slot": "blue"},
}


def strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *strings(v)]]
    return []


def test_a_genuine_state_json_is_read_unchanged():
    assert IngestState().process([json.dumps(STATE, indent=2)]) == STATE
    assert IngestState().process(["", "  "]) is None
    with pytest.raises(FactProcessError, match="expected JSON"):
        IngestState().process(["{broken"])


@pytest.mark.parametrize("path", [
    "release", "image", "image_id", "config_version", "schema_head", "slot", "previous.image_id", "standby.release",
    "standby.slot", "slots.blue.API_BLUE_IMAGE", "slots.green.API_GREEN_CONFIG",
])
@pytest.mark.parametrize("payload", ["x$(touch /tmp/pwned)", "`id`", "v1;id", "v1\nid", "x" * 5000])
def test_a_forged_state_value_is_not_usable_and_is_named(path, payload):
    forged = json.loads(json.dumps(STATE))
    *parents, key = path.split(".")
    holder = forged
    for parent in parents:
        holder = holder[parent]
    holder[key] = payload

    state = IngestState().process([json.dumps(forged)])

    rejected = state.pop(REJECTED)
    assert list(rejected) == [path]
    assert rejected[path].startswith(f"{hostlayout.STATE_FILE} field {path}: expected ")
    assert len(rejected[path]) < 300
    assert all(shlex.quote(s) == s for s in strings(state)), "nothing left needs quoting"
    assert payload not in strings(state)
    holder = state
    for parent in parents:
        holder = holder[parent]
    if parents and parents[0] == "slots":
        assert key not in holder  # compose then falls back to `none`: the slot cannot start a forged image
    else:
        assert holder[key] is None
    # Everything else is as it was: a rollback still knows what the host runs.
    expected = json.loads(json.dumps(STATE))
    holder = expected
    for parent in parents:
        holder = holder[parent]
    if parents and parents[0] == "slots":
        del holder[key]
    else:
        holder[key] = None
    assert state == expected


def test_a_state_json_of_the_wrong_shape_keeps_only_what_ingestctl_writes():
    state = checked_state({**STATE, "standby": "blue", "slots": {"blue": "x", "red": {"API_RED_IMAGE": "x"}},
                           "evil": "$(id)", "release": 7})
    assert state["standby"] is None and state["release"] is None and "evil" not in state
    assert state["slots"] == {}
    assert sorted(state[REJECTED]) == ["release", "standby"]
    assert state[REJECTED]["release"] == f"{hostlayout.STATE_FILE} field release: expected a release version " \
        "(a Docker tag: letters, digits, '_', '.', '-', not starting with '.' or '-', at most 128), found int 7"


# --- other facts -------------------------------------------------------------------------------------------

def test_schema_head_fact_refuses_a_forged_head_clearly():
    assert SchemaHead().process(["", " 0002 "]) == "0002"
    assert SchemaHead().process([]) is None
    with pytest.raises(HostValueError) as err:
        SchemaHead().process(["0002'; DROP TABLE events; --"])
    assert str(err.value).startswith("db host: alembic_version.version_num: expected an alembic revision id")


def test_config_versions_fact_lists_only_config_versions():
    assert ConfigVersions().process([CFG2, "$(touch /tmp/pwned)", CFG1 + ";id", CFG1, "none"]) == [CFG1, CFG2]


def test_docker_image_fact_never_echoes_a_forged_answer_whole():
    with pytest.raises(FactProcessError) as err:
        DockerImage().process(["sha256:x$(id)" + "a" * 5000])
    assert len(str(err.value)) < 200


# --- the merged ledger, with warnings ----------------------------------------------------------------------

class Recorder:
    """A Reporter that keeps its events."""

    json_mode = True

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []

    def event(self, type_: str, message: str = "", **fields) -> None:
        self.events.append((type_, message, fields))

    def table(self, title: str, columns: list[str], rows: list[list]) -> None:
        self.events.append(("table", title, {"rows": rows}))

    def warnings(self) -> list[tuple[str, dict]]:
        return [(message, fields) for type_, message, fields in self.events if type_ == "warning"]


def ledger_line(n: int, release: str, **more) -> str:
    started = datetime(2024, 5, 1, 12, n, tzinfo=UTC)
    entry = ledger.LedgerEntry(id=f"20240501T12{n:02d}00Z-abc{n:03d}", kind="deploy", env="local", release=release,
                               image_id=IMG1 if release == "v1" else IMG2, config_version=CFG1, who="ana@laptop",
                               started=started, finished=started, outcome="success", hosts=["app2", "app3"], **more)
    return ledger.serialise(entry, {})


def forged_ledger_line(n: int) -> str:
    record = json.loads(ledger_line(n, "v9"))
    record.update(outcome="failed", image_id="sha256:x$(touch /tmp/pwned-ledger)")
    return json.dumps(record)


@pytest.fixture
def three_hosts(monkeypatch):
    """db1 and app2 hold the genuine ledger; app3 also holds a forged line (its line 3)."""
    genuine = [ledger_line(1, "v1"), ledger_line(2, "v2")]
    copies = {"db1": genuine, "app2": genuine, "app3": [*genuine, forged_ledger_line(3), "{torn"]}
    commands: list[str] = []

    def run_commands(env, command_for, hosts=None):
        assert env == "local" and callable(command_for)
        result = {}
        for host in hosts:
            commands.append(command_for(host))
            result[host] = fleet.CommandResult(host, True, "\n".join(copies[host]), "")
        return result

    monkeypatch.setattr(fleetview.inventory, "load", lambda _env: SimpleNamespace(all_hosts=list(copies)))
    monkeypatch.setattr(fleet.SshFleet, "run_commands",
                        lambda self, command_for, hosts=None: run_commands(self.env, command_for, hosts))
    return commands


def test_read_ledger_warns_of_forged_lines_naming_host_and_line(three_hosts):
    reporter = Recorder()
    entries = fleetview.read_ledger("local", reporter)
    assert [e.release for e in entries] == ["v1", "v2"]
    assert three_hosts == [ledger.read_command()] * 3, "reading is the only command: nothing is written back"
    warnings = reporter.warnings()
    assert [(fields["host"], fields["line"]) for _message, fields in warnings] == [("app3", 3), ("app3", 4)]
    assert warnings[0][0] == (
        f"warning: app3:{ledger.LEDGER_PATH} line 3: rejected (image_id: expected an image ID sha256:<64 lower-case "
        "hex>, found 'sha256:x$(touch /tmp/pwned-ledger)'), ignored")
    assert fleetview.read_ledger("local") == entries  # callers without a reporter get the same, checked entries


def test_show_history_prints_the_warnings_before_the_table(three_hosts):
    reporter = Recorder()
    fleetview.show_history("local", reporter)
    kinds = [type_ for type_, _message, _fields in reporter.events]
    assert kinds == ["warning", "warning", "table"]
    assert [row[2] for row in reporter.events[-1][2]["rows"]] == ["v2", "v1"]


def test_status_shows_the_fleet_and_warns_of_each_forged_value(monkeypatch):
    forged_lock = json.loads(lock.new_record(who="ana@laptop", command="deploy local", release="v2",
                                             now=datetime.now(UTC)).to_json()) | {"who": "ana@laptop`id`"}
    spec = {name: SimpleNamespace(roles=roles, ssh_hostname=name)
            for name, roles in (("db1", ["db"]), ("app2", ["app"]), ("app3", ["app"]))}
    env = SimpleNamespace(all_hosts=list(spec), db_host="db1", hosts=spec, data=SimpleNamespace(app_port=8000))
    states = {"db1": checked_state(STATE), "app2": checked_state(STATE),
              "app3": checked_state({**STATE, "image_id": "sha256:x$(id)"})}

    held = f"ingest-lock: held\n{json.dumps(forged_lock)}"
    fake_fleet(monkeypatch, env, {
        name: FakeHost(states[name], "0002$(id)" if name == "db1" else None,
                       held if name == "app2" else "ingest-lock: free") for name in spec})
    reporter = Recorder()
    rows = fleetview.show_status("local", reporter)
    assert [(r["host"], r["release"], r["image"], r["schema"], r["lock"]) for r in rows] == [
        ("db1", "v2", IMG2, None, "free"), ("app2", "v2", IMG2, None, "held by ?"), ("app3", "v2", None, None, "free")]
    warnings = [(fields["host"], message) for message, fields in reporter.warnings()]
    assert [host for host, _message in warnings] == ["db1", "app2", "app3"]
    assert warnings[0][1].startswith("warning: db1: db host: alembic_version.version_num: expected an alembic")
    assert warnings[1][1].startswith("warning: app2: lock record rejected (who: expected user@machine")
    assert warnings[2][1].startswith(f"warning: app3: {hostlayout.STATE_FILE} field image_id: expected an image ID")


class FakeHost:
    """A connected host as fleetview sees it: facts and one lock command's output."""

    def __init__(self, state, head_output, lock_output):
        self.state, self.head_output, self.lock_output = state, head_output, lock_output

    def get_fact(self, fact_cls, **_kwargs):
        # Facts read together come back as nothing here: each is then read on its own, as after a failed part.
        if fact_cls is SchemaHead:
            return SchemaHead().process([self.head_output] if self.head_output else [])
        if fact_cls is DeployLockLines:
            return self.lock_output.splitlines()
        return self.state if fact_cls is IngestState else None


def fake_fleet(monkeypatch, env, hosts):
    from contextlib import contextmanager

    @contextmanager
    def connected(env_name, wanted=None, require_all=True):
        yield hosts

    monkeypatch.setattr(fleetview.inventory, "load", lambda _env: env)
    monkeypatch.setattr(fleet, "connected", connected)
    monkeypatch.setattr(fleetview, "readiness", lambda _url: "ready")


def test_status_shows_an_unreachable_host_as_such_and_the_rest_as_usual(monkeypatch):
    spec = {name: SimpleNamespace(roles=roles, ssh_hostname=name)
            for name, roles in (("db1", ["db"]), ("app2", ["app"]), ("app3", ["app"]))}
    env = SimpleNamespace(all_hosts=list(spec), db_host="db1", hosts=spec, data=SimpleNamespace(app_port=8000))
    fake_fleet(monkeypatch, env, {name: FakeHost(checked_state(STATE), "0002" if name == "db1" else None,
                                                 "ingest-lock: free") for name in ("db1", "app2")})
    rows = fleetview.show_status("local", Recorder())
    assert [(r["host"], r["release"], r["lock"]) for r in rows] == [
        ("db1", "v2", "free"), ("app2", "v2", "free"), ("app3", "unreachable", "unknown")]
    assert rows[0]["schema"] == "0002" and rows[2]["health"] == "ready"


# --- rollbacks: only checked values, always quoted -----------------------------------------------------------

def rollback_ctx(reporter: Recorder | None = None, io: SimpleNamespace | None = None) -> SimpleNamespace:
    env = SimpleNamespace(db_host="db1", app_hosts=["app2", "app3"], all_hosts=["db1", "app2", "app3"])
    return SimpleNamespace(name="local", env=env, reporter=reporter or Recorder(), io=io)


def test_live_release_leaves_out_a_host_with_a_forged_state_and_warns():
    reporter = Recorder()
    forged = checked_state({**STATE, "image_id": "sha256:x$(id)"})
    host, current = rollbacks.live_release(rollback_ctx(reporter), {"app2": checked_state(STATE), "app3": forged})
    assert host == "app2" and current["release"] == "v2" and current["image_id"] == IMG2
    [(message, fields)] = reporter.warnings()
    assert fields == {"host": "app3"}
    assert message.startswith(f"warning: app3: {hostlayout.STATE_FILE} field image_id: expected an image ID")
    with pytest.raises(ConfigError, match=r"no app host's state.json can be trusted \(app2, app3"):
        rollbacks.live_release(rollback_ctx(), {"app2": forged, "app3": forged})


def test_downgrade_image_quotes_every_image_it_asks_about(monkeypatch, tmp_path):
    commands: list[str] = []

    def run_commands(command_for, hosts=None):
        [(host, command)] = command_for.items()
        commands.append(command)
        return {host: fleet.CommandResult(host, False, "", "")}

    pwned = tmp_path / "pwned"
    # A state that bypassed the fact's check: the command still cannot run what it carries.
    raw = {**STATE, "image": f"ingest:v2$(touch {pwned})"}
    entries = ledger.parse(ledger_line(1, "v1", release_schema_head="0002") + "\n").entries
    with pytest.raises(ConfigError, match="no image that knows schema head '0002' is on db1"):
        rollbacks.downgrade_image(rollback_ctx(io=SimpleNamespace(run_commands=run_commands)), entries, {"app2": raw, "app3": checked_state(STATE)}, "0002")
    assert commands == [f"docker image inspect {shlex.quote(image)} >/dev/null 2>&1"
                        for image in (raw["image"], "ingest:v2", "ingest:v1")]
    fake_docker = tmp_path / "bin" / "docker"
    fake_docker.parent.mkdir()
    fake_docker.write_text("#!/bin/sh\nexit 1\n")
    fake_docker.chmod(0o755)
    for command in commands:
        subprocess.run(["sh", "-c", command], env={"PATH": f"{fake_docker.parent}:/usr/bin:/bin"}, check=False)
    assert not pwned.exists()


def test_read_live_config_refuses_a_version_that_is_not_one(monkeypatch):
    monkeypatch.setattr(fleet, "run_commands", lambda *a, **k: pytest.fail("no command may run"))
    with pytest.raises(HostValueError, match=r"^app2: config version: expected a config version"):
        rollbacks.read_live_config(rollback_ctx(), "app2", "0123456789ab; touch /tmp/pwned")
