"""No-op re-deploy: deploying the release that already runs, to the 3-host sandbox, must change nothing and
take at most 1.0x the same convergence through the plain pyinfra CLI (DESIGN section 6), run side by side:
`pyinfra inventories/local.py deploys/deploy.py`, which has no lock, gates or ledger.

    python -m bench.noop_redeploy [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.releases import ingestctl

VERSION = "noop-v1"
TARGET_RATIO = 1.0


def timed(func) -> tuple[float, object]:
    started = time.monotonic()
    result = func()
    return round(time.monotonic() - started, 2), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from ingestctl.testbed import lifecycle

    lifecycle.up(lambda _m: None)
    first = ingestctl("deploy", "local", "--version", VERSION, "--skip-bench")
    if first.code != 0:
        raise SystemExit(first.explain())
    ours, plain = [], []
    pyinfra = str(Path(sys.executable).parent / "pyinfra")
    for _ in range(args.repeat):
        seconds, result = timed(lambda: ingestctl("deploy", "local", "--version", VERSION, "--json"))
        summary = result.summary()
        if result.code != 0 or summary.get("outcome") != "noop":
            raise SystemExit(f"re-deploy was not a noop:\n{result.explain()}")
        ours.append(seconds)
        seconds, completed = timed(
            lambda: subprocess.run(
                [pyinfra, "-y", "inventories/local.py", "deploys/deploy.py", "--data", f"version={VERSION}"],
                cwd=ROOT,
                env=dict(os.environ),
                capture_output=True,
                text=True,
                check=False,
            )
        )
        if completed.returncode != 0:
            raise SystemExit(f"plain pyinfra run failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-2000:]}")
        plain.append(seconds)
    report = {
        "bench": "noop_redeploy",
        "hosts": 3,
        "ingestctl_s": ours,
        "plain_pyinfra_s": plain,
        "ingestctl_median_s": statistics.median(ours),
        "plain_pyinfra_median_s": statistics.median(plain),
        "ratio": round(statistics.median(ours) / statistics.median(plain), 2),
        "target_ratio": TARGET_RATIO,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print("| run | `ingestctl deploy` no-op (s) | plain `pyinfra deploys/deploy.py` no-op (s) |")
        print("|---|---|---|")
        for number, (a, b) in enumerate(zip(ours, plain, strict=True), start=1):
            print(f"| {number} | {a} | {b} |")
        print(
            f"\nmedian {report['ingestctl_median_s']} s vs {report['plain_pyinfra_median_s']} s "
            f"(ratio {report['ratio']}); target ratio <= {TARGET_RATIO}"
        )
    return 0 if report["ratio"] <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
