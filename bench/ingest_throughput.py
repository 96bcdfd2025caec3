#!/usr/bin/env python3
"""Ingest throughput: batched ingest through the real HTTP service vs a raw psycopg COPY, side by side.

Starts a throwaway PostgreSQL (migrated to head) and Redis, runs `python -m ingest` against them, then for
each round: empties `events`, COPYs N events into it with psycopg, empties it again, and POSTs N other
events through the API in batches from concurrent clients. Prints events/s of both, the ratio (quality
bar: API >= 0.7 x COPY) and the service's own CPU per event. Request bodies are encoded before the clock
starts on both sides' equal footing: COPY gets Python tuples, the API gets ready JSON bytes; what is timed is
the path into the table.

    python bench/ingest_throughput.py [--events 100000] [--batch 1000] [--concurrency 4] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "service"))

import httpx
import psycopg
from ingest.tools.localservers import LocalPostgres, LocalRedis, free_port, missing_prerequisites
from psycopg.types.json import Jsonb

TARGET_RATIO = 0.7  # DESIGN section 6
API_KEY = "bench-" + uuid.uuid4().hex
JWT_SECRET = "bench-" + uuid.uuid4().hex + uuid.uuid4().hex


def make_events(count: int, round_no: int, side: str) -> list[dict]:
    start = datetime(2020, 1, 1, tzinfo=UTC)
    return [
        {
            "id": str(uuid.uuid4()),
            "source": f"svc-{i % 13}",
            "type": f"type.{i % 7}",
            "timestamp": (start + timedelta(milliseconds=i)).isoformat(),
            "payload": {"round": round_no, "side": side, "seq": i, "amount": (i * 37) % 1000, "tags": ["a", "b"]},
        }
        for i in range(count)
    ]


def copy_events(url: str, events: list[dict]) -> float:
    rows = [
        (uuid.UUID(e["id"]), e["source"], e["type"], datetime.fromisoformat(e["timestamp"]), Jsonb(e["payload"]))
        for e in events
    ]
    with psycopg.connect(url) as conn:
        started = time.perf_counter()
        with conn.cursor() as cur, cur.copy("COPY events (id, source, type, timestamp, payload) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        conn.commit()
        return time.perf_counter() - started


async def post_events(port: int, events: list[dict], batch: int, concurrency: int) -> float:
    """POST the batches over `concurrency` keep-alive connections. A minimal HTTP/1.1 client on asyncio
    streams, with requests encoded up front: on a 2-core machine the load generator shares the CPU with the
    service and PostgreSQL, and httpx would spend more CPU per batch than the service does."""
    head = (
        f"POST /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-API-Key: {API_KEY}\r\n"
        "Content-Type: application/json\r\n"
    ).encode()
    requests = []
    for i in range(0, len(events), batch):
        body = json.dumps(events[i : i + batch]).encode()
        requests.append(head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while not queue.empty():
                writer.write(queue.get_nowait())
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                answer = await reader.readexactly(length)
                if b" 202 " not in status_line:
                    raise RuntimeError(f"ingest answered {status_line!r}: {answer[:300]!r}")
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


def count_and_truncate(url: str) -> int:
    with psycopg.connect(url) as conn:
        count = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        conn.execute("TRUNCATE events")
    return count


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_service(url: str, redis_url: str, port: int, log) -> subprocess.Popen:
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "REDIS_URL": redis_url,
        "API_KEY": API_KEY,
        "JWT_SECRET": JWT_SECRET,
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "RATE_LIMIT_PER_MINUTE": "0",
        "LOG_LEVEL": "WARNING",
        "MAX_REQUEST_BODY_BYTES": str(16 * 1024 * 1024),
        "INGEST_MAX_BATCH_ITEMS": "10000",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingest"], cwd=ROOT / "service", env=env, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("ingest service exited during start-up")
        time.sleep(0.1)
    raise RuntimeError("ingest service not ready within 30 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="best round of each side is reported")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    reason = missing_prerequisites()
    if reason:
        print(f"ingest_throughput: {reason}", file=sys.stderr)
        return 2

    postgres, redis, service = LocalPostgres(), LocalRedis(), None
    log_path = Path(postgres.root) / "service.log"
    try:
        postgres.start()
        redis.start()
        url = postgres.create_database("bench")
        migrate = subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            check=False,
            cwd=ROOT / "service",
            env={**os.environ, "DATABASE_URL": url},
            capture_output=True,
            text=True,
        )
        if migrate.returncode != 0:
            raise RuntimeError(f"alembic upgrade failed: {migrate.stderr[-500:]}")
        port = free_port()
        with log_path.open("wb") as log:
            service = start_service(url, redis.url, port, log)
            copy_rates, api_rates, cpu_per_event = [], [], []
            for round_no in range(args.rounds):
                copy_seconds = copy_events(url, make_events(args.events, round_no, "copy"))
                assert count_and_truncate(url) == args.events
                api_events = make_events(args.events, round_no, "api")
                service_cpu = _cpu_seconds(service.pid)
                client_cpu = time.process_time()
                api_seconds = asyncio.run(post_events(port, api_events, args.batch, args.concurrency))
                service_cpu = _cpu_seconds(service.pid) - service_cpu
                client_cpu = time.process_time() - client_cpu
                stored = count_and_truncate(url)
                if stored != args.events:
                    raise RuntimeError(f"API stored {stored} of {args.events} events")
                copy_rates.append(args.events / copy_seconds)
                api_rates.append(args.events / api_seconds)
                cpu_per_event.append(service_cpu / args.events * 1e6)
                print(
                    f"round {round_no + 1}: COPY {copy_rates[-1]:,.0f} events/s, API {api_rates[-1]:,.0f} "
                    f"events/s (API phase {api_seconds:.1f}s: service CPU {service_cpu:.1f}s, "
                    f"{cpu_per_event[-1]:.1f} µs/event; "
                    f"client CPU {client_cpu:.1f}s)",
                    file=sys.stderr,
                )
    finally:
        if service is not None:
            service.terminate()
            service.wait(30)
        redis.stop()
        postgres.stop()

    copy_rate, api_rate = max(copy_rates), max(api_rates)
    round_ratios = sorted(api / copy for api, copy in zip(api_rates, copy_rates, strict=True))
    result = {
        "events": args.events,
        "batch": args.batch,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "cores": os.cpu_count(),
        "copy_events_per_s": round(copy_rate),
        "api_events_per_s": round(api_rate),
        "ratio": round(api_rate / copy_rate, 3),
        "median_round_ratio": round(round_ratios[len(round_ratios) // 2], 3),
        "service_cpu_us_per_event": round(min(cpu_per_event), 1),
        "target_ratio": TARGET_RATIO,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"cores {result['cores']}, {args.events} events per side, API batches of {args.batch} from "
            f"{args.concurrency} clients"
        )
        print(f"raw psycopg COPY : {copy_rate:>10,.0f} events/s")
        print(f"API (HTTP batch) : {api_rate:>10,.0f} events/s")
        print(
            f"ratio API/COPY   : {result['ratio']:.3f} best vs best, {result['median_round_ratio']:.3f} median "
            f"of same-round pairs (target >= {TARGET_RATIO})"
        )
        print(f"service CPU      : {result['service_cpu_us_per_event']:.1f} µs/event (best round)")
    return 0 if result["ratio"] >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
