"""One-shot rollback speed: `ingestctl rollback app local` on the 3-host sandbox, next to starting the
previous release's containers by hand on the same hosts, in the same run.

Target (DESIGN section 6): command to all hosts healthy on the previous release at most 0.5x the hand start.
The hand start is the limit a person at a shell could reach: `docker run` of the previous image on every app
host at once (in parallel over SSH), timed until each answers /health/ready 200. The rollback is timed the same
way, from outside: from the command's start until every app host's proxy answers /version with the previous
release (a slot gets traffic only once it answered ready). Its exit (after its own health gate, the ledger and
the unlock) and the ledger's time_to_healthy_s are reported beside.

    python -m bench.rollback_speed [--repeat 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx

from tests.e2e.releases import ingestctl

HAND_PORT = 8009
HAND_NAME = "ingest-hand-start"
PROXY_PORT = 8000
TARGET_RATIO = 0.5
# Both sides are watched from outside at the same rate: a faster poll of one side would load the 2 cores that the
# other side's containers and the command itself run on (and it did: 300 requests/s through the proxies).
POLL_S = 0.05


def hosts():
    from ingestctl.testbed import lifecycle
    from ingestctl.testbed import state as testbed_state

    lifecycle.up(lambda _m: None)
    state = testbed_state.load()
    return state, [h for h in state.hosts if "app" in h.roles], next(h for h in state.hosts if "db" in h.roles)


def ssh(state, host, command: str, timeout: float = 120) -> str:
    from ingestctl.testbed.probe import run_ssh

    code, out, err = run_ssh(host.address, host.ssh_port, state.ssh_user, state.ssh_key, command, timeout)
    if code != 0:
        raise SystemExit(f"{host.name}: `{command[:80]}...` failed ({code}): {err.strip()[-500:]}")
    return out


def hand_start(state, app_hosts, db, image: str) -> float:
    """docker run IMAGE on every app host at once, with the live config, until all answer ready."""
    live = json.loads(ssh(state, app_hosts[0], "cat /opt/ingest/state.json"))
    config_dir = f"/opt/ingest/config/{live['config_version']}"
    command = (
        f"docker rm -f {HAND_NAME} >/dev/null 2>&1; docker run -d --name {HAND_NAME} --network host "
        f"--user 10001:10001 --env-file {config_dir}/app.env -v {config_dir}/secrets:/run/secrets:ro "
        f"-e PORT={HAND_PORT} -e POSTGRES_HOST={db.address} -e POSTGRES_PORT=5432 "
        f"-e POSTGRES_DB=ingest -e REDIS_URL=redis://{db.address}:6379/0 -e APP_VERSION=hand {image}"
    )
    ready_at: dict[str, float] = {}
    started = time.monotonic()

    def one(host) -> None:
        ssh(state, host, command)
        deadline = time.monotonic() + 120
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                try:
                    if client.get(f"http://{host.address}:{HAND_PORT}/health/ready").status_code == 200:
                        ready_at[host.name] = time.monotonic() - started
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(POLL_S)

    threads = [threading.Thread(target=one, args=(h,)) for h in app_hosts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    for host in app_hosts:
        ssh(state, host, f"docker rm -f {HAND_NAME} >/dev/null")
    if len(ready_at) != len(app_hosts):
        raise SystemExit(f"hand start: not every host became ready: {ready_at}")
    return round(elapsed, 2)


class ServedWatch:
    """Polls every app host's /version through its proxy, from outside, and notes when each first serves VERSION."""

    def __init__(self, app_hosts, version: str, timeout_s: float = 60):
        self.version, self.deadline = version, time.monotonic() + timeout_s
        self.started = time.monotonic()
        self.at: dict[str, float] = {}
        self.threads = [threading.Thread(target=self._watch, args=(h,), daemon=True) for h in app_hosts]
        for thread in self.threads:
            thread.start()

    def _watch(self, host) -> None:
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < self.deadline:
                try:
                    if client.get(f"http://{host.address}:{PROXY_PORT}/version").json().get("version") == self.version:
                        self.at[host.name] = time.monotonic() - self.started
                        return
                except (httpx.HTTPError, ValueError):
                    pass
                time.sleep(POLL_S)

    def all_served(self) -> float | None:
        for thread in self.threads:
            thread.join(timeout=max(0.0, self.deadline - time.monotonic()))
        return round(max(self.at.values()), 2) if len(self.at) == len(self.threads) else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    state, app_hosts, db = hosts()
    rounds = []
    for number in range(1, args.repeat + 1):
        for version in ("rs-v1", "rs-v2"):
            result = ingestctl("deploy", "local", "--version", version, "--skip-bench")
            if result.code != 0:
                raise SystemExit(result.explain())
        hand = hand_start(state, app_hosts, db, "ingest:rs-v1")
        watch = ServedWatch(app_hosts, "rs-v1")
        started = time.monotonic()
        result = ingestctl("rollback", "app", "local", "--json")
        wall = round(time.monotonic() - started, 2)
        if result.code != 0:
            raise SystemExit(result.explain())
        served = watch.all_served()
        if served is None:
            raise SystemExit(f"rollback exited 0 but not every host served rs-v1 within 60 s: {watch.at}")
        entries = json.loads(ssh(state, db, "tail -n 1 /var/lib/ingest/ledger.jsonl") or "{}")
        healthy = entries.get("time_to_healthy_s")
        rounds.append(
            {
                "round": number,
                "hand_start_s": hand,
                "rollback_served_s": served,
                "rollback_exit_s": wall,
                "ledger_time_to_healthy_s": healthy,
                "ratio": round(served / hand, 2),
                "exit_ratio": round(wall / hand, 2),
            }
        )
        print(
            f"  round {number}: hand start {hand}s, rollback served on every host after {served}s, exited after "
            f"{wall}s (ledger: healthy after {healthy}s), ratio {served / hand:.2f}",
            file=sys.stderr,
        )
    report = {
        "bench": "rollback_speed",
        "app_hosts": len(app_hosts),
        "rounds": rounds,
        "median_ratio": round(statistics.median(r["ratio"] for r in rounds), 2),
        "median_exit_ratio": round(statistics.median(r["exit_ratio"] for r in rounds), 2),
        "target_ratio": TARGET_RATIO,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print("| round | hand start (s) | rollback: all hosts serve it (s) | rollback exits (s) | ledger time to "
              "healthy (s) | ratio |")
        print("|---|---|---|---|---|---|")
        for r in rounds:
            print(
                f"| {r['round']} | {r['hand_start_s']} | {r['rollback_served_s']} | {r['rollback_exit_s']} | "
                f"{r['ledger_time_to_healthy_s']} | {r['ratio']} |"
            )
        print(f"\nmedian ratio {report['median_ratio']}, to exit {report['median_exit_ratio']} "
              f"(target <= {TARGET_RATIO})")
    return 0 if report["median_ratio"] <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
