"""Service settings: typed, validated once at start-up, secrets readable from `NAME_FILE` files.

A bad setting must stop the process with one line that names the variable and the rule it broke. Values
never appear in that line (pydantic's own messages can embed inputs, so we format errors ourselves).
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

# Variables that may hold a secret; each also accepts NAME_FILE (how the deploy passes them: 0600 files).
FILE_BACKED = ("POSTGRES_PASSWORD", "API_KEY", "JWT_SECRET", "DATABASE_URL", "REDIS_URL", "REDIS_PASSWORD")

# Kept identical to ingestctl's list: the image cannot import the release tooling.
PLACEHOLDERS = frozenset(
    {"changeme", "change-me", "change_me", "changethis", "password", "secret", "example", "default",
     "todo", "xxx", "test", "dummy", "placeholder", "replace-me", "replaceme", "your-secret-here"}
)
MIN_SECRET_BYTES = {"JWT_SECRET": 32, "API_KEY": 16}


class ConfigurationError(Exception):
    """A setting is missing or invalid. The message names the variable and rule, never the value."""


class _SecretFilesSource(PydanticBaseSettingsSource):
    """`NAME_FILE=/path` supplies NAME. Ranked below the environment, so a set NAME wins over its file."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for name in FILE_BACKED:
            if name.lower() not in self.settings_cls.model_fields:
                continue  # not this model's: the migrations' settings never open the api's secret files
            path_text = os.environ.get(f"{name}_FILE")
            if not path_text or os.environ.get(name):
                continue
            path = Path(path_text)
            try:
                value = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise ConfigurationError(f"{name}_FILE: expected a readable file, found nothing at {path}") from None
            except (PermissionError, IsADirectoryError, UnicodeDecodeError) as exc:
                raise ConfigurationError(
                    f"{name}_FILE: expected a readable UTF-8 file at {path}, found {type(exc).__name__}"
                ) from None
            # Files written by editors and `echo` end in a newline that is not part of the secret.
            found[name] = value.rstrip("\r\n")
        return found


def _check_secret(name: str, value: str) -> str:
    if not value:
        raise ValueError("is required and must not be empty")
    if value.strip().lower() in PLACEHOLDERS or value.strip().lower().startswith("changeme"):
        raise ValueError("is a placeholder value; generate a real one (e.g. `openssl rand -hex 32`)")
    minimum = MIN_SECRET_BYTES.get(name)
    if minimum and len(value.encode()) < minimum:
        raise ValueError(f"must be at least {minimum} bytes, found {len(value.encode())} bytes")
    if any(ch in value for ch in "\r\n\0"):
        raise ValueError("must be a single line without control characters")
    return value


class DatabaseSettings(BaseSettings):
    """What migrations need: only the database connection (no API key or JWT secret)."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", hide_input_in_errors=True)

    # PostgreSQL: a full libpq URL, or the parts.
    database_url: SecretStr | None = Field(None, alias="DATABASE_URL")
    postgres_host: str = Field("localhost", min_length=1, alias="POSTGRES_HOST")
    postgres_port: int = Field(5432, ge=1, le=65535, alias="POSTGRES_PORT")
    postgres_user: str = Field("ingest", min_length=1, alias="POSTGRES_USER")
    postgres_db: str = Field("ingest", min_length=1, alias="POSTGRES_DB")
    postgres_password: SecretStr | None = Field(None, alias="POSTGRES_PASSWORD")
    db_pool_min_size: int = Field(2, ge=0, le=100, alias="DB_POOL_MIN_SIZE")
    db_pool_max_size: int = Field(10, ge=1, le=200, alias="DB_POOL_MAX_SIZE")
    db_pool_timeout_seconds: float = Field(5.0, gt=0, le=120, alias="DB_POOL_TIMEOUT_SECONDS")
    db_statement_timeout_ms: int = Field(15000, ge=0, le=3_600_000, alias="DB_STATEMENT_TIMEOUT_MS")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return init_settings, env_settings, _SecretFilesSource(settings_cls)

    @field_validator("postgres_password")
    @classmethod
    def _password_rules(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            _check_secret("POSTGRES_PASSWORD", value.get_secret_value())
        return value

    @field_validator("database_url")
    @classmethod
    def _libpq_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        raw = value.get_secret_value()
        if not raw:
            return None
        scheme = urlsplit(raw).scheme
        if scheme not in ("postgresql", "postgres", "postgresql+psycopg"):
            raise ValueError("must be a libpq URL starting with postgresql://")
        return SecretStr(raw.replace("postgresql+psycopg://", "postgresql://", 1))

    @model_validator(mode="after")
    def _database_reachable_somehow(self) -> DatabaseSettings:
        if self.database_url is None and self.postgres_password is None:
            raise ConfigurationError(
                "POSTGRES_PASSWORD: is required unless DATABASE_URL is set; set it or POSTGRES_PASSWORD_FILE"
            )
        return self

    @cached_property
    def conninfo(self) -> str:
        """libpq connection string for psycopg. Holds the password: never log it."""
        password = self.postgres_password.get_secret_value() if self.postgres_password else None
        if self.database_url is not None:
            base = self.database_url.get_secret_value()
            if password and "password" not in conninfo_to_dict(base):
                return make_conninfo(base, password=password)
            return make_conninfo(base)
        return make_conninfo(
            host=self.postgres_host, port=self.postgres_port, user=self.postgres_user,
            dbname=self.postgres_db, password=password,
        )

    def sqlalchemy_url(self):
        """The same database as a SQLAlchemy URL object (for Alembic); rendered without the password."""
        from sqlalchemy.engine import URL

        parts = conninfo_to_dict(self.conninfo)
        query = {k: str(v) for k, v in parts.items() if k not in {"host", "port", "user", "password", "dbname"}}
        return URL.create(
            "postgresql+psycopg",
            username=parts.get("user"), password=parts.get("password"), host=parts.get("host"),
            port=int(parts["port"]) if parts.get("port") else None, database=parts.get("dbname"),
            query=query,
        )

    def describe_database(self) -> str:
        """host:port/db for logs and errors, no credentials."""
        parts = conninfo_to_dict(self.conninfo)
        return f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"




class Settings(DatabaseSettings):
    """Everything the running service needs."""

    # Process
    port: int = Field(8000, ge=1, le=65535, alias="PORT")
    host: str = Field("0.0.0.0", alias="HOST")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field("INFO", alias="LOG_LEVEL")
    shutdown_grace_seconds: float = Field(20.0, ge=0, le=600, alias="SHUTDOWN_GRACE_SECONDS")
    app_version: str = Field("dev", min_length=1, max_length=128, alias="APP_VERSION")
    # The blue/green slot this process serves from ("" outside the fleet). Two slots can run the same release
    # (a config change, the warm standby): without it their counters would be one series to Prometheus, and a
    # switch between them would read as every request the other slot ever answered.
    app_slot: Literal["", "blue", "green"] = Field("", alias="APP_SLOT")
    # Peers whose X-Forwarded-For is believed (a per-host proxy): the rate limiter keys on the real client.
    forwarded_allow_ips: str = Field("127.0.0.1", alias="FORWARDED_ALLOW_IPS")
    # Also serve on this unix socket (beside HOST:PORT): the per-host proxy's route to the slot. The proxy
    # connects through a symlink that the deploy flips, which moves traffic without reloading nginx. A peer on
    # it is the local proxy, trusted like 127.0.0.1 for X-Forwarded-For.
    unix_socket: str = Field("", pattern=r"^(/[A-Za-z0-9._-]+)+\.sock$|^$", max_length=100, alias="UNIX_SOCKET")

    # Secrets
    api_key: SecretStr | None = Field(None, alias="API_KEY")
    jwt_secret: SecretStr | None = Field(None, alias="JWT_SECRET")
    jwt_leeway_seconds: int = Field(30, ge=0, le=3600, alias="JWT_LEEWAY_SECONDS")
    # Query tokens: `exp` at most this long after `iat` (after now when there is no `iat`); 60 s to 30 days.
    jwt_max_lifetime_seconds: int = Field(86400, ge=60, le=2_592_000, alias="JWT_MAX_LIFETIME_SECONDS")
    # ... and their `aud` must include, their `iss` must equal, these.
    jwt_audience: str = Field("ingest", min_length=1, max_length=256, alias="JWT_AUDIENCE")
    jwt_issuer: str = Field("ingest", min_length=1, max_length=256, alias="JWT_ISSUER")

    # Redis and rate limiting
    redis_url: SecretStr = Field(SecretStr("redis://localhost:6379/0"), alias="REDIS_URL")
    # Redis's password (the deploy always sets one, as REDIS_PASSWORD_FILE); a password in REDIS_URL wins.
    redis_password: SecretStr | None = Field(None, alias="REDIS_PASSWORD")
    redis_timeout_seconds: float = Field(0.25, gt=0, le=10, alias="REDIS_TIMEOUT_SECONDS")
    rate_limit_backend: Literal["redis", "memory"] = Field("redis", alias="RATE_LIMIT_BACKEND")
    rate_limit_per_minute: int = Field(6000, ge=0, le=10_000_000, alias="RATE_LIMIT_PER_MINUTE")
    rate_limit_burst: int = Field(1000, ge=1, le=10_000_000, alias="RATE_LIMIT_BURST")

    # Request guards
    ingest_max_batch_items: int = Field(1000, ge=1, le=100_000, alias="INGEST_MAX_BATCH_ITEMS")
    max_request_body_bytes: int = Field(1_048_576, ge=1024, le=1_073_741_824, alias="MAX_REQUEST_BODY_BYTES")
    query_max_limit: int = Field(1000, ge=1, le=100_000, alias="QUERY_MAX_LIMIT")
    # A client must send its whole request line and headers within this many seconds of connecting (or of
    # the first byte of its next request on a kept-alive connection), else the connection is closed.
    header_timeout_seconds: float = Field(10.0, gt=0, le=300, allow_inf_nan=False, alias="HEADER_TIMEOUT_SECONDS")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("rate_limit_backend", mode="before")
    @classmethod
    def _lower_backend(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("api_key", "jwt_secret")
    @classmethod
    def _secret_rules(cls, value: SecretStr | None, info) -> SecretStr | None:
        if value is not None:
            _check_secret(info.field_name.upper(), value.get_secret_value())
        return value

    @field_validator("jwt_audience", "jwt_issuer")
    @classmethod
    def _claim_value(cls, value: str) -> str:
        # Compared verbatim with the token's claim: stray whitespace would make every token fail.
        if value != value.strip() or any(not ch.isprintable() for ch in value):
            raise ValueError("must not have surrounding whitespace or control characters")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr) -> SecretStr:
        if urlsplit(value.get_secret_value()).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a URL starting with redis://, rediss:// or unix://")
        return value

    @model_validator(mode="after")
    def _required_together(self) -> Settings:
        missing = [name for name, value in (("API_KEY", self.api_key), ("JWT_SECRET", self.jwt_secret))
                   if value is None]
        if missing:
            raise ConfigurationError(
                f"{missing[0]}: is required; set it or {missing[0]}_FILE (a file holding the value)"
            )
        if self.db_pool_min_size > self.db_pool_max_size:
            raise ConfigurationError("DB_POOL_MIN_SIZE: must not exceed DB_POOL_MAX_SIZE")
        return self

def _format_validation_error(error: ValidationError, cls: type[BaseSettings]) -> str:
    problems = []
    by_alias = {name: (field.alias or name).upper() for name, field in cls.model_fields.items()}
    for item in error.errors(include_input=False, include_url=False):
        loc = item.get("loc") or ()
        field = str(loc[0]) if loc else ""
        variable = by_alias.get(field, field.upper())
        message = item.get("msg", "is invalid")
        message = message.removeprefix("Value error, ")
        if item.get("type") == "value_error" and isinstance(item.get("ctx", {}).get("error"), ConfigurationError):
            problems.append(str(item["ctx"]["error"]))
            continue
        problems.append(f"{variable}: {message}")
    return "; ".join(problems)


def load_settings() -> Settings:
    """Read and validate the environment once, raising ConfigurationError with a one-line message."""
    return _load(Settings)


def load_database_settings() -> DatabaseSettings:
    """The database part alone, for Alembic: migrations need no API key or JWT secret."""
    return _load(DatabaseSettings)


def _load(cls):
    try:
        return cls()
    except ValidationError as exc:
        raise ConfigurationError(_format_validation_error(exc, cls)) from None
