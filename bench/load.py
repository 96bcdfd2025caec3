"""A bounded, continuous load of ingest and query requests against a fleet, for zero-downtime checks.

Every request counts: a non-2xx answer or a transport error is a failed request, with no client-side retry
to hide it. Every event the service acknowledged (202) is remembered so the caller can check that it is in
PostgreSQL exactly once. Bounded in time and in request count; traffic goes only to the given base URLs.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
from ingest.tools.credentials import mint_read_token


@dataclass
class LoadResult:
    requests: int = 0
    failures: int = 0
    failure_reasons: Counter = field(default_factory=Counter)
    acknowledged: list[str] = field(default_factory=list)
    by_status: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "failures": self.failures,
            "failure_reasons": dict(self.failure_reasons.most_common(5)),
            "acknowledged_events": len(self.acknowledged),
            "by_status": dict(self.by_status),
            "seconds": round(self.seconds, 1),
            "requests_per_s": round(self.requests / self.seconds, 1) if self.seconds else 0,
        }


class Load:
    """Workers round-robin over the base URLs, alternating a batch ingest and a query."""

    def __init__(
        self,
        base_urls: list[str],
        api_key: str,
        jwt_secret: str,
        workers: int = 4,
        max_seconds: float = 600.0,
        max_requests: int = 200_000,
        batch: int = 5,
        keepalive: bool = True,
    ):
        self.base_urls = base_urls
        self.api_key = api_key
        self.token = mint_read_token(jwt_secret, ttl_seconds=7200, subject="bench")
        self.workers = workers
        self.max_seconds = max_seconds
        self.max_requests = max_requests
        self.batch = batch
        self.keepalive = keepalive
        self.result = LoadResult()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = 0.0

    def __enter__(self) -> Load:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._started = time.monotonic()
        for index in range(self.workers):
            thread = threading.Thread(target=self._work, args=(index,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> LoadResult:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self.result.seconds = time.monotonic() - self._started
        return self.result

    def _record(self, status: int | None, reason: str | None, acked: list[str] | None = None) -> None:
        with self._lock:
            self.result.requests += 1
            if status is not None:
                self.result.by_status[status] += 1
            if reason is not None:
                self.result.failures += 1
                self.result.failure_reasons[reason] += 1
            if acked:
                self.result.acknowledged.extend(acked)
            if self.result.requests >= self.max_requests:
                self._stop.set()

    def _work(self, index: int) -> None:
        limits = httpx.Limits(max_keepalive_connections=10 if self.keepalive else 0)
        deadline = self._started + self.max_seconds
        turn = index
        with httpx.Client(timeout=10.0, limits=limits) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                base = self.base_urls[turn % len(self.base_urls)]
                turn += 1
                if turn % 2:
                    self._ingest(client, base)
                else:
                    self._query(client, base)

    def _ingest(self, client: httpx.Client, base: str) -> None:
        now = datetime.now(UTC).isoformat()
        events = [
            {"id": str(uuid.uuid4()), "source": "bench", "type": "load", "timestamp": now, "payload": {"n": i}}
            for i in range(self.batch)
        ]
        try:
            response = client.post(base + "/api/v1/events", json=events, headers={"X-API-Key": self.api_key})
        except httpx.HTTPError as exc:
            self._record(None, f"{type(exc).__name__} on POST {base}")
            return
        if response.status_code == 202:
            self._record(202, None, [e["id"] for e in events])
        else:
            self._record(response.status_code, f"HTTP {response.status_code} on POST {base}")

    def _query(self, client: httpx.Client, base: str) -> None:
        try:
            response = client.get(
                base + "/api/v1/events",
                params={"source": "bench", "limit": 20},
                headers={"Authorization": f"Bearer {self.token}"},
            )
        except httpx.HTTPError as exc:
            self._record(None, f"{type(exc).__name__} on GET {base}")
            return
        self._record(
            response.status_code, None if response.status_code == 200 else f"HTTP {response.status_code} on GET {base}"
        )


def count_in_database(dsn: str, ids: list[str]) -> tuple[int, int]:
    """(distinct acknowledged ids found, rows found for them): both must equal len(ids) for exactly-once."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT count(DISTINCT id), count(*) FROM events WHERE id = ANY(%s::uuid[])", (ids,)
        ).fetchone()
    return int(rows[0]), int(rows[1])
