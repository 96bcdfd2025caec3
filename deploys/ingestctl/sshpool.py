"""One SSH connection per host for the whole ingestctl process, shared by every pyinfra State it builds.

A run reads facts, takes the lock, switches and writes the ledger through several pyinfra States (one per call,
so runs never share facts or operations). pyinfra's SSH connector makes a new connection for each: a TCP and
SSH handshake and a key exchange per host per step, most of an emergency rollback's time on a LAN. This
connector keeps the first connection and lends it to later States, with Nagle's algorithm off.

A kept connection is lent only after it answers: a channel opened and closed within a few seconds. A host that
stopped answering (paused, cut off) is then connected afresh, and fails as a new connection would, so "could not
reach the host" still means what it meant. A command that fails on the transport evicts it.

A host whose fresh connect failed is remembered as unreachable until a connect to it succeeds. The best-effort
steps at the end of a run (its ledger line, the lock's release, the incident record) then leave it out at once,
as Ansible drops an unreachable host from the rest of a play, instead of each waiting out the connect timeout
again (`fleet.connected(require_all=False)`). Steps that need the host still try it.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from paramiko import SSHClient
from pyinfra.connectors.ssh import SSHConnector

T = TypeVar("T")

# A live sshd opens a channel in milliseconds (under 10 ms on the quiet sandbox). A kept connection that has not
# done so by then is replaced by a fresh connect, which has the whole connect timeout: a slow answer taken
# for none costs one handshake, not a failure, while a paused host no longer costs two full timeouts.
PROBE_TIMEOUT_S = 3.0


def no_delay(client: SSHClient) -> None:
    """TCP_NODELAY on the connection's socket, as OpenSSH sets it. paramiko leaves Nagle on, and an exec's
    small packets then wait on the peer's delayed ACK: measured on the sandbox, 44 ms a command with it, 3 ms
    without."""
    transport = client.get_transport()
    if transport is not None and isinstance(transport.sock, socket.socket):
        transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _answers(client: SSHClient, timeout: float) -> bool:
    transport = client.get_transport()
    if transport is None or not transport.is_active():
        return False
    try:
        transport.open_session(timeout=timeout).close()
    except Exception:  # a timeout, a closed transport, a refused channel: connect afresh
        return False
    return True


class PooledSSHConnector(SSHConnector):
    """pyinfra's SSH connector, reusing this process's live connection to the same host, port, user and key."""

    _pool: ClassVar[dict[tuple, SSHClient]] = {}
    _connecting: ClassVar[dict[tuple, threading.Lock]] = {}
    # What a host's commands cannot change during a run (which Compose it has), read once per connection.
    _remembered: ClassVar[dict[tuple, Any]] = {}
    # Hosts whose last fresh connect in this process failed: when it ended (monotonic) and what it raised.
    _unreachable: ClassVar[dict[tuple, tuple[float, BaseException]]] = {}
    _guard: ClassVar[threading.Lock] = threading.Lock()

    def _pool_key(self) -> tuple:
        data = self.data
        return (data["ssh_hostname"] or self.host.name, data["ssh_port"], data["ssh_user"], data["ssh_key"],
                data["ssh_known_hosts_file"], data["ssh_strict_host_key_checking"], data["ssh_config_file"])

    def _connect(self) -> None:
        key = self._pool_key()
        asked = time.monotonic()
        with self._guard:
            connecting = self._connecting.setdefault(key, threading.Lock())
        # One connect per host at a time: reads made at once (fleet.at_once) then share one connection, or the
        # failure of the connect they waited on (a second try right after it would wait out the timeout again).
        with connecting:
            with self._guard:
                failed_at, failure = self._unreachable.get(key, (None, None))
            if failed_at is not None and failed_at > asked:
                raise failure
            kept = self._pool.get(key)
            if kept is not None and _answers(kept, min(PROBE_TIMEOUT_S, self.state.config.CONNECT_TIMEOUT)):
                self.client = kept
                return
            if kept is not None:
                self._drop(key, kept)  # what was remembered over it goes with it
                kept.close()
            try:
                super()._connect()
            except Exception as exc:
                with self._guard:
                    self._unreachable[key] = (time.monotonic(), exc)
                raise
            no_delay(self.client)
            with self._guard:
                self._pool[key] = self.client
                self._unreachable.pop(key, None)

    def run_shell_command(self, *args: Any, **kwargs: Any):
        try:
            return super().run_shell_command(*args, **kwargs)
        except Exception:
            self.forget()
            raise

    def forget(self) -> None:
        """Drop this host's kept connection and what was remembered over it: the next connect makes a new one."""
        self._drop(self._pool_key(), self.client)

    @classmethod
    def _drop(cls, key: tuple, client: SSHClient | None) -> None:
        """Forget CLIENT as KEY's kept connection, and what was remembered over it; nothing if another replaced it."""
        with cls._guard:
            if cls._pool.get(key) is not client:
                return
            del cls._pool[key]
            for remembered in [k for k in cls._remembered if k[0] == key]:
                del cls._remembered[remembered]

    def remember(self, name: str, read: Callable[[], T]) -> T:
        """READ() once per kept connection; a None result is not kept."""
        key = (self._pool_key(), name)
        with self._guard:
            if key in self._remembered:
                return self._remembered[key]
        value = read()
        if value is not None:
            with self._guard:
                self._remembered[key] = value
        return value


def found_unreachable(host: Any) -> bool:
    """Whether this process's last fresh connect to HOST (a pyinfra Host of a State) failed."""
    connector = getattr(host, "connector", None)
    if not isinstance(connector, PooledSSHConnector):
        return False
    with PooledSSHConnector._guard:
        return connector._pool_key() in PooledSSHConnector._unreachable


def remembered(host: Any, name: str, read: Callable[[], T]) -> T:
    """READ() once for HOST while its connection is kept; every time for hosts not reached through the pool."""
    connector = getattr(host, "connector", None)
    if isinstance(connector, PooledSSHConnector):
        return connector.remember(name, read)
    return read()


def close_all() -> None:
    """Close every kept connection (tests; the process's exit closes them too)."""
    with PooledSSHConnector._guard:
        clients = list(PooledSSHConnector._pool.values())
        PooledSSHConnector._pool.clear()
        PooledSSHConnector._remembered.clear()
        PooledSSHConnector._unreachable.clear()
    for client in clients:
        client.close()


def pool_connections(inventory: Any) -> None:
    """Every host of INVENTORY that pyinfra would reach with its SSH connector uses the pooled one instead."""
    for host in inventory:
        if host.connector_cls is SSHConnector:
            host.connector_cls = PooledSSHConnector
