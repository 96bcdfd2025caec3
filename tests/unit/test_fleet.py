"""fleet.on_every_host: every host's call runs, results come back in the hosts' order, a failure is raised.
fleet.connected: which hosts a best-effort step tries."""

from __future__ import annotations

import gevent
import pytest
from ingestctl import fleet, sshpool
from ingestctl import pyinfra_runner as runner
from ingestctl.errors import HostError
from pyinfra.api import Inventory
from pyinfra.api.exceptions import ConnectError
from pyinfra.connectors.ssh import SSHConnector


def test_results_keep_the_hosts_order_whatever_finishes_first():
    delays = {"db1": 0.03, "app2": 0.0, "app3": 0.01}

    def call(name, delay):
        gevent.sleep(delay)
        return f"{name} done"

    assert list(fleet.on_every_host(delays, call).items()) == [
        ("db1", "db1 done"), ("app2", "app2 done"), ("app3", "app3 done")]


def test_hosts_run_at_once_not_one_after_another():
    events: list[tuple[str, str]] = []

    def call(name, _host):
        events.append(("start", name))
        gevent.sleep(0.01)  # cooperative I/O, as an SSH round trip is under the console script
        events.append(("end", name))

    fleet.on_every_host({"db1": None, "app2": None, "app3": None}, call)
    # One after another would give start, end, start, end...: at once, every host starts before any ends.
    assert [kind for kind, _name in events] == ["start"] * 3 + ["end"] * 3


def test_a_failing_host_is_raised():
    def call(name, _host):
        if name == "app2":
            raise RuntimeError("app2 unreachable")
        return name

    with pytest.raises(RuntimeError, match="app2 unreachable"):
        fleet.on_every_host({"db1": None, "app2": None}, call)


def test_no_hosts_is_an_empty_result():
    assert fleet.on_every_host({}, lambda _name, _host: None) == {}


@pytest.fixture
def three_hosts(monkeypatch) -> list[str]:
    """An inventory of db1, app2, app3 on the pooled connector, where connecting to app3 fails; the names of the
    hosts each connect was tried on, in order."""
    tried: list[str] = []

    def inventory(_env):
        built = Inventory((["db1", "app2", "app3"], {}))
        sshpool.pool_connections(built)
        return built

    def connect(self) -> None:
        tried.append(self.host.name)
        if self.host.name == "app3":
            raise ConnectError("app3: timed out")
        self.client = None

    monkeypatch.setattr(runner, "load_inventory", inventory)
    monkeypatch.setattr(SSHConnector, "_connect", connect)
    monkeypatch.setattr(sshpool, "no_delay", lambda client: None)
    monkeypatch.setattr(sshpool.PooledSSHConnector, "_pool", {})
    monkeypatch.setattr(sshpool.PooledSSHConnector, "_unreachable", {})
    return tried


def test_a_best_effort_step_leaves_out_at_once_a_host_the_run_could_not_reach(three_hosts):
    with pytest.raises(HostError, match="app3"), fleet.connected("sandbox"):
        pass
    three_hosts.clear()
    with fleet.connected("sandbox", require_all=False) as active:
        assert list(active) == ["db1", "app2"]
    assert "app3" not in three_hosts


def test_a_step_that_needs_every_host_tries_an_unreachable_one_again(three_hosts):
    with fleet.connected("sandbox", require_all=False):
        pass
    three_hosts.clear()
    with pytest.raises(HostError, match="app3"), fleet.connected("sandbox"):
        pass
    assert "app3" in three_hosts
