"""Detection: a release that breaks the error ratio goes live on its first host; how long until the fleet is
healthy on the previous release again?

Target (DESIGN section 6): 30 s or less, from the bad release going live (the `switched` event of batch 1)
to the rollback's health re-check passing (the `rollback` event with outcome `rolled-back`), both read from
the deploy's own --json stream. The bad release is real: this checkout with the query endpoint raising.

    python -m bench.detection [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.releases import ingestctl, variant

QUERY_ROUTE = "service/ingest/api/events.py"
FAULT = (
    "    after = None\n    if cursor:",
    "    raise RuntimeError('bench: a release whose queries fail')\n    after = None\n    if cursor:",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from ingestctl.testbed import lifecycle

    lifecycle.up(lambda _m: None)
    good = ingestctl("deploy", "local", "--version", "det-good", "--skip-bench")
    if good.code != 0:
        raise SystemExit(good.explain())

    def broken(text: str) -> str:
        assert FAULT[0] in text, f"{QUERY_ROUTE} changed: update bench/detection.py's fault"
        return text.replace(FAULT[0], FAULT[1], 1)

    with tempfile.TemporaryDirectory(prefix="ingest-detection-") as tmp:
        root = variant(Path(tmp), {QUERY_ROUTE: broken})
        bad = ingestctl("deploy", "local", "--version", "det-bad", "--skip-bench", "--json", root=root)
    if bad.code != 3:
        raise SystemExit(f"expected the bad release to be rolled back (exit 3):\n{bad.explain()}")
    events = bad.events
    live = next(e for e in events if e.get("step") == "switched" and e.get("batch") == 1)
    gate = next(e for e in events if e.get("type") == "gate" and e.get("passed") is False)
    back = next(e for e in events if e.get("type") == "rollback" and e.get("outcome") == "rolled-back")
    report = {
        "bench": "detection",
        "bad_release": "det-bad (GET /api/v1/events raises: 500)",
        "failed_gate": gate.get("gate"),
        "gate_numbers": gate.get("numbers"),
        "live_to_detected_s": round(gate["ts"] - live["ts"], 2),
        "live_to_healthy_on_previous_s": round(back["ts"] - live["ts"], 2),
        "target_s": 30,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print("| bad release | failed gate | live -> detected (s) | live -> fleet healthy on previous (s) |")
        print("|---|---|---|---|")
        print(
            f"| {report['bad_release']} | {report['failed_gate']} | {report['live_to_detected_s']} | "
            f"{report['live_to_healthy_on_previous_s']} |"
        )
    return 0 if report["live_to_healthy_on_previous_s"] <= 30 else 1


if __name__ == "__main__":
    sys.exit(main())
