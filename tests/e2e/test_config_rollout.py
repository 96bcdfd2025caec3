"""Gated config rollouts and config rollbacks on the real sandbox: the runbook's surge response
(`config set local INGEST_MAX_BATCH_ITEMS=...`), its undo (`rollback config local`), secret rotation, and the
refusals that must leave every host untouched.

Effects are proved through the service itself (a batch of 6 events answered 202, then 413, then 202 again on
every app host; a 3000-byte body that the proxy in front refuses while MAX_REQUEST_BODY_BYTES is 2048; the old API
key refused after a rotation) and through the hosts (state.json, the config directories, the ledger), not only
through exit codes. Each scenario ends with `ingestctl verify local`.
The module starts by deploying its baseline (the inventory's config) and ends with the baseline config live.
"""

from __future__ import annotations

import json
import secrets
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from releases import app_urls, ingestctl, remember_secret

pytestmark = pytest.mark.e2e

RELEASE = "e2e8-v2"  # the same build of this checkout as test_rollbacks' baseline: built once per session
STATE_FILE = "/opt/ingest/state.json"
LEDGER_FILE = "/var/lib/ingest/ledger.jsonl"
LOCK_INFO = "/var/lib/ingest/lock/info.json"
HOSTS = ("db1", "app2", "app3")


def host_state(ssh, host: str) -> dict | None:
    status, out, err = ssh(host, f"cat {STATE_FILE} 2>/dev/null || true")
    assert status == 0, err
    return json.loads(out) if out.strip() else None


def fleet_states(ssh) -> dict[str, dict | None]:
    return {h: host_state(ssh, h) for h in HOSTS}


def config_versions(ssh) -> dict[str, str]:
    return {h: (s or {}).get("config_version") for h, s in fleet_states(ssh).items()}


def ledger_text(ssh, host: str = "db1") -> str:
    status, out, err = ssh(host, f"cat {LEDGER_FILE} 2>/dev/null || true")
    assert status == 0, err
    return out


def ledger(ssh, host: str = "db1") -> dict[str, dict]:
    entries: dict[str, dict] = {}
    for line in ledger_text(ssh, host).splitlines():
        if line.strip():
            entry = json.loads(line)
            entries[entry["id"]] = entry
    return entries


def config_dirs(ssh) -> dict[str, str]:
    return {h: ssh(h, "ls /opt/ingest/config")[1] for h in HOSTS}


def lock_holders(ssh) -> list[str]:
    return [h for h in HOSTS if ssh(h, f"test -e {LOCK_INFO}")[0] == 0]


def file_secrets() -> dict[str, str]:
    """The local environment's secrets, as the deploy used them (environment overrides included)."""
    from ingestctl import paths
    from ingestctl import secrets as secrets_mod

    return secrets_mod.validated(paths.secrets_file("local"))


def events(n: int) -> list[dict]:
    now = datetime.now(UTC).isoformat()
    return [{"id": str(uuid.uuid4()), "source": "e2e8-config", "type": "batch-limit", "timestamp": now,
             "payload": {"n": i}} for i in range(n)]


def ingest_status(testbed, n: int, api_key: str) -> dict[str, int]:
    """The HTTP status of a batch of N events posted to every app host; 413s must carry PAYLOAD_TOO_LARGE."""
    found = {}
    for name, url in app_urls(testbed).items():
        response = httpx.post(url + "/api/v1/events", json=events(n), headers={"X-API-Key": api_key}, timeout=10)
        if response.status_code == 413:
            assert response.json()["error"]["code"] == "PAYLOAD_TOO_LARGE", response.text
        found[name] = response.status_code
    return found


def padded_status(testbed, size: int, api_key: str) -> dict[str, int | str]:
    """One event padded to SIZE bytes of JSON, posted to every app host: its status, or for a 413 its message
    (the proxy's names its own limit, so the test sees which limit answered)."""
    event = events(1)[0]
    event["payload"] = {"pad": ""}
    event["payload"]["pad"] = "x" * (size - len(json.dumps([event]).encode()))
    body = json.dumps([event]).encode()
    found: dict[str, int | str] = {}
    for name, url in app_urls(testbed).items():
        response = httpx.post(url + "/api/v1/events", content=body, timeout=10,
                              headers={"X-API-Key": api_key, "Content-Type": "application/json"})
        found[name] = response.json()["error"]["message"] if response.status_code == 413 else response.status_code
    return found


def everywhere(testbed, status: int | str) -> dict[str, int | str]:
    return {name: status for name in app_urls(testbed)}


def verify(ssh) -> None:
    state = host_state(ssh, "db1")
    result = ingestctl("verify", "local", env={"INGEST_IMAGE": state["image"], "INGEST_IMAGE_ID": state["image_id"]},
                       timeout=600)
    assert result.code == 0, "ingestctl verify local failed:\n" + result.explain()


def assert_untouched(ssh, states: dict, entries: dict, dirs: dict) -> None:
    assert fleet_states(ssh) == states, "a refused command changed a host's state.json"
    assert ledger(ssh) == entries, "a refused command wrote the ledger"
    assert config_dirs(ssh) == dirs, "a refused command wrote a config version to a host"
    assert lock_holders(ssh) == []


@pytest.fixture(scope="module")
def baseline(testbed, ssh):
    """RELEASE with the inventory's config (and the secrets file's secrets) live on every host."""
    result = ingestctl("deploy", "local", "--version", RELEASE, "--skip-bench", "--json")
    assert result.code == 0, result.explain()
    versions = set(config_versions(ssh).values())
    assert len(versions) == 1
    live = versions.pop()
    yield live
    if set(config_versions(ssh).values()) != {live}:
        # A failed test left another config live: the deploy puts the inventory's config back.
        ingestctl("deploy", "local", "--version", RELEASE, "--skip-bench", "--json")


# Refused by the proxy itself once MAX_REQUEST_BODY_BYTES is lowered: its client_max_body_size follows the config.
PROXY_413 = "request body must be at most 2048 bytes (MAX_REQUEST_BODY_BYTES, client_max_body_size of the proxy)"


def test_config_set_lowers_the_batch_limit_and_rollback_config_restores_it(testbed, ssh, baseline):
    api_key = file_secrets()["API_KEY"]
    assert ingest_status(testbed, 6, api_key) == everywhere(testbed, 202)
    assert padded_status(testbed, 3000, api_key) == everywhere(testbed, 202)
    before = ledger(ssh)

    result = ingestctl("config", "set", "local", "INGEST_MAX_BATCH_ITEMS=5", "MAX_REQUEST_BODY_BYTES=2048", "--json")
    assert result.code == 0, result.explain()
    lowered = set(config_versions(ssh).values())
    assert len(lowered) == 1 and lowered != {baseline}, f"expected one new config version, found {lowered}"
    assert ingest_status(testbed, 6, api_key) == everywhere(testbed, 413)
    assert ingest_status(testbed, 5, api_key) == everywhere(testbed, 202)
    assert {name: str(found)[:len(PROXY_413)] for name, found in padded_status(testbed, 3000, api_key).items()} \
        == everywhere(testbed, PROXY_413)
    assert padded_status(testbed, 2048, api_key) == everywhere(testbed, 202), "a body at the limit passes"
    new = [e for i, e in ledger(ssh).items() if i not in before]
    assert [(e["kind"], e["outcome"]) for e in new] == [("config-set", "success")]
    assert new[0]["config_version"] in lowered and new[0]["previous_config_version"] == baseline
    plan = next(e for e in result.events if e["type"] == "plan")
    assert {"key": "INGEST_MAX_BATCH_ITEMS", "old": "1000", "new": "5"} in plan["changes"]
    assert {"key": "MAX_REQUEST_BODY_BYTES", "old": "1048576", "new": "2048"} in plan["changes"]

    before = ledger(ssh)
    result = ingestctl("rollback", "config", "local", "--json")
    assert result.code == 0, result.explain()
    assert set(config_versions(ssh).values()) == {baseline}
    assert ingest_status(testbed, 6, api_key) == everywhere(testbed, 202)
    assert padded_status(testbed, 3000, api_key) == everywhere(testbed, 202), "the proxy's limit came back too"
    new = [e for i, e in ledger(ssh).items() if i not in before]
    assert [(e["kind"], e["outcome"]) for e in new] == [("rollback-config", "success")]
    assert new[0]["config_version"] == baseline and isinstance(new[0]["time_to_healthy_s"], (int, float))
    assert lock_holders(ssh) == []
    verify(ssh)


@pytest.mark.parametrize(("assignment", "expected"), [
    ("NO_SUCH_KEY=1", "NO_SUCH_KEY: unknown config key; known keys: INGEST_MAX_BATCH_ITEMS"),
    ("INGEST_MAX_BATCH_ITEMS=0", "INGEST_MAX_BATCH_ITEMS: expected an integer from 1 to 100000, found '0'"),
    ("RATE_LIMIT_BACKEND=etcd", "RATE_LIMIT_BACKEND: expected one of: redis, memory"),
    ("JWT_SECRET=@{tiny}", "JWT_SECRET: must be at least 32 bytes, found 16 bytes"),
    ("JWT_SECRET=e2e8-tiny-sekret", "JWT_SECRET: a secret is taken only as JWT_SECRET=@FILE or JWT_SECRET=-"),
])
def test_config_set_refuses_bad_input_without_touching_any_host(testbed, ssh, baseline, assignment, expected,
                                                                tmp_path):
    states, entries, dirs = fleet_states(ssh), ledger(ssh), config_dirs(ssh)
    (tmp_path / "tiny").write_text(remember_secret("JWT_SECRET", "e2e8-tiny-sekret") + "\n")
    result = ingestctl("config", "set", "local", assignment.format(tiny=tmp_path / "tiny"), "--json")
    assert result.code == 2, result.explain()
    summary = result.summary()
    assert summary["outcome"] == "refused" and expected in summary["error"], summary["error"]
    if assignment.startswith("JWT_SECRET"):
        assert "e2e8-tiny-sekret" not in result.stdout + result.stderr, "a secret value was echoed"
    assert_untouched(ssh, states, entries, dirs)


def test_rollback_config_to_an_unknown_or_live_version_is_refused(testbed, ssh, baseline):
    states, entries, dirs = fleet_states(ssh), ledger(ssh), config_dirs(ssh)
    # 000000000000 is never a real version (a sha256 prefix), so this holds on any ledger, fresh or not.
    result = ingestctl("rollback", "config", "local", "--to", "000000000000", "--json")
    assert result.code == 2, result.explain()
    assert "000000000000" in result.summary()["error"] and "unknown" in result.summary()["error"]
    assert baseline in result.summary()["error"], "expected the known config versions to be named"
    result = ingestctl("rollback", "config", "local", "--to", baseline, "--json")
    assert result.code == 2, result.explain()
    assert "already live" in result.summary()["error"]
    assert_untouched(ssh, states, entries, dirs)


def test_secret_rotation_takes_the_new_key_refuses_the_old_and_never_shows_either(testbed, ssh, baseline, tmp_path):
    old_key = file_secrets()["API_KEY"]
    new_key = remember_secret("API_KEY", "e2e8" + secrets.token_urlsafe(32))
    assert ingest_status(testbed, 1, old_key) == everywhere(testbed, 202)

    secret_file = tmp_path / "api_key"
    secret_file.write_text(new_key + "\n")
    secret_file.chmod(0o600)
    result = ingestctl("config", "set", "local", f"API_KEY=@{secret_file}", "--json")
    assert result.code == 0, result.explain()
    rotated = set(config_versions(ssh).values())
    assert len(rotated) == 1 and rotated != {baseline}
    assert ingest_status(testbed, 1, new_key) == everywhere(testbed, 202)
    assert ingest_status(testbed, 1, old_key) == everywhere(testbed, 401)

    shown = ingestctl("config", "show", "local", "--json")
    assert shown.code == 0, shown.explain()
    for text in (result.stdout, result.stderr, shown.stdout, shown.stderr,
                 *(ledger_text(ssh, h) for h in HOSTS)):
        assert new_key not in text and old_key not in text, "a secret appeared in output or the ledger"
    status, inspected, _ = ssh("app2", "docker inspect $(docker ps -q)")
    assert status == 0 and new_key not in inspected, "the new API key is visible in `docker inspect`"

    result = ingestctl("rollback", "config", "local", "--json")
    assert result.code == 0, result.explain()
    assert new_key not in result.stdout + result.stderr
    assert set(config_versions(ssh).values()) == {baseline}
    assert ingest_status(testbed, 1, old_key) == everywhere(testbed, 202)
    assert ingest_status(testbed, 1, new_key) == everywhere(testbed, 401)
    verify(ssh)


def test_config_set_while_the_lock_is_held_exits_5(testbed, ssh, baseline):
    from ingestctl import lock

    record = lock.new_record(who="e2e8-config-holder@ci-runner", command="e2e8 held lock", release=None,
                             now=datetime.now(UTC))
    status, out, err = ssh("db1", lock.acquire_command(record))
    assert status == 0 and "acquired" in out, err
    try:
        states, entries, dirs = fleet_states(ssh), ledger(ssh), config_dirs(ssh)
        result = ingestctl("config", "set", "local", "INGEST_MAX_BATCH_ITEMS=5", "--json")
        assert result.code == 5, result.explain()
        assert "e2e8-config-holder" in result.summary()["error"]
        assert lock_holders(ssh) == ["db1"]
    finally:
        ssh("db1", lock.release_command(record.token))
    assert_untouched(ssh, states, entries, dirs)
    verify(ssh)
