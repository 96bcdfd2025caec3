"""Secrets: load from the environment, `*_FILE` files or the environment's secrets file; validate; generate.

Precedence (DESIGN section 3): a variable set in the environment wins over `NAME_FILE`, which wins over
the environment's secrets file `secrets/ENV.env`. Validation runs before any host is contacted, and no
message ever contains a secret's value.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets as _random
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ingestctl.errors import ConfigError

REQUIRED = ("POSTGRES_PASSWORD", "API_KEY", "JWT_SECRET", "REDIS_PASSWORD")
MIN_BYTES = {"POSTGRES_PASSWORD": 12, "API_KEY": 16, "JWT_SECRET": 32, "REDIS_PASSWORD": 16}
# REDIS_PASSWORD goes into redis.conf, whose parser splits on whitespace and reads quotes and backslashes.
REDIS_UNSAFE = frozenset(" \t\"'\\")
# What `testbed up` generates for the local sandbox: random hex of these many bytes.
GENERATED_BYTES = {"POSTGRES_PASSWORD": 16, "API_KEY": 24, "JWT_SECRET": 32, "REDIS_PASSWORD": 24}
PLACEHOLDERS = frozenset(
    {
        "changeme",
        "change-me",
        "change_me",
        "changethis",
        "password",
        "secret",
        "example",
        "default",
        "todo",
        "xxx",
        "test",
        "dummy",
        "placeholder",
        "replace-me",
        "replaceme",
        "your-secret-here",
    }
)
MASK = "********"
# The api connects as this role: DML on the schema, no superuser, no DDL. The migrations run as POSTGRES_USER
# (`ingest`, the bootstrap superuser that owns the schema), whose password the api never sees.
APP_DB_ROLE = "ingest_app"


def app_database_password(postgres_password: str) -> str:
    """The app role's password, derived one way from POSTGRES_PASSWORD: the api holds this, never the owner's.

    Derived rather than a fifth secret: rotating POSTGRES_PASSWORD rotates it too, and nothing new to keep.
    """
    return hmac.new(postgres_password.encode(), f"{APP_DB_ROLE} database role".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class SecretProblem:
    name: str
    rule: str

    def __str__(self) -> str:
        return f"{self.name}: {self.rule}"


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments ignored; surrounding quotes stripped."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE, found a line without '='")
        key, value = line.split("=", 1)
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def check_file_private(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"{path}: secrets file is readable by group or others (mode {mode:04o}); run `chmod 600 {path}`"
        )


def load(env_file: Path | None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The required secrets by name, from the sources in precedence order. Missing names are absent."""
    environ = os.environ if environ is None else environ
    from_file: dict[str, str] = {}
    if env_file is not None and env_file.exists():
        check_file_private(env_file)
        from_file = parse_env_file(env_file)
    found: dict[str, str] = {}
    for name in REQUIRED:
        if environ.get(name):
            found[name] = environ[name]
        elif environ.get(f"{name}_FILE"):
            path = Path(environ[f"{name}_FILE"])
            if not path.is_file():
                raise ConfigError(f"{name}_FILE: expected a readable file, found nothing at {path}")
            found[name] = path.read_text().strip()
        elif from_file.get(name):
            found[name] = from_file[name]
    return found


def problems(values: Mapping[str, str]) -> list[SecretProblem]:
    """Every rule each required secret breaks. Messages name the variable and rule, never the value."""
    found: list[SecretProblem] = []
    for name in REQUIRED:
        value = values.get(name)
        if not value:
            found.append(SecretProblem(name, "is required; set it in the environment, NAME_FILE, or the secrets file"))
            continue
        if value.strip().lower() in PLACEHOLDERS or value.strip().lower().startswith("changeme"):
            found.append(
                SecretProblem(name, "is a placeholder value; generate a real one (e.g. `openssl rand -hex 32`)")
            )
        size = len(value.encode())
        if size < MIN_BYTES[name]:
            found.append(SecretProblem(name, f"must be at least {MIN_BYTES[name]} bytes, found {size} bytes"))
        if any(ch in value for ch in "\r\n\0"):
            found.append(SecretProblem(name, "must be a single line without control characters"))
        if name == "REDIS_PASSWORD" and REDIS_UNSAFE.intersection(value):
            found.append(SecretProblem(name, "must not contain spaces, tabs, quotes or backslashes (redis.conf "
                                             "would split it); generate one with `openssl rand -hex 24`"))
    return found


def validated(env_file: Path | None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Load and validate, raising one ConfigError that lists every problem."""
    values = load(env_file, environ)
    issues = problems(values)
    if issues:
        source = f" (secrets file: {env_file})" if env_file else ""
        raise ConfigError("secrets check failed" + source + ":\n  " + "\n  ".join(map(str, issues)))
    return values


def generate_file(path: Path) -> list[str]:
    """Random values (file mode 0600) for every required secret PATH lacks, creating it if missing.

    Returns the names written: a file from before a secret joined REQUIRED gets just that one added.
    """
    existing = parse_env_file(path) if path.exists() else {}
    missing = [name for name in REQUIRED if not existing.get(name)]
    if not missing:
        return []
    lines = [f"{name}={_random.token_hex(GENERATED_BYTES[name])}\n" for name in missing]
    if path.exists():
        check_file_private(path)
        ends_open = not path.read_text().endswith("\n") and path.stat().st_size > 0
        with open(path, "a") as handle:
            handle.write(("\n" if ends_open else "") + "".join(lines))
        return missing
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("# Generated by `ingestctl testbed up` for the local sandbox. Never commit this file.\n")
        handle.write("".join(lines))
    return missing


def mask(values: Mapping[str, str]) -> dict[str, str]:
    """A copy fit for output: secret names keep a fixed mask, other keys keep their value."""
    return {key: (MASK if key in REQUIRED else value) for key, value in values.items()}
