"""`ingestctl deploy` end to end on the sandbox: v1 then v2, no-op re-deploy, --dry, --json, refusals, lock, abort.

Everything is proven from host state over SSH (state.json, the lock directory, the ledger file) and from each
app host's `/version`, not only from exit codes. Releases are built from a snapshot of this checkout taken at
module start, so edits made to the working tree while the module runs do not leak into "v1" or "v2".
The module leaves the fleet healthy on its v2 release, with the lock free.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from releases import Result, app_urls, ingestctl, variant, version_of

pytestmark = pytest.mark.e2e

V1, V2, V3 = "e2e4-v1", "e2e4-v2", "e2e4-v3"
LOCK_DIR = "/var/lib/ingest/lock"
LEDGER = "/var/lib/ingest/ledger.jsonl"
STATE = "/opt/ingest/state.json"


# ----- host state -------------------------------------------------------------------------------------------

def host_snapshot(testbed, ssh) -> dict[str, dict]:
    """Per host: state.json verbatim, whether the lock directory exists, and the ledger's line count."""
    snapshot = {}
    for host in testbed.hosts:
        code, out, err = ssh(
            host.name,
            f"cat {STATE} 2>/dev/null; echo '--'; test -e {LOCK_DIR} && echo locked || echo free; "
            f"echo '--'; cat {LEDGER} 2>/dev/null | wc -l",
        )
        assert code == 0, f"{host.name}: reading host state failed: {err}"
        state, lock, ledger_lines = (part.strip() for part in out.split("--\n"))
        snapshot[host.name] = {"state": state, "lock": lock, "ledger_lines": int(ledger_lines)}
    return snapshot


def ledger_entries(ssh, host: str) -> list[dict]:
    code, out, err = ssh(host, f"cat {LEDGER}")
    assert code == 0, f"{host}: cannot read {LEDGER}: {err}"
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def live_releases(testbed, ssh) -> dict[str, str | None]:
    releases = {}
    for host in testbed.hosts:
        _code, out, _err = ssh(host.name, f"cat {STATE} 2>/dev/null")
        releases[host.name] = json.loads(out).get("release") if out.strip() else None
    return releases


def served_versions(testbed) -> dict[str, str | None]:
    return {host: version_of(url) for host, url in app_urls(testbed).items()}


def assert_fleet_on(testbed, ssh, release: str) -> None:
    served = served_versions(testbed)
    assert set(served.values()) == {release}, f"expected every app host to serve {release} on /version: {served}"
    recorded = live_releases(testbed, ssh)
    assert set(recorded.values()) == {release}, f"expected {STATE} to record {release} on every host: {recorded}"


# ----- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A frozen copy of this checkout: the good releases of this module are built from it."""
    return variant(tmp_path_factory.mktemp("deploy-checkout"), {})


@pytest.fixture(scope="module")
def deployed_v1(testbed, checkout):
    result = ingestctl("deploy", "local", "--version", V1, "--skip-bench", "--json", root=checkout)
    assert result.code == 0, result.explain()
    return result


@pytest.fixture(scope="module")
def deployed_v2(testbed, deployed_v1, checkout):
    result = ingestctl("deploy", "local", "--version", V2, "--skip-bench", "--json", root=checkout)
    assert result.code == 0, result.explain()
    return result


# ----- deploys ----------------------------------------------------------------------------------------------

def test_v1_then_v2_every_app_host_serves_v2(testbed, ssh, deployed_v1, deployed_v2):
    assert deployed_v1.summary()["outcome"] in {"success", "noop"}, deployed_v1.explain()
    summary = deployed_v2.summary()
    assert summary["outcome"] == "success", deployed_v2.explain()
    assert sorted(summary["switched"]) == sorted(app_urls(testbed)), f"v2 did not switch every app host: {summary}"
    assert_fleet_on(testbed, ssh, V2)


def test_json_stream_has_plan_steps_gates_and_a_summary(deployed_v2):
    events = deployed_v2.events
    types = [e["type"] for e in events]
    for wanted in ("plan", "step", "gate", "summary"):
        assert wanted in types, f"no {wanted!r} event in the --json stream: {sorted(set(types))}"
    assert types[-1] == "summary", f"the last event must be the summary, found {types[-1]!r}"
    plan = next(e for e in events if e["type"] == "plan")
    assert plan["batches"][0] and len(plan["batches"]) >= 2, f"expected a canary batch then the rest: {plan}"
    gates = [(e["gate"], e.get("batch"), e.get("passed")) for e in events if e["type"] == "gate"]
    for batch in range(1, len(plan["batches"]) + 1):
        assert ("health", batch, True) in gates and ("metrics", batch, True) in gates, (
            f"batch {batch} was not gated on health and metrics: {gates}"
        )
    assert ("benchmark", None, None) in gates, f"--skip-bench is not reported as a skipped gate: {gates}"
    metrics = next(e for e in events if e["type"] == "gate" and e["gate"] == "metrics")
    assert metrics["numbers"]["thresholds"]["max_p95_ms"] > 0, f"metric gate without its numbers: {metrics}"


def test_ledger_and_history_have_both_releases(testbed, ssh, deployed_v2):
    history = ingestctl("history", "local", "--json")
    assert history.code == 0, history.explain()
    rows = [e for e in history.events if e["type"] == "row"]
    succeeded = {r["release"].split(" -> ")[-1] for r in rows if r["kind"] == "deploy"
                 and r["outcome"].startswith("success")}
    for release in (V1, V2):
        assert release in succeeded, f"`ingestctl history local` lacks a successful deploy of {release}: {rows[:5]}"
    for host in testbed.hosts:
        entries = [e for e in ledger_entries(ssh, host.name) if e["kind"] == "deploy"]
        v2 = [e for e in entries if e["release"] == V2 and e["hosts"]]
        assert v2, f"{host.name}: {LEDGER} has no deploy of {V2} that switched hosts"
        assert v2[-1]["previous_release"] == V1 and v2[-1]["bench_skipped"] is True, v2[-1]
        assert {g["name"] for g in v2[-1]["gates"]} >= {"health", "metrics"}, v2[-1]["gates"]


def test_noop_redeploy_changes_nothing(testbed, ssh, deployed_v2, checkout):
    before = host_snapshot(testbed, ssh)
    started = time.monotonic()
    result = ingestctl("deploy", "local", "--version", V2, "--skip-bench", "--json", root=checkout)
    took = time.monotonic() - started
    assert result.code == 0, result.explain()
    summary = result.summary()
    assert summary["outcome"] == "noop" and summary["switched"] == [], f"a re-deploy switched hosts: {summary}"
    after = host_snapshot(testbed, ssh)
    for host in before:
        assert after[host]["state"] == before[host]["state"], f"{host}: {STATE} changed on a no-op re-deploy"
        assert after[host]["lock"] == "free", f"{host}: the lock was not released"
    noops = [e["message"] for e in result.events if e.get("step") == "rollout"]
    assert noops and all("noop" in m or "batch" in m for m in noops), noops
    assert not [e for e in result.events if e["type"] == "gate" and e.get("gate") == "health"], (
        "a no-op re-deploy ran the health gate, so it switched something"
    )
    print(f"no-op re-deploy of {V2} to {len(before)} hosts: {took:.1f}s (including the cached image build)")


def test_the_plain_pyinfra_deploy_of_the_live_release_changes_nothing(testbed, ssh, deployed_v2, checkout):
    """`pyinfra inventories/local.py deploys/deploy.py` (deploy.py's docstring) runs deploy.py once per host in
    greenlets; each builds the image under one lock file, which once stopped the whole process for ever."""
    before = host_snapshot(testbed, ssh)
    completed = subprocess.run(
        [str(Path(sys.executable).parent / "pyinfra"), "-y", "inventories/local.py", "deploys/deploy.py", "--data",
         f"version={V2}"], cwd=checkout, env={**os.environ, "INGESTCTL_ROOT": str(checkout)},
        capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-2000:]
    after = host_snapshot(testbed, ssh)
    assert {h: s["state"] for h, s in after.items()} == {h: s["state"] for h, s in before.items()}
    assert_fleet_on(testbed, ssh, V2)


def test_dry_prints_the_plan_and_changes_nothing(testbed, ssh, deployed_v2, checkout, docker_engine):
    before = host_snapshot(testbed, ssh)
    dry_version = "e2e4-dry"
    result = ingestctl("deploy", "local", "--dry", "--version", dry_version, root=checkout)
    assert result.code == 0, result.explain()
    out = result.stdout
    for expected in (f"ingest:{dry_version}", f"live now: {V2}", "batch 1 of", "hosts:", "migrations:"):
        assert expected in out, f"--dry output lacks {expected!r}:\n{out}"
    assert "nothing was changed" in out, out
    assert host_snapshot(testbed, ssh) == before, "--dry changed host state (state.json, lock or ledger)"
    for host in testbed.hosts:
        code, _out, _err = ssh(host.name, f"docker image inspect ingest:{dry_version} >/dev/null 2>&1")
        assert code != 0, f"{host.name}: --dry shipped ingest:{dry_version}"
    import docker.errors

    with pytest.raises(docker.errors.ImageNotFound):
        docker_engine.images.get(f"ingest:{dry_version}")


def test_verify_passes_after_the_deploys(testbed, deployed_v2, docker_engine):
    image = f"ingest:{V2}"
    result = ingestctl("verify", "local", env={"INGEST_IMAGE": image,
                                               "INGEST_IMAGE_ID": docker_engine.images.get(image).id})
    assert result.code == 0, result.explain()
    assert re.search(r"\d+ passed", result.stdout), result.explain()


# ----- refusals: exit 2, nothing touched ------------------------------------------------------------------------

def test_short_secret_is_refused_before_any_host_is_touched(testbed, ssh, deployed_v2, checkout):
    before = host_snapshot(testbed, ssh)
    result = ingestctl("deploy", "local", "--version", V3, "--skip-bench", "--json", root=checkout,
                       env={"JWT_SECRET": "short"})
    assert result.code == 2, result.explain()
    assert "JWT_SECRET" in result.stdout + result.stderr, result.explain()
    assert '"short"' not in result.stdout + result.stderr, "the refused secret's value was echoed"
    assert host_snapshot(testbed, ssh) == before, "a refused deploy touched a host"


def test_missing_secret_is_refused_before_any_host_is_touched(testbed, ssh, deployed_v2, tmp_path):
    before = host_snapshot(testbed, ssh)
    empty = tmp_path / "empty.env"
    empty.write_text("")
    empty.chmod(0o600)
    # The inventory names a secrets file with nothing in it, and the environment supplies none either.
    root = variant(tmp_path, {"inventories/local.py": lambda text: text.replace(
        '"bench_profile":', f'"secrets_file": {str(empty)!r},\n        "bench_profile":', 1)})
    env = {f"{name}{suffix}": "" for name in ("POSTGRES_PASSWORD", "API_KEY", "JWT_SECRET") for suffix in ("", "_FILE")}
    result = ingestctl("deploy", "local", "--version", V3, "--skip-bench", "--json", root=root, env=env)
    assert result.code == 2, result.explain()
    assert re.search(r"JWT_SECRET\W.*is required", result.stdout), result.explain()
    assert host_snapshot(testbed, ssh) == before, "a refused deploy touched a host"


def test_inventory_error_is_refused_before_any_host_is_touched(testbed, ssh, deployed_v2, tmp_path):
    before = host_snapshot(testbed, ssh)
    root = variant(tmp_path, {"inventories/local.py": lambda text: text.replace(
        '"bench_profile":', '"app_port": "x",\n        "bench_profile":', 1)})
    assert '"app_port": "x"' in (root / "inventories" / "local.py").read_text(), "the inventory was not broken"
    result = ingestctl("deploy", "local", "--version", V3, "--skip-bench", "--json", root=root)
    assert result.code == 2, result.explain()
    assert "data.app_port: expected an integer" in result.stdout, result.explain()
    assert host_snapshot(testbed, ssh) == before, "a refused deploy touched a host"


# ----- the deploy lock: exit 5 ----------------------------------------------------------------------------------

def _foreign_lock_record() -> str:
    from ingestctl import lock as lock_mod

    return lock_mod.new_record(who="alice@laptop", command="deploy local --version hotfix-7", release="hotfix-7",
                               now=datetime.now(UTC), machine="ci-runner-7", pid=4242).to_json()


def test_a_held_lock_exits_5_naming_the_holder_then_lock_break_frees_it(testbed, ssh, deployed_v2, checkout):
    holder_host = testbed.hosts[-1].name
    record = _foreign_lock_record()
    code, _out, err = ssh(holder_host, f"mkdir -p {LOCK_DIR} && printf '%s\\n' '{record}' > {LOCK_DIR}/info.json")
    assert code == 0, err
    try:
        before = host_snapshot(testbed, ssh)
        result = ingestctl("deploy", "local", "--version", V2, "--skip-bench", "--json", root=checkout)
        assert result.code == 5, result.explain()
        message = result.stdout + result.stderr
        assert "alice@laptop" in message and "ci-runner-7" in message and "hotfix-7" in message, result.explain()
        assert "ingestctl lock break local" in message, result.explain()

        started = time.monotonic()
        waited = ingestctl("deploy", "local", "--version", V2, "--skip-bench", "--json", "--lock-wait", "2",
                           root=checkout)
        took = time.monotonic() - started
        assert waited.code == 5, waited.explain()
        lock_wait = [e for e in waited.events if e["type"] == "progress" and "waiting for the deploy lock" in
                     e.get("message", "")]
        assert lock_wait, f"--lock-wait 2 did not wait: {waited.explain()}"
        assert took >= 2, f"--lock-wait 2 gave up after {took:.1f}s"

        after = host_snapshot(testbed, ssh)
        for host, seen in after.items():
            expected = "locked" if host == holder_host else "free"
            assert seen["lock"] == expected, f"{host}: lock is {seen['lock']}, expected {expected} after refusals"
            assert seen["state"] == before[host]["state"], f"{host}: state.json changed while the lock was held"
            assert seen["ledger_lines"] == before[host]["ledger_lines"], f"{host}: a refused deploy wrote the ledger"
        _code, still, _err = ssh(holder_host, f"cat {LOCK_DIR}/info.json")
        assert json.loads(still) == json.loads(record), f"{holder_host}: the holder's lock record was changed"
    finally:
        refused = ingestctl("lock", "break", "local")  # no terminal to ask on, no --force: nothing is broken
        broke = ingestctl("lock", "break", "local", "--force")
    assert refused.code == 2 and "--force" in refused.stdout + refused.stderr, refused.explain()
    assert broke.code == 0, broke.explain()
    assert "alice@laptop" in broke.stdout, f"`lock break` did not say whose lock it broke: {broke.explain()}"
    assert all(s["lock"] == "free" for s in host_snapshot(testbed, ssh).values()), "`lock break` left a lock"


# ----- abort: exit 3, rolled back ------------------------------------------------------------------------------

def _read_events(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


def deploy_watched(checkout, version: str, on_event, timeout_s: float = 900) -> Result:
    """`ingestctl deploy local --version VERSION --skip-bench --json` in its own process group, calling
    ON_EVENT(event, process) for each event as it arrives; ON_EVENT returns True once it has killed the run.
    Bounded by TIMEOUT_S; the process group is killed if it outlives it."""
    executable = shutil.which("ingestctl", path=str(Path(sys.executable).parent)) or "ingestctl"
    deploy = subprocess.Popen(
        [executable, "deploy", "local", "--version", version, "--skip-bench", "--json"], cwd=checkout,
        env={**os.environ, "INGESTCTL_ROOT": str(checkout)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_events, args=(deploy.stdout, lines), daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            seen.append(line)
            if on_event(json.loads(line) if line.startswith("{") else {}, deploy):
                break
        code = deploy.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        if deploy.poll() is None:
            os.killpg(deploy.pid, signal.SIGKILL)
    return Result(code, "".join(seen), deploy.stderr.read())


def test_abort_mid_deploy_rolls_back(testbed, ssh, deployed_v2, checkout):
    assert_fleet_on(testbed, ssh, V2)
    aborted = None

    def abort_once_batch_1_is_live(event, _process):
        nonlocal aborted
        # Batch 1 switched and is being gated (its metric window is still open): the abort lands before
        # batch 2 starts.
        batch_1_live = event.get("batch") == 1 and (event.get("type") == "gate" or event.get("step") == "switched")
        if aborted is None and batch_1_live:
            aborted = ingestctl("abort", "local", root=checkout)

    result = deploy_watched(checkout, V3, abort_once_batch_1_is_live, timeout_s=600)
    code = result.code
    assert aborted is not None, f"the deploy never reported a batch 1 gate: {result.explain()}"
    assert aborted.code == 0, aborted.explain()
    assert code == 3, result.explain()
    events = result.events
    assert any(e["type"] == "rollback" for e in events), f"no rollback event: {result.explain()}"
    assert not any(e.get("step") == "rollout" and e.get("batch") == 2 for e in events), (
        f"batch 2 started after the abort: {result.explain()}"
    )
    assert "abort" in json.dumps(result.summary()), result.summary()
    assert_fleet_on(testbed, ssh, V2)
    entry = ledger_entries(ssh, testbed.hosts[0].name)[-1]
    assert entry["release"] == V3 and entry["outcome"] == "rolled-back", entry
    assert "abort" in (entry.get("message") or ""), entry
    assert all(s["lock"] == "free" for s in host_snapshot(testbed, ssh).values()), "the aborted deploy kept the lock"


# ----- the controller dies mid-rollout ---------------------------------------------------------------------------

def test_a_sigkilled_controller_shows_as_interrupted_and_the_next_deploy_converges(testbed, ssh, deployed_v2,
                                                                                  checkout):
    """SIGKILL the whole `ingestctl deploy` once batch 1 is live: no finally, no unlock, no ledger entry. The
    next deploy takes the dead run's lock over by itself (its pid is gone) and converges the fleet; history
    shows the killed run as interrupted, naming the host it had switched."""
    assert_fleet_on(testbed, ssh, V2)
    killed = False

    def kill_once_batch_1_is_live(event, process):
        nonlocal killed
        if event.get("step") == "switched" and event.get("batch") == 1:
            os.killpg(process.pid, signal.SIGKILL)  # no finally, no unlock, no ledger entry
            killed = True
        return killed

    deploy_watched(checkout, V3, kill_once_batch_1_is_live, timeout_s=600)
    assert killed, "the deploy never reported batch 1 switched"
    assert any(s["lock"] == "locked" for s in host_snapshot(testbed, ssh).values()), "the killed run left no lock"

    history = ingestctl("history", "local", "--json", root=checkout)
    assert history.code == 0, history.explain()
    rows = [e for e in history.events if e["type"] == "row" and str(e.get("release", "")).endswith(V3)]
    assert rows and rows[0]["outcome"].startswith("interrupted on "), f"no interrupted run in history: {rows}"
    status = ingestctl("status", "local", root=checkout)
    assert status.code == 0, status.explain()

    again = ingestctl("deploy", "local", "--version", V3, "--skip-bench", "--json", root=checkout)
    assert again.code == 0, again.explain()
    assert "took over the expired deploy lock" in again.stdout, again.explain()
    assert_fleet_on(testbed, ssh, V3)
    entry = ledger_entries(ssh, testbed.hosts[0].name)[-1]
    assert entry["release"] == V3 and entry["outcome"] == "success", entry
    assert "took over the expired deploy lock" in (entry.get("lock_takeover") or ""), entry
    assert all(s["lock"] == "free" for s in host_snapshot(testbed, ssh).values())


def test_a_lock_that_cannot_be_taken_on_one_host_is_released_everywhere(testbed, ssh, deployed_v2, checkout):
    """The lock's directory cannot be created on the last host (a file sits where /var/lib/ingest should be):
    the deploy takes the lock nowhere, exits 2 naming the host, and nothing changes."""
    victim = testbed.hosts[-1].name
    code, _out, err = ssh(victim, "mv /var/lib/ingest /var/lib/ingest.e2e-moved && touch /var/lib/ingest")
    assert code == 0, err
    try:
        before = {h: s for h, s in host_snapshot(testbed, ssh).items() if h != victim}
        result = ingestctl("deploy", "local", "--version", V2, "--skip-bench", "--json", root=checkout)
        after = {h: s for h, s in host_snapshot(testbed, ssh).items() if h != victim}
    finally:
        ssh(victim, "rm -f /var/lib/ingest && mv /var/lib/ingest.e2e-moved /var/lib/ingest")
    assert result.code == 2, result.explain()
    assert victim in result.summary()["error"] and "deploy lock" in result.summary()["error"], result.explain()
    assert after == before, "a host changed although the lock could not be taken everywhere"
    assert all(s["lock"] == "free" for s in host_snapshot(testbed, ssh).values()), "a partial lock was left"


def test_a_host_paused_mid_rollout_ends_honestly_and_the_next_deploy_converges(testbed, ssh, deployed_v2, checkout,
                                                                              testbed_name):
    """`docker pause` the second batch's host once batch 1 is live: the run rolls batch 1 back (exit 3) naming
    the host it could not reach; after unpause, the next deploy takes the run's leftover lock over and converges."""
    current = next(iter(live_releases(testbed, ssh).values()))
    target = V2 if current != V2 else V3
    batches: list[list[str]] = []
    paused = None

    def pause_batch_2_once_batch_1_is_live(event, _process):
        nonlocal paused
        if event.get("type") == "plan" and "batches" in event:
            batches.extend(event["batches"])
        if paused is None and event.get("step") == "switched" and event.get("batch") == 1:
            paused = f"{testbed_name}-{batches[1][0]}"
            subprocess.run(["docker", "pause", paused], check=True, capture_output=True, timeout=60)

    try:
        result = deploy_watched(checkout, target, pause_batch_2_once_batch_1_is_live)
    finally:
        if paused:
            subprocess.run(["docker", "unpause", paused], check=False, capture_output=True, timeout=60)
    code = result.code
    assert paused, f"the deploy never reported batch 1 switched: {result.explain()}"
    host = paused.removeprefix(f"{testbed_name}-")
    assert code in (3, 4), result.explain()
    assert host in json.dumps(result.summary()), f"the summary does not name {host}: {result.summary()}"
    if code == 3:
        assert set(served_versions(testbed).values()) == {current}, "exit 3 but the fleet is not back"
    deadline = time.monotonic() + 60
    while ssh(host, "true")[0] != 0:
        assert time.monotonic() < deadline, f"{host} did not answer over SSH within 60 s of docker unpause"
        time.sleep(1)

    again = ingestctl("deploy", "local", "--version", target, "--skip-bench", "--json", root=checkout)
    assert again.code == 0, again.explain()
    assert_fleet_on(testbed, ssh, target)
    assert all(s["lock"] == "free" for s in host_snapshot(testbed, ssh).values())


RESTART_DOCKERD = (
    # The engine as the sandbox host started it (same flags), killed and started again: its containers stop
    # with it and come back by their restart policy, as on a host whose docker.service was restarted.
    'pid=$(pidof dockerd) && args=$(tr "\\0" " " < /proc/$pid/cmdline) && kill $pid && '
    'for i in $(seq 1 60); do kill -0 $pid 2>/dev/null || break; sleep 0.5; done; '
    'nohup $args >>/var/log/dockerd.log 2>&1 </dev/null & '
    'for i in $(seq 1 60); do timeout 5 docker info >/dev/null 2>&1 && exit 0; sleep 0.5; done; exit 1'
)


def test_dockerd_restarted_on_a_host_mid_rollout_ends_honestly_and_the_next_deploy_converges(testbed, ssh,
                                                                                            deployed_v2, checkout):
    """Restart the Docker engine of the second batch's host once batch 1 is live. The run either rides it out
    (its steps retry transient engine errors) or rolls back (exit 3); either way every host then serves one
    release, ready, and the next deploy converges without a lock break."""
    current = next(iter(live_releases(testbed, ssh).values()))
    target = V2 if current != V2 else V3
    batches: list[list[str]] = []
    restarted: dict[str, tuple[int, str, str]] = {}

    def restart_dockerd_once_batch_1_is_live(event, _process):
        if event.get("type") == "plan" and "batches" in event:
            batches.extend(event["batches"])
        if not restarted and event.get("step") == "switched" and event.get("batch") == 1:
            restarted[batches[1][0]] = ssh(batches[1][0], RESTART_DOCKERD, timeout=90)

    result = deploy_watched(checkout, target, restart_dockerd_once_batch_1_is_live)
    assert restarted, f"the deploy never reported batch 1 switched: {result.explain()}"
    [(host, (status, _out, err))] = restarted.items()
    assert status == 0, f"{host}: restarting dockerd failed: {err}"
    assert result.code in (0, 3), result.explain()
    expected = target if result.code == 0 else current
    deadline = time.monotonic() + 120  # the restarted host's containers come back by their restart policy
    while set(served_versions(testbed).values()) != {expected}:
        assert time.monotonic() < deadline, f"exit {result.code} but the fleet serves {served_versions(testbed)}"
        time.sleep(2)
    assert all(s["lock"] == "free" for s in host_snapshot(testbed, ssh).values()), "the run kept the lock"

    again = ingestctl("deploy", "local", "--version", target, "--skip-bench", "--json", root=checkout)
    assert again.code == 0, again.explain()
    assert_fleet_on(testbed, ssh, target)
