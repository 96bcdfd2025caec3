"""The deploy lock as a lease: renewal, takeover of an expired holder, and all-or-nothing acquisition.

Lock commands run under a real /bin/sh against temporary lock directories; the "fleet" is a set of local
shells (a fake of the SSH transport only), so the orchestrator's own code decides what to run and when.
"""

import subprocess
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from ingestctl import lock, runcontext, runlock
from ingestctl.errors import ConfigError, LockHeld

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def sh(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=30, check=False)


def record(token: str, expires: datetime | None, **more) -> lock.LockRecord:
    return lock.LockRecord(token=token, who=more.pop("who", "ana@laptop"), machine=more.pop("machine", "laptop"),
                           pid=4242, started=NOW - timedelta(minutes=5), command="deploy local", expires=expires,
                           **more)


def test_an_expired_lease_is_taken_over_and_a_renewal_by_its_old_holder_finds_it_lost(tmp_path):
    path = str(tmp_path / "lock")
    dead = record("dead0001", NOW - timedelta(seconds=1))
    assert lock.parse_output(sh(lock.acquire_command(dead, path)).stdout).state == "acquired"
    assert lock.expired(dead, NOW, runner_alive=None)

    ours = record("ours0001", NOW + timedelta(seconds=60))
    taken = lock.parse_output(sh(lock.takeover_command(dead.token, ours, path)).stdout)
    assert taken.state == "acquired" and taken.record == ours

    lost = lock.parse_output(sh(lock.renew_command(dead.renewed(NOW, timedelta(seconds=60)), path)).stdout)
    assert lost.state == "lost" and lost.record == ours


def test_a_takeover_leaves_a_lock_that_changed_hands(tmp_path):
    path = str(tmp_path / "lock")
    newer = record("newr0001", NOW + timedelta(seconds=60))
    sh(lock.acquire_command(newer, path))
    status = lock.parse_output(sh(lock.takeover_command("dead0001", record("ours0001", None), path)).stdout)
    assert status.state == "held" and status.record == newer


def test_renewal_extends_only_our_lease(tmp_path):
    path = str(tmp_path / "lock")
    ours = record("ours0001", NOW + timedelta(seconds=60))
    sh(lock.acquire_command(ours, path))
    later = ours.renewed(NOW + timedelta(seconds=30), timedelta(seconds=60))
    assert lock.parse_output(sh(lock.renew_command(later, path)).stdout).state == "renewed"
    assert lock.parse_output(sh(lock.read_command(path)).stdout).record.expires == NOW + timedelta(seconds=90)


@pytest.mark.parametrize("expires,alive,is_expired", [
    (NOW + timedelta(seconds=5), None, False),
    (NOW - timedelta(seconds=5), None, True),
    (NOW - timedelta(seconds=5), True, False),   # a live pid on this machine is never taken over
    (NOW + timedelta(seconds=5), False, True),   # a dead pid on this machine is, at once
    (None, None, False),                         # a record from before leases: 2 h from its start
])
def test_expiry(expires, alive, is_expired):
    assert lock.expired(record("t0000001", expires), NOW, alive) is is_expired


class LocalShellHost:
    """A connected host whose commands run in a local shell, its lock directory under a temp path."""

    def __init__(self, root, fail: bool = False):
        self.root, self.fail, self.data = root, fail, {}

    def run_shell_command(self, command, **_kwargs):
        if self.fail:
            return False, SimpleNamespace(stdout_lines=[], stderr_lines=["mkdir: cannot create directory: No space"])
        done = sh(command.replace(lock.LOCK_DIR, f"{self.root}/lock"))
        return done.returncode == 0, SimpleNamespace(stdout_lines=done.stdout.splitlines(),
                                                     stderr_lines=done.stderr.splitlines())


class Reporter:
    def __init__(self):
        self.events = []

    def event(self, kind, message="", **fields):
        self.events.append((kind, message))


def ctx_for(ttl_s: int = 60):
    return SimpleNamespace(name="local", who="ci@runner", reporter=Reporter(),
                           env=SimpleNamespace(data=SimpleNamespace(lock_ttl_s=ttl_s)))


def fleet_of(tmp_path, names, failing=()):
    hosts = {}
    for name in names:
        (tmp_path / name).mkdir()
        hosts[name] = LocalShellHost(tmp_path / name, fail=name in failing)
    return hosts


def test_the_next_command_takes_over_a_dead_runners_lock_and_records_whose(tmp_path):
    active = fleet_of(tmp_path, ["db1", "app2"])
    dead = record("dead0001", datetime.now(UTC) - timedelta(seconds=1), run_id="20261201T115500Z-abcdef")
    for host in active.values():
        sh(lock.acquire_command(dead, f"{host.root}/lock"))
    ctx, run = ctx_for(), runcontext.Run("20261201T120000Z-123456", "deploy", "local", "ci@runner")
    ours, _reads = runlock.acquire_lock(ctx, run, 0.0, "deploy local", active)
    for host in active.values():
        assert lock.parse_output(sh(lock.read_command(f"{host.root}/lock")).stdout).record.token == ours.token
    assert "took over the expired deploy lock of ana@laptop" in run.facts.lock_takeover
    assert "20261201T115500Z-abcdef" in run.facts.lock_takeover


def test_a_live_lease_is_not_taken_over(tmp_path):
    active = fleet_of(tmp_path, ["db1"])
    sh(lock.acquire_command(record("live0001", datetime.now(UTC) + timedelta(seconds=60)), f"{active['db1'].root}/lock"))
    with pytest.raises(LockHeld, match="ana@laptop"):
        runlock.acquire_lock(ctx_for(), runcontext.Run("20261201T120000Z-123456", "deploy", "local", "x@y"), 0.0,
                              "deploy local", active)


def test_acquisition_is_all_or_nothing_when_one_host_cannot_take_it(tmp_path):
    active = fleet_of(tmp_path, ["db1", "app2", "app3"], failing=["app3"])
    with pytest.raises(ConfigError, match="cannot take the deploy lock.*app3.*no host was changed"):
        runlock.acquire_lock(ctx_for(), runcontext.Run("20261201T120000Z-123456", "deploy", "local", "x@y"), 0.0,
                              "deploy local", active)
    for name in ("db1", "app2"):  # taken there first, then released
        assert lock.parse_output(sh(lock.read_command(f"{active[name].root}/lock")).stdout).state == "free"


def test_reads_under_the_lock_run_in_its_own_command_only_once_it_is_taken(tmp_path):
    """The lock's round also reads what it protects (one SSH round, not two), in the same shell command, after
    the lock is taken; where the lock is held by another run, nothing is read there."""
    from ingestctl.facts.release import FileDigests
    from ingestctl.facts.together import TogetherRead

    active = fleet_of(tmp_path, ["db1", "app2"])
    marker = tmp_path / "db1" / "lock" / lock.RECORD_FILE
    reads = {name: TogetherRead.of((FileDigests, {"paths": [str(marker)]})) for name in active}
    ctx, run = ctx_for(), runcontext.Run("20261201T120000Z-123456", "deploy", "local", "ci@runner")
    ours, facts = runlock.acquire_lock(ctx, run, 0.0, "deploy local", active, reads)
    assert facts["db1"].known(FileDigests, paths=[str(marker)])
    digest = facts["db1"].get(FileDigests, paths=[str(marker)])
    assert digest[str(marker)], "the lock record existed when the read ran: it ran after the take"
    assert lock.parse_output(sh(lock.read_command(f"{tmp_path}/db1/lock")).stdout).record.token == ours.token

    later = runcontext.Run("20261201T120001Z-654321", "deploy", "local", "x@y")
    with pytest.raises(LockHeld):
        runlock.acquire_lock(ctx_for(), later, 0.0, "deploy local", active,
                             {name: TogetherRead.of((FileDigests, {"paths": ["/"]})) for name in active})
    answers = runlock.take_lock_everywhere(
        active, lock.new_record(who="x@y", command="deploy local", release=None, now=datetime.now(UTC),
                                ttl=timedelta(seconds=60)), {}, reads)
    assert {name: answer.read_lines for name, answer in answers.items()} == {"db1": [], "app2": []}, (
        "a host whose lock is held reads nothing")
    assert all(answer.status.state == "held" for answer in answers.values())
