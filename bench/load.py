"""A bounded, continuous load of ingest and query requests against a fleet, for zero-downtime checks.

Every request counts: a non-2xx answer or a transport error is a failed request, with no client-side retry
to hide it. Each request carries its own X-Request-Id, and each is kept as a `Sample` (when, how long, where,
which client, and why it failed), so a failure can be placed against the switch that caused it. Every event
the service acknowledged (202) is remembered so the caller can check that it is in PostgreSQL exactly once.
Bounded in time and in request count; traffic goes only to the given base URLs.

Three kinds of clients, because each meets a different race at a proxy switch:
- `workers`: keep-alive connections, requests back to back;
- `idle_clients`: keep-alive connections idle for a random 0 to `max_gap_s` seconds between requests (an idle
  connection is what a proxy reload or an upstream keep-alive timeout closes under a client);
- `fresh_clients`: a new connection for every request.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
from ingest.tools.credentials import mint_read_token

from bench.failures import Sample, error_reason, group_failures, status_reason


@dataclass
class LoadResult:
    requests: int = 0
    failures: int = 0
    failure_reasons: Counter = field(default_factory=Counter)
    acknowledged: list[str] = field(default_factory=list)
    by_status: Counter = field(default_factory=Counter)
    samples: list[Sample] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "failures": self.failures,
            "failure_reasons": dict(group_failures(self.samples)[:5]),
            "acknowledged_events": len(self.acknowledged),
            "by_status": dict(self.by_status),
            "seconds": round(self.seconds, 1),
            "requests_per_s": round(self.requests / self.seconds, 1) if self.seconds else 0,
        }


class Load:
    """Clients round-robin over the base URLs, each mixing batch ingests (POST) and queries (GET)."""

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
        idle_clients: int = 0,
        fresh_clients: int = 0,
        max_gap_s: float = 6.0,
    ):
        self.base_urls = base_urls
        self.api_key = api_key
        self.token = mint_read_token(jwt_secret, ttl_seconds=7200, subject="bench")
        self.workers = workers
        self.max_seconds = max_seconds
        self.max_requests = max_requests
        self.batch = batch
        self.keepalive = keepalive
        self.idle_clients = idle_clients
        self.fresh_clients = fresh_clients
        self.max_gap_s = max_gap_s
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
        kinds = (["keepalive" if self.keepalive else "fresh"] * self.workers + ["idle-gaps"] * self.idle_clients
                 + ["fresh"] * self.fresh_clients)
        for index, kind in enumerate(kinds):
            thread = threading.Thread(target=self._work, args=(index, kind), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> LoadResult:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self.result.seconds = time.monotonic() - self._started
        return self.result

    def _record(self, sample: Sample, status: int | None, acked: list[str] | None = None) -> None:
        with self._lock:
            self.result.requests += 1
            self.result.samples.append(sample)
            if status is not None:
                self.result.by_status[status] += 1
            if sample.reason is not None:
                self.result.failures += 1
                self.result.failure_reasons[sample.reason] += 1
            if acked:
                self.result.acknowledged.extend(acked)
            if self.result.requests >= self.max_requests:
                self._stop.set()

    def _work(self, index: int, kind: str) -> None:
        # A fresh client keeps no connection: httpx closes each one after its response.
        limits = httpx.Limits(max_keepalive_connections=0 if kind == "fresh" else 10)
        headers = {"Connection": "close"} if kind == "fresh" else {}
        deadline = self._started + self.max_seconds
        pick = random.Random(index)
        turn = index
        with httpx.Client(timeout=10.0, limits=limits, headers=headers) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                base = self.base_urls[turn % len(self.base_urls)]
                turn += 1
                # Back-to-back clients alternate; the others pick at random so both methods meet every gap.
                ingest = turn % 2 if kind == "keepalive" else pick.random() < 0.5
                self._send(client, base, kind, ingest)
                if kind == "idle-gaps":
                    self._stop.wait(pick.uniform(0, self.max_gap_s))

    def _send(self, client: httpx.Client, base: str, kind: str, ingest: bool) -> None:
        request_id = str(uuid.uuid4())
        events = None
        if ingest:
            method, now = "POST", datetime.now(UTC).isoformat()
            events = [
                {"id": str(uuid.uuid4()), "source": "bench", "type": "load", "timestamp": now, "payload": {"n": i}}
                for i in range(self.batch)
            ]
            request = client.build_request(
                "POST", base + "/api/v1/events", json=events,
                headers={"X-API-Key": self.api_key, "X-Request-Id": request_id})
        else:
            method = "GET"
            request = client.build_request(
                "GET", base + "/api/v1/events", params={"source": "bench", "limit": 20},
                headers={"Authorization": f"Bearer {self.token}", "X-Request-Id": request_id})
        started = time.monotonic()
        try:
            response = client.send(request)
        except httpx.HTTPError as exc:
            self._record(self._sample(started, base, method, kind, request_id, error_reason(exc)), None)
            return
        reason = status_reason(method, response.status_code)
        acked = [e["id"] for e in events] if events and reason is None else None
        self._record(self._sample(started, base, method, kind, request_id, reason), response.status_code, acked)

    @staticmethod
    def _sample(started: float, base: str, method: str, kind: str, request_id: str, reason: str | None) -> Sample:
        latency = time.monotonic() - started
        return Sample(time.time(), latency, base, method, kind, request_id, reason)


def count_in_database(dsn: str, ids: list[str]) -> tuple[int, int]:
    """(distinct acknowledged ids found, rows found for them): both must equal len(ids) for exactly-once."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT count(DISTINCT id), count(*) FROM events WHERE id = ANY(%s::uuid[])", (ids,)
        ).fetchone()
    return int(rows[0]), int(rows[1])
