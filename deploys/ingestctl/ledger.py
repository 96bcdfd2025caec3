"""The ledger: an append-only file of JSON lines on every host, one entry per deploy, rollback or config change.

Pure: the entry model, (de)serialisation, merging the copies of several hosts, the history table, the
live-release stack that rollbacks and pruning read, and the shell commands (built here, run elsewhere)
that append a line atomically and read the file back.

A later line with the same `id` supersedes an earlier one, so a writer may append a provisional entry
and then the final one without ever rewriting the file.
"""

from __future__ import annotations

import functools
import getpass
import json
import secrets as _random
import shlex
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ingestctl import hostvalues
from ingestctl.errors import ConfigError
from ingestctl.secrets import MASK

LEDGER_PATH = "/var/lib/ingest/ledger.jsonl"
LOCK_WAIT_S = 30

Kind = Literal["deploy", "rollback-app", "rollback-schema", "rollback-config", "config-set"]
# `running` is the journal line a run writes before it changes anything; its final line replaces it (merge).
Outcome = Literal["success", "rolled-back", "failed", "aborted", "running"]
RELEASE_KINDS: frozenset[str] = frozenset({"deploy", "rollback-app"})
# Names only, never values: which secrets a `config set` rotated (a deploy must not silently undo them).
SecretName = Literal["POSTGRES_PASSWORD", "API_KEY", "JWT_SECRET", "REDIS_PASSWORD"]


class Step(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    started: datetime
    duration_s: float
    host: str | None = None
    detail: str | None = None


class GateResult(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str  # health | metrics | bench | ...
    passed: bool
    numbers: dict[str, float | int | str | bool | None] = Field(default_factory=dict)
    host: str | None = None
    at: datetime | None = None  # when the gate reached its verdict (older entries lack it)


class LedgerEntry(BaseModel):
    """One action on the environment. Unknown fields from newer writers are ignored, not fatal.

    The fields that name things (ids, releases, images, configs, schema heads, hosts) must have the shapes in
    HOST_VALUE_FIELDS whenever an entry crosses a host boundary: `parse` skips lines that break them and
    `serialise` refuses to write one. Free text (message, steps, gates) is kept as data: it is never put in a
    command, a path or the history table.
    """

    model_config = ConfigDict(extra="ignore")

    id: str
    kind: Kind
    env: str
    release: str | None = None
    image_id: str | None = None
    config_version: str | None = None
    schema_head_before: str | None = None
    schema_head_after: str | None = None
    # The schema head the release's own code was built for (its newest migration): what an app
    # rollback to this release must be compatible with. For a deploy it equals schema_head_after.
    release_schema_head: str | None = None
    who: str
    started: datetime
    finished: datetime | None = None
    steps: list[Step] = Field(default_factory=list)
    gates: list[GateResult] = Field(default_factory=list)
    outcome: Outcome
    duration_s: float | None = None
    time_to_healthy_s: float | None = None
    hosts: list[str] = Field(default_factory=list)
    previous_release: str | None = None
    previous_config_version: str | None = None
    restore_point: str | None = None
    bench_skipped: bool = False
    # `deploy --emergency`: a change made under the error budget policy's exception (shown in history and reports).
    emergency: bool = False
    message: str | None = None
    lock_takeover: str | None = None  # whose expired deploy lock this run took over, if it did
    rotated_secrets: list[SecretName] = Field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.outcome == "success"

    def code_schema_head(self) -> str | None:
        if self.release_schema_head is not None:
            return self.release_schema_head
        return self.schema_head_after if self.kind == "deploy" else None


def new_entry_id(started: datetime) -> str:
    """Sortable and unique enough across machines: UTC second plus 6 random hex digits."""
    return f"{started.astimezone(UTC):%Y%m%dT%H%M%SZ}-{_random.token_hex(3)}"


def who_am_i() -> str:
    """`user@machine` of the person or CI runner starting the action."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, e.g. an arbitrary uid in a CI container
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


# --- secrets never reach the ledger ------------------------------------------------------------------


def _strings(value: Any, path: str) -> Iterable[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield f"{path}.{key}" if path else str(key), str(key)
            yield from _strings(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for position, item in enumerate(value):
            yield from _strings(item, f"{path}[{position}]")


def assert_no_secret(record: Mapping[str, Any], known_secrets: Mapping[str, str], what: str = "ledger entry") -> None:
    """ConfigError when any string in `record` is, or contains, a known secret's value. Names field and secret only."""
    for path, text in _strings(record, ""):
        for name, secret in known_secrets.items():
            if not secret:
                continue
            # Containment only for realistic lengths: a one-letter test value would match everything.
            if text == secret or (len(secret) >= 8 and secret in text):
                # The path itself may hold the secret (as a dict key): mask it there too.
                for value in known_secrets.values():
                    if value:
                        path = path.replace(value, MASK)
                raise ConfigError(f"{what} field {path} contains the value of {name}; refusing to write it "
                                  "(secrets never go to the ledger)")


# --- values that reach commands, paths and other hosts' ledgers ------------------------------------------

# Checked where entries cross a host boundary rather than by pydantic on construction: planning code and its
# tests build entries in memory freely; what must never happen is reading a forged value from a host, or
# writing one (a rollback copies the target entry's release and image ID into a new entry on every host).
HOST_VALUE_FIELDS: dict[str, hostvalues.HostValue] = {
    "id": hostvalues.RUN_ID,
    "env": hostvalues.ENV_NAME,
    "release": hostvalues.RELEASE,
    "previous_release": hostvalues.RELEASE,
    "image_id": hostvalues.IMAGE_ID,
    "config_version": hostvalues.CONFIG_VERSION,
    "previous_config_version": hostvalues.CONFIG_VERSION,
    "schema_head_before": hostvalues.SCHEMA_HEAD,
    "schema_head_after": hostvalues.SCHEMA_HEAD,
    "release_schema_head": hostvalues.SCHEMA_HEAD,
    "restore_point": hostvalues.RESTORE_POINT,
    "who": hostvalues.WHO,
}


def check_values(entry: LedgerEntry) -> None:
    """HostValueError naming the first field of ENTRY that is not in the shape ingestctl writes."""
    for name, rule in HOST_VALUE_FIELDS.items():
        value = getattr(entry, name)
        if value is not None:
            rule.check(value, name)
    for position, host in enumerate(entry.hosts):
        hostvalues.HOST_NAME.check(host, f"hosts[{position}]")


def serialise(entry: LedgerEntry, known_secrets: Mapping[str, str]) -> str:
    """One compact JSON line (no newline), after checking its values' shapes and that no secret is in it."""
    check_values(entry)
    record = entry.model_dump(mode="json", exclude_none=True)
    assert_no_secret(record, known_secrets)
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


@dataclass(frozen=True)
class SkippedLine:
    """A ledger line that was not used, and why: shown to the operator as a warning."""

    source: str  # `host:path`, or a label in tests
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.source} line {self.line}: {self.reason}"


@dataclass(frozen=True)
class ParsedLedger:
    entries: list[LedgerEntry]
    skipped: list[SkippedLine] = field(default_factory=list)


def parse(text: str, source: str = "ledger") -> ParsedLedger:
    """Entries in file order, later lines superseding earlier ones with the same id.

    A torn last line (a write cut short) is expected and skipped; any other unreadable line is skipped
    too and reported in `skipped`, because refusing the whole ledger would block a 3 a.m. rollback. So is a
    line whose values are not in the shape ingestctl writes (a forged line): it is never used, so it can
    neither supersede a genuine entry nor feed a command or another host's ledger.
    """
    lines = text.split("\n")
    torn_possible = not text.endswith("\n")
    by_id: dict[str, LedgerEntry] = {}
    skipped: list[SkippedLine] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        entry = read_line(line)
        if isinstance(entry, Unreadable):
            if entry.rejected:
                skipped.append(SkippedLine(source, number, f"rejected ({entry.reason}), ignored"))
            elif number == len(lines) and torn_possible:
                skipped.append(SkippedLine(source, number, "torn last line (an interrupted write), ignored"))
            else:
                skipped.append(SkippedLine(source, number, f"not a ledger entry ({entry.reason}), ignored"))
            continue
        by_id.pop(entry.id, None)  # re-insert so file order follows the latest write
        by_id[entry.id] = entry
    return ParsedLedger(entries=list(by_id.values()), skipped=skipped)


@dataclass(frozen=True)
class Unreadable:
    """Why a ledger line is no entry: not one at all, or REJECTED (an entry whose values break their shapes)."""

    reason: str
    rejected: bool = False


@functools.lru_cache(maxsize=16384)
def read_line(line: str) -> LedgerEntry | Unreadable:
    """LINE's entry, validated and checked, or why it is none. Cached: every host keeps the same lines, so a
    fleet's ledgers cost one validation a line, not one a host (60 us a line; a year of deploys is thousands).
    Entries are never changed once read, so one object can stand for the line wherever it was read."""
    try:
        entry = LedgerEntry.model_validate(json.loads(line))
    except json.JSONDecodeError as exc:
        return Unreadable(exc.msg)
    except ValidationError as exc:
        return Unreadable(f"{exc.error_count()} invalid field(s)")
    try:
        check_values(entry)
    except hostvalues.HostValueError as exc:
        return Unreadable(str(exc), rejected=True)
    return entry


def _completeness(entry: LedgerEntry) -> tuple[int, datetime]:
    finished = entry.finished or entry.started
    return (1 if entry.finished else 0, finished)


def merge(ledgers: Mapping[str, Sequence[LedgerEntry]]) -> list[LedgerEntry]:
    """One history from every host's copy: deduplicated by id (the most complete copy wins), oldest first."""
    best: dict[str, LedgerEntry] = {}
    for entries in ledgers.values():
        for entry in entries:
            held = best.get(entry.id)
            if held is None or _completeness(entry) > _completeness(held):
                best[entry.id] = entry
    return sorted(best.values(), key=lambda e: (e.started, e.id))


# --- history -----------------------------------------------------------------------------------------

HISTORY_COLUMNS = ["started", "kind", "release", "config", "schema", "outcome", "duration", "to healthy", "who", "id"]


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.1f}s" if value < 120 else f"{value / 60:.1f}m"


def mark_interrupted(entries: Sequence[LedgerEntry], live_run_ids: set[str],
                     live_on: Mapping[str, list[str]]) -> list[LedgerEntry]:
    """ENTRIES with every `running` journal line whose run no longer holds the deploy lock shown as
    `interrupted`, naming the hosts LIVE_ON its release (what the killed run had switched, as the hosts say)."""
    marked = []
    for entry in entries:
        if entry.outcome == "running" and entry.id not in live_run_ids:
            hosts = live_on.get(entry.release or "", []) if entry.kind in RELEASE_KINDS else []
            entry = entry.model_copy(update={
                "outcome": "interrupted", "hosts": hosts,
                "message": "the run stopped before it finished (killed or cut off)"
                           + (f"; live on its release: {', '.join(hosts)}" if hosts else "")})
        marked.append(entry)
    return marked


def _outcome_text(entry: LedgerEntry) -> str:
    if entry.outcome == "interrupted":
        return "interrupted" + (f" on {', '.join(entry.hosts)}" if entry.hosts else "")
    return (entry.outcome + (" (bench skipped)" if entry.bench_skipped else "")
            + (" (emergency)" if entry.emergency else ""))


def history_rows(entries: Sequence[LedgerEntry]) -> list[list[str]]:
    """Rows for `ingestctl history`, newest first, matching HISTORY_COLUMNS."""
    rows = []
    for e in sorted(entries, key=lambda e: (e.started, e.id), reverse=True):
        schema = ""
        if e.schema_head_before != e.schema_head_after:
            schema = f"{e.schema_head_before or 'empty'} -> {e.schema_head_after or 'empty'}"
        elif e.schema_head_after:
            schema = e.schema_head_after
        release = e.release or ""
        if e.previous_release and e.previous_release != e.release and e.kind in RELEASE_KINDS:
            release = f"{e.previous_release} -> {release}"
        config = e.config_version or ""
        if e.previous_config_version and e.previous_config_version != e.config_version:
            config = f"{e.previous_config_version} -> {config}"
        rows.append([
            e.started.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ"), e.kind, release, config, schema,
            _outcome_text(e), _seconds(e.duration_s),
            _seconds(e.time_to_healthy_s), e.who, e.id,
        ])
    return rows


# --- what is live, and what was live before ----------------------------------------------------------


def _stack(entries: Sequence[LedgerEntry], value_of, pop_kind: str, kinds: frozenset[str]) -> list[LedgerEntry]:
    """The entries that made each still-undoable value live, oldest first; the last is what runs now.

    A successful change pushes its value; a successful rollback of `pop_kind` to X pops back to X (so
    rolling back twice walks further back instead of flipping between two values). Repeating the
    live value (a no-op re-deploy) pushes nothing.
    """
    stack: list[LedgerEntry] = []
    for entry in sorted(entries, key=lambda e: (e.started, e.id)):
        value = value_of(entry)
        if not entry.succeeded or entry.kind not in kinds or value is None:
            continue
        if entry.kind == pop_kind:
            depth = next((i for i in range(len(stack) - 1, -1, -1) if value_of(stack[i]) == value), None)
            if depth is not None:
                del stack[depth + 1:]
                continue
        if stack and value_of(stack[-1]) == value:
            continue
        stack.append(entry)
    return stack


def release_stack(entries: Sequence[LedgerEntry]) -> list[LedgerEntry]:
    return _stack(entries, lambda e: e.release, "rollback-app", RELEASE_KINDS)


def config_stack(entries: Sequence[LedgerEntry]) -> list[LedgerEntry]:
    kinds = frozenset({"deploy", "rollback-app", "config-set", "rollback-config"})
    return _stack(entries, lambda e: e.config_version, "rollback-config", kinds)


def _last_live(entries: Sequence[LedgerEntry], value_of, kinds: frozenset[str]) -> dict[str, datetime]:
    """When each value (a release, a config version) last went live through a successful run of KINDS."""
    last_live: dict[str, datetime] = {}
    for entry in entries:
        value = value_of(entry)
        if value is not None and entry.succeeded and entry.kind in kinds:
            moment = entry.finished or entry.started
            last_live[value] = max(moment, last_live.get(value, moment))
    return last_live


def _most_recently_live(entries: Sequence[LedgerEntry], keep: int, value_of, kinds: frozenset[str],
                        stack: Sequence[LedgerEntry]) -> set[str]:
    """The KEEP values most recently live, the live one (the top of STACK) always among them."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ConfigError(f"keep_releases: expected an integer of at least 1, found {keep!r}")
    last_live = _last_live(entries, value_of, kinds)
    live_now = value_of(stack[-1]) if stack else None
    ranked = sorted(last_live, key=lambda v: (v == live_now, last_live[v]), reverse=True)
    return set(ranked[:keep]) | ({live_now} if live_now else set())


def live_rotations(entries: Sequence[LedgerEntry]) -> dict[str, LedgerEntry]:
    """Secrets that `config set` rotated and the live config still carries: {name: the config-set entry}.

    Walks the config stack back from the live config to the last deploy that changed it: a deploy made its
    config from the secrets it was given, so a rotation before it is no longer the fleet's alone.
    """
    rotations: dict[str, LedgerEntry] = {}
    for entry in reversed(config_stack(entries)):
        if entry.kind == "deploy":
            break
        if entry.kind == "config-set":
            for name in entry.rotated_secrets:
                rotations.setdefault(name, entry)
    return rotations


def configs_to_prune(entries: Sequence[LedgerEntry], keep: int) -> list[str]:
    """Config versions whose directories can go: all but the `keep` most recently live ones (and the live one).

    Old versions hold retired secrets: a rotated-away API key must not stay on disk, nor come back with
    `rollback config`, past the window `keep_releases` promises. Versions that never went live go too.
    """
    kinds = frozenset({"deploy", "rollback-app", "config-set", "rollback-config"})
    kept = _most_recently_live(entries, keep, lambda e: e.config_version, kinds, config_stack(entries))
    seen = {entry.config_version for entry in entries if entry.config_version is not None}
    return sorted(seen - kept)


@dataclass(frozen=True)
class PruneItem:
    release: str
    image_ids: tuple[str, ...]


def releases_to_prune(entries: Sequence[LedgerEntry], keep: int) -> list[PruneItem]:
    """Releases whose images can go: all but the `keep` most recently live ones (the live one always stays).

    Releases that never went live (failed deploys) are pruned too. An image id still used by a kept
    release is never listed, even under another release name.
    """
    kept = _most_recently_live(entries, keep, lambda e: e.release, RELEASE_KINDS, release_stack(entries))
    last_live = _last_live(entries, lambda e: e.release, RELEASE_KINDS)
    images: dict[str, list[str]] = {}
    for entry in entries:
        if entry.release is None:
            continue
        ids = images.setdefault(entry.release, [])
        if entry.image_id and entry.image_id not in ids:
            ids.append(entry.image_id)
    kept_images = {image for release in kept for image in images.get(release, [])}
    prune = []
    for release, ids in images.items():
        if release in kept:
            continue
        prunable = tuple(i for i in ids if i not in kept_images)
        prune.append(PruneItem(release=release, image_ids=prunable))
    return sorted(prune, key=lambda p: (last_live.get(p.release, datetime.min.replace(tzinfo=UTC)), p.release))


# --- commands run on a host (built here, executed by the orchestration) ------------------------------

# Appending: flock serialises writers; a file not ending in a newline (a torn write) first gets one,
# so the torn line stays alone and the new entry is readable. printf '%s\n' with the line passed as
# a positional argument means the JSON is never parsed by the shell.
_APPEND_SCRIPT = (
    'umask 027; mkdir -p "$(dirname "$1")" && touch "$1" && '
    'exec 9>>"$1.lock" && flock -w "$3" 9 && '
    '{ if [ -s "$1" ] && [ -n "$(tail -c 1 "$1")" ]; then printf "\\n" >> "$1"; fi; '
    'printf "%s\\n" "$2" >> "$1"; }'
)


def append_command(line: str, path: str = LEDGER_PATH, wait_s: int = LOCK_WAIT_S) -> str:
    """A shell command appending one serialised entry to the ledger at `path` on the host."""
    if "\n" in line or "\r" in line:
        raise ConfigError("ledger line: expected a single line of JSON, found a line break")
    return f"sh -c {shlex.quote(_APPEND_SCRIPT)} ledger-append {shlex.quote(path)} {shlex.quote(line)} {int(wait_s)}"


def read_command(path: str = LEDGER_PATH) -> str:
    """A shell command printing the ledger; prints nothing (and succeeds) on a host that has none yet."""
    quoted = shlex.quote(path)
    return f"if [ -f {quoted} ]; then cat {quoted}; fi"
