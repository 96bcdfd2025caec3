"""Shipping, side by side with its limit: `docker save | zstd | ssh host 'zstd -d | docker load'` over OpenSSH,
every host in parallel, against `ingestctl image ship` for the same images to the same hosts.

Three cases, each measured by time and by the bytes each sandbox host's eth0 received (read from outside
through `docker exec`):
- first ship of the app image to every host and the database images to db1 (hosts emptied first; ingestctl's
  layer cache emptied too, so it pays its own `docker save` and compression like the limit does);
- a code-only release (one comment line in service/ingest/app.py) to hosts that hold the previous one;
- a new version of unchanged inputs.

Runs on its own sandbox (testbed `ingest-bench`, removed afterwards unless --keep).

    python -m bench.ship [--keep] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

TESTBED = "ingest-bench"
VERSION = "bench-ship"
FIRST_SHIP_MAX_RATIO = 1.2
CODE_RELEASE_MAX_BYTES = 2_000_000


def _env() -> dict[str, str]:
    return {**os.environ, "INGESTCTL_TESTBED": TESTBED, "INGESTCTL_ROOT": str(ROOT)}


def ingestctl(*args: str, root: Path = ROOT) -> None:
    executable = shutil.which("ingestctl", path=str(Path(sys.executable).parent)) or "ingestctl"
    completed = subprocess.run([executable, *args], cwd=root, env={**_env(), "INGESTCTL_ROOT": str(root)},
                               capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"ingestctl {' '.join(args)} failed:\n{completed.stdout[-2000:]}{completed.stderr[-2000:]}")


def images_for(testbed) -> dict[str, list[str]]:
    from ingestctl.testbed.images import POSTGRES_IMAGE, REDIS_IMAGE

    app = f"ingest:{VERSION}"
    return {host.name: [app] + ([POSTGRES_IMAGE, REDIS_IMAGE] if "db" in host.roles else []) for host in testbed.hosts}


def ssh(testbed, host: str, command: str, stdin=None) -> subprocess.CompletedProcess:
    config = ROOT / ".testbed" / TESTBED / "ssh_config"
    return subprocess.run(["ssh", "-F", str(config), host, command], stdin=stdin, capture_output=True, check=False)


def empty_hosts(testbed) -> None:
    for host in testbed.hosts:
        ssh(testbed, host.name, "docker ps -aq | xargs -r docker rm -f >/dev/null; "
                                "docker images -aq | xargs -r docker rmi -f >/dev/null 2>&1; true")


def received(testbed) -> dict[str, int]:
    from ingestctl.testbed import probe

    return {host.name: probe.received_bytes(host.container) for host in testbed.hosts}


def measured(testbed, action) -> dict:
    before = received(testbed)
    started = time.monotonic()
    action()
    seconds = time.monotonic() - started
    after = received(testbed)
    return {"seconds": round(seconds, 2), "bytes": {name: after[name] - before[name] for name in after}}


def limit_ship(testbed, wanted: dict[str, list[str]]) -> None:
    """The limit: one `docker save | zstd | ssh 'zstd -d | docker load'` per host, all hosts at once."""
    config = ROOT / ".testbed" / TESTBED / "ssh_config"

    def one(host: str) -> None:
        images = " ".join(wanted[host])
        pipeline = (f"set -o pipefail; docker save {images} | zstd -q -3 -T0 | "
                    f"ssh -F {config} {host} 'zstd -dcq | docker load -q'")
        subprocess.run(["bash", "-c", pipeline], check=True, capture_output=True)

    with ThreadPoolExecutor(len(wanted)) as pool:
        list(pool.map(one, wanted))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the bench sandbox afterwards")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.update(_env())
    from ingestctl import image_layers
    from ingestctl.testbed import lifecycle
    from ingestctl.testbed import state as testbed_state
    from releases import variant

    lifecycle.up(lambda _m: None, name=TESTBED)
    testbed = testbed_state.load(TESTBED)
    try:
        ingestctl("image", "build", "--version", VERSION)
        wanted = images_for(testbed)
        report: dict = {"bench": "ship", "hosts": len(testbed.hosts)}

        empty_hosts(testbed)
        report["limit_first"] = measured(testbed, lambda: limit_ship(testbed, wanted))
        empty_hosts(testbed)
        shutil.rmtree(image_layers.cache_dir(), ignore_errors=True)
        report["ingestctl_first"] = measured(testbed, lambda: ingestctl("image", "ship", "local", "--version", VERSION))
        empty_hosts(testbed)
        report["ingestctl_first_warm_cache"] = measured(
            testbed, lambda: ingestctl("image", "ship", "local", "--version", VERSION))

        with tempfile.TemporaryDirectory() as scratch:
            changed = variant(Path(scratch), {"service/ingest/app.py": lambda t: t + "\n# bench: code only\n"})
            ingestctl("image", "build", "--version", f"{VERSION}-code", root=changed)
        code_images = {host: [f"ingest:{VERSION}-code"] for host in wanted}
        report["ingestctl_code_only"] = measured(
            testbed, lambda: ingestctl("image", "ship", "local", "--version", f"{VERSION}-code"))
        report["limit_code_only"] = measured(testbed, lambda: limit_ship(testbed, code_images))

        ingestctl("image", "build", "--version", f"{VERSION}-again")
        report["ingestctl_new_version_same_inputs"] = measured(
            testbed, lambda: ingestctl("image", "ship", "local", "--version", f"{VERSION}-again"))
    finally:
        if not args.keep:
            lifecycle.down(lambda _m: None, name=TESTBED)

    first_ratio = report["ingestctl_first"]["seconds"] / report["limit_first"]["seconds"]
    code_max = max(report["ingestctl_code_only"]["bytes"].values())
    report.update(
        first_ship_ratio=round(first_ratio, 2),
        first_ship_ratio_warm_cache=round(
            report["ingestctl_first_warm_cache"]["seconds"] / report["limit_first"]["seconds"], 2),
        code_only_max_bytes_per_host=code_max,
        code_only_bytes_ratio=round(code_max / max(report["limit_code_only"]["bytes"].values()), 5),
        new_version_max_bytes_per_host=max(report["ingestctl_new_version_same_inputs"]["bytes"].values()),
        targets={"first_ship_ratio": FIRST_SHIP_MAX_RATIO, "code_only_max_bytes_per_host": CODE_RELEASE_MAX_BYTES},
    )
    if not args.json:
        print("| case | seconds | MB received per host (eth0) |")
        print("|---|---|---|")
        for case in ("limit_first", "ingestctl_first", "ingestctl_first_warm_cache", "limit_code_only",
                     "ingestctl_code_only", "ingestctl_new_version_same_inputs"):
            per_host = ", ".join(f"{h} {b / 1e6:.3f}" for h, b in report[case]["bytes"].items())
            print(f"| {case} | {report[case]['seconds']} | {per_host} |")
        print(f"\nfirst ship {report['first_ship_ratio']}x the limit (target <= {FIRST_SHIP_MAX_RATIO}); "
              f"code-only release at most {code_max} bytes per host (target <= {CODE_RELEASE_MAX_BYTES})")
    print(json.dumps(report))
    ok = first_ratio <= FIRST_SHIP_MAX_RATIO and code_max <= CODE_RELEASE_MAX_BYTES
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
