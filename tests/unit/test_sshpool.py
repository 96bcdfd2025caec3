"""sshpool: which hosts use the pooled connector, what is remembered per connection, and when a kept connection
is lent again. The real connections are counted by sshd in tests/e2e/test_rollbacks.py."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from ingestctl import sshpool
from ingestctl.sshpool import PooledSSHConnector
from pyinfra.api import Inventory
from pyinfra.connectors.local import LocalConnector
from pyinfra.connectors.ssh import SSHConnector


@pytest.fixture(autouse=True)
def empty_pool():
    sshpool.close_all()
    yield
    sshpool.close_all()


def test_ssh_hosts_use_the_pooled_connector_and_others_keep_theirs() -> None:
    inventory = Inventory((["app2", "@local"], {}))
    sshpool.pool_connections(inventory)
    connectors = {host.name: host.connector_cls for host in inventory}
    assert connectors == {"app2": PooledSSHConnector, "@local": LocalConnector}


class FakeTransport:
    def __init__(self, active: bool = True, opens: bool = True):
        self.active, self.opens, self.opened = active, opens, 0

    def is_active(self) -> bool:
        return self.active

    def open_session(self, timeout: float):
        self.opened += 1
        self.timeout = timeout
        if not self.opens:
            raise TimeoutError(f"no channel within {timeout}s")
        return SimpleNamespace(close=lambda: None)


class FakeClient:
    def __init__(self, transport: FakeTransport | None):
        self.transport, self.closed = transport, False

    def get_transport(self):
        return self.transport

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fresh(monkeypatch) -> list[FakeClient]:
    """The connections made afresh (recorded, not made) by every PooledSSHConnector of the test."""
    made: list[FakeClient] = []

    def connect(self) -> None:
        self.client = FakeClient(FakeTransport())
        made.append(self.client)

    monkeypatch.setattr(SSHConnector, "_connect", connect)
    monkeypatch.setattr(sshpool, "no_delay", lambda client: None)
    return made


def pooled(hostname: str = "10.0.0.2") -> PooledSSHConnector:
    connector = PooledSSHConnector.__new__(PooledSSHConnector)
    connector.host = SimpleNamespace(name="app2")
    connector.state = SimpleNamespace(config=SimpleNamespace(CONNECT_TIMEOUT=10))
    connector.data = {"ssh_hostname": hostname, "ssh_port": 22, "ssh_user": "root", "ssh_key": "/k",
                      "ssh_known_hosts_file": None, "ssh_strict_host_key_checking": "accept-new",
                      "ssh_config_file": None}
    return connector


def test_a_second_connect_to_the_same_host_reuses_the_connection_once_it_answers(fresh) -> None:
    first = pooled()
    first._connect()
    second = pooled()
    second._connect()
    assert len(fresh) == 1 and second.client is first.client
    assert first.client.transport.opened == 1  # checked with one channel before it was lent


def test_a_kept_connection_that_does_not_answer_is_closed_and_replaced(fresh) -> None:
    first = pooled()
    first._connect()
    assert first.remember("compose", lambda: "docker compose") == "docker compose"
    first.client.transport.opens = False  # a paused host: the TCP connection is up, sshd does not answer
    second = pooled()
    second._connect()
    assert len(fresh) == 2 and second.client is fresh[1]
    assert fresh[0].closed
    assert second.remember("compose", lambda: "docker-compose") == "docker-compose"  # read again over the new one


def test_a_kept_connection_is_given_seconds_to_answer_not_the_whole_connect_timeout(fresh) -> None:
    first = pooled()
    first._connect()
    second = pooled()
    second._connect()
    assert first.client.transport.timeout == sshpool.PROBE_TIMEOUT_S < first.state.config.CONNECT_TIMEOUT


def test_a_failed_fresh_connect_marks_the_host_unreachable_until_one_succeeds(monkeypatch) -> None:
    outcomes = [ConnectionRefusedError("no sshd"), None]

    def connect(self) -> None:
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome
        self.client = FakeClient(FakeTransport())

    monkeypatch.setattr(SSHConnector, "_connect", connect)
    monkeypatch.setattr(sshpool, "no_delay", lambda client: None)
    failing, other = pooled("10.0.0.2"), pooled("10.0.0.3")
    with pytest.raises(ConnectionRefusedError):
        failing._connect()
    assert sshpool.found_unreachable(SimpleNamespace(connector=pooled("10.0.0.2")))
    assert not sshpool.found_unreachable(SimpleNamespace(connector=other))
    pooled("10.0.0.2")._connect()
    assert not sshpool.found_unreachable(SimpleNamespace(connector=failing))


def test_connects_that_waited_on_a_failed_one_share_its_failure_and_later_ones_try_afresh(monkeypatch) -> None:
    tried: list[float] = []
    started = threading.Event()

    def connect(self) -> None:
        tried.append(time.monotonic())
        started.set()
        time.sleep(0.2)  # a host that does not answer: the connect timeout, shortened
        raise TimeoutError("app2: no SSH banner")

    monkeypatch.setattr(SSHConnector, "_connect", connect)
    errors: list[BaseException] = []

    def attempt() -> None:
        try:
            pooled()._connect()
        except TimeoutError as exc:
            errors.append(exc)

    first = threading.Thread(target=attempt)
    first.start()
    started.wait(5)
    waiting = threading.Thread(target=attempt)  # asks while the first is still connecting
    waiting.start()
    first.join(5)
    waiting.join(5)
    assert len(tried) == 1 and len(errors) == 2
    attempt()  # asked after that failure: a retry tries the host again
    assert len(tried) == 2


def test_hosts_outside_the_pool_are_never_found_unreachable() -> None:
    assert not sshpool.found_unreachable(SimpleNamespace(connector=object()))


def test_another_host_gets_its_own_connection(fresh) -> None:
    first = pooled("10.0.0.2")
    first._connect()
    other = pooled("10.0.0.3")
    other._connect()
    assert len(fresh) == 2 and other.client is not first.client


def test_a_failed_command_evicts_the_connection_and_what_was_remembered(fresh, monkeypatch) -> None:
    connector = pooled()
    connector._connect()
    assert connector.remember("compose", lambda: "docker compose") == "docker compose"

    def broken(self, *args, **kwargs):
        raise EOFError("transport closed")

    monkeypatch.setattr(SSHConnector, "run_shell_command", broken)
    with pytest.raises(EOFError):
        connector.run_shell_command("true")
    again = pooled()
    again._connect()
    assert len(fresh) == 2
    assert again.remember("compose", lambda: "docker-compose") == "docker-compose"


def test_remembered_reads_once_per_connection_and_never_keeps_none(fresh) -> None:
    connector = pooled()
    connector._connect()
    reads: list[str] = []

    def read(value):
        def inner():
            reads.append(value)
            return value
        return inner

    host = SimpleNamespace(connector=connector)
    assert sshpool.remembered(host, "binary", read(None)) is None
    assert sshpool.remembered(host, "binary", read("docker compose")) == "docker compose"
    assert sshpool.remembered(host, "binary", read("docker-compose")) == "docker compose"
    assert reads == [None, "docker compose"]


def test_hosts_outside_the_pool_are_read_every_time() -> None:
    reads = []
    host = SimpleNamespace(connector=object())
    for _ in range(2):
        sshpool.remembered(host, "binary", lambda: reads.append(1) or "docker compose")
    assert len(reads) == 2
