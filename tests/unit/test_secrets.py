"""The environment's secrets: validation rules (never echoing a value) and the sandbox's generated file."""

from __future__ import annotations

import stat

import pytest
from ingestctl import secrets as secrets_mod

GOOD = {"POSTGRES_PASSWORD": "p" * 16, "API_KEY": "a" * 24, "JWT_SECRET": "j" * 32, "REDIS_PASSWORD": "r" * 24}


def test_four_good_secrets_have_no_problem():
    assert secrets_mod.problems(GOOD) == []


def test_redis_never_runs_without_a_password():
    found = secrets_mod.problems({k: v for k, v in GOOD.items() if k != "REDIS_PASSWORD"})
    assert [p.name for p in found] == ["REDIS_PASSWORD"]
    assert "is required" in found[0].rule


@pytest.mark.parametrize("value", ["r" * 20 + " x", "r" * 20 + '"x', "r" * 20 + "'x", "r" * 20 + "\\x", "r\t" * 10])
def test_a_redis_password_that_redis_conf_would_split_is_refused_without_echoing_it(value):
    found = secrets_mod.problems({**GOOD, "REDIS_PASSWORD": value})
    assert [p.name for p in found] == ["REDIS_PASSWORD"]
    assert "spaces, tabs, quotes or backslashes" in found[0].rule
    assert value not in str(found[0])


def test_a_short_redis_password_is_refused():
    found = secrets_mod.problems({**GOOD, "REDIS_PASSWORD": "r" * 15})
    assert [str(p) for p in found] == ["REDIS_PASSWORD: must be at least 16 bytes, found 15 bytes"]


def test_generated_file_holds_every_secret_privately(tmp_path):
    path = tmp_path / "secrets" / "local.env"
    assert secrets_mod.generate_file(path) == list(secrets_mod.REQUIRED)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert secrets_mod.problems(secrets_mod.load(path, environ={})) == []
    assert secrets_mod.generate_file(path) == [], "a complete file is left alone"


def test_a_file_from_before_redis_had_a_password_gets_only_that_one_added(tmp_path):
    path = tmp_path / "local.env"
    old = {k: v for k, v in GOOD.items() if k != "REDIS_PASSWORD"}
    path.write_text("".join(f"{k}={v}\n" for k, v in old.items()).rstrip("\n"))  # even without a final newline
    path.chmod(0o600)
    assert secrets_mod.generate_file(path) == ["REDIS_PASSWORD"]
    loaded = secrets_mod.load(path, environ={})
    assert {k: loaded[k] for k in old} == old, "the existing secrets are kept as they were"
    assert secrets_mod.problems(loaded) == []
