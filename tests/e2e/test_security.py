"""A forged line in one host's ledger never runs on any host and never reaches another host's ledger.

The issue's reproduction on the real sandbox: lines are appended to app3's ledger as whoever can write that one
file would append them (failed releases whose image ID and release carry `$(...)` and backticks), then the
commands that read the ledger run as an operator would: `history`, `status`, a deploy that switches hosts (so it
prunes old images, the loop that used to run the injected command as root everywhere) and an app rollback.

The module deploys its own releases from a frozen copy of this checkout, and ends with its forged lines removed
from app3's ledger and the fleet healthy on its first release, with the lock free.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import socket

import pytest
from releases import app_urls, ingestctl, variant, version_of

pytestmark = pytest.mark.e2e

SEC1, SEC2 = "e2e9-sec1", "e2e9-sec2"
HOSTS = ("db1", "app2", "app3")
LEDGER = "/var/lib/ingest/ledger.jsonl"
LOCK_DIR = "/var/lib/ingest/lock"
PWNED = "/tmp/pwned-ledger"  # what the injected commands would create; every forged line names it
IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}")


def ledger_text(ssh, host: str) -> str:
    status, out, err = ssh(host, f"cat {LEDGER} 2>/dev/null || true")
    assert status == 0, f"{host}: cannot read {LEDGER}: {err}"
    return out


def forged_lines(template: dict) -> list[str]:
    """Two failed releases as an attacker would append them: genuine in every field but one or two."""
    base = {**template, "kind": "deploy", "outcome": "failed", "hosts": [], "steps": [], "gates": []}
    return [
        json.dumps({**base, "id": "20200101T000001Z-e2e901", "release": "e2e9-forged-1",
                    "image_id": f"sha256:x$(touch {PWNED})"}),
        json.dumps({**base, "id": "20200101T000002Z-e2e902", "release": f"e2e9-forged-2`touch {PWNED}`",
                    "image_id": f"sha256:`touch {PWNED}`"}),
    ]


def remove_forged_lines(ssh) -> None:
    """Under the ledger's own flock, keep every line but the forged ones (same file, same mode and owner)."""
    script = (f'grep -vF {shlex.quote(PWNED)} "$1" > "$1.e2e9" || true; cat "$1.e2e9" > "$1"; rm -f "$1.e2e9"')
    command = f"flock {shlex.quote(LEDGER + '.lock')} sh -c {shlex.quote(script)} e2e9 {shlex.quote(LEDGER)}"
    status, _out, err = ssh("app3", command)
    assert status == 0, f"app3: removing the forged lines failed: {err}"


def test_a_forged_ledger_line_on_app3_runs_nowhere_and_spreads_nowhere(testbed, ssh, tmp_path_factory):
    checkout = variant(tmp_path_factory.mktemp("security-checkout"), {})
    for host in HOSTS:
        ssh(host, f"rm -f {PWNED}")  # a leftover of an earlier session must not fail (or pass) this one
    result = ingestctl("deploy", "local", "--version", SEC1, "--skip-bench", "--json", root=checkout)
    assert result.code == 0, f"deploy {SEC1}:\n" + result.explain()

    before = ledger_text(ssh, "app3")
    template = json.loads(before.splitlines()[-1])
    lines = forged_lines(template)
    first_line = len(before.splitlines()) + 1
    # Quoted for this SSH command: appending must not run what the lines carry.
    append = "; ".join(f"printf '%s\\n' {shlex.quote(line)} >> {LEDGER}" for line in lines)
    status, _out, err = ssh("app3", append)
    assert status == 0, f"app3: appending the forged lines failed: {err}"
    try:
        history = ingestctl("history", "local")
        assert history.code == 0, "history:\n" + history.explain()
        for number in (first_line, first_line + 1):
            assert f"app3:{LEDGER} line {number}: rejected" in history.stdout, history.explain()
        history = ingestctl("history", "local", "--json")
        assert history.code == 0, history.explain()
        warned = {(e.get("host"), e.get("line")) for e in history.events if e["type"] == "warning"}
        assert {("app3", first_line), ("app3", first_line + 1)} <= warned, history.explain()
        releases = {e["release"] for e in history.events if e["type"] == "row"}
        assert not [r for r in releases if "e2e9-forged" in r], f"a forged release is in the history: {releases}"

        status_result = ingestctl("status", "local", "--json")
        assert status_result.code == 0, "status:\n" + status_result.explain()

        # A deploy that switches hosts, so it prunes: the loop that ran the injected command on every host.
        deploy = ingestctl("deploy", "local", "--version", SEC2, "--skip-bench", "--json", root=checkout)
        assert deploy.code == 0, f"deploy {SEC2}:\n" + deploy.explain()
        assert deploy.summary()["outcome"] == "success", deploy.explain()
        pruned = [i for e in deploy.events if e.get("step") == "prune" for i in e.get("images", [])]
        assert all(IMAGE_ID.fullmatch(i) for i in pruned), f"prune listed a value that is not an image ID: {pruned}"

        rollback = ingestctl("rollback", "app", "local", "--json", root=checkout)
        assert rollback.code == 0, "rollback app:\n" + rollback.explain()
        assert rollback.summary()["outcome"] == "success", rollback.explain()
        assert {h: version_of(url) for h, url in app_urls(testbed).items()} == {h: SEC1 for h in app_urls(testbed)}

        for host in HOSTS:
            status, _out, _err = ssh(host, f"test -e {PWNED}")
            assert status != 0, f"{host}: {PWNED} exists: a forged ledger value was run as a command"
        for host in ("db1", "app2"):
            text = ledger_text(ssh, host)
            assert PWNED not in text and "e2e9-forged" not in text, f"a forged line reached {host}'s ledger"
        # The runs' own entries, written to every host, carry only values in their shapes.
        for host in HOSTS:
            by_id: dict[str, dict] = {}  # each run writes a `running` line first, then its final one
            for line in ledger_text(ssh, host).splitlines():
                if line.strip() and PWNED not in line:
                    entry = json.loads(line)
                    by_id.pop(entry["id"], None)
                    by_id[entry["id"]] = entry
            mine = list(by_id.values())[-2:]
            assert [(e["kind"], e["release"]) for e in mine] == [("deploy", SEC2), ("rollback-app", SEC1)], host
            assert all(IMAGE_ID.fullmatch(e["image_id"]) for e in mine), mine
    finally:
        remove_forged_lines(ssh)
        if any(ssh(h, f"test -e {LOCK_DIR}")[0] == 0 for h in HOSTS):
            ingestctl("lock", "break", "local", "--force")
        for host in HOSTS:
            ssh(host, f"rm -f {PWNED}")
    assert PWNED not in ledger_text(ssh, "app3")
    assert ledger_text(ssh, "app3").startswith(before), "removing the forged lines changed app3's genuine ones"


def proc_address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp{,6} writes it: hex, in 32-bit words of host (little-endian) byte order."""
    raw = bytes.fromhex(hex_address)
    return ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))


def listeners(ssh, host: str) -> dict[int, set]:
    """{port: addresses} of every TCP socket listening on HOST's network namespace, read from /proc (no tools)."""
    status, out, err = ssh(host, "cat /proc/net/tcp /proc/net/tcp6")
    assert status == 0, f"{host}: cannot read /proc/net/tcp: {err}"
    listening: dict[int, set] = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
            address, port = fields[1].split(":")
            listening.setdefault(int(port, 16), set()).add(proc_address(address))
    return listening


def loopback_only(addresses: set) -> bool:
    # 127.0.0.0/8 and ::1: Docker's embedded DNS, for one, listens on 127.0.0.11 of every container network.
    return all(address.is_loopback for address in addresses)


@pytest.fixture
def fleet_up(testbed, tmp_path_factory):
    """The fleet serving: as the first test leaves it, or deployed here when a test runs on its own."""
    if any(version_of(url) is None for url in app_urls(testbed).values()):
        checkout = variant(tmp_path_factory.mktemp("security-fleet"), {})
        result = ingestctl("deploy", "local", "--version", SEC1, "--skip-bench", "--json", root=checkout)
        assert result.code == 0, result.explain()
    return testbed


def test_from_outside_an_app_host_only_ssh_and_the_proxy_answer(fleet_up, ssh):
    testbed = fleet_up
    for host in (h for h in testbed.hosts if "db" not in h.roles):  # db1 also serves 5432/6379 to the app hosts
        listening = listeners(ssh, host.name)
        # The live slot (at least) listens, on loopback only; nothing but sshd and the proxy faces the network.
        slots = {port: addresses for port, addresses in listening.items() if port in (8001, 8002)}
        assert slots and all(loopback_only(addresses) for addresses in slots.values()), f"{host.name}: {slots}"
        exposed = {port for port, addresses in listening.items() if not loopback_only(addresses)}
        assert exposed == {host.ssh_port, 8000}, f"{host.name}: listening beyond loopback on {sorted(exposed)}"
        for port in sorted(slots):
            with pytest.raises(OSError):
                socket.create_connection((host.address, port), timeout=3).close()
        assert version_of(f"http://{host.address}:8000") is not None, f"{host.name}: the proxy does not answer"


def redis_reply(address: str, command: bytes) -> bytes:
    """Redis's first reply line to COMMAND (inline protocol), sent from the controller as any client would."""
    with socket.create_connection((address, 6379), timeout=5) as sock:
        sock.sendall(command + b"\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply


def test_redis_refuses_a_client_without_the_password(fleet_up):
    db1 = fleet_up.host("db1")
    for command in (b"PING", b"FLUSHALL", b"CONFIG GET requirepass"):
        reply = redis_reply(db1.address, command)
        assert reply.startswith(b"-NOAUTH"), f"redis on db1 answered {command!r} without a password: {reply!r}"


def test_the_apis_database_sessions_are_not_superuser(fleet_up, ssh):
    # Every api (each app host's live and standby slots) holds pooled connections: read them off the server.
    query = ("SELECT DISTINCT a.usename || ':' || r.rolsuper || ':' || r.rolcreaterole FROM pg_stat_activity a "
             "JOIN pg_roles r ON r.rolname = a.usename WHERE a.backend_type = 'client backend' "
             "AND a.pid <> pg_backend_pid()")
    status, out, err = ssh("db1", "cd /opt/ingest && docker exec $(docker ps -q --filter "
                                  "label=com.docker.compose.service=postgres) psql -U ingest -d ingest -tAc "
                                  f"{shlex.quote(query)}")
    assert status == 0, f"db1: reading pg_stat_activity failed: {err}"
    sessions = set(out.split())
    assert sessions == {"ingest_app:false:false"}, f"the api's database sessions: {sessions}"
    # And the role can write rows but not change the schema.
    ddl = ssh("db1", "docker exec $(docker ps -q --filter label=com.docker.compose.service=postgres) "
                     "psql -U ingest -d ingest -tAc \"SET ROLE ingest_app; CREATE TABLE e2e_not_allowed (x int)\"")
    assert ddl[0] != 0 and "permission denied" in ddl[2], f"the app role could create a table: {ddl}"
