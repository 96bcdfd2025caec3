"""Runtime health of running ingest services: live, ready, /version and /metrics, for one or more base URLs.

Exit 0 when every URL passes, 1 otherwise. A degraded readiness answer (Redis down, ingest still working)
passes only with --allow-ready-degraded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field

import httpx

REQUIRED_METRICS = (
    "ingest_http_requests_total", "ingest_http_request_duration_seconds", "ingest_events_accepted_total",
    "ingest_events_duplicate_total", "ingest_degraded",
)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class HostReport:
    base_url: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)


def check_service(base_url: str, allow_ready_degraded: bool, timeout: float = 5.0,
                  client: httpx.Client | None = None) -> HostReport:
    report = HostReport(base_url.rstrip("/"))
    http = client or httpx.Client(timeout=timeout)
    try:
        def get(path: str) -> httpx.Response | None:
            try:
                return http.get(report.base_url + path)
            except httpx.HTTPError as exc:
                report.checks.append(Check(path, False, f"no answer: {type(exc).__name__}: {exc}"))
                return None

        if (live := get("/health/live")) is not None:
            report.checks.append(Check("live", live.status_code == 200, f"HTTP {live.status_code}"))

        if (ready := get("/health/ready")) is not None:
            try:
                body = ready.json()
            except ValueError:
                body = {}
            status = body.get("status", "?")
            failing = {name: c.get("detail", c.get("status")) for name, c in body.get("checks", {}).items()
                       if c.get("status") != "ok"}
            passed = ready.status_code == 200 and status == "ok"
            if not passed and allow_ready_degraded and ready.status_code == 503 and status == "degraded":
                passed = True
            detail = f"HTTP {ready.status_code} status={status}" + (f" failing={failing}" if failing else "")
            report.checks.append(Check("ready", passed, detail))

        if (version := get("/version")) is not None:
            try:
                info = version.json()
                passed = version.status_code == 200 and bool(info.get("version")) and "schema_head" in info
                detail = f"version={info.get('version')} schema_head={info.get('schema_head')}"
            except ValueError:
                passed, detail = False, f"HTTP {version.status_code}, not JSON"
            report.checks.append(Check("version", passed, detail))

        if (metrics := get("/metrics")) is not None:
            missing = [name for name in REQUIRED_METRICS if name not in metrics.text]
            report.checks.append(Check("metrics", metrics.status_code == 200 and not missing,
                                       f"HTTP {metrics.status_code}" + (f" missing {missing}" if missing else "")))
    finally:
        if client is None:
            http.close()
    return report


def render(reports: list[HostReport]) -> str:
    lines = []
    for report in reports:
        lines.append(f"{'PASS' if report.ok else 'FAIL'}  {report.base_url}")
        for check in report.checks:
            lines.append(f"  {'ok  ' if check.ok else 'FAIL'} {check.name:<8} {check.detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", action="append", dest="base_urls", metavar="URL",
                        help="service base URL; repeat for a fleet (default: $INGEST_BASE_URL or http://localhost:8000)")
    parser.add_argument("--allow-ready-degraded", action="store_true",
                        help="accept readiness 503 with status=degraded (Redis down, degrade mode)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per request (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    args = parser.parse_args(argv)
    urls = args.base_urls or [u for u in os.environ.get("INGEST_BASE_URL", "http://localhost:8000").split(",") if u]
    reports = [check_service(url, args.allow_ready_degraded, args.timeout) for url in urls]
    ok = all(report.ok for report in reports)
    if args.json:
        print(json.dumps({"ok": ok, "hosts": [{"base_url": r.base_url, "ok": r.ok,
                                                "checks": [asdict(c) for c in r.checks]} for r in reports]}))
    else:
        print(render(reports))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
