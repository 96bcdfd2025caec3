"""Service tunables: parsing `config set` arguments, defaults, versioning and rendering. No secret in any output."""

from __future__ import annotations

import pytest
from ingestctl import config
from ingestctl import secrets as secrets_mod
from ingestctl.errors import ConfigError
from ingestctl.secrets import MASK

SECRETS = {
    "POSTGRES_PASSWORD": "pg-9f8e7d6c5b4a3210",
    "API_KEY": "key-0123456789abcdef0123",
    "JWT_SECRET": "jwt-" + "a1b2c3d4" * 5,
}


def test_defaults_fill_every_tunable():
    cfg = config.ServiceConfig.build({}, SECRETS)
    assert cfg.tunables == {
        "INGEST_MAX_BATCH_ITEMS": "1000",
        "LOG_LEVEL": "INFO",
        "MAX_REQUEST_BODY_BYTES": "1048576",
        "RATE_LIMIT_BACKEND": "redis",
        "RATE_LIMIT_PER_MINUTE": "6000",
        "SHUTDOWN_GRACE_SECONDS": "20",
    }


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("INGEST_MAX_BATCH_ITEMS=200", {"INGEST_MAX_BATCH_ITEMS": "200"}),
        ("MAX_REQUEST_BODY_BYTES=65536", {"MAX_REQUEST_BODY_BYTES": "65536"}),
        ("RATE_LIMIT_BACKEND=Memory", {"RATE_LIMIT_BACKEND": "memory"}),
        ("LOG_LEVEL=debug", {"LOG_LEVEL": "DEBUG"}),
        ("SHUTDOWN_GRACE_SECONDS= 300 ", {"SHUTDOWN_GRACE_SECONDS": "300"}),
        ("RATE_LIMIT_PER_MINUTE=1", {"RATE_LIMIT_PER_MINUTE": "1"}),
    ],
)
def test_valid_assignments_are_normalised(arg, expected):
    assert config.parse_assignments([arg]) == expected


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("INGEST_MAX_BATCH_ITEMS=0", "INGEST_MAX_BATCH_ITEMS: expected an integer from 1 to 100000, found '0'"),
        ("INGEST_MAX_BATCH_ITEMS=100001", "expected an integer from 1 to 100000, found '100001'"),
        ("INGEST_MAX_BATCH_ITEMS=lots", "expected an integer from 1 to 100000, found 'lots'"),
        ("MAX_REQUEST_BODY_BYTES=1023", "MAX_REQUEST_BODY_BYTES: expected an integer from 1024 to 104857600"),
        ("RATE_LIMIT_BACKEND=etcd", "RATE_LIMIT_BACKEND: expected one of: redis, memory, found 'etcd'"),
        ("RATE_LIMIT_PER_MINUTE=0", "RATE_LIMIT_PER_MINUTE: expected an integer of at least 1"),
        ("LOG_LEVEL=TRACE", "LOG_LEVEL: expected one of: DEBUG, INFO, WARNING, ERROR"),
        ("SHUTDOWN_GRACE_SECONDS=301", "SHUTDOWN_GRACE_SECONDS: expected an integer from 1 to 300"),
        ("SHUTDOWN_GRACE_SECONDS=2.5", "SHUTDOWN_GRACE_SECONDS: expected an integer from 1 to 300, found '2.5'"),
    ],
)
def test_invalid_values_name_key_and_rule(arg, message):
    with pytest.raises(ConfigError) as err:
        config.parse_assignments([arg])
    assert message in str(err.value)
    assert "nothing was changed" in str(err.value)


def test_unknown_key_lists_known_keys():
    with pytest.raises(ConfigError) as err:
        config.parse_assignments(["INGEST_MAX_BATCH=5"])
    text = str(err.value)
    assert "INGEST_MAX_BATCH: unknown config key" in text
    for key in ("INGEST_MAX_BATCH_ITEMS", "RATE_LIMIT_BACKEND", "JWT_SECRET"):
        assert key in text


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        config.parse_assignments(["LOG_LEVEL=loud", "NOPE=1", "INGEST_MAX_BATCH_ITEMS=-3"])
    text = str(err.value)
    assert "LOG_LEVEL:" in text and "NOPE:" in text and "INGEST_MAX_BATCH_ITEMS:" in text


def test_argument_without_equals_is_not_echoed():
    secret_looking = "s3cr3t-value-typed-without-key"
    with pytest.raises(ConfigError) as err:
        config.parse_assignments([secret_looking])
    assert "argument 1: expected KEY=VALUE" in str(err.value)
    assert secret_looking not in str(err.value)


def test_duplicate_key_refused():
    with pytest.raises(ConfigError, match="LOG_LEVEL: given twice"):
        config.parse_assignments(["LOG_LEVEL=INFO", "LOG_LEVEL=DEBUG"])


def test_no_assignment_refused():
    with pytest.raises(ConfigError, match="at least one KEY=VALUE"):
        config.parse_assignments([])


def test_secret_rotation_is_validated_without_echoing_the_value(tmp_path):
    short = tmp_path / "short"
    short.write_text("tooshort\n")
    with pytest.raises(ConfigError) as err:
        config.parse_assignments([f"JWT_SECRET=@{short}"], current_secrets=SECRETS)
    text = str(err.value)
    assert "JWT_SECRET: must be at least 32 bytes, found 8 bytes" in text
    assert "tooshort" not in text

    with pytest.raises(ConfigError) as err:
        config.parse_assignments(["API_KEY=-"], current_secrets=SECRETS, read_stdin=lambda: "changeme-changeme-123\n")
    assert "API_KEY: is a placeholder value" in str(err.value)
    assert "changeme-changeme-123" not in str(err.value)

    fresh = tmp_path / "fresh"
    fresh.write_text("k" * 40 + "\n")
    assert config.parse_assignments([f"JWT_SECRET=@{fresh}"], current_secrets=SECRETS) == {"JWT_SECRET": "k" * 40}
    assert config.parse_assignments(["API_KEY=-"], current_secrets=SECRETS,
                                    read_stdin=lambda: "a" * 40) == {"API_KEY": "a" * 40}


def test_an_inline_secret_is_refused_and_not_echoed():
    inline = "k" * 40
    with pytest.raises(ConfigError) as err:
        config.parse_assignments([f"JWT_SECRET={inline}"], current_secrets=SECRETS)
    assert "JWT_SECRET: a secret is taken only as JWT_SECRET=@FILE or JWT_SECRET=-" in str(err.value)
    assert inline not in str(err.value)


def test_only_one_secret_from_stdin_and_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="only one secret can come from standard input"):
        config.parse_assignments(["API_KEY=-", "JWT_SECRET=-"], current_secrets=SECRETS, read_stdin=lambda: "a" * 40)
    with pytest.raises(ConfigError, match=f"API_KEY: cannot read {tmp_path}/nope"):
        config.parse_assignments([f"API_KEY=@{tmp_path}/nope"], current_secrets=SECRETS)


def test_version_is_content_addressed_and_includes_secrets():
    base = config.ServiceConfig.build({"INGEST_MAX_BATCH_ITEMS": 500}, SECRETS)
    same = config.ServiceConfig.build({"INGEST_MAX_BATCH_ITEMS": "500"}, dict(reversed(SECRETS.items())))
    assert base.version == same.version
    assert len(base.version) == 12 and int(base.version, 16) >= 0

    lowered = base.with_changes({"INGEST_MAX_BATCH_ITEMS": "100"})
    rotated = base.with_changes({"API_KEY": "another-api-key-0123456789"})
    assert len({base.version, lowered.version, rotated.version}) == 3
    # Changing back gives back the same version: versions name content, not history.
    assert lowered.with_changes({"INGEST_MAX_BATCH_ITEMS": "500"}).version == base.version


def test_the_version_cannot_test_a_guess_of_a_secret_without_jwt_secret():
    import hashlib
    import hmac

    cfg = config.ServiceConfig.build({}, SECRETS)
    canonical = cfg.canonical().encode()
    # Whoever sees the version (CI logs, the ledger) and guesses API_KEY right still cannot confirm the guess:
    # neither an unkeyed hash nor one keyed without JWT_SECRET gives the version.
    assert cfg.version != hashlib.sha256(canonical).hexdigest()[:12]
    assert cfg.version != hmac.new(b"", canonical, hashlib.sha256).hexdigest()[:12]
    # Rotating the key's source makes a new version too.
    assert cfg.with_changes({"JWT_SECRET": "jwt-" + "e5f6a7b8" * 5}).version != cfg.version


def test_env_file_is_deterministic_and_holds_no_secret():
    cfg = config.ServiceConfig.build({"RATE_LIMIT_BACKEND": "memory"}, SECRETS)
    text = config.render_env_file(cfg, secrets_dir="/run/secrets/")
    assert text == (
        "# ingest service config, written by ingestctl. Do not edit on the host: use `ingestctl config set`.\n"
        f"# config version {cfg.version}\n"
        "INGEST_MAX_BATCH_ITEMS=1000\n"
        "LOG_LEVEL=INFO\n"
        "MAX_REQUEST_BODY_BYTES=1048576\n"
        "RATE_LIMIT_BACKEND=memory\n"
        "RATE_LIMIT_PER_MINUTE=6000\n"
        "SHUTDOWN_GRACE_SECONDS=20\n"
        "POSTGRES_USER=ingest_app\n"
        "API_KEY_FILE=/run/secrets/API_KEY\n"
        "JWT_SECRET_FILE=/run/secrets/JWT_SECRET\n"
        "POSTGRES_PASSWORD_FILE=/run/secrets/POSTGRES_PASSWORD\n"
    )
    for value in SECRETS.values():
        assert value not in text
        assert value not in repr(cfg)
        assert value not in cfg.version
    assert "API_KEY_FILE" not in config.render_env_file(cfg)


def test_secret_files_and_masked_view():
    cfg = config.ServiceConfig.build({}, SECRETS)
    files = config.render_secret_files(cfg)
    # The api's POSTGRES_PASSWORD is its own role's, derived one way from the owner's, which it never holds.
    assert files == {**SECRETS, "POSTGRES_PASSWORD": secrets_mod.app_database_password(SECRETS["POSTGRES_PASSWORD"])}
    assert SECRETS["POSTGRES_PASSWORD"] not in files["POSTGRES_PASSWORD"]
    assert len(files["POSTGRES_PASSWORD"]) == 64
    masked = cfg.masked()
    assert masked["API_KEY"] == MASK and masked["LOG_LEVEL"] == "INFO"
    assert not set(SECRETS.values()) & set(masked.values())


def test_rendered_env_file_reads_back():
    cfg = config.ServiceConfig.build({"INGEST_MAX_BATCH_ITEMS": 42}, SECRETS)
    assert config.tunables_from_env_file(config.render_env_file(cfg, "/run/secrets")) == dict(cfg.tunables)
    with pytest.raises(ConfigError, match=r"host env:3: expected KEY=VALUE"):
        config.parse_env_file_text("A=1\n\nbroken line\n", where="host env")
    with pytest.raises(ConfigError, match="host env: LOG_LEVEL: expected one of"):
        config.tunables_from_env_file("LOG_LEVEL=chatty\n", where="host env")


def test_inventory_config_rejects_secrets_and_bad_types():
    with pytest.raises(ConfigError, match="API_KEY: secrets do not belong in inventory config"):
        config.validate_tunables({"API_KEY": "x" * 30})
    with pytest.raises(ConfigError, match=r"INGEST_MAX_BATCH_ITEMS: expected an integer from 1 to 100000, found bool"):
        config.validate_tunables({"INGEST_MAX_BATCH_ITEMS": True})
    assert config.validate_tunables({"INGEST_MAX_BATCH_ITEMS": 7}) == {"INGEST_MAX_BATCH_ITEMS": "7"}


def test_secret_with_line_break_refused():
    with pytest.raises(ConfigError, match="single line"):
        config.ServiceConfig.build({}, {**SECRETS, "API_KEY": "abc\ndef-0123456789"})
