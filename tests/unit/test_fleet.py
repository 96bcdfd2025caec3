"""fleet.on_every_host: every host's call runs, results come back in the hosts' order, a failure is raised."""

from __future__ import annotations

import gevent
import pytest
from ingestctl import fleet


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
