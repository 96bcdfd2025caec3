"""docs/RUNBOOK.md, run for real: every command of its ```sh blocks is executed against the sandbox, in an
order an on-call engineer could follow, with the placeholders the runbook documents filled in, and must exit
as the runbook says it does. A runbook command this test neither runs nor lists as not-for-the-sandbox (with
the reason) fails `test_every_runbook_command_is_run`, so the runbook cannot rot.

Commands run through `bash -c` from the project root, in the environment the runbook's own "Before you
start" block produces (activated virtualenv, INGEST_BASE_URL/APP_URL/BENCH_BASE_URL from `ingestctl testbed
status --json`, the secrets file exported), exactly as an operator's shell would run them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from releases import PROJECT_ROOT, app_urls, ingestctl, version_of

pytestmark = pytest.mark.e2e

RUNBOOK = PROJECT_ROOT / "docs" / "RUNBOOK.md"
PREVIOUS = "e2e8-v1"  # a second known-good release (also test_rollbacks' baseline: built once per session)
STATE_FILE = "/opt/ingest/state.json"

# Runbook commands that do not run against the sandbox, and why. Only these may be left out.
NOT_FOR_THE_SANDBOX = {
    # "Production compose baseline": one host by hand with docker-compose.prod.yml on the machine itself, not
    # a sandbox fleet; it writes /etc/ingest and binds localhost:8000 on the controller.
    'export SECRETS_DIR=/etc/ingest/compose-secrets': "compose baseline (controller, not the sandbox)",
    'umask 077': "compose baseline (controller, not the sandbox)",
    'install -d -m 0700 "$SECRETS_DIR"': "compose baseline (controller, not the sandbox)",
    'printf \'%s\' "$POSTGRES_PASSWORD" > "$SECRETS_DIR/postgres_password"': "compose baseline",
    'printf \'%s\' "$API_KEY" > "$SECRETS_DIR/api_key"': "compose baseline",
    'printf \'%s\' "$JWT_SECRET" > "$SECRETS_DIR/jwt_secret"': "compose baseline",
    'chown 10001:10001 "$SECRETS_DIR"/postgres_password "$SECRETS_DIR"/api_key "$SECRETS_DIR"/jwt_secret':
        "compose baseline",
    'chmod 0400 "$SECRETS_DIR"/postgres_password "$SECRETS_DIR"/api_key "$SECRETS_DIR"/jwt_secret':
        "compose baseline",
    'printf \'%s\' "$REDIS_PASSWORD" > "$SECRETS_DIR/redis_password"': "compose baseline",
    'chown 999:10001 "$SECRETS_DIR/redis_password"': "compose baseline",
    'chmod 0440 "$SECRETS_DIR/redis_password"': "compose baseline",
    'docker compose -f docker-compose.prod.yml up -d --build': "compose baseline",
    'docker compose -f docker-compose.prod.yml --profile migrate run --rm migrate': "compose baseline",
    'python scripts/check_runtime_health.py --base-url http://localhost:8000': "compose baseline (localhost)",
}


def _docs_parser():
    """tests/unit/test_docs.py's own reader of ```sh blocks, so both tests see the same commands."""
    path = PROJECT_ROOT / "tests" / "unit" / "test_docs.py"
    spec = importlib.util.spec_from_file_location("_runbook_docs_parser", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the module look themselves up here
    spec.loader.exec_module(module)
    return module


def runbook_lines() -> list[str]:
    parser = _docs_parser()
    lines: list[str] = []
    for block in parser.sh_blocks(RUNBOOK.read_text(encoding="utf-8")):
        for line in parser.command_lines(block):
            if line not in lines:
                lines.append(line)
    return lines


# Every runbook command run in this session, with its exit status: read by the completeness check at the end.
RAN: dict[str, int] = {}


class Shell:
    """An operator's shell: the runbook's set-up block once, then one `bash -c` per command, recorded."""

    def __init__(self, setup: list[str]):
        self.ran = RAN
        script = "set -e\n" + "\n".join(setup) + "\nenv -0\n"
        completed = subprocess.run(["bash", "-c", script], check=False, cwd=PROJECT_ROOT, capture_output=True, timeout=300,
                                   env={**os.environ, "INGESTCTL_ROOT": str(PROJECT_ROOT)})
        assert completed.returncode == 0, f"the runbook's set-up block failed:\n{completed.stderr.decode()[-3000:]}"
        self.env = dict(item.split("=", 1) for item in completed.stdout.decode().split("\0") if "=" in item)
        self.ran.update({line: 0 for line in setup})

    def run(self, line: str, expect: int = 0, timeout: float = 900, **variables: str) -> str:
        """Run one runbook LINE (it must be in the runbook verbatim); assert its exit status; return its output
        (stdout, then stderr: pyinfra prints the hosts' output on stderr, as an operator sees it)."""
        assert line in runbook_lines(), f"not a command of docs/RUNBOOK.md (was it edited?): {line}"
        completed = subprocess.run(["bash", "-c", line], check=False, cwd=PROJECT_ROOT, capture_output=True, text=True,
                                   timeout=timeout, env={**self.env, **variables})
        assert completed.returncode == expect, (
            f"runbook command exited {completed.returncode}, expected {expect}: {line}\n"
            f"--- stdout\n{completed.stdout[-3000:]}\n--- stderr\n{completed.stderr[-3000:]}")
        self.ran[line] = completed.returncode
        return completed.stdout + completed.stderr


def host_state(ssh, host: str) -> dict | None:
    status, out, err = ssh(host, f"cat {STATE_FILE} 2>/dev/null || true")
    assert status == 0, err
    return json.loads(out) if out.strip() else None


def releases_live(testbed) -> set[str | None]:
    return {version_of(url) for url in app_urls(testbed).values()}


def checkout_version() -> str:
    from ingestctl.images import checkout_version as describe

    return describe(PROJECT_ROOT)


# The incident draft the aborted deploy left (its `incident` event): the post-incident commands work on it.
ABORT_DRAFT: dict[str, object] = {}

# The release `ingestctl deploy local` made live (the checkout's git describe when it ran: read once, because
# a checkout that changes during the session would describe itself differently later).
DEPLOYED: dict[str, str] = {}


def deployed() -> str:
    assert "release" in DEPLOYED, "test_recover_deploys_the_checkout_and_verifies_it must run first"
    return DEPLOYED["release"]


@pytest.fixture(scope="module")
def shell(testbed):
    lines = runbook_lines()
    before_you_start = (". .venv/bin/activate", "ingestctl testbed status", "export INGEST_BASE_URL=",
                        "export APP_URL=", "export BENCH_BASE_URL=", "set -a && . ./secrets/local.env")
    setup = [line for line in lines if line.startswith(before_you_start) and "--json >" not in line]
    assert len(setup) == 6, f"expected the runbook's 'Before you start' commands, found {setup}"
    result = ingestctl("deploy", "local", "--version", PREVIOUS, "--skip-bench", "--json")
    assert result.code == 0, result.explain()
    return Shell(setup)


def test_before_you_start_gives_the_documented_variables(shell, testbed):
    urls = sorted(app_urls(testbed).values())
    assert sorted(shell.env["INGEST_BASE_URL"].split(",")) == urls
    assert shell.env["APP_URL"] in urls and shell.env["BENCH_BASE_URL"] == shell.env["INGEST_BASE_URL"]
    assert shell.env.get("API_KEY") and shell.env.get("JWT_SECRET")
    assert shell.env["PATH"].startswith(str(PROJECT_ROOT / ".venv" / "bin"))


def test_recover_deploys_the_checkout_and_verifies_it(shell, testbed):
    dry = shell.run("ingestctl deploy local --dry")
    assert "nothing was changed" in dry
    expected = checkout_version()
    shell.run("ingestctl deploy local")
    live = releases_live(testbed)
    assert len(live) == 1 and live != {PREVIOUS}, live
    DEPLOYED["release"] = live.pop()
    assert DEPLOYED["release"] in (expected, checkout_version()), "the deploy did not ship the checkout's version"
    # The same deploy again, waiting for the lock as the runbook says: a no-op.
    out = shell.run("ingestctl deploy local --lock-wait 300")
    assert "every host already current" in out
    shell.run("python scripts/check_runtime_health.py")
    shell.run("ingestctl verify local")
    shell.run("ingestctl status local")


def test_triage_and_diagnose_commands(shell, testbed):
    shell.run("ingestctl testbed status")
    status = shell.run("ingestctl status local")
    assert deployed() in status
    shell.run("ingestctl history local")
    shell.run('python scripts/check_runtime_health.py --base-url "$APP_URL"')
    assert json.loads(shell.run('curl -s "$APP_URL/version"'))["version"] == deployed()
    assert json.loads(shell.run('curl -s "$APP_URL/health/live"'))
    assert json.loads(shell.run('curl -s "$APP_URL/health/ready"'))
    metrics = shell.run(
        """curl -s "$APP_URL/metrics" | grep -E '^ingest_(http_requests_total|degraded|build_info|rate_limited)'""")
    assert "ingest_http_requests_total" in metrics
    shell.run("""curl -s "$APP_URL/metrics" | grep -E '^ingest_(http_requests_total|rate_limited)'""")
    shell.run("export REQUEST_ID=runbook-probe-1")
    request_id = f"e2e8-runbook-{int(time.time())}"
    answer = shell.run('curl -s -H "X-Request-Id: $REQUEST_ID" "$APP_URL/api/v1/events"', REQUEST_ID=request_id)
    assert json.loads(answer)["error"]["request_id"] == request_id
    # Logs reach docker a moment after the response: bounded retries of the documented search.
    search = ("pyinfra -y inventories/local.py exec --limit app -- 'cd /opt/ingest && docker compose -p ingest "
              "-f compose.yml logs --no-color --since 2h api_blue api_green' 2>&1 | grep \"$REQUEST_ID\"")
    for attempt in range(5):
        try:
            assert request_id in shell.run(search, REQUEST_ID=request_id, timeout=180)
            break
        except AssertionError:
            if attempt == 4:
                raise
            time.sleep(2)


def test_db_and_redis_template_commands(shell, testbed):
    exec_db = "pyinfra -y inventories/local.py exec --limit db -- "
    ps = shell.run(exec_db + "'cd /opt/ingest && docker compose -p ingest -f compose.yml ps postgres redis'")
    assert "postgres" in ps and "redis" in ps
    shell.run(exec_db + "'cd /opt/ingest && docker compose -p ingest -f compose.yml logs --no-color --tail 200 "
              "postgres'")
    shell.run(exec_db + "'cd /opt/ingest && docker compose -p ingest -f compose.yml up -d --no-deps postgres'")
    assert ".dump" in shell.run(exec_db + "'ls -l /opt/ingest/backups'")
    shell.run(exec_db + "'cd /opt/ingest && docker compose -p ingest -f compose.yml logs --no-color --tail 200 "
              "redis'")
    shell.run(exec_db + "'cd /opt/ingest && docker compose -p ingest -f compose.yml up -d --no-deps redis'")
    shell.run("python scripts/check_runtime_health.py --allow-ready-degraded")
    shell.run('python scripts/check_runtime_health.py --base-url "$APP_URL" --allow-ready-degraded')
    assert shell.run("""curl -s "$APP_URL/metrics" | grep '^ingest_degraded'""").split()[-1] in ("0", "0.0")


def test_stabilize_with_config_rollouts_then_roll_the_config_back(shell, ssh, testbed):
    baseline = host_state(ssh, "db1")["config_version"]
    shell.run("ingestctl config set local RATE_LIMIT_BACKEND=memory")
    memory = host_state(ssh, "db1")["config_version"]
    shell.run("ingestctl config set local RATE_LIMIT_PER_MINUTE=3000")
    shell.run("ingestctl config set local INGEST_MAX_BATCH_ITEMS=500 MAX_REQUEST_BODY_BYTES=524288")
    shown = shell.run("ingestctl config show local")
    assert "524288" in shown and shell.env["API_KEY"] not in shown
    assert all((host_state(ssh, h) or {}).get("config_version") == host_state(ssh, "db1")["config_version"]
               for h in ("app2", "app3"))
    # The 413 checks hold with the lowered limits too (a list of 1001 > 500; a 2 MB body > 512 KiB).
    shell.run("""python3 -c 'print("[" + "0" * 2000000 + "]")' | curl -s -X POST -H "X-API-Key: $API_KEY" """
              """-H 'Content-Type: application/json' --data-binary @- "$APP_URL/api/v1/events" | grep """
              """PAYLOAD_TOO_LARGE""")
    shell.run("""python3 -c 'print("[" + ",".join(["{}"] * 1001) + "]")' | curl -s -X POST -H "X-API-Key: """
              """$API_KEY" -H 'Content-Type: application/json' --data-binary @- "$APP_URL/api/v1/events" | grep """
              """PAYLOAD_TOO_LARGE""")
    shell.run("ingestctl rollback config local")
    assert host_state(ssh, "db1")["config_version"] not in (baseline, memory)
    shell.run('ingestctl rollback config local --to "$CONFIG_VERSION"', CONFIG_VERSION=memory)
    assert host_state(ssh, "db1")["config_version"] == memory
    shell.run('ingestctl rollback config local --to "$CONFIG_VERSION" --json', CONFIG_VERSION=baseline)
    assert {(host_state(ssh, h) or {}).get("config_version") for h in ("db1", "app2", "app3")} == {baseline}
    shell.run("python scripts/check_runtime_health.py")


def test_deploy_incident_abort_and_app_rollbacks(shell, ssh, testbed):
    current = deployed()
    shell.run("ingestctl rollback app local")
    assert releases_live(testbed) == {PREVIOUS}

    # `abort` stops a running deploy at its next step and rolls its switched hosts back (exit 3).
    deploy = subprocess.Popen([str(Path(sys.executable).parent / "ingestctl"), "deploy", "local", "--json"],
                              cwd=PROJECT_ROOT, env=shell.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        deadline = time.monotonic() + 600
        for line in deploy.stdout:
            if '"batch": 1' in line and '"type": "gate"' in line:
                break  # batch 1 switched and gated: abort before batch 2
            assert time.monotonic() < deadline, "the deploy did not reach batch 1 within 600 s"
        shell.run("ingestctl abort local")
        out, _err = deploy.communicate(timeout=600)
    finally:
        if deploy.poll() is None:
            deploy.kill()
    assert deploy.returncode == 3, out[-3000:]
    assert "aborted by `ingestctl abort`" in out
    assert releases_live(testbed) == {PREVIOUS}
    # Exit 3 left an incident draft linking the run: SEV-3, since no metric or benchmark gate failed.
    drafts = [json.loads(line) for line in out.splitlines() if line.startswith('{"type": "incident"')]
    assert len(drafts) == 1 and drafts[0]["sev"] == 3 and drafts[0]["status"] == "draft", out[-3000:]
    ABORT_DRAFT.update(drafts[0])

    shell.run('ingestctl rollback app local --to "$RELEASE"', RELEASE=current)
    assert releases_live(testbed) == {current}
    shell.run('ingestctl rollback app local --to "$RELEASE" --json', RELEASE=PREVIOUS)
    assert releases_live(testbed) == {PREVIOUS}
    shell.run('ingestctl rollback app local --to "$RELEASE"', RELEASE=current)
    # The running release needs schema head 0002: the runbook says the schema rollback refuses (exit 2).
    shell.run("ingestctl rollback schema local --steps 1", expect=2)
    shell.run("ingestctl lock show local")
    shell.run("ingestctl lock break local --force")
    shell.run("ingestctl verify local")


def test_post_incident_and_performance_commands(shell, testbed):
    files = {name: PROJECT_ROOT / name for name in ("incident-ledger.jsonl", "incident-report.md",
                                                    "incident-report.json")}
    existed = {name for name, path in files.items() if path.exists()}
    try:
        shell.run("ingestctl history local --json > incident-ledger.jsonl")
        kinds = {json.loads(line).get("kind") for line in files["incident-ledger.jsonl"].read_text().splitlines()
                 if line.strip()}
        assert {"deploy", "rollback-app", "config-set", "rollback-config"} <= kinds, kinds
        post_incident(shell)
    finally:
        for name, path in files.items():
            if name not in existed:
                path.unlink(missing_ok=True)
    shell.run("ingestctl history local --json")
    shell.run("BENCH_PROFILE=local BENCH_FAIL_THRESHOLD_MS=250 BENCH_FAIL_P95_THRESHOLD_MS=400 "
              'python scripts/benchmark_queries.py --base-url "$APP_URL"')
    shell.run("BENCH_PROFILE=staging BENCH_FAIL_THRESHOLD_MS=250 BENCH_FAIL_P95_THRESHOLD_MS=400 "
              "python scripts/benchmark_queries.py", timeout=1200)


def incident_rows(shell) -> dict[str, dict]:
    out = shell.run("ingestctl incident list local --json")
    return {row["id"]: row for row in map(json.loads, out.splitlines()) if row.get("type") == "row"}


def post_incident(shell) -> None:
    """The runbook's incident commands: the abort's draft dismissed, one opened by hand noted, reported, closed."""
    draft = str(ABORT_DRAFT.get("incident") or "")
    assert draft, "test_deploy_incident_abort_and_app_rollbacks must run first (its abort leaves the draft)"
    assert incident_rows(shell)[draft]["status"] == "draft"
    assert draft in shell.run("ingestctl incident list local")
    shell.run('ingestctl incident close local "$INCIDENT" --dismiss --reason "$REASON"', INCIDENT=draft,
              REASON="a deliberate abort in the runbook drill")

    out = shell.run('ingestctl incident open local --sev 2 --title "$TITLE" --since 15m', TITLE="runbook drill")
    opened = next(i for i, row in incident_rows(shell).items() if row["title"] == "runbook drill"
                  and row["status"] == "open" and i in out)
    shell.run('ingestctl incident note local "$INCIDENT" "$NOTE"', INCIDENT=opened, NOTE="p95 | 900 ms on app2")
    shell.run('ingestctl incident report local "$INCIDENT" > incident-report.md', INCIDENT=opened)
    report = (PROJECT_ROOT / "incident-report.md").read_text()
    for heading in ("## 영향 (Impact)", "## 원인 (Cause)", "## 임시조치 (Mitigation)", "## 복구검증 (Recovery Validation)",
                    "## SEV-2 보고", "## 타임라인 (Timeline)"):
        assert heading in report, report[:3000]
    assert "p95 \\| 900 ms on app2" in report, report  # the note, inert in its table cell
    shell.run('ingestctl incident close local "$INCIDENT"', INCIDENT=opened)
    shell.run('ingestctl incident report local "$INCIDENT" --format json > incident-report.json', INCIDENT=opened)
    data = json.loads((PROJECT_ROOT / "incident-report.json").read_text())
    assert data["incident"]["status"] == "closed" and data["mttd_s"] == pytest.approx(15 * 60, abs=60), data
    rows = incident_rows(shell)
    assert rows[draft]["status"] == "dismissed" and rows[opened]["status"] == "closed"
    shell.run('ingestctl incident close local "$INCIDENT"', expect=2, INCIDENT=opened)  # already closed


def test_every_runbook_command_is_run():
    lines = runbook_lines()
    stale = sorted(set(NOT_FOR_THE_SANDBOX) - set(lines))
    assert not stale, f"NOT_FOR_THE_SANDBOX names commands the runbook no longer has: {stale}"
    missing = [line for line in lines if line not in RAN and line not in NOT_FOR_THE_SANDBOX]
    assert not missing, "docs/RUNBOOK.md commands this test did not run:\n  " + "\n  ".join(missing)
