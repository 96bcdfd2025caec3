"""Facts about the ingest release on a host: which compose CLI it has, what is live, which configs it holds."""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping

from pyinfra.api import FactBase
from pyinfra.api.exceptions import FactProcessError

from ingestctl import hostvalues, ledger, lock
from ingestctl.hostlayout import BASE, PROJECT, SLOTS, STATE_FILE, container_of

# The postgres container's ID, main process and PATH, in one `docker container inspect` (`docker inspect` of a
# missing name asks after every kind of object), only if it runs and compose's labels say it is this project's
# postgres (a stranger that took the name is not entered); the engine's PATH when it has none.
_ID_PID_AND_PATH = (
    f'{{{{if and .State.Running (eq (index .Config.Labels "com.docker.compose.project") "{PROJECT}") '
    '(eq (index .Config.Labels "com.docker.compose.service") "postgres")}}{{.Id}} {{.State.Pid}} '
    '{{range .Config.Env}}{{if eq (index (split . "=") 0) "PATH"}}{{.}}{{end}}{{end}}{{end}}'
)
# Compose names a service's one container PROJECT-SERVICE-1 (v1: PROJECT_SERVICE_1).
POSTGRES_NAMES = f"{PROJECT}-postgres-1 {PROJECT}_postgres_1"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def psql(arguments: str) -> str:
    """psql in the db host's running postgres container; no output without one.

    The container is inspected by compose's name for it, and found by compose's labels only when no container of
    that name is this project's running postgres: one engine call instead of two (each 20 ms of the db host's
    CPU, under the lock of an app rollback). psql runs in the container's mount namespace, as the user its server
    runs as, with the container's PATH and nothing else of the SSH session's environment: what `docker exec`
    does, without asking the engine to start a process in the container (60 ms a query instead of 120).
    `docker exec` when nsenter cannot enter it (util-linux is Essential in Debian, but a host may forbid setns).
    Never `compose exec`, which first loads the project (176 ms)."""
    query = f"psql -X -U ingest -d ingest {arguments}"
    inspect = f"docker container inspect -f {shlex.quote(_ID_PID_AND_PATH)}"
    return (
        f"{{ set -- $({inspect} {POSTGRES_NAMES} 2>/dev/null); "
        f'[ -n "${{1:-}}" ] || set -- $({inspect} {container_of("postgres")} 2>/dev/null); '
        '[ -z "${1:-}" ] || '
        'if [ "${2:-0}" -gt 0 ] 2>/dev/null && nsenter -t "$2" -m true 2>/dev/null; then '
        f'nsenter -t "$2" -m -S "$(stat -c %u /proc/$2)" -G "$(stat -c %g /proc/$2)" -- '
        f'env -i "${{3:-PATH={DEFAULT_PATH}}}" {query}; '
        f'else docker exec "$1" {query}; fi; }} 2>/dev/null || true'
    )


class ComposeBinary(FactBase[str | None]):
    """`docker compose` (v2) when the plugin answers, else `docker-compose` (v1), else None."""

    def command(self) -> str:
        return (
            "if docker compose version >/dev/null 2>&1; then echo 'docker compose'; "
            "elif command -v docker-compose >/dev/null 2>&1; then echo docker-compose; fi"
        )

    def process(self, output: list[str]) -> str | None:
        lines = [line.strip() for line in output if line.strip()]
        if not lines:
            return None
        if lines[0] not in ("docker compose", "docker-compose"):
            raise FactProcessError(f"expected 'docker compose' or 'docker-compose', found {lines[0]!r}")
        return lines[0]


# state.json as `hostlayout.write_state` writes it: what runs live, the standby and what ran before.
STATE_VALUES: dict[str, hostvalues.HostValue] = {
    "release": hostvalues.RELEASE,
    "image": hostvalues.IMAGE_REF,
    "image_id": hostvalues.IMAGE_ID,
    "config_version": hostvalues.CONFIG_VERSION,
    "schema_head": hostvalues.SCHEMA_HEAD,
    "slot": hostvalues.SLOT,
}
# Each slot's compose variables (`hostlayout.slot_env`), by suffix.
SLOT_ENV_VALUES: dict[str, hostvalues.HostValue] = {
    "IMAGE": hostvalues.IMAGE_REF,
    "VERSION": hostvalues.RELEASE,
    "CONFIG": hostvalues.CONFIG_VERSION,
}
# Where the state records what failed its check: {field path: "what was expected, what was found"}.
REJECTED = "rejected"


def _checked_values(record: Mapping, where: str, rejected: dict[str, str]) -> dict:
    """The STATE_VALUES fields of RECORD; a value not in its shape becomes None and is named in REJECTED."""
    clean: dict = {}
    for key, rule in STATE_VALUES.items():
        if key not in record:
            continue
        clean[key] = None
        try:
            if record[key] is not None:
                clean[key] = rule.check(record[key], f"{STATE_FILE} field {where}{key}")
        except hostvalues.HostValueError as exc:
            rejected[where + key] = str(exc)
    return clean


def _checked_nested(value: object, where: str, rejected: dict[str, str]) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        rejected[where] = f"{STATE_FILE} field {where}: expected an object or null, found {type(value).__name__}"
        return None
    return _checked_values(value, f"{where}.", rejected)


def _checked_slots(value: object, rejected: dict[str, str]) -> dict[str, dict[str, str]]:
    """Each slot's compose variables; a variable not in its shape is left out (compose then uses `none`)."""
    if not isinstance(value, Mapping):
        if value is not None:
            rejected["slots"] = f"{STATE_FILE} field slots: expected an object, found {type(value).__name__}"
        return {}
    slots: dict[str, dict[str, str]] = {}
    for slot in SLOTS:
        variables = value.get(slot)
        if not isinstance(variables, Mapping):
            continue
        prefix = f"API_{slot.upper()}_"
        kept = {}
        for suffix, rule in SLOT_ENV_VALUES.items():
            key = prefix + suffix
            if key not in variables:
                continue
            try:
                kept[key] = rule.check(variables[key], f"{STATE_FILE} field slots.{slot}.{key}")
            except hostvalues.HostValueError as exc:
                rejected[f"slots.{slot}.{key}"] = str(exc)
        slots[slot] = kept
    return slots


def checked_state(state: Mapping) -> dict:
    """STATE with every value in the shape ingestctl writes; the rest set to None and listed under REJECTED.

    Why not fail the fact: a host whose state.json was tampered with must not block the fleet. With the bad
    values None, a deploy or rollback still switches that host (None never equals what it wants, so it is
    changed, not skipped) and writes a clean state.json, and the values that were valid still guide the
    switch. Callers that need a value treat None as unknown and name REJECTED; nothing forged is ever put in
    a command or written back. Keys ingestctl does not write are dropped.
    """
    rejected: dict[str, str] = {}
    clean = _checked_values(state, "", rejected)
    if "slots" in state:
        clean["slots"] = _checked_slots(state["slots"], rejected)
    for key in ("previous", "standby", "canary"):
        if key in state:
            clean[key] = _checked_nested(state[key], key, rejected)
    if rejected:
        clean[REJECTED] = rejected
    return clean


class IngestState(FactBase[dict | None]):
    """The host's state.json: live slot, release, image ID, config version and both slots' settings.

    Values are checked (`checked_state`): one not in the shape ingestctl writes comes back as None and is named
    under the REJECTED key. Unparsable JSON fails the fact (pyinfra then reports it and returns None).
    """

    def command(self) -> str:
        return f"cat {STATE_FILE} 2>/dev/null || true"

    def process(self, output: list[str]) -> dict | None:
        text = "\n".join(output).strip()
        if not text:
            return None
        try:
            state = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FactProcessError(f"{STATE_FILE}: expected JSON, found unparsable text ({exc})") from exc
        if not isinstance(state, dict):
            raise FactProcessError(f"{STATE_FILE}: expected a JSON object, found {type(state).__name__}")
        return checked_state(state)


class ConfigVersions(FactBase[list[str]]):
    """Config versions fully written on the host (a version dir without its .complete marker is ignored)."""

    @staticmethod
    def default() -> list[str]:
        return []

    def command(self) -> str:
        return f"for d in {BASE}/config/*/; do [ -f \"$d.complete\" ] && basename \"$d\"; done 2>/dev/null; true"

    def process(self, output: list[str]) -> list[str]:
        # Anything else in the directory (a forged name included) is not a config version: never listed.
        return sorted(line.strip() for line in output if hostvalues.CONFIG_VERSION.matches(line.strip()))


HEAD_QUERY = "SELECT version_num FROM alembic_version"


class SchemaHead(FactBase[str | None]):
    """The database's alembic head on the db host, or None (no database container, or an empty schema)."""

    runs_long = True  # read together, it runs in the background beside the other parts

    def command(self) -> str:
        return psql(f"-tAc '{HEAD_QUERY}'")

    def process(self, output: list[str]) -> str | None:
        heads = [line.strip() for line in output if line.strip()]
        if not heads:
            return None
        # Raised past pyinfra (its FactProcessError would become None, which reads as an empty schema and would
        # mislead the compatibility checks): an unknown head stops the command with this message (exit 2).
        return hostvalues.SCHEMA_HEAD.check(heads[0], "db host: alembic_version.version_num")


def applied_migrations(rows: list[str]) -> list:
    """What the database itself records of its migrations (schema_migration_meta rows `revision|t|f`), oldest
    applied first: each revision with its declared backward_compatible and downgrade_data_safe. Emergency commands
    decide from this, not from the checkout they happen to run in, which may not know the database's newest
    revisions."""
    from ingestctl.migrations import AppliedMigration

    applied = []
    for number, line in enumerate((line.strip() for line in rows if line.strip()), start=1):
        revision, _, rest = line.partition("|")
        compatible, _, data_safe = rest.partition("|")
        if compatible not in ("t", "f") or data_safe not in ("t", "f"):
            raise hostvalues.HostValueError(f"db host: schema_migration_meta row {number}",
                                            "revision|t or f|t or f", line)
        applied.append(AppliedMigration(
            hostvalues.SCHEMA_HEAD.check(revision, f"db host: schema_migration_meta row {number} revision"),
            compatible == "t", data_safe == "t"))
    return applied


class SchemaRecord(FactBase[tuple]):
    """(the SchemaHead, the `applied_migrations`) from one psql: an app rollback plans from both, and a second
    `docker exec` beside the first cost the db host 70 ms more. Each row is tagged with its query; a row with any
    other tag is not what the queries return, and is refused naming it."""

    runs_long = True  # read together, it runs in the background beside the other parts

    @staticmethod
    def default() -> tuple:
        return None, []

    def command(self) -> str:
        head = HEAD_QUERY.replace("SELECT ", "SELECT 'head', ", 1)
        applied = ("SELECT 'applied', revision, backward_compatible, downgrade_data_safe FROM schema_migration_meta "
                   "ORDER BY applied_at, revision")
        # One -c per query: psql runs the second when the first fails (no alembic_version yet), as two calls did.
        return psql(f'-tA -F \'|\' -c "{head}" -c "{applied}"')

    def process(self, output: list[str]) -> tuple:
        rows: dict[str, list[str]] = {"head": [], "applied": []}
        for number, line in enumerate((line.strip() for line in output if line.strip()), start=1):
            tag, _, row = line.partition("|")
            if tag not in rows:
                raise hostvalues.HostValueError(f"db host: schema record row {number}", "head|... or applied|...",
                                                line)
            rows[tag].append(row)
        return SchemaHead().process(rows["head"]), applied_migrations(rows["applied"])


MIGRATION_FILE_MARK = "### ingest-migration "


class ImageMigrations(FactBase[dict]):
    """The Alembic migration files inside IMAGE (on this host): {file stem: source}. The image that added a
    revision carries its downgrade code, so a schema rollback can be planned from it in any checkout."""

    @staticmethod
    def default() -> dict:
        return {}

    def command(self, image: str) -> str:
        script = ('cd /app/alembic/versions && for f in *.py; do [ "$f" = __init__.py ] && continue; '
                  f'printf "\n{MIGRATION_FILE_MARK}%s\n" "$f"; cat "$f"; done')
        return f"docker run --rm --network none --entrypoint sh {shlex.quote(image)} -c {shlex.quote(script)}"

    def process(self, output: list[str]) -> dict:
        files: dict[str, list[str]] = {}
        current = None
        for line in output:
            if line.startswith(MIGRATION_FILE_MARK):
                name = line[len(MIGRATION_FILE_MARK):].strip().removesuffix(".py")
                current = hostvalues.MIGRATION_FILE.check(name, "migration file name in the image")
                files[current] = []
            elif current is not None:
                files[current].append(line)
        return {name: "\n".join(lines) + "\n" for name, lines in files.items()}


class RunningServices(FactBase[dict[str, str]]):
    """Running containers of the ingest compose project: {service: image}."""

    runs_long = True  # read together, it runs in the background beside the other parts

    @staticmethod
    def default() -> dict[str, str]:
        return {}

    def command(self) -> str:
        return (
            "docker ps --filter label=com.docker.compose.project=ingest --filter status=running "
            "--format '{{.Label \"com.docker.compose.service\"}} {{.Image}}'"
        )

    def process(self, output: list[str]) -> dict[str, str]:
        # Not checked against hostvalues: these are only compared with what ingestctl wants, never put in a command.
        services = {}
        for line in output:
            parts = line.split()
            if len(parts) == 2:
                services[parts[0]] = parts[1]
        return services


class SlotSockets(FactBase[frozenset[str]]):
    """The slots whose unix socket (the proxy's route to them) exists in BASE/run. Only a slot container of this
    layout creates one: a slot started before the layout had sockets has none, and a switch must not route to it."""

    @staticmethod
    def default() -> frozenset[str]:
        return frozenset()

    def command(self) -> str:
        return f"ls -1 {BASE}/run 2>/dev/null || true"

    def process(self, output: list[str]) -> frozenset[str]:
        return frozenset(slot for slot in SLOTS if f"{slot}.sock" in {line.strip() for line in output})


class FileDigests(FactBase[dict[str, str | None]]):
    """sha256 of each path (None when absent): one round trip to tell whether a set of files is as wanted."""

    @staticmethod
    def default() -> dict[str, str | None]:
        return {}

    def command(self, paths: list[str]) -> str:
        quoted = " ".join(shlex.quote(p) for p in paths)
        return f"for f in {quoted}; do if [ -f \"$f\" ]; then sha256sum \"$f\"; else echo \"- $f\"; fi; done"

    def process(self, output: list[str]) -> dict[str, str | None]:
        # Only compared with the digests of the wanted files (a forged one just means "rewrite"): not checked.
        digests: dict[str, str | None] = {}
        for line in output:
            digest, _, path = line.strip().partition(" ")
            digests[path.strip()] = None if digest == "-" else digest
        return digests


class DeployLockLines(FactBase[list[str]]):
    """What `lock.read_command` prints on the host, as it is: the caller parses it with `lock.parse_output`,
    which names the host in what it rejects."""

    @staticmethod
    def default() -> list[str]:
        return []

    def command(self) -> str:
        return lock.read_command()

    def process(self, output: list[str]) -> list[str]:
        return list(output)


class LedgerCopy(FactBase[ledger.ParsedLedger]):
    """This host's copy of the ledger, parsed as `ledger.parse` does: unreadable or forged lines are set aside in
    `skipped` (their source is the ledger's path; the reader names the host). Read beside the lock's other facts
    when a plan is decided under the lock (`runlock.guarded(decide=...)`)."""

    @staticmethod
    def default() -> ledger.ParsedLedger:
        return ledger.ParsedLedger([])

    def command(self) -> str:
        return ledger.read_command()

    def process(self, output: list[str]) -> ledger.ParsedLedger:
        return ledger.parse("\n".join(output) + "\n", source=ledger.LEDGER_PATH)
