"""The inventory's `parallelism`: how many hosts every per-host step works on at once."""

from __future__ import annotations

from types import SimpleNamespace

import gevent
import pytest
from ingestctl import fleet, inventory
from ingestctl import pyinfra_runner as runner
from ingestctl.errors import ConfigError

HOSTS = {"db1": {"ssh_hostname": "10.0.0.1", "roles": ["db", "app"]}}


def hosts(count: int, parallelism: int | None = None) -> dict[str, SimpleNamespace]:
    data = {} if parallelism is None else {"parallelism": parallelism}
    return {f"app{n}": SimpleNamespace(data=data) for n in range(count)}


def test_every_host_at_once_by_default() -> None:
    assert runner.pool_size(hosts(8).values()) == 8


def test_the_inventory_bounds_it() -> None:
    assert runner.pool_size(hosts(8, parallelism=3).values()) == 3
    assert runner.pool_size(hosts(2, parallelism=3).values()) == 2
    assert runner.pool_size([]) == 1


def test_on_every_host_never_runs_more_hosts_at_once_than_allowed() -> None:
    running: list[str] = []
    most = 0

    def step(name: str, _host) -> str:
        nonlocal most
        running.append(name)
        most = max(most, len(running))
        gevent.sleep(0.01)  # an SSH round trip: the other greenlets run here
        running.remove(name)
        return name.upper()

    results = fleet.on_every_host(hosts(7, parallelism=2), step)
    assert most == 2
    assert results == {f"app{n}": f"APP{n}" for n in range(7)}


def test_the_inventory_default_is_what_hosts_without_data_get() -> None:
    env = inventory.environment(name="staging", data={}, hosts=HOSTS, source="inventories/staging.py")
    assert env.data.parallelism == runner.DEFAULT_PARALLELISM


@pytest.mark.parametrize("value", [0, -1, "many"])
def test_a_parallelism_below_one_is_refused_naming_it(value) -> None:
    with pytest.raises(ConfigError) as err:
        inventory.environment(name="staging", data={"parallelism": value}, hosts=HOSTS,
                              source="inventories/staging.py")
    assert "parallelism" in str(err.value)
