"""Scale: a real deploy, a no-op deploy and an app rollback on a 3-host fleet and on an 8-host one, side by side
in one run, each size on its own sandbox (`ingestctl testbed up --hosts 2`, then `--hosts 7`: db1 and its app
hosts). Target (DESIGN section 6): 8 hosts / 3 hosts at most 1.5x for the no-op and the rollback.

Each size: a first deploy (the shipping, reported apart with the bytes each host's eth0 received), a deploy of a
new version (the same image re-tagged, so no image bytes: the gated rolling switch itself), a no-op re-deploy, and
`rollback app` to the warm standby. For every command it also reports the SSH connections each host's sshd
accepted (its own log), which must not grow with the fleet, and the CPU-seconds of the controller and of the rest
of the machine: here every sandbox host shares the machine's cores, so their work adds up where real hosts'
would overlap.

The no-op and the rollback are run REPEAT times a size (a flip back to scale-v2 between rounds, not measured), and
the median run is reported, with every run's time.

    python -m bench.scale [--sizes 3,8] [--repeat 3] [--keep] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TESTBED = "ingest-scale"
TARGET_RATIO = 1.5
IDLE_S = 10
BOUNDED = ("noop", "rollback")


def run(*args: str, timeout: float = 1800) -> tuple[float, int]:
    """`ingestctl ARGS` on the scale sandbox: (seconds it took, its peak memory in KiB, from GNU time). A failure
    stops the benchmark with its output."""
    executable = shutil.which("ingestctl", path=str(Path(sys.executable).parent)) or "ingestctl"
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        started = time.monotonic()
        completed = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, executable, *args], cwd=ROOT,
                                   capture_output=True, text=True, timeout=timeout, check=False,
                                   env={**os.environ, "INGESTCTL_TESTBED": TESTBED, "INGESTCTL_ROOT": str(ROOT)})
        seconds = round(time.monotonic() - started, 2)
        peak_kib = int(rss.read().strip().splitlines()[-1])
    if completed.returncode != 0:
        raise SystemExit(f"ingestctl {' '.join(args)} failed ({completed.returncode}):\n"
                         f"{completed.stdout[-3000:]}{completed.stderr[-2000:]}")
    return seconds, peak_kib


def machine_busy_s() -> float:
    """CPU-seconds this machine has spent busy (every core, /proc/stat), for the sandbox hosts' share."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def controller_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured(hosts, *args: str) -> dict:
    """Seconds, CPU (the controller's, and the rest of the machine's: the sandbox hosts share its cores), bytes
    received and SSH connections per host for one command."""
    from ingestctl.testbed import probe

    before = {h.name: probe.received_bytes(h.container) for h in hosts}
    busy, controller = machine_busy_s(), controller_cpu_s()
    since = time.time()
    seconds, peak_kib = run(*args)
    until = time.time()
    controller = controller_cpu_s() - controller
    return {
        "seconds": seconds,
        "controller_cpu_s": round(controller, 2),
        "controller_peak_mb": round(peak_kib / 1024, 1),
        "hosts_cpu_s": round(machine_busy_s() - busy - controller, 2),
        "mb_received": {h.name: round((probe.received_bytes(h.container) - before[h.name]) / 1e6, 3) for h in hosts},
        "ssh_connections": {h.name: probe.ssh_logins(h.container, since, until) for h in hosts},
    }


def median_run(runs: list[dict]) -> dict:
    """The run with the median time (the lower middle of an even count): one command on 2 shared cores varies by
    a fifth from run to run, more than the ratio's margin."""
    return sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2]


def one_size(size: int, keep: bool, repeat: int) -> dict:
    from ingestctl.testbed import state as testbed_state

    run("testbed", "down")
    run("testbed", "up", "--hosts", str(size - 1))
    try:
        hosts = testbed_state.load(TESTBED).hosts
        assert len(hosts) == size, f"expected {size} hosts, the testbed has {[h.name for h in hosts]}"
        result = {"hosts": size,
                  "first_deploy": measured(hosts, "deploy", "local", "--version", "scale-v1", "--skip-bench")}
        # What the sandbox burns doing nothing (engines, idle slots, Prometheus scraping every host each second),
        # taken out of each command's sandbox CPU below.
        busy = machine_busy_s()
        time.sleep(IDLE_S)
        result["idle_cpu_per_s"] = idle = round((machine_busy_s() - busy) / IDLE_S, 3)
        result["deploy"] = measured(hosts, "deploy", "local", "--version", "scale-v2", "--skip-bench")
        samples: dict[str, list[dict]] = {case: [] for case in BOUNDED}
        for number in range(repeat):
            if number:  # back on scale-v2 (a flip to its warm slot), scale-v1 the standby again: not measured
                run("deploy", "local", "--version", "scale-v2", "--skip-bench")
            samples["noop"].append(measured(hosts, "deploy", "local", "--version", "scale-v2", "--skip-bench"))
            samples["rollback"].append(measured(hosts, "rollback", "app", "local"))
        for case, runs in samples.items():
            result[case] = {**median_run(runs), "samples_s": [r["seconds"] for r in runs]}
        for case in ("deploy", "noop", "rollback"):
            result[case]["hosts_cpu_net_s"] = round(result[case]["hosts_cpu_s"] - idle * result[case]["seconds"], 2)
    finally:
        if not keep:
            run("testbed", "down")
    for case in ("first_deploy", "deploy", "noop", "rollback"):
        print(f"  {size} hosts, {case}: {result[case]['seconds']} s (CPU: controller "
              f"{result[case]['controller_cpu_s']} s, peak {result[case]['controller_peak_mb']} MB; sandbox hosts "
              f"{result[case]['hosts_cpu_s']} s, {result[case].get('hosts_cpu_net_s', '-')} s net of idle), at most "
              f"{max(result[case]['ssh_connections'].values())} SSH connection(s) a host, at most "
              f"{max(result[case]['mb_received'].values())} MB received a host"
              + (f"; the median of {result[case]['samples_s']}" if "samples_s" in result[case] else ""),
              file=sys.stderr)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="3,8", help="two fleet sizes, smaller first (default 3,8)")
    parser.add_argument("--keep", action="store_true", help="leave the last sandbox up")
    parser.add_argument("--repeat", type=int, default=3, help="no-op and rollback runs a size, median taken (3)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    small, large = (int(n) for n in args.sizes.split(","))
    results = {size: one_size(size, args.keep and size == large, max(1, args.repeat)) for size in (small, large)}
    cases = ("first_deploy", "deploy", "noop", "rollback")
    ratios = {case: round(results[large][case]["seconds"] / results[small][case]["seconds"], 2) for case in cases}
    connections = {case: max(max(results[s][case]["ssh_connections"].values()) for s in (small, large))
                   for case in cases}
    report = {
        "bench": "scale",
        "sizes": [small, large],
        "results": {str(size): result for size, result in results.items()},
        "ratios": ratios,
        "max_ssh_connections_per_host": connections,
        "target_ratio": TARGET_RATIO,
        "passed": all(ratios[case] <= TARGET_RATIO for case in BOUNDED),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"| case | {small} hosts (s) | {large} hosts (s) | ratio | controller CPU (s) | controller peak (MB) "
              "| sandbox hosts' CPU, net of idle (s) | SSH connections a host, at most |")
        print("|---|---|---|---|---|---|---|---|")
        for case in cases:
            small_case, large_case = results[small][case], results[large][case]
            print(f"| {case} | {small_case['seconds']} | {large_case['seconds']} | {ratios[case]} | "
                  f"{small_case['controller_cpu_s']} / {large_case['controller_cpu_s']} | "
                  f"{small_case['controller_peak_mb']} / {large_case['controller_peak_mb']} | "
                  f"{small_case.get('hosts_cpu_net_s', small_case['hosts_cpu_s'])} / "
                  f"{large_case.get('hosts_cpu_net_s', large_case['hosts_cpu_s'])} | {connections[case]} |")
        print(f"\nno-op and rollback ratios {ratios['noop']} and {ratios['rollback']} (target <= {TARGET_RATIO}); "
              "the first deploy ships the images (MB per host in --json)")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
