"""The shapes of values read back from hosts: ledger lines, state.json, lock records and facts.

Whoever can write one host's files controls what ingestctl reads from it, and those values reach shell
commands on every host (image pruning, rollbacks) and the other hosts' ledgers. So each value is checked,
where it is parsed, against the shape ingestctl itself writes; a value that fails is never used.

The patterns are deliberately narrow. Every one except LOCK_COMMAND (display only) accepts nothing that a
POSIX shell would need quoted, so even a forgotten `shlex.quote` cannot turn an accepted value into syntax.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ingestctl.errors import ConfigError
from ingestctl.hostlayout import BASE, SLOTS

# A value shown in an error is cut here: a forged value may be megabytes long.
SHOWN_CHARS = 60
# Linux's PID_MAX_LIMIT: a pid above it, or below 1 (a process group for kill(2)), is not a process.
PID_MAX = 4_194_304


def shown(value: object) -> str:
    """VALUE for an error message: repr'd (control characters escaped), truncated, never the whole of it.

    Square brackets are escaped too: the human output is rich markup, where a forged `[/x]` would raise.
    """
    if isinstance(value, str):
        text = repr(value[:SHOWN_CHARS])
        if len(value) > SHOWN_CHARS:
            text += f"... ({len(value)} characters)"
    else:
        text = repr(value)
        text = f"{type(value).__name__} {text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + '...'}"
    return text.replace("[", "\\x5b").replace("]", "\\x5d")


class HostValueError(ConfigError):
    """A value read from a host is not in the shape ingestctl writes. Names the field, the shape and the value."""

    def __init__(self, field: str, expected: str, found: object) -> None:
        super().__init__(f"{field}: expected {expected}, found {shown(found)}")
        self.field = field


@dataclass(frozen=True)
class HostValue:
    """One kind of value: its pattern (matched whole) and how to describe it to a human."""

    pattern: re.Pattern[str]
    expected: str

    def matches(self, value: object) -> bool:
        return isinstance(value, str) and self.pattern.fullmatch(value) is not None

    def check(self, value: object, field: str) -> str:
        """VALUE when it has this shape; else HostValueError naming FIELD."""
        if isinstance(value, str) and self.pattern.fullmatch(value):
            return value
        raise HostValueError(field, self.expected, value)


def _value(pattern: str, expected: str) -> HostValue:
    return HostValue(re.compile(pattern), expected)


# A release is its image tag (images.valid_tag): `git describe --tags --always --dirty` output or --version.
RELEASE = _value(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}",
                 "a release version (a Docker tag: letters, digits, '_', '.', '-', not starting with '.' or '-', "
                 "at most 128)")

# Docker's reference grammar, narrowed: [registry[:port]/]path[:tag][@sha256:<64 hex>], with a tag or a digest.
# Covers `ingest:<release>` (images.image_name), the sandbox's `ingest-postgres:15`, official `postgres:16`,
# `registry.example:5000/ingest:1.4.2` (local_images.registry_reference) and pinned `repo/name:tag@sha256:...`.
_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*" \
          r"(?::[0-9]{1,5})?/)?"
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"sha256:[0-9a-f]{64}"
IMAGE_REF = _value(rf"(?=.{{1,255}}\Z){_DOMAIN}{_PATH}(?::{_TAG}(?:@{_DIGEST})?|@{_DIGEST})",
                   "an image reference like ingest:1.4.2 or registry:5000/repo/name:tag[@sha256:<64 hex>] "
                   "(at most 255)")

# The registry-less digest of an image (docker image inspect --format '{{.Id}}').
IMAGE_ID = _value(r"sha256:[0-9a-f]{64}", "an image ID sha256:<64 lower-case hex>")

# config.ServiceConfig.version: the first 12 hex digits of a sha256.
CONFIG_VERSION = _value(r"[0-9a-f]{12}", "a config version (12 lower-case hex digits)")

# An alembic revision id (alembic_version.version_num is VARCHAR(32)); this project numbers them: 0001, 0002.
# A migration file's stem as alembic's template names it: `0003_add_tags`.
MIGRATION_FILE = _value(r"[A-Za-z0-9_]{1,128}", "a migration file name (letters, digits, '_', at most 128)")

SCHEMA_HEAD = _value(r"[A-Za-z0-9_]{1,32}", "an alembic revision id (letters, digits, '_', at most 32)")

SLOT = _value("|".join(SLOTS), f"a slot name ({' or '.join(SLOTS)})")

# pipeline.new_run_id (local time, no Z) and ledger.new_entry_id (UTC, Z): second plus 6 random hex digits.
RUN_ID = _value(r"[0-9]{8}T[0-9]{6}Z?-[0-9a-f]{6}", "a run id like 20240501T120000Z-1a2b3c")

# incidents.new_incident_id: `inc-` + UTC date + 6 random hex digits; what on-call types after `incident note`.
INCIDENT_ID = _value(r"inc-[0-9]{8}-[0-9a-f]{6}", "an incident id like inc-20240501-1a2b3c")

# inventory.ENV_NAME, bounded.
ENV_NAME = _value(r"[a-z0-9][a-z0-9_-]{0,63}", "an environment name (lower-case letters, digits, '-', '_')")

# Inventory host names and machines' hostnames (socket.gethostname()).
_HOST = r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}"
HOST_NAME = _value(_HOST, "a host name (letters, digits, '.', '_', '-', at most 253)")

# ledger.who_am_i / pipeline's `user@machine` of whoever started a run.
WHO = _value(rf"[A-Za-z0-9_][A-Za-z0-9._-]{{0,63}}@{_HOST}", "user@machine (letters, digits, '.', '_', '-')")

# lock.new_record: secrets.token_hex(8), matched with `grep -F` on the host.
LOCK_TOKEN = _value(r"[A-Za-z0-9]{1,64}", "letters and digits only (at most 64)")

# The command a lock holder runs, e.g. `deploy local --version v2` or `rollback app local -> v1`. Shown in
# messages only, never run: the one pattern here that admits characters a shell would need quoted.
LOCK_COMMAND = _value(r"[A-Za-z0-9][A-Za-z0-9 ._:/@()>=+,-]{0,199}",
                      "a command line of letters, digits, spaces and ._:/@()>=+,- (at most 200)")

# pipeline.migrate / rollbacks.rollback_schema: BASE/backups/<run id>-<schema head or 'empty'>.dump.
RESTORE_POINT = _value(rf"{re.escape(BASE)}/backups/[A-Za-z0-9_-]{{1,128}}\.dump",
                       f"a restore point {BASE}/backups/<run id>-<schema head>.dump")


def check_pid(value: object, field: str) -> int:
    """VALUE when it is a process id (an int, not a bool, from 1 to PID_MAX); else HostValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= PID_MAX:
        raise HostValueError(field, f"a process id from 1 to {PID_MAX}", value)
    return value
