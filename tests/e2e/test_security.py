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
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import releases
from releases import app_urls, ingestctl, remember_secret, variant, version_of

pytestmark = pytest.mark.e2e

SEC1, SEC2, SEC3 = "e2e9-sec1", "e2e9-sec2", "e2e9-sec3"
HOSTS = ("db1", "app2", "app3")
LEDGER = "/var/lib/ingest/ledger.jsonl"
LOCK_DIR = "/var/lib/ingest/lock"
STATE_FILE = "/opt/ingest/state.json"
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


def test_a_client_that_trickles_its_headers_is_cut_off_within_the_proxys_timeout(fleet_up):
    # One header line a second, never the blank line that ends them: the proxy's client_header_timeout (10 s)
    # runs over the whole header, so the connection is closed then, however steadily the client trickles.
    app2 = fleet_up.host("app2")
    with socket.create_connection((app2.address, 8000), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: e2e\r\n")
        closed_after = None
        for n in range(30):  # bounded: 30 lines, about 30 s
            try:
                sock.sendall(f"X-Trickle-{n}: 1\r\n".encode())
                sock.settimeout(1.0)
                if sock.recv(4096) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                continue
            except OSError:  # reset: `reset_timedout_connection on`
                closed_after = time.monotonic() - started
                break
    assert closed_after is not None, "the proxy kept a trickling client's connection open for 30 s"
    assert 8 <= closed_after <= 16, f"cut off after {closed_after:.1f} s; the proxy's header timeout is 10 s"
    assert version_of(f"http://{app2.address}:8000") is not None, "the proxy stopped serving other clients"


class CommandLineWatch:
    """Every command line on the controller and on each sandbox host, sampled while a command runs."""

    def __init__(self, ssh, hosts):
        self.ssh, self.hosts = ssh, hosts
        self.seen: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + 600  # bounded even if the watched command hangs
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.seen.append(subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout)
            for host in self.hosts:  # /proc/*/cmdline: no tools needed on the host
                status, out, _err = self.ssh(host, "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '",
                                             timeout=20)
                self.seen.append(out)
            self.samples += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=60)


def config_set_from_stdin(assignment: str, value: str) -> releases.Result:
    executable = shutil.which("ingestctl", path=str(Path(sys.executable).parent)) or "ingestctl"
    done = subprocess.run([executable, "config", "set", "local", assignment, "--json"], input=value + "\n",
                          capture_output=True, text=True, timeout=600, cwd=releases.PROJECT_ROOT,
                          env=dict(os.environ), check=False)
    releases.OUTPUTS.append(done.stdout + done.stderr)
    return releases.Result(done.returncode, done.stdout, done.stderr)


def live_configs(ssh) -> dict[str, str | None]:
    found = {}
    for host in ("app2", "app3"):
        status, out, _err = ssh(host, f"cat {STATE_FILE} 2>/dev/null || true")
        found[host] = json.loads(out).get("config_version") if status == 0 and out.strip() else None
    return found


def test_secrets_are_taken_only_from_stdin_or_a_file_and_never_show_nor_get_silently_reverted(fleet_up, ssh, tmp_path):
    testbed = fleet_up
    baseline = live_configs(ssh)
    stdin_key = remember_secret("API_KEY", "e2e9stdin" + secrets.token_urlsafe(24))
    file_key = remember_secret("API_KEY", "e2e9file" + secrets.token_urlsafe(24))

    inline = ingestctl("config", "set", "local", f"API_KEY={stdin_key}", "--json")
    assert inline.code == 2, inline.explain()
    assert "never inline" in inline.summary()["error"] and stdin_key not in inline.stdout + inline.stderr
    assert live_configs(ssh) == baseline, "a refused inline secret changed a host"

    assert None not in baseline.values() and len(set(baseline.values())) == 1, baseline
    try:
        with CommandLineWatch(ssh, HOSTS) as watch:
            rotated = config_set_from_stdin("API_KEY=-", stdin_key)
        assert rotated.code == 0, rotated.explain()
        assert watch.samples >= 3, f"only {watch.samples} samples of the command lines were taken"
        assert not [text for text in watch.seen if stdin_key in text], "the secret appeared in a command line (ps)"
        url = app_urls(testbed)["app2"] + "/api/v1/events"
        event = [{"id": str(uuid.uuid4()), "source": "e2e9-security", "type": "rotation", "payload": {"n": 1},
                  "timestamp": "2026-12-02T00:00:00+00:00"}]
        assert httpx.post(url, json=event, headers={"X-API-Key": stdin_key}, timeout=10).status_code == 202

        # The checkout's secrets file still has the old key: a deploy would undo the rotation, so it is refused.
        deploy = ingestctl("deploy", "local", "--version", SEC3, "--skip-bench", "--json")
        assert deploy.code == 2, deploy.explain()
        assert "API_KEY: rotated by `config set`" in deploy.summary()["error"], deploy.explain()
        assert live_configs(ssh) != baseline and len(set(live_configs(ssh).values())) == 1

        key_file = tmp_path / "api_key"
        key_file.write_text(file_key + "\n")
        key_file.chmod(0o600)
        with CommandLineWatch(ssh, HOSTS) as watch:
            rotated = ingestctl("config", "set", "local", f"API_KEY=@{key_file}", "--json")
        assert rotated.code == 0, rotated.explain()
        assert not [text for text in watch.seen if file_key in text], "the secret appeared in a command line (ps)"
        assert httpx.post(url, json=event, headers={"X-API-Key": file_key}, timeout=10).status_code == 202

    finally:  # the rotation undone whatever failed: the next modules deploy from the checkout's secrets
        back = ingestctl("rollback", "config", "local", "--to", baseline["app2"], "--json")
    assert back.code == 0, back.explain()
    assert live_configs(ssh) == baseline
    # Nothing written or printed anywhere holds either value: output, ledger, docker inspect, logs, history.
    assert releases.secret_leaks(testbed, {"stdin key": stdin_key, "file key": file_key}) == []


def test_postgres_listens_only_where_the_app_hosts_reach_it_and_admits_only_them(fleet_up, ssh):
    from ingestctl.testbed.images import POSTGRES_IMAGE

    testbed = fleet_up
    db1 = testbed.host("db1")
    assert listeners(ssh, "db1")[5432] == {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address(db1.address)}

    def login_from(network_args: list[str]) -> str:
        # A wrong password on purpose: pg_hba decides before any password is checked, so the answer says which.
        dsn = f"host={db1.address} dbname=ingest user=ingest_app password=e2e9-not-the-password connect_timeout=5"
        done = subprocess.run(["docker", "run", "--rm", *network_args, "--entrypoint", "psql", POSTGRES_IMAGE,
                               dsn, "-c", "SELECT 1"], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode != 0, f"logged in with a wrong password: {done.stdout}"
        return done.stderr

    # A machine on the sandbox network that is no app host: refused before its password is even read.
    outsider = login_from(["--network", testbed.network])
    assert "no pg_hba.conf entry for host" in outsider, outsider
    # This machine is a named client of the sandbox (db_clients): admitted, so it gets to the password check.
    admitted = login_from(["--network", "host"])
    assert "password authentication failed" in admitted, admitted
