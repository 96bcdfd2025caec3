"""The deploy lock on each host: its record, the shell commands that take, release and break it, and staleness.

Taking the lock is one atomic `rename(2)`: the record is written into a fresh temporary directory,
which is then renamed onto the lock path with `mv -T`. The rename fails when the lock directory already
exists with a record in it, so a holder is never without its record and two runners never both win.
Every command prints a marker line first (`ingest-lock: acquired|held|released|...`) followed by the
record, which `parse_output` reads.

A stale lock (its runner died) is reported as such, never broken silently: the operator breaks it on
purpose with `ingestctl lock break ENV`, which removes only the lock it was shown (matched by token).
"""

from __future__ import annotations

import json
import os
import secrets as _random
import shlex
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from ingestctl import hostvalues
from ingestctl.errors import ConfigError, LockHeld

LOCK_DIR = "/var/lib/ingest/lock"
RECORD_FILE = "info.json"
MARKER = "ingest-lock:"
HELD_EXIT_CODE = 75  # EX_TEMPFAIL: try again later
# Without a way to check the runner's pid (another machine), a lock this old is reported as probably stale.
DEFAULT_MAX_AGE = timedelta(hours=2)
# Takeover and renewal replace a record in two steps; this flock on the lock's parent makes them one.
GUARD_FILE = ".lock-guard"


class LockRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    token: str  # random per run: lets a run re-enter its own lock and release only its own
    who: str
    machine: str
    pid: int
    started: datetime
    release: str | None = None
    command: str
    # The lease: the runner renews it every few seconds while it works. Past it, the holder is presumed dead and
    # the next command takes the lock over. Records written before leases existed have none (see lease_end).
    expires: datetime | None = None
    run_id: str | None = None  # the ledger entry of the run holding it: history tells running from interrupted

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), sort_keys=True, separators=(",", ":"))

    def lease_end(self, max_age: timedelta = DEFAULT_MAX_AGE) -> datetime:
        return self.expires or (self.started + max_age)

    def renewed(self, now: datetime, ttl: timedelta) -> LockRecord:
        return self.model_copy(update={"expires": now + ttl})


def check_values(record: LockRecord) -> None:
    """HostValueError naming the first field of RECORD not in the shape `new_record` writes.

    A record read from a host names who holds the lock in messages, and its token goes back into the
    commands that release or break it: a forged one is treated as unreadable, never echoed whole or run.
    """
    hostvalues.LOCK_TOKEN.check(record.token, "token")
    hostvalues.WHO.check(record.who, "who")
    hostvalues.HOST_NAME.check(record.machine, "machine")
    hostvalues.check_pid(record.pid, "pid")
    if record.release is not None:
        hostvalues.RELEASE.check(record.release, "release")
    if record.run_id is not None:
        hostvalues.RUN_ID.check(record.run_id, "run_id")
    hostvalues.LOCK_COMMAND.check(record.command, "command")


def new_record(*, who: str, command: str, release: str | None, now: datetime,
               machine: str | None = None, pid: int | None = None, ttl: timedelta | None = None,
               run_id: str | None = None) -> LockRecord:
    return LockRecord(token=_random.token_hex(8), who=who, machine=machine or socket.gethostname(),
                      pid=os.getpid() if pid is None else pid, started=now, release=release, command=command,
                      expires=now + ttl if ttl else None, run_id=run_id)


def _token_pattern(token: str) -> str:
    return f'"token":"{hostvalues.LOCK_TOKEN.check(token, "lock token")}"'


def acquire_command(record: LockRecord, lock_dir: str = LOCK_DIR) -> str:
    """Take the lock, or re-enter it if `record.token` already holds it. Exits HELD_EXIT_CODE when held."""
    info = f'"$lock/{RECORD_FILE}"'
    script = (
        'set -u; umask 077; lock="$1"; parent=$(dirname "$lock"); mkdir -p "$parent" || exit 1; '
        'tmp=$(mktemp -d "$parent/.lock.XXXXXX") || exit 1; '
        f'printf "%s\\n" "$2" > "$tmp/{RECORD_FILE}"; '
        f'if mv -T "$tmp" "$lock" 2>/dev/null; then echo "{MARKER} acquired"; cat {info}; exit 0; fi; '
        'rm -rf "$tmp"; '
        f'if grep -qF "$3" {info} 2>/dev/null; then echo "{MARKER} acquired"; cat {info}; exit 0; fi; '
        f'echo "{MARKER} held"; cat {info} 2>/dev/null; '
        f"exit {HELD_EXIT_CODE}"
    )
    return (f"sh -c {shlex.quote(script)} ingest-lock {shlex.quote(lock_dir)} {shlex.quote(record.to_json())} "
            f"{shlex.quote(_token_pattern(record.token))}")


def _guarded(script: str) -> str:
    """SCRIPT run under an flock on the lock's parent directory: check-then-replace becomes atomic among runners."""
    return ('lock="$1"; parent=$(dirname "$lock"); mkdir -p "$parent" || exit 1; '
            f'exec 9>"$parent/{GUARD_FILE}" && flock -w 10 9 || exit 1; ' + script)


def renew_command(record: LockRecord, lock_dir: str = LOCK_DIR) -> str:
    """Extend the lease of the lock RECORD's token holds (`renewed`), or print `lost` and the holder's record."""
    info = f'"$lock/{RECORD_FILE}"'
    script = _guarded(
        f'if grep -qF "$3" {info} 2>/dev/null; then printf "%s\n" "$2" > "$lock/.{RECORD_FILE}.tmp" && '
        f'mv "$lock/.{RECORD_FILE}.tmp" {info} && echo "{MARKER} renewed"; exit $?; fi; '
        f'echo "{MARKER} lost"; cat {info} 2>/dev/null; exit 0'
    )
    return (f"sh -c {shlex.quote(script)} ingest-lock {shlex.quote(lock_dir)} {shlex.quote(record.to_json())} "
            f"{shlex.quote(_token_pattern(record.token))}")


def takeover_command(expired_token: str, record: LockRecord, lock_dir: str = LOCK_DIR) -> str:
    """Replace the lock EXPIRED_TOKEN holds (its lease ran out) by RECORD; if the lock changed hands meanwhile,
    leave it and print `held` with its record, like a plain acquire."""
    info = f'"$lock/{RECORD_FILE}"'
    script = _guarded(
        f'if grep -qF "$4" {info} 2>/dev/null; then rm -rf "$lock" || exit 1; fi; '
        'umask 077; tmp=$(mktemp -d "$parent/.lock.XXXXXX") || exit 1; '
        f'printf "%s\n" "$2" > "$tmp/{RECORD_FILE}"; '
        f'if mv -T "$tmp" "$lock" 2>/dev/null; then echo "{MARKER} acquired"; cat {info}; exit 0; fi; '
        'rm -rf "$tmp"; '
        f'if grep -qF "$3" {info} 2>/dev/null; then echo "{MARKER} acquired"; cat {info}; exit 0; fi; '
        f'echo "{MARKER} held"; cat {info} 2>/dev/null; exit {HELD_EXIT_CODE}'
    )
    return (f"sh -c {shlex.quote(script)} ingest-lock {shlex.quote(lock_dir)} {shlex.quote(record.to_json())} "
            f"{shlex.quote(_token_pattern(record.token))} {shlex.quote(_token_pattern(expired_token))}")


def runner_alive(record: LockRecord | None) -> bool | None:
    """Whether RECORD's pid runs, when it ran on this machine; None when this machine cannot tell."""
    if record is None or record.machine != socket.gethostname():
        return None
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def expired(record: LockRecord, now: datetime, runner_alive: bool | None) -> bool:
    """Whether RECORD's holder is gone: its lease ran out, or it ran on this machine and its pid is dead."""
    return runner_alive is False or (runner_alive is None and now > record.lease_end())


def _remove_if_ours(token: str, lock_dir: str, done: str) -> str:
    info = f'"$lock/{RECORD_FILE}"'
    script = (
        'lock="$1"; '
        f'if [ ! -e "$lock" ]; then echo "{MARKER} absent"; exit 0; fi; '
        f'if grep -qF "$2" {info} 2>/dev/null; then rm -rf "$lock" && echo "{MARKER} {done}"; exit $?; fi; '
        f'echo "{MARKER} not-ours"; cat {info} 2>/dev/null; exit 0'
    )
    return f"sh -c {shlex.quote(script)} ingest-lock {shlex.quote(lock_dir)} {shlex.quote(_token_pattern(token))}"


def release_command(token: str, lock_dir: str = LOCK_DIR) -> str:
    """Remove the lock only if `token` holds it; otherwise print who does (and succeed: nothing of ours to do)."""
    return _remove_if_ours(token, lock_dir, "released")


def break_command(token: str | None, lock_dir: str = LOCK_DIR) -> str:
    """Break a lock on purpose. With `token`, only the lock the operator was shown; None breaks any (forced)."""
    if token is None:
        script = (f'lock="$1"; if [ -e "$lock" ]; then held=$(cat "$lock/{RECORD_FILE}" 2>/dev/null); '
                  f'rm -rf "$lock" && echo "{MARKER} broken" && printf "%s\\n" "$held"; '
                  f'else echo "{MARKER} absent"; fi')
        return f"sh -c {shlex.quote(script)} ingest-lock {shlex.quote(lock_dir)}"
    return _remove_if_ours(token, lock_dir, "broken")


def read_command(lock_dir: str = LOCK_DIR) -> str:
    """Print `ingest-lock: held` and the record, or `ingest-lock: free`."""
    quoted = shlex.quote(lock_dir)
    return (f'if [ -e {quoted} ]; then echo "ingest-lock: held"; cat {quoted}/{RECORD_FILE} 2>/dev/null; '
            f'else echo "ingest-lock: free"; fi')


LockState = Literal["acquired", "held", "released", "absent", "not-ours", "broken", "free", "renewed", "lost",
                    "failed"]


@dataclass(frozen=True)
class LockStatus:
    state: LockState
    record: LockRecord | None  # the holder's record (or ours after acquiring); None when unreadable or free
    rejected: str | None = None  # why a record that was there was not used (a forged or foreign one)


def parse_output(output: str | Sequence[str], host: str = "host") -> LockStatus:
    """Read what any command above printed."""
    lines = output.splitlines() if isinstance(output, str) else list(output)
    lines = [line for line in lines if line.strip()]
    marker_line = next((line for line in lines if line.startswith(MARKER)), None)
    if marker_line is None:
        found = hostvalues.shown("\n".join(lines[:3]))
        raise ConfigError(f"{host}: lock command printed no `{MARKER}` line; found {found}")
    state = marker_line[len(MARKER):].strip()
    if state not in LockState.__args__:  # type: ignore[attr-defined]
        raise ConfigError(f"{host}: unknown lock state {hostvalues.shown(state)}")
    record = None
    rejected = None
    rest = lines[lines.index(marker_line) + 1:]
    for line in rest:
        try:
            candidate = LockRecord.model_validate_json(line)
            check_values(candidate)
        except ValidationError:
            continue
        except hostvalues.HostValueError as exc:
            rejected = f"{host}: lock record rejected ({exc})"
            continue
        record, rejected = candidate, None
        break
    return LockStatus(state=state, record=record, rejected=rejected)  # type: ignore[arg-type]


def staleness(record: LockRecord, now: datetime, runner_alive: bool | None,
              max_age: timedelta = DEFAULT_MAX_AGE) -> str | None:
    """Why the lock looks stale, or None when it looks live.

    `runner_alive` is whether `record.pid` runs on `record.machine`: True/False when this machine is that
    machine and could check, None when it cannot know. Then only age speaks.
    """
    if runner_alive is False:
        return f"its runner (pid {record.pid} on {record.machine}) is no longer running"
    if runner_alive is True:
        return None
    age = now - record.started
    if age > max_age:
        return f"it is {_age(age)} old, longer than any deploy takes ({_age(max_age)})"
    return None


def is_stale(record: LockRecord, now: datetime, runner_alive: bool | None,
             max_age: timedelta = DEFAULT_MAX_AGE) -> bool:
    return staleness(record, now, runner_alive, max_age) is not None


def _age(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


def held_error(env: str, host: str, record: LockRecord | None, now: datetime, runner_alive: bool | None,
               max_age: timedelta = DEFAULT_MAX_AGE) -> LockHeld:
    """The LockHeld exception: holder, since when, what they run, and how to wait or break it on purpose."""
    if record is None:
        return LockHeld(
            f"deploy lock on {env} is held at {host} ({LOCK_DIR}) but its record is unreadable; if no deploy is "
            f"running, break it on purpose: ingestctl lock break {env}"
        )
    started = record.started.astimezone(UTC)
    since = f"{started:%Y-%m-%d %H:%M:%SZ} ({_age(now - record.started)} ago)"
    release = f" for release {record.release}" if record.release else ""
    message = (f"deploy lock on {env} is held by {record.who} (pid {record.pid} on {record.machine}) since {since}, "
               f"running `{record.command}`{release} (seen on {host}).")
    reason = staleness(record, now, runner_alive, max_age)
    if reason:
        message += (f" It looks stale: {reason}. If that run is really gone, break the lock on purpose: "
                    f"ingestctl lock break {env}")
    else:
        message += (f" Wait for it with --lock-wait SECONDS; if that run is dead, break the lock on purpose: "
                    f"ingestctl lock break {env}")
    return LockHeld(message)
