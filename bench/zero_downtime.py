"""Zero downtime: one bounded, continuous load of ingest and query requests through every kind of switch on the
3-host sandbox, with every failed request's reason, and p99 latency at the switches against the baseline's.

Target (DESIGN section 6): 0 failed requests in every phase, and every acknowledged event in PostgreSQL
exactly once. The same load against a fleet that is left alone runs first, as the baseline.

    python -m bench.zero_downtime [--soak N] [--workers 4] [--idle-clients 12] [--fresh-clients 2] [--racy]
                                  [--baseline-s 10] [--nice N] [--json]

Without --soak: one deploy (A -> B), `rollback app`, and `config set` + `rollback config`. With --soak N: N
rounds of those, each followed by a deploy of a release whose queries fail (this checkout with the fault of
bench/detection.py), which the metric gate must roll back by itself (exit 3). Its phase's failed requests
are that release's blast radius, reported apart and not counted against the target. With --racy, each round
also restarts every proxy (bench/racy_switch.py): the negative control, which must show failed requests (else
the bench exits 1: it could not see a drop). The switches themselves flip the proxies' routes, with no reload.

It uses the sandbox named by INGESTCTL_TESTBED (started if needed) and deploys releases `zd-<tag>-a`,
`zd-<tag>-b` and `zd-<tag>-bad<round>` built from this checkout (<tag> is new for every invocation).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.detection import FAULT, QUERY_ROUTE
from bench.load import Load, count_in_database
from bench.racy_switch import restart_proxies
from bench.soak_report import (
    BAD_RELEASE,
    BASELINE,
    RACY_CONTROL,
    PhaseWindow,
    compare_to_baseline,
    failed_outside_bad_releases,
    phase_report,
    render,
    totals_by_kind,
)
from tests.e2e.releases import ingestctl, variant

SETTLE_S = 2.0
# Bounds of the whole load, whatever the number of rounds: a round takes about 5 minutes on the sandbox.
SECONDS_PER_ROUND = 600
MAX_REQUESTS = 2_000_000


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


Action = Callable[[], tuple[int, list[float]]]


def command(*args: str, expect: int = 0, root: Path = ROOT, nice: int = 0) -> Action:
    """An `ingestctl ARGS --json` run expected to exit EXPECT; it returns the exit code and the times of the
    stream's `switched` events (a batch of hosts live on the new slot). NICE: the controller's niceness; here it
    shares the 2 cores with the fleet and the load, which a controller on its own machine would not."""

    def run() -> tuple[int, list[float]]:
        result = ingestctl(*args, "--json", root=root, timeout=600, nice=nice)
        if result.code != expect:
            raise SystemExit(f"`ingestctl {' '.join(args)}` exited {result.code}, expected {expect}:\n"
                             f"{result.explain()}")
        return result.code, [e["ts"] for e in result.events if e.get("step") == "switched"]

    return run


def pause(seconds: float) -> Action:
    return lambda: (time.sleep(seconds), (0, []))[1]


def phase(name: str, kind: str, round_: int, action: Action) -> PhaseWindow:
    """Run ACTION under the load that is already running, settling SETTLE_S before and after it."""
    start = time.time()
    time.sleep(SETTLE_S)
    action_start = time.time()
    code, switches = action()
    action_end = time.time()
    time.sleep(SETTLE_S)
    print(f"  round {round_}: {name} took {action_end - action_start:.1f}s", file=sys.stderr)
    return PhaseWindow(name, kind, round_, start, action_start, action_end, time.time(), tuple(switches), code)


def rounds(count: int, tag: str, bad_root: Path | None, racy: bool,
           nice: int = 0) -> list[tuple[str, str, int, Action]]:
    """The switches of COUNT rounds: A -> B, back to A, a config version and back, then (with BAD_ROOT) a bad
    release that is rolled back to A. From round 2 on, B starts cold again: the rollback of the bad release
    removed the standby."""
    a, b = f"zd-{tag}-a", f"zd-{tag}-b"
    plan = []
    for n in range(1, count + 1):
        plan += [
            (f"deploy {a} -> {b}", "deploy", n, command("deploy", "local", "--version", b, "--skip-bench", nice=nice)),
            (f"rollback app -> {a}", "rollback-app", n, command("rollback", "app", "local", nice=nice)),
            (f"config set INGEST_MAX_BATCH_ITEMS={900 - n}", "config", n,
             command("config", "set", "local", f"INGEST_MAX_BATCH_ITEMS={900 - n}", nice=nice)),
            ("rollback config", "config", n, command("rollback", "config", "local", nice=nice)),
        ]
        if racy:
            plan.append(("racy control: every proxy restarted", RACY_CONTROL, n, restart_proxies))
        if bad_root is not None:
            plan.append((f"deploy bad zd-{tag}-bad{n} (rolled back)", BAD_RELEASE, n,
                         command("deploy", "local", "--version", f"zd-{tag}-bad{n}", "--skip-bench",
                                 expect=3, root=bad_root, nice=nice)))
    return plan


def bad_checkout(tmp: Path) -> Path:
    def broken(text: str) -> str:
        assert FAULT[0] in text, f"{QUERY_ROUTE} changed: update bench/detection.py's fault"
        return text.replace(FAULT[0], FAULT[1], 1)

    return variant(tmp, {QUERY_ROUTE: broken})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--soak", type=int, default=0, metavar="N",
                        help="N rounds of every kind of switch, each with a bad release rolled back")
    parser.add_argument("--workers", type=int, default=4, help="keep-alive clients sending back to back")
    parser.add_argument("--idle-clients", type=int, default=12, help="keep-alive clients idle 0-6 s between requests")
    parser.add_argument("--fresh-clients", type=int, default=2, help="clients opening a connection per request")
    parser.add_argument("--racy", action="store_true",
                        help="each round also restarts every proxy: the negative control, which must fail requests")
    parser.add_argument("--baseline-s", type=float, default=10.0, help="seconds of load with no change, first")
    parser.add_argument("--nice", type=int, default=0, metavar="N",
                        help="run the controller (ingestctl) at niceness N: on this machine it shares the CPUs with "
                             "the sandbox fleet and the load, as a controller on its own machine would not")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    urls, secrets, dsn = sandbox()
    tag = time.strftime("%H%M%S")
    print(f"zero-downtime bench: preparing zd-{tag}-a on the sandbox", file=sys.stderr)
    command("deploy", "local", "--version", f"zd-{tag}-a", "--skip-bench")()
    with tempfile.TemporaryDirectory(prefix="ingest-zero-downtime-") as tmp:
        bad_root = bad_checkout(Path(tmp)) if args.soak else None
        load = Load(urls, secrets["API_KEY"], secrets["JWT_SECRET"], workers=args.workers,
                    idle_clients=args.idle_clients, fresh_clients=args.fresh_clients,
                    max_seconds=SECONDS_PER_ROUND * max(1, args.soak) + 60, max_requests=MAX_REQUESTS)
        with load:
            windows = [phase("baseline (no change)", BASELINE, 0, pause(args.baseline_s))]
            windows += [phase(*step) for step in rounds(max(1, args.soak), tag, bad_root, args.racy, args.nice)]
    result = load.result
    reports = [phase_report(w, result.samples) for w in windows]
    baseline_p99 = compare_to_baseline(reports)
    distinct, rows = count_in_database(dsn, result.acknowledged)
    acked = len(result.acknowledged)
    report = {
        "bench": "zero_downtime",
        "hosts": len(urls),
        "clients": {"keepalive": args.workers, "idle_gaps_0_6s": args.idle_clients, "fresh": args.fresh_clients},
        "rounds": max(1, args.soak),
        "controller_nice": args.nice,
        "baseline_s": args.baseline_s,
        "requests": result.requests,
        "baseline_p99_ms": baseline_p99,
        "phases": [r.as_dict() for r in reports],
        "kinds": [asdict(t) for t in totals_by_kind(reports)],
        "acknowledged_events": acked,
        "found_distinct": distinct,
        "found_rows": rows,
        "exactly_once": distinct == rows == acked,
        "failed_requests": result.failures,
        "failed_outside_bad_releases": failed_outside_bad_releases(reports),
        "racy_control_failed": sum(r.failed for r in reports if r.kind == RACY_CONTROL) if args.racy else None,
    }
    # The text comes first either way, so the reasons are read without --json; with --json its line is last.
    print("\n".join(render(reports, baseline_p99)))
    print(f"\n{result.requests} requests, {result.failures} failed "
          f"({report['failed_outside_bad_releases']} outside the bad releases' phases)")
    print(f"acknowledged {acked} events; in PostgreSQL: {distinct} distinct, {rows} rows "
          f"({'exactly once' if report['exactly_once'] else 'MISMATCH'})")
    if args.json:
        print(json.dumps(report))
    blind = args.racy and not report["racy_control_failed"]
    if blind:
        print("the racy control failed no request: this load cannot see a dropped request", file=sys.stderr)
    return 0 if report["failed_outside_bad_releases"] == 0 and report["exactly_once"] and not blind else 1


if __name__ == "__main__":
    sys.exit(main())
