"""Service configuration: the tunables `config set` accepts, their rules and defaults, and its versioned rendering.

A config is the full set of tunables plus the secrets. Its version is content-addressed: the first 12 hex
digits of an HMAC-SHA256 of the canonical rendering, secrets included (so rotating a secret makes a new
version), keyed from JWT_SECRET (so the version tells nothing about a secret to whoever sees it). The
rendering written to hosts is split in two: a non-secret env file, and one file per secret (mode 0600 on
the host). Neither the version nor any message here ever reveals a secret's value.
"""

from __future__ import annotations

import hashlib
import hmac
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ingestctl import secrets as secrets_mod
from ingestctl.errors import ConfigError

VERSION_LENGTH = 12
VERSION_KEY_LABEL = b"ingest config version key"


@dataclass(frozen=True)
class Tunable:
    """One service setting: its default, the rule a value must follow, and how to normalise it."""

    name: str
    default: str
    rule: str
    normalise: Callable[[str], str]
    description: str = ""


def _int_in_range(low: int, high: int | None) -> Callable[[str], str]:
    def normalise(raw: str) -> str:
        text = raw.strip()
        # int() accepts "1_000" and "+5"; an operator typing those at 3 a.m. means a plain number, so
        # the canonical form is digits only, keeping the content hash stable across spellings.
        try:
            number = int(text, 10)
        except ValueError:
            raise ValueError("not an integer") from None
        if number < low or (high is not None and number > high):
            raise ValueError("out of range")
        return str(number)

    return normalise


def _one_of(choices: tuple[str, ...], case: Callable[[str], str]) -> Callable[[str], str]:
    def normalise(raw: str) -> str:
        value = case(raw.strip())
        if value not in choices:
            raise ValueError("not a known choice")
        return value

    return normalise


TUNABLES: dict[str, Tunable] = {
    t.name: t
    for t in (
        Tunable("INGEST_MAX_BATCH_ITEMS", "1000", "an integer from 1 to 100000", _int_in_range(1, 100_000),
                "events accepted in one batch request; longer batches get 413"),
        Tunable("MAX_REQUEST_BODY_BYTES", "1048576", "an integer from 1024 to 104857600",
                _int_in_range(1024, 104_857_600), "request bodies larger than this get 413 PAYLOAD_TOO_LARGE"),
        Tunable("RATE_LIMIT_BACKEND", "redis", "one of: redis, memory", _one_of(("redis", "memory"), str.lower),
                "where rate-limit counters live; memory is the surge fallback when Redis struggles"),
        Tunable("RATE_LIMIT_PER_MINUTE", "6000", "an integer of at least 1", _int_in_range(1, None),
                "requests per minute per API key"),
        Tunable("LOG_LEVEL", "INFO", "one of: DEBUG, INFO, WARNING, ERROR",
                _one_of(("DEBUG", "INFO", "WARNING", "ERROR"), str.upper), "service log level"),
        Tunable("SHUTDOWN_GRACE_SECONDS", "20", "an integer from 1 to 300", _int_in_range(1, 300),
                "how long SIGTERM waits for in-flight requests to drain"),
    )
}
SECRET_KEYS: tuple[str, ...] = secrets_mod.REQUIRED
RENDER_FORMAT = 2
KNOWN_KEYS: tuple[str, ...] = (*TUNABLES, *SECRET_KEYS)


def _known_keys_text() -> str:
    return ", ".join(KNOWN_KEYS)


def validate_tunable(key: str, value: object, where: str = "") -> str:
    """The canonical string for one tunable, or ConfigError naming key, rule and (non-secret) value."""
    prefix = f"{where}{key}"
    tunable = TUNABLES.get(key)
    if tunable is None:
        raise ConfigError(f"{prefix}: unknown config key; known keys: {_known_keys_text()}")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(f"{prefix}: expected {tunable.rule}, found {type(value).__name__} {value!r}")
    try:
        return tunable.normalise(str(value))
    except ValueError:
        raise ConfigError(f"{prefix}: expected {tunable.rule}, found {str(value)!r}") from None


def validate_tunables(values: Mapping[str, object], where: str = "") -> dict[str, str]:
    """Validate a mapping of tunables (e.g. an inventory's `config` data). Secrets are refused here."""
    result: dict[str, str] = {}
    for key, value in values.items():
        if key in SECRET_KEYS:
            raise ConfigError(
                f"{where}{key}: secrets do not belong in inventory config; put them in the environment, "
                f"{key}_FILE or the environment's secrets file"
            )
        result[key] = validate_tunable(key, value, where)
    return result


def read_secret_argument(key: str, value: str, read_stdin: Callable[[], str]) -> str:
    """A secret given as `KEY=@FILE` or `KEY=-` (standard input), never inline: an inline value is in `ps`
    for the whole run and in the shell's history. ConfigError names the key and the way to give it."""
    if value == "-":
        return read_stdin().rstrip("\r\n")
    if value.startswith("@") and len(value) > 1:
        path = Path(value[1:]).expanduser()
        try:
            return path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    raise ConfigError(f"{key}: a secret is taken only as {key}=@FILE or {key}=- (from standard input), never "
                      "inline (an inline value shows in `ps` and the shell's history)")


def parse_assignments(args: Iterable[str], current_secrets: Mapping[str, str] | None = None,
                      read_stdin: Callable[[], str] | None = None) -> dict[str, str]:
    """`KEY=VALUE` command-line arguments to canonical values; secrets as `KEY=@FILE` or `KEY=-` (stdin).

    Unknown keys list the known ones; invalid tunables name the rule; a secret is checked with
    `ingestctl.secrets.problems` against the rest of `current_secrets` and its value never appears.
    Every problem is reported at once so an operator fixes the command in one go.
    """
    changes: dict[str, str] = {}
    errors: list[str] = []
    stdin_used: list[str] = []

    def stdin_once() -> str:
        stdin_used.append("-")
        if len(stdin_used) > 1:
            raise ConfigError("only one secret can come from standard input (KEY=-); give the others as @FILE")
        return (read_stdin or sys.stdin.read)()

    for position, arg in enumerate(args, start=1):
        key, sep, value = arg.partition("=")
        key = key.strip()
        if not sep or not key:
            # Never echo the argument itself: it may be a secret missing its `KEY=`.
            errors.append(f"argument {position}: expected KEY=VALUE, found no '=' "
                          f"(known keys: {_known_keys_text()})")
            continue
        if key in changes:
            errors.append(f"{key}: given twice; give each key once")
            continue
        if key in SECRET_KEYS:
            try:
                value = read_secret_argument(key, value, stdin_once)
            except ConfigError as exc:
                errors.append(str(exc))
                continue
            merged = {**(current_secrets or {}), key: value}
            found = [str(p) for p in secrets_mod.problems(merged) if p.name == key]
            if found:
                errors.extend(found)
            else:
                changes[key] = value
            continue
        try:
            changes[key] = validate_tunable(key, value)
        except ConfigError as exc:
            errors.append(str(exc))
    if errors:
        raise ConfigError("config set refused, nothing was changed:\n  " + "\n  ".join(errors))
    if not changes:
        raise ConfigError(f"config set: expected at least one KEY=VALUE; known keys: {_known_keys_text()}")
    return changes


def _secret_guard(value: str) -> str:
    if any(ch in value for ch in "\r\n\0"):
        raise ConfigError("a secret contains a line break or NUL; secrets must be a single line")
    return value


@dataclass(frozen=True)
class ServiceConfig:
    """Every tunable (defaults filled in) plus the secrets. Immutable: changes make a new config."""

    tunables: Mapping[str, str]
    secrets: Mapping[str, str] = field(repr=False)

    @classmethod
    def build(cls, overrides: Mapping[str, object] | None = None,
              secrets: Mapping[str, str] | None = None) -> ServiceConfig:
        values = {name: t.default for name, t in TUNABLES.items()}
        values.update(validate_tunables(overrides or {}))
        return cls(tunables=dict(sorted(values.items())),
                   secrets={k: _secret_guard(v) for k, v in sorted((secrets or {}).items()) if k in SECRET_KEYS})

    def with_changes(self, changes: Mapping[str, str]) -> ServiceConfig:
        """A new config with `changes` (already parsed by `parse_assignments`) applied."""
        tunables = dict(self.tunables)
        secrets = dict(self.secrets)
        for key, value in changes.items():
            if key in SECRET_KEYS:
                secrets[key] = _secret_guard(value)
            else:
                tunables[key] = validate_tunable(key, value)
        return ServiceConfig(tunables=dict(sorted(tunables.items())), secrets=dict(sorted(secrets.items())))

    def canonical(self) -> str:
        """The text the version hashes: every key, sorted, secrets included. Never written or printed."""
        # The rendering's format: format 2 runs the api as the app role. A new format makes new versions, so
        # hosts get fresh config directories; an old version rolled back to keeps running as it did.
        lines = [f"format:{RENDER_FORMAT}"]
        lines += [f"{k}={v}" for k, v in sorted(self.tunables.items())]
        lines += [f"secret:{k}={v}" for k, v in sorted(self.secrets.items())]
        return "\n".join(lines) + "\n"

    @property
    def version(self) -> str:
        """Keyed, so the version (printed everywhere: output, CI logs, the ledger) cannot test a guess of a secret.

        An unkeyed hash over the secrets let anyone who saw it check candidate values offline. The key comes from
        JWT_SECRET (at least 32 bytes), so only whoever already holds the secrets can compute a version.
        """
        key = hmac.new(VERSION_KEY_LABEL, self.secrets.get("JWT_SECRET", "").encode(), hashlib.sha256).digest()
        return hmac.new(key, self.canonical().encode(), hashlib.sha256).hexdigest()[:VERSION_LENGTH]

    def masked(self) -> dict[str, str]:
        """Every key with its value, secrets replaced by the mask: fit for output and --dry plans."""
        return {**self.tunables, **{k: secrets_mod.MASK for k in self.secrets}}


def render_env_file(config: ServiceConfig, secrets_dir: str | None = None) -> str:
    """The non-secret env file: deterministic, one `KEY=VALUE` per line, sorted.

    With `secrets_dir`, each secret is referenced as `NAME_FILE=<secrets_dir>/<NAME>`, the path where the
    per-secret file is mounted, so the service (and `docker inspect`) sees a path, never the value.
    """
    lines = [
        "# ingest service config, written by ingestctl. Do not edit on the host: use `ingestctl config set`.",
        f"# config version {config.version}",
    ]
    lines += [f"{k}={v}" for k, v in sorted(config.tunables.items())]
    lines.append(f"POSTGRES_USER={secrets_mod.APP_DB_ROLE}")
    if secrets_dir is not None:
        base = secrets_dir.rstrip("/")
        lines += [f"{k}_FILE={base}/{k}" for k in sorted(config.secrets)]
    return "\n".join(lines) + "\n"


def render_secret_files(config: ServiceConfig) -> dict[str, str]:
    """One file body per secret, keyed by file name. No trailing newline: readers that do not strip stay right.

    POSTGRES_PASSWORD's file holds the app role's password (see POSTGRES_USER above), not the owner's.
    """
    files = dict(sorted(config.secrets.items()))
    if "POSTGRES_PASSWORD" in files:
        files["POSTGRES_PASSWORD"] = secrets_mod.app_database_password(files["POSTGRES_PASSWORD"])
    return files


def parse_env_file_text(text: str, where: str = "config env file") -> dict[str, str]:
    """Read back a rendered env file (comments skipped). `*_FILE` references are returned as they are."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ConfigError(f"{where}:{number}: expected KEY=VALUE, found a line without '='")
        values[key.strip()] = value.strip()
    return values


def tunables_from_env_file(text: str, where: str = "config env file") -> dict[str, str]:
    """Only the tunables of a rendered env file, validated, with defaults for any absent key."""
    raw = parse_env_file_text(text, where)
    found = {k: v for k, v in raw.items() if k in TUNABLES}
    values = {name: t.default for name, t in TUNABLES.items()}
    values.update(validate_tunables(found, where=f"{where}: "))
    return dict(sorted(values.items()))
