"""After a deploy, each host runs what its state.json records, is ready, keeps secrets private, leaks none, is unlocked.

Paths follow `ingestctl.hostlayout` (BASE /opt/ingest, state.json, config/<version>/) and `ingestctl.lock` /
`ingestctl.ledger` (/var/lib/ingest/lock, /var/lib/ingest/ledger.jsonl). A host without state.json has had no
release deployed (a db-only host, or a bare one): its release checks skip; the secret checks still run.
"""

from __future__ import annotations

import json
import re

import pytest

pytestmark = pytest.mark.after_deploy

BASE = "/opt/ingest"
STATE_FILE = f"{BASE}/state.json"
LOCK_DIR = "/var/lib/ingest/lock"
LEDGER = "/var/lib/ingest/ledger.jsonl"
PROJECT_LABEL = "com.docker.compose.project=ingest"
# Short values could match by accident (a digit in a timestamp); real secrets are far longer than this.
SHORTEST_SECRET_CHECKED = 8


def _name(host) -> str:
    return host.backend.hostname


def _state(host) -> dict:
    result = host.run(f"cat {STATE_FILE}")
    if result.rc != 0:
        pytest.skip(reason=f"{_name(host)}: no {STATE_FILE}: no release deployed on this host (`ingestctl deploy ENV`)")
    return json.loads(result.stdout)


def _containers(host, *filters: str) -> list[str]:
    args = " ".join(f"--filter {f}" for f in (f"label={PROJECT_LABEL}", *filters))
    return host.run(f"docker ps -q {args}").stdout.split()


def _live_api(host, state: dict) -> str:
    slot = state["slot"]
    found = _containers(host, f"label=com.docker.compose.service=api_{slot}", "status=running")
    assert len(found) == 1, f"{_name(host)}: expected one running api_{slot} container (live slot), found {found}"
    return found[0]


def _secret_values(host) -> dict[str, str]:
    """Every secret written on the host, by file, read as root from the config versions and the db secrets."""
    listing = host.run(f"find {BASE}/config {BASE}/db -path '*/secrets/*' -type f 2>/dev/null").stdout.split()
    values = {}
    for path in listing:
        value = host.run("cat %s", path).stdout.strip()
        if len(value) >= SHORTEST_SECRET_CHECKED:
            values[path] = value
    if not values:
        pytest.skip(reason=f"{_name(host)}: no secret files under {BASE}: deploy first (`ingestctl deploy ENV`)")
    return values


def test_live_api_runs_the_image_in_state_json(host):
    state = _state(host)
    container = _live_api(host, state)
    image_id = host.run("docker inspect --format '{{.Image}}' %s", container).stdout.strip()
    assert image_id == state["image_id"], (
        f"{_name(host)}: api_{state['slot']} runs image {image_id}, but {STATE_FILE} records {state['image_id']} "
        f"({state['release']})"
    )


def test_idle_api_slot_runs_nothing_but_the_recorded_standby(host):
    state = _state(host)
    idle = "green" if state["slot"] == "blue" else "blue"
    running = _containers(host, f"label=com.docker.compose.service=api_{idle}", "status=running")
    if not running:
        return
    standby = state.get("standby") or {}
    assert standby.get("slot") == idle, (
        f"{_name(host)}: idle slot api_{idle} runs ({running}) but {STATE_FILE} records no standby there; "
        "a failed switch or a rollback left it behind"
    )
    image_id = host.run("docker inspect --format '{{.Image}}' %s", running[0]).stdout.strip()
    assert image_id == standby.get("image_id"), (
        f"{_name(host)}: standby api_{idle} runs image {image_id}, {STATE_FILE} records {standby.get('image_id')} "
        f"({standby.get('release')})"
    )


def _public_port(host) -> int:
    """The proxy's listening port (inventory data `app_port`), as rendered into its config on the host."""
    conf = host.run("cat %s/proxy/nginx.conf", f"{BASE}").stdout
    found = re.search(r"^\s*listen\s+(\d+)\s*;", conf, re.MULTILINE)
    assert found, f"{_name(host)}: no `listen PORT;` in {BASE}/proxy/nginx.conf"
    return int(found.group(1))


def test_api_listens_on_the_public_port(host):
    _state(host)
    port = _public_port(host)
    listening = host.socket(f"tcp://0.0.0.0:{port}").is_listening or host.socket(f"tcp://:::{port}").is_listening
    assert listening, f"{_name(host)}: nothing listens on the proxy's public port {port}"


def test_api_slots_listen_on_loopback_only(host):
    state = _state(host)
    public = _public_port(host)
    slots = {"blue": public + 1, "green": public + 2}  # hostlayout.Ports: the slots sit just above the proxy
    live = slots[state["slot"]]
    assert host.socket(f"tcp://127.0.0.1:{live}").is_listening, f"{_name(host)}: api_{state['slot']} not on {live}"
    for port in slots.values():
        for everywhere in (f"tcp://0.0.0.0:{port}", f"tcp://:::{port}"):
            assert not host.socket(everywhere).is_listening, (
                f"{_name(host)}: an api slot listens on {everywhere}: clients could go around the proxy"
            )


def test_the_proxys_live_route_is_the_live_slots_socket(host):
    state = _state(host)
    target = host.run(f"readlink {BASE}/proxy/live.sock").stdout.strip()
    assert target == f"/run/ingest-slots/{state['slot']}.sock", (
        f"{_name(host)}: the proxy's live route points at {target!r}, state.json says slot {state['slot']}")
    assert host.file(f"{BASE}/run/{state['slot']}.sock").is_socket, (
        f"{_name(host)}: api_{state['slot']} serves no socket at {BASE}/run/{state['slot']}.sock")


def test_redis_refuses_a_client_without_the_password(host):
    # Every Redis the host runs (the db host's; an app host runs none, and so passes).
    for container in _containers(host, "label=com.docker.compose.service=redis", "status=running"):
        answer = host.run("docker exec %s redis-cli -p 6379 ping", container)
        assert "NOAUTH" in answer.stdout + answer.stderr, (
            f"{_name(host)}: Redis answered a client without the password: {answer.stdout.strip()!r}"
        )


def test_api_is_ready_from_the_host(host):
    _state(host)
    url = f"http://127.0.0.1:{_public_port(host)}/health/ready"
    # python3 or curl, whichever the host has: neither is guaranteed on a minimal host.
    probe = (
        f"python3 -c \"import urllib.request as u; print(u.urlopen('{url}', timeout=5).status)\" 2>/dev/null "
        f"|| curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 {url}"
    )
    status = host.run(probe).stdout.strip()
    assert status == "200", f"{_name(host)}: GET {url} answered {status or 'nothing'}, expected 200"


def test_live_config_is_private_to_the_app_user(host):
    state = _state(host)
    user = host.run("docker inspect --format '{{.Config.User}}' %s", _live_api(host, state)).stdout.strip()
    app_uid = int(user.split(":")[0])
    folder = f"{BASE}/config/{state['config_version']}"
    listing = host.run(f"find {folder} -printf '%m %U %y %p\\n'").stdout.splitlines()
    assert listing, f"{_name(host)}: config version folder {folder} is missing"
    wrong = []
    for line in listing:
        mode, uid, kind, path = line.split(" ", 3)
        if path.endswith("/.complete"):
            continue  # an empty marker, not configuration
        expected = "700" if kind == "d" else "600"
        if mode != expected or int(uid) != app_uid:
            wrong.append(f"{path} (mode {mode}, uid {uid}; expected {expected}, uid {app_uid})")
    assert not wrong, f"{_name(host)}: config files not private to the app user: {', '.join(wrong)}"


def test_no_secret_in_docker_inspect(host):
    secrets = _secret_values(host)
    containers = host.run(f"docker ps -aq --filter label={PROJECT_LABEL}").stdout.split()
    assert containers, f"{_name(host)}: no ingest containers to inspect"
    inspected = host.run("docker inspect %s", " ".join(containers)).stdout
    leaked = [path for path, value in secrets.items() if value in inspected]
    assert not leaked, f"{_name(host)}: `docker inspect` of ingest containers shows the values of {', '.join(leaked)}"


def test_no_secret_in_the_ledger(host):
    secrets = _secret_values(host)
    ledger = host.run("cat %s", LEDGER)
    if ledger.rc != 0:
        pytest.skip(reason=f"{_name(host)}: no {LEDGER} yet: deploy first")
    leaked = [path for path, value in secrets.items() if value in ledger.stdout]
    assert not leaked, f"{_name(host)}: {LEDGER} holds the values of {', '.join(leaked)}"


def test_deploy_lock_is_released(host):
    lock = host.file(LOCK_DIR)
    holder = host.run("cat %s/info.json", LOCK_DIR).stdout.strip() if lock.exists else ""
    assert not lock.exists, f"{_name(host)}: deploy lock {LOCK_DIR} is still held: {holder or '(no record)'}"
