"""Zero downtime: a bounded continuous load of ingest and query requests through a deploy (v1 -> v2), an app
rollback, and a config rollout followed by a config rollback, on the 3-host sandbox.

Target (DESIGN section 6): 0 failed requests in every phase, and every acknowledged event in PostgreSQL
exactly once. The same load against a fleet that is left alone runs first, as the baseline.

    python -m bench.zero_downtime [--workers 4] [--json]

It uses the sandbox named by INGESTCTL_TESTBED (started if needed) and deploys releases `zd-v1`/`zd-v2`
built from this checkout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.load import Load, count_in_database
from tests.e2e.releases import ingestctl


def sandbox():
    from ingestctl import secrets
    from ingestctl.testbed import lifecycle
    from ingestctl.testbed import state as testbed_state

    lifecycle.up(lambda _m: None)
    state = testbed_state.load()
    values = secrets.load(ROOT / "secrets" / "local.env", environ={})
    urls = [f"http://{h.address}:8000" for h in state.hosts if "app" in h.roles]
    db = next(h for h in state.hosts if "db" in h.roles)
    dsn = f"postgresql://ingest:{values['POSTGRES_PASSWORD']}@{db.address}:5432/ingest"
    return urls, values, dsn


def must(*args: str) -> float:
    started = time.monotonic()
    result = ingestctl(*args)
    if result.code != 0:
        raise SystemExit(f"`ingestctl {' '.join(args)}` failed:\n{result.explain()}")
    return round(time.monotonic() - started, 1)


def phase(name: str, urls, secrets, workers: int, action) -> dict:
    """Run ACTION (a callable returning its duration) under load; settle 2 s before and after."""
    load = Load(urls, secrets["API_KEY"], secrets["JWT_SECRET"], workers=workers, max_seconds=900)
    with load:
        time.sleep(2)
        duration = action()
        time.sleep(2)
    result = load.result
    print(
        f"  {name}: {result.requests} requests, {result.failures} failed, "
        f"{len(result.acknowledged)} events acknowledged, action {duration}s",
        file=sys.stderr,
    )
    return {"phase": name, "action_s": duration, **result.as_dict(), "_acked": result.acknowledged}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    urls, secrets, dsn = sandbox()
    print("zero-downtime bench: preparing zd-v1 on the sandbox", file=sys.stderr)
    must("deploy", "local", "--version", "zd-v1", "--skip-bench")
    phases = [
        phase("baseline (no change)", urls, secrets, args.workers, lambda: (time.sleep(10), 10.0)[1]),
        phase(
            "deploy zd-v1 -> zd-v2",
            urls,
            secrets,
            args.workers,
            lambda: must("deploy", "local", "--version", "zd-v2", "--skip-bench"),
        ),
        phase("rollback app -> zd-v1", urls, secrets, args.workers, lambda: must("rollback", "app", "local")),
        phase(
            "config set + rollback config",
            urls,
            secrets,
            args.workers,
            lambda: must("config", "set", "local", "INGEST_MAX_BATCH_ITEMS=900") + must("rollback", "config", "local"),
        ),
    ]
    acked = [event_id for p in phases for event_id in p.pop("_acked")]
    distinct, rows = count_in_database(dsn, acked)
    report = {
        "bench": "zero_downtime",
        "hosts": len(urls),
        "workers": args.workers,
        "phases": phases,
        "acknowledged_events": len(acked),
        "found_distinct": distinct,
        "found_rows": rows,
        "exactly_once": distinct == rows == len(acked),
        "failed_requests": sum(p["failures"] for p in phases),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print("| phase | requests | failed | req/s | events acked | action (s) |")
        print("|---|---|---|---|---|---|")
        for p in phases:
            print(
                f"| {p['phase']} | {p['requests']} | {p['failures']} | {p['requests_per_s']} | "
                f"{p['acknowledged_events']} | {p['action_s']} |"
            )
        print(
            f"\nacknowledged {len(acked)} events; in PostgreSQL: {distinct} distinct, {rows} rows "
            f"({'exactly once' if report['exactly_once'] else 'MISMATCH'})"
        )
    return 0 if report["failed_requests"] == 0 and report["exactly_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
