"""Delivery of change events to the inventory's webhook URLs: in the background, retried with backoff, bounded.

A receiver that is down, slow or answers errors must never block or fail a deploy or a rollback. So `emit` only
queues; one background worker POSTs each event to each URL, retrying a failed attempt (connection error, timeout,
5xx, 429) after 0.5, 1, 2 and 4 s, and gives an event up once its delivery deadline has passed. At exit the
queue gets at most FLUSH_CAP_S to finish; what is left is dropped and counted in one stderr line.

URLs may carry tokens (chat webhooks do): they are never printed whole, only their scheme and host.
"""

from __future__ import annotations

import atexit
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

ATTEMPT_TIMEOUT_S = 3.0
BACKOFF_S = (0.5, 1.0, 2.0, 4.0)
DEADLINE_S = 30.0  # per event, from when it was emitted
FLUSH_CAP_S = 5.0  # at exit, for everything still queued


def shown_url(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}{f':{parts.port}' if parts.port else ''}/…"


def retryable(status: int) -> bool:
    return status >= 500 or status in (408, 429)


@dataclass
class Delivery:
    payload: dict[str, Any]
    url: str
    deadline: float
    attempts: int = 0


@dataclass
class Outcome:
    """What the worker did, for tests and the exit line."""

    delivered: list[tuple[str, str]] = field(default_factory=list)  # (url, event type)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (url, event type, last problem)
    attempts: int = 0


class Notifier:
    def __init__(self, urls: Sequence[str], attempt_timeout_s: float = ATTEMPT_TIMEOUT_S,
                 backoff_s: Sequence[float] = BACKOFF_S, deadline_s: float = DEADLINE_S) -> None:
        self.urls = list(urls)
        self.attempt_timeout_s = attempt_timeout_s
        self.backoff_s = tuple(backoff_s)
        self.deadline_s = deadline_s
        self.outcome = Outcome()
        self._queue: deque[Delivery] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False
        self._thread: threading.Thread | None = None

    def emit(self, payload: dict[str, Any]) -> None:
        """Queue PAYLOAD for every URL and return at once."""
        if not self.urls or self._closed:
            return
        deadline = time.monotonic() + self.deadline_s
        with self._lock:
            self._queue.extend(Delivery(payload, url, deadline) for url in self.urls)
            self._idle.clear()
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="webhooks", daemon=True)
                self._thread.start()
        self._wake.set()

    def flush(self, cap_s: float = FLUSH_CAP_S) -> int:
        """Wait at most CAP_S for queued deliveries; the number of deliveries not done (now dropped)."""
        self._idle.wait(cap_s)
        with self._lock:
            self._closed = True
            left = len(self._queue) + (0 if self._idle.is_set() else 1)
            self._queue.clear()
        return left

    def _next(self) -> Delivery | None:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            self._idle.set()
            self._wake.clear()
            return None

    def _work(self) -> None:
        with httpx.Client(timeout=self.attempt_timeout_s, follow_redirects=False) as client:
            while True:
                item = self._next()
                if item is None:
                    self._wake.wait()
                    continue
                self._deliver(client, item)

    def _deliver(self, client: httpx.Client, item: Delivery) -> None:
        kind = str(item.payload.get("context", {}).get("type", "?"))
        problem = "deadline passed"
        while time.monotonic() < item.deadline and not self._closed:
            item.attempts += 1
            self.outcome.attempts += 1
            try:
                response = client.post(item.url, json=item.payload,
                                       headers={"Content-Type": "application/json", "User-Agent": "ingestctl"})
                if response.status_code < 300:
                    self.outcome.delivered.append((item.url, kind))
                    return
                problem = f"HTTP {response.status_code}"
                if not retryable(response.status_code):
                    break
            except httpx.HTTPError as exc:
                problem = type(exc).__name__
            if item.attempts > len(self.backoff_s):
                break
            pause = self.backoff_s[item.attempts - 1]
            if time.monotonic() + pause >= item.deadline:
                break
            time.sleep(pause)
        self.outcome.failed.append((item.url, kind, problem))


_NOTIFIERS: dict[str, Notifier] = {}


def for_env(env_name: str) -> Notifier:
    """The process's notifier for ENV's inventory webhooks (flushed at exit, within FLUSH_CAP_S)."""
    if env_name not in _NOTIFIERS:
        from ingestctl import inventory

        notifier = Notifier(inventory.load(env_name).data.webhooks)
        _NOTIFIERS[env_name] = notifier
        if notifier.urls:
            atexit.register(_flush_at_exit, env_name, notifier)
    return _NOTIFIERS[env_name]


def _flush_at_exit(env_name: str, notifier: Notifier) -> None:
    left = notifier.flush()
    failed = notifier.outcome.failed
    if left or failed:
        where = ", ".join(sorted({shown_url(url) for url, _kind, _why in failed})) or "webhooks"
        sys.stderr.write(f"warning: {env_name}: {len(failed)} change event(s) not delivered to {where}"
                         + (f", {left} dropped at exit after {FLUSH_CAP_S:g}s" if left else "")
                         + " (deploys never wait for webhooks)\n")
