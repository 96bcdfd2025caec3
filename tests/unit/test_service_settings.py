"""Settings resolution: *_FILE secrets, precedence, and the connection strings derived from them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "service"))

from ingest.settings import ConfigurationError, load_database_settings, load_settings

GOOD = {"API_KEY": "ak-3f9c1d2e8b7a6f5e4d3c", "JWT_SECRET": "js-" + "9a8b7c6d5e4f3a2b1c0d" * 2,
        "POSTGRES_PASSWORD": "pg-5d4c3b2a1f0e9d8c"}


@pytest.fixture
def env(monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith(("POSTGRES_", "DATABASE_URL", "API_KEY", "JWT_", "REDIS_", "RATE_LIMIT", "PORT",
                            "HEADER_TIMEOUT", "APP_SLOT")):
            monkeypatch.delenv(name)

    def set_env(**values: str) -> None:
        for key, value in values.items():
            monkeypatch.setenv(key, value)

    return set_env


def test_secrets_from_files_strip_the_trailing_newline(env, tmp_path):
    for name, value in GOOD.items():
        (tmp_path / name).write_text(value + "\n")
    env(**{f"{name}_FILE": str(tmp_path / name) for name in GOOD})
    settings = load_settings()
    assert settings.api_key.get_secret_value() == GOOD["API_KEY"]
    assert settings.jwt_secret.get_secret_value() == GOOD["JWT_SECRET"]
    assert "password=pg-5d4c3b2a1f0e9d8c" in settings.conninfo


def test_environment_value_wins_over_its_file(env, tmp_path):
    (tmp_path / "key").write_text("from-the-file-0123456789")
    env(**GOOD, API_KEY_FILE=str(tmp_path / "key"))
    assert load_settings().api_key.get_secret_value() == GOOD["API_KEY"]


def test_database_parts_build_a_conninfo_with_escaped_password(env):
    env(**{**GOOD, "POSTGRES_PASSWORD": "p@ss word/with:odd'chars"}, POSTGRES_HOST="db.internal",
        POSTGRES_PORT="6543", POSTGRES_USER="svc", POSTGRES_DB="events")
    settings = load_settings()
    url = settings.sqlalchemy_url()
    assert (url.host, url.port, url.username, url.database) == ("db.internal", 6543, "svc", "events")
    assert url.password == "p@ss word/with:odd'chars"
    assert "odd" not in url.render_as_string(hide_password=True)
    assert settings.describe_database() == "db.internal:6543/events"


def test_database_url_gets_the_password_from_its_file(env, tmp_path):
    (tmp_path / "pw").write_text("pg-from-file-77")
    env(DATABASE_URL="postgresql://svc@db:5432/ingest?sslmode=require", POSTGRES_PASSWORD_FILE=str(tmp_path / "pw"))
    settings = load_database_settings()  # migrations: no API key or JWT secret needed
    assert settings.sqlalchemy_url().password == "pg-from-file-77"
    assert settings.sqlalchemy_url().query == {"sslmode": "require"}


def test_errors_never_carry_the_value(env):
    env(**{**GOOD, "JWT_SECRET": "s3cr3t-but-short"})
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert "s3cr3t-but-short" not in str(caught.value)
    assert str(caught.value) == "JWT_SECRET: must be at least 32 bytes, found 16 bytes"


def test_defaults_are_the_documented_ones(env):
    env(**GOOD)
    settings = load_settings()
    assert (settings.port, settings.ingest_max_batch_items, settings.max_request_body_bytes,
            settings.rate_limit_backend, settings.rate_limit_per_minute, settings.shutdown_grace_seconds,
            settings.app_version, settings.log_level) == (8000, 1000, 1048576, "redis", 6000, 20.0, "dev", "INFO")


def test_the_slot_is_blue_green_or_none(env):
    env(**GOOD)
    assert load_settings().app_slot == ""
    env(APP_SLOT="green")
    assert load_settings().app_slot == "green"
    env(APP_SLOT="purple")
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert str(caught.value).startswith("APP_SLOT: Input should be ''"), str(caught.value)


def test_security_defaults_are_the_documented_ones(env):
    env(**GOOD)
    settings = load_settings()
    assert (settings.jwt_max_lifetime_seconds, settings.jwt_audience, settings.jwt_issuer,
            settings.header_timeout_seconds) == (86400, "ingest", "ingest", 10.0)


def test_security_settings_are_read_from_the_environment(env):
    env(**GOOD, JWT_MAX_LIFETIME_SECONDS="3600", JWT_AUDIENCE="ingest-eu", JWT_ISSUER="https://auth.example/",
        HEADER_TIMEOUT_SECONDS="2.5")
    settings = load_settings()
    assert (settings.jwt_max_lifetime_seconds, settings.jwt_audience, settings.jwt_issuer,
            settings.header_timeout_seconds) == (3600, "ingest-eu", "https://auth.example/", 2.5)


@pytest.mark.parametrize(
    ("assignment", "expected"),
    [
        ({"JWT_MAX_LIFETIME_SECONDS": "0"}, "JWT_MAX_LIFETIME_SECONDS: Input should be greater than or equal to 60"),
        ({"JWT_MAX_LIFETIME_SECONDS": "59"}, "JWT_MAX_LIFETIME_SECONDS: Input should be greater than or equal to 60"),
        ({"JWT_MAX_LIFETIME_SECONDS": "2592001"},
         "JWT_MAX_LIFETIME_SECONDS: Input should be less than or equal to 2592000"),
        ({"JWT_MAX_LIFETIME_SECONDS": "a day"}, "JWT_MAX_LIFETIME_SECONDS: Input should be a valid integer"),
        ({"JWT_AUDIENCE": ""}, "JWT_AUDIENCE: String should have at least 1 character"),
        ({"JWT_AUDIENCE": " ingest"}, "JWT_AUDIENCE: must not have surrounding whitespace or control characters"),
        ({"JWT_ISSUER": "ingest\t"}, "JWT_ISSUER: must not have surrounding whitespace or control characters"),
        ({"JWT_ISSUER": "a\x01b"}, "JWT_ISSUER: must not have surrounding whitespace or control characters"),
        ({"JWT_ISSUER": "x" * 257}, "JWT_ISSUER: String should have at most 256 characters"),
        ({"HEADER_TIMEOUT_SECONDS": "0"}, "HEADER_TIMEOUT_SECONDS: Input should be greater than 0"),
        ({"HEADER_TIMEOUT_SECONDS": "301"}, "HEADER_TIMEOUT_SECONDS: Input should be less than or equal to 300"),
        ({"HEADER_TIMEOUT_SECONDS": "soon"}, "HEADER_TIMEOUT_SECONDS: Input should be a valid number"),
        ({"HEADER_TIMEOUT_SECONDS": "nan"}, "HEADER_TIMEOUT_SECONDS: Input should be a finite number"),
    ],
)
def test_bad_security_settings_name_the_variable_and_rule(env, assignment, expected):
    env(**GOOD, **assignment)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert str(caught.value).startswith(expected), str(caught.value)
    for value in assignment.values():
        if len(value) > 3:
            assert value not in str(caught.value)


def test_migration_settings_never_open_the_apis_secret_files(env, tmp_path):
    # The migrations run as another user, which may not read the api's secret files: naming them is harmless.
    (tmp_path / "pg").write_text(GOOD["POSTGRES_PASSWORD"])
    env(POSTGRES_PASSWORD_FILE=str(tmp_path / "pg"), API_KEY_FILE=str(tmp_path / "unreadable" / "API_KEY"),
        JWT_SECRET_FILE=str(tmp_path / "unreadable" / "JWT_SECRET"),
        REDIS_PASSWORD_FILE=str(tmp_path / "unreadable" / "REDIS_PASSWORD"))
    assert "password=pg-5d4c3b2a1f0e9d8c" in load_database_settings().conninfo


def test_redis_password_comes_from_its_file(env, tmp_path):
    (tmp_path / "redis").write_text("redis-0123456789abcdef\n")
    env(**GOOD, REDIS_PASSWORD_FILE=str(tmp_path / "redis"))
    assert load_settings().redis_password.get_secret_value() == "redis-0123456789abcdef"
