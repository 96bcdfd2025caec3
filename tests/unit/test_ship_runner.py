"""The pyinfra runner, run for real against pyinfra's `@local` connector (commands run on this machine).

SSH hosts are covered by tests/e2e/test_ship.py; here the runner's own logic is exercised: results per host,
changed vs noop, errors naming host and operation, host subsets, repeated runs in one process.
"""

from __future__ import annotations

import pytest
from ingestctl import pyinfra_runner as runner
from ingestctl.errors import ConfigError, HostError
from pyinfra import host
from pyinfra.api import FactBase, deploy, operation
from pyinfra.api.exceptions import FactProcessError
from pyinfra.operations import server


@operation()
def marker_present(path: str):
    """Create PATH unless it exists; a noop with a reason otherwise (facts-free on purpose: reads via test)."""
    from pyinfra.facts.files import File

    if host.get_fact(File, path=path):
        host.noop(f"{path} already exists")
        return
    yield f"touch {path}"


@pytest.fixture()
def local_env(tmp_path, monkeypatch):
    root = tmp_path / "checkout"
    (root / "inventories").mkdir(parents=True)
    (root / "service").mkdir()
    (root / "inventories" / "unit.py").write_text('local = ["@local"]\n')
    monkeypatch.setenv("INGESTCTL_ROOT", str(root))
    return root


def test_changed_then_noop_across_two_runs_in_one_process(local_env, tmp_path):
    target = tmp_path / "marker"
    call = runner.OperationCall(marker_present, kwargs={"path": str(target), "name": "Ensure marker exists"})

    first = runner.run_operations("unit", [call])
    assert target.exists()
    assert first.hosts["@local"].success and first.hosts["@local"].changed
    assert first.hosts["@local"].operations[0].name == "Ensure marker exists"
    assert first.changed_hosts == ["@local"]

    second = runner.run_operations("unit", [call])
    result = second.hosts["@local"]
    assert result.success and not result.changed
    assert result.noops == (f"{target} already exists",)
    assert second.changed_hosts == []


def test_failure_names_host_operation_and_stderr(local_env, tmp_path):
    calls = [
        runner.OperationCall(
            server.shell, kwargs={"commands": ["echo broken-step >&2; exit 3"], "name": "Break on purpose"}
        ),
        runner.OperationCall(
            server.shell, kwargs={"commands": [f"touch {tmp_path / 'after'}"], "name": "After"}
        ),
    ]
    with pytest.raises(HostError, match=r"host @local: operation 'Break on purpose' failed: broken-step"):
        runner.run_operations("unit", calls)
    assert not (tmp_path / "after").exists(), "operations after a failure must not run on that host"

    result = runner.run_operations("unit", calls, raise_on_error=False)
    local = result.hosts["@local"]
    assert not local.success
    assert [op.success for op in local.operations] == [False, False]
    assert local.operations[1].error == "not run: host failed earlier"
    assert [r.host for r in result.failed] == ["@local"]


def test_run_deploy_with_data_override(local_env, tmp_path):
    from pyinfra.api import deploy

    @deploy("Write data")
    def write_data():
        server.shell(name="Write the data value", commands=[f"echo {host.data.word} > {tmp_path / 'word'}"])

    result = runner.run_deploy("unit", write_data, data={"word": "hello"})
    assert (tmp_path / "word").read_text() == "hello\n"
    assert result.hosts["@local"].operations[0].name == "Write data | Write the data value"


def test_host_subset_and_unknown_hosts(local_env, tmp_path):
    (local_env / "inventories" / "multi.py").write_text(
        'db = [("@local", {"roles": ["db"]})]\napp = ["@local"]\n'
    )
    call = runner.OperationCall(server.shell, kwargs={"commands": ["true"]})
    result = runner.run_operations("multi", [call], hosts=["@local"])
    assert list(result.hosts) == ["@local"]
    inventory = runner.load_inventory("multi")
    assert {"db", "app", "multi"} <= set(inventory.get_host("@local").groups)
    with pytest.raises(ConfigError, match="hosts app9 are not in the inventory; it has @local"):
        runner.run_operations("multi", [call], hosts=["app9"])
    with pytest.raises(ConfigError, match="empty host subset"):
        runner.run_operations("multi", [call], hosts=[])


def test_missing_and_broken_inventories_are_config_errors(local_env):
    with pytest.raises(
        ConfigError, match=r"inventory for environment 'nowhere' not found .*expected one of: unit"
    ):
        runner.load_inventory("nowhere")
    (local_env / "inventories" / "broken.py").write_text("raise RuntimeError('bad inventory data')\n")
    with pytest.raises(ConfigError, match="broken.py failed to load: RuntimeError: bad inventory data"):
        runner.load_inventory("broken")
    (local_env / "inventories" / "empty.py").write_text("NAME = 'x'\n")
    with pytest.raises(ConfigError, match="defines no hosts"):
        runner.load_inventory("empty")


def test_unreachable_ssh_host_is_reported_not_raised(local_env):
    # Port 9 on loopback: nothing listens there, so the connection is refused at once (no traffic leaves).
    (local_env / "inventories" / "down.py").write_text(
        'app = [("127.0.0.1", {"ssh_port": 9, "ssh_user": "nobody"})]\n'
    )
    call = runner.OperationCall(server.shell, kwargs={"commands": ["true"]})
    result = runner.run_operations("down", [call], raise_on_error=False)
    host_result = result.hosts["127.0.0.1"]
    assert not host_result.success and host_result.error
    with pytest.raises(HostError, match="host 127.0.0.1: "):
        result.raise_for_failures()


@operation()
def counted(counter: str, then_raise: str | None = None):
    """Appends a line to COUNTER each time pyinfra evaluates it (reads it), then optionally raises THEN_RAISE."""
    from pyinfra.facts.server import Command

    host.get_fact(Command, command=f"echo read >> {counter}")
    if then_raise == "config":
        raise ConfigError("inventory value x: expected a number, found 'y'")
    if then_raise == "bug":
        raise KeyError("slot")
    yield f"echo ran >> {counter}"


def test_a_single_operation_is_evaluated_once_as_pyinfra_y_does(local_env, tmp_path):
    counter = tmp_path / "counter"
    result = runner.run_operations("unit", [runner.OperationCall(counted, kwargs={"counter": str(counter)})])
    assert result.hosts["@local"].success
    assert counter.read_text().split() == ["read", "ran"]


def test_several_operations_are_each_evaluated_before_any_runs(local_env, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    calls = [runner.OperationCall(counted, kwargs={"counter": str(first)}),
             runner.OperationCall(counted, kwargs={"counter": str(second), "then_raise": "config"})]
    with pytest.raises(ConfigError, match="inventory value x"):
        runner.run_operations("unit", calls)
    assert first.read_text().split() == ["read"], "the first operation must not run when the second cannot"


@pytest.mark.parametrize("kind, message", [
    ("config", "host @local: inventory value x: expected a number, found 'y'"),
    ("bug", "host @local: evaluating the operation failed: KeyError: 'slot'"),
])
def test_an_error_while_a_single_operation_runs_fails_its_host_naming_it(local_env, tmp_path, kind, message):
    counter = tmp_path / "counter"
    call = runner.OperationCall(counted, kwargs={"counter": str(counter), "then_raise": kind})
    result = runner.run_operations("unit", [call], raise_on_error=False)
    local = result.hosts["@local"]
    assert not local.success and local.reached
    assert local.describe_failure() == message
    assert counter.read_text().split() == ["read"]


class Unreadable(FactBase):
    """A host value not in the shape ingestctl writes (a forged state.json, say)."""

    def command(self) -> str:
        return "echo '{not json'"

    def process(self, output):
        raise FactProcessError("state.json: expected JSON, found unparsable text")


@operation()
def decided_from_a_fact(counter: str):
    state = host.get_fact(Unreadable)  # pyinfra reports the error, fails the host and returns None
    yield f"echo decided-from-{state} >> {counter}"


def test_a_fact_that_fails_while_a_single_operation_runs_stops_it_before_its_commands(local_env, tmp_path):
    counter = tmp_path / "counter"
    result = runner.run_operations("unit", [runner.OperationCall(decided_from_a_fact,
                                                                 kwargs={"counter": str(counter)})],
                                   raise_on_error=False)
    local = result.hosts["@local"]
    assert not local.success
    assert "state.json: expected JSON" in local.describe_failure()
    assert not counter.exists(), "a command decided from a failed fact's default ran"


@deploy("Count once")
def one_counted_operation(counter: str):
    counted(counter=counter)


def test_a_deploy_of_one_operation_per_host_is_evaluated_once_too(local_env, tmp_path):
    counter = tmp_path / "counter"
    result = runner.run_deploy("unit", one_counted_operation, counter=str(counter))
    assert result.hosts["@local"].success
    assert counter.read_text().split() == ["read", "ran"]


@operation()
def counted_noop(counter: str):
    """Reads like `counted`, then finds nothing to change."""
    from pyinfra.facts.server import Command

    host.get_fact(Command, command=f"echo read >> {counter}")
    host.noop(f"{counter} already as wanted")
    yield from ()


def test_operations_that_change_nothing_are_read_once_not_again_when_they_run(local_env, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    calls = [runner.OperationCall(counted_noop, kwargs={"counter": str(first)}),
             runner.OperationCall(counted_noop, kwargs={"counter": str(second)})]
    local = runner.run_operations("unit", calls).hosts["@local"]
    assert local.success and not local.changed
    assert (first.read_text().split(), second.read_text().split()) == (["read"], ["read"])
    assert local.noops == (f"{first} already as wanted", f"{second} already as wanted")


def test_an_operation_after_one_that_changes_the_host_is_read_again_when_it_runs(local_env, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    calls = [runner.OperationCall(counted, kwargs={"counter": str(first)}),
             runner.OperationCall(counted_noop, kwargs={"counter": str(second)})]
    assert runner.run_operations("unit", calls).hosts["@local"].success
    assert first.read_text().split() == ["read", "read", "ran"]
    assert second.read_text().split() == ["read", "read"], "decided before the first changed the host, and after"
