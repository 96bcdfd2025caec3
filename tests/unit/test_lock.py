"""The deploy lock: record, command builders (exact strings, and run in a real shell), staleness, the message."""

from __future__ import annotations

import json
import shlex
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from ingestctl import hostvalues, lock
from ingestctl.errors import ConfigError, LockHeld

NOW = datetime(2024, 5, 1, 3, 0, 0, tzinfo=UTC)


def record(token="a1b2c3d4e5f60718", who="ana@laptop", started=NOW - timedelta(minutes=12), **more):
    fields = {"machine": "laptop", "pid": 4242, "release": "v2", "command": "ingestctl deploy staging --version v2",
              **more}
    return lock.LockRecord(token=token, who=who, started=started, **fields)


def sh(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=30, check=False)


def test_new_record_is_unique_per_run():
    a = lock.new_record(who="ana@laptop", command="ingestctl deploy local", release="v1", now=NOW)
    b = lock.new_record(who="ana@laptop", command="ingestctl deploy local", release="v1", now=NOW)
    assert a.token != b.token and a.token.isalnum() and a.pid > 0 and a.machine


def test_acquire_command_exact():
    rec = record()
    script = (
        'set -u; umask 077; lock="$1"; parent=$(dirname "$lock"); mkdir -p "$parent" || exit 1; '
        'tmp=$(mktemp -d "$parent/.lock.XXXXXX") || exit 1; '
        'printf "%s\\n" "$2" > "$tmp/info.json"; '
        'if mv -T "$tmp" "$lock" 2>/dev/null; then echo "ingest-lock: acquired"; cat "$lock/info.json"; exit 0; fi; '
        'rm -rf "$tmp"; '
        'if grep -qF "$3" "$lock/info.json" 2>/dev/null; then echo "ingest-lock: acquired"; cat "$lock/info.json"; '
        'exit 0; fi; '
        'echo "ingest-lock: held"; cat "$lock/info.json" 2>/dev/null; exit 75'
    )
    assert lock.acquire_command(rec) == (
        f"sh -c {shlex.quote(script)} ingest-lock /var/lib/ingest/lock {shlex.quote(rec.to_json())} "
        "'\"token\":\"a1b2c3d4e5f60718\"'"
    )


def test_read_and_release_commands_exact():
    assert lock.read_command("/var/lib/ingest/lock") == (
        'if [ -e /var/lib/ingest/lock ]; then echo "ingest-lock: held"; cat /var/lib/ingest/lock/info.json '
        '2>/dev/null; else echo "ingest-lock: free"; fi'
    )
    script = (
        'lock="$1"; if [ ! -e "$lock" ]; then echo "ingest-lock: absent"; exit 0; fi; '
        'if grep -qF "$2" "$lock/info.json" 2>/dev/null; then rm -rf "$lock" && echo "ingest-lock: released"; '
        'exit $?; fi; echo "ingest-lock: not-ours"; cat "$lock/info.json" 2>/dev/null; exit 0'
    )
    assert lock.release_command("abc123") == (
        f"sh -c {shlex.quote(script)} ingest-lock /var/lib/ingest/lock '\"token\":\"abc123\"'"
    )


def test_token_must_be_alphanumeric():
    with pytest.raises(ConfigError, match="lock token: expected letters and digits only"):
        lock.release_command('x" -o "')


def test_lock_lifecycle_in_a_real_shell(tmp_path):
    """Acquire, contend, re-enter, refuse a foreign release, release, break: under /bin/sh on temp paths."""
    path = str(tmp_path / "var" / "lib" / "ingest" / "lock")
    ours, theirs = record(token="aaaa1111"), record(token="bbbb2222", who="ben@ci-runner-7", machine="ci-runner-7")

    assert lock.parse_output(sh(lock.read_command(path)).stdout).state == "free"

    done = sh(lock.acquire_command(ours, path))
    status = lock.parse_output(done.stdout)
    assert done.returncode == 0 and status.state == "acquired" and status.record == ours
    assert (tmp_path / "var" / "lib" / "ingest" / "lock" / "info.json").stat().st_mode & 0o077 == 0

    done = sh(lock.acquire_command(theirs, path))
    status = lock.parse_output(done.stdout)
    assert done.returncode == lock.HELD_EXIT_CODE and status.state == "held" and status.record == ours
    assert not [p for p in (tmp_path / "var" / "lib" / "ingest").iterdir() if p.name.startswith(".lock.")]

    assert lock.parse_output(sh(lock.acquire_command(ours, path)).stdout).state == "acquired"  # re-entry

    status = lock.parse_output(sh(lock.release_command(theirs.token, path)).stdout)
    assert status.state == "not-ours" and status.record == ours
    assert lock.parse_output(sh(lock.read_command(path)).stdout).record == ours

    assert lock.parse_output(sh(lock.release_command(ours.token, path)).stdout).state == "released"
    assert lock.parse_output(sh(lock.release_command(ours.token, path)).stdout).state == "absent"

    sh(lock.acquire_command(theirs, path))
    assert lock.parse_output(sh(lock.break_command(ours.token, path)).stdout).state == "not-ours"
    assert lock.parse_output(sh(lock.break_command(theirs.token, path)).stdout).state == "broken"
    sh(lock.acquire_command(theirs, path))
    status = lock.parse_output(sh(lock.break_command(None, path)).stdout)
    assert status.state == "broken" and status.record == theirs
    assert lock.parse_output(sh(lock.read_command(path)).stdout).state == "free"


def test_concurrent_acquires_have_exactly_one_winner(tmp_path):
    path = str(tmp_path / "lock")
    records = [record(token=f"t{n:04d}") for n in range(8)]
    procs = [subprocess.Popen(["sh", "-c", lock.acquire_command(r, path)], stdout=subprocess.PIPE, text=True)
             for r in records]
    outputs = [p.communicate(timeout=30)[0] for p in procs]
    states = [lock.parse_output(out).state for out in outputs]
    assert states.count("acquired") == 1 and states.count("held") == 7
    winner = records[states.index("acquired")]
    assert all(lock.parse_output(out).record == winner for out in outputs)


def test_parse_output_errors_and_unreadable_record():
    with pytest.raises(ConfigError, match="app2: lock command printed no `ingest-lock:` line"):
        lock.parse_output("permission denied", host="app2")
    with pytest.raises(ConfigError, match="unknown lock state 'maybe'"):
        lock.parse_output("ingest-lock: maybe")
    assert lock.parse_output(["ingest-lock: held", "{garbage"]) == lock.LockStatus("held", None)


# --- forged records ----------------------------------------------------------------------------------

FORGED_FIELDS = {
    "token": 'aaaa1111" -o "',
    "who": "ana@laptop$(touch /tmp/pwned)",
    "machine": "laptop;touch /tmp/pwned",
    "release": "v2`touch /tmp/pwned`",
    "command": "ingestctl deploy local\n$(touch /tmp/pwned)",
    "pid": 0,
}


@pytest.mark.parametrize(("field", "value"), [
    *FORGED_FIELDS.items(), ("pid", -1), ("pid", hostvalues.PID_MAX + 1), ("who", "x" * 5000),
])
def test_a_forged_record_is_rejected_naming_host_and_field(field, value):
    forged = json.loads(record().to_json())
    forged[field] = value
    status = lock.parse_output(["ingest-lock: held", json.dumps(forged)], host="app3")
    assert status.state == "held" and status.record is None
    assert status.rejected is not None
    assert status.rejected.startswith(f"app3: lock record rejected ({field}: expected ")
    assert len(status.rejected) < 300, "a forged value is never echoed whole"
    # The holder is then unknown: the message says so and how to break the lock on purpose.
    assert "record is unreadable" in str(lock.held_error("local", "app3", status.record, NOW, runner_alive=None))


def test_a_valid_record_after_a_forged_one_is_used():
    forged = json.loads(record().to_json()) | {"who": "x;y"}
    status = lock.parse_output(["ingest-lock: held", json.dumps(forged), record().to_json()], host="app3")
    assert status.record == record() and status.rejected is None


def test_every_record_this_module_writes_passes_its_own_check():
    rec = lock.new_record(who="uid1000@ci-runner-7.example", command="rollback app local -> v1", release="v1",
                          now=NOW)
    lock.check_values(rec)
    assert lock.parse_output(["ingest-lock: acquired", rec.to_json()]).record == rec


def test_a_forged_record_on_disk_is_reported_and_can_still_be_broken(tmp_path):
    """Under /bin/sh: a forged info.json is never parsed into a holder, and `lock break` removes it."""
    path = tmp_path / "lock"
    path.mkdir()
    forged = json.loads(record().to_json()) | {"token": "$(touch " + str(tmp_path / "pwned") + ")"}
    (path / "info.json").write_text(json.dumps(forged) + "\n")
    status = lock.parse_output(sh(lock.read_command(str(path))).stdout, host="app3")
    assert status.state == "held" and status.record is None and "token: expected" in status.rejected
    status = lock.parse_output(sh(lock.break_command(None, str(path))).stdout, host="app3")
    assert status.state == "broken" and status.record is None
    assert not path.exists() and not (tmp_path / "pwned").exists()


def test_parse_output_never_echoes_host_output_whole():
    with pytest.raises(ConfigError) as err:
        lock.parse_output("x" * 10_000, host="app2")
    assert len(str(err.value)) < 300
    with pytest.raises(ConfigError, match=r"unknown lock state 'held\$\(id\)'"):
        lock.parse_output("ingest-lock: held$(id)")


@pytest.mark.parametrize(
    ("alive", "age", "stale"),
    [(False, timedelta(seconds=5), True), (True, timedelta(days=3), False),
     (None, timedelta(minutes=30), False), (None, timedelta(hours=3), True)],
)
def test_staleness(alive, age, stale):
    rec = record(started=NOW - age)
    assert lock.is_stale(rec, NOW, alive) is stale
    reason = lock.staleness(rec, NOW, alive)
    assert (reason is not None) is stale
    if alive is False:
        assert reason == "its runner (pid 4242 on laptop) is no longer running"


def test_held_message_names_holder_since_and_how_to_break():
    error = lock.held_error("staging", "app2", record(), NOW, runner_alive=None)
    assert isinstance(error, LockHeld) and error.exit_code == 5
    assert str(error) == (
        "deploy lock on staging is held by ana@laptop (pid 4242 on laptop) since 2024-05-01 02:48:00Z (12 min ago), "
        "running `ingestctl deploy staging --version v2` for release v2 (seen on app2). Wait for it with "
        "--lock-wait SECONDS; if that run is dead, break the lock on purpose: ingestctl lock break staging"
    )


def test_held_message_for_a_stale_or_unreadable_lock():
    text = str(lock.held_error("local", "db1", record(), NOW, runner_alive=False))
    assert "It looks stale: its runner (pid 4242 on laptop) is no longer running." in text
    assert text.endswith("break the lock on purpose: ingestctl lock break local")
    text = str(lock.held_error("local", "db1", None, NOW, runner_alive=None))
    assert "record is unreadable" in text and "ingestctl lock break local" in text
