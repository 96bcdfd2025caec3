"""`python -m ingest` refuses to start on a bad setting: exit 2, one line naming the variable, no value echoed.

Settings are validated before any connection is made, so these need no database.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SERVICE_DIR = Path(__file__).resolve().parents[2] / "service"

GOOD = {"API_KEY": "ak-3f9c1d2e8b7a6f5e4d3c", "JWT_SECRET": "js-" + "9a8b7c6d5e4f3a2b1c0d" * 2,
        "POSTGRES_PASSWORD": "pg-5d4c3b2a1f0e9d8c", "REDIS_URL": "redis://127.0.0.1:1/0"}


def start(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if k not in GOOD and not k.endswith("_FILE") and not k.startswith(("POSTGRES_", "DATABASE_"))}
    clean.update(env, PORT="1")  # never reached: validation fails first
    return subprocess.run([sys.executable, "-m", "ingest"], check=False, cwd=SERVICE_DIR, env=clean, capture_output=True,
                          text=True, timeout=60)


def without(name: str) -> dict[str, str]:
    return {k: v for k, v in GOOD.items() if k != name}


CASES = {
    "missing API_KEY": (without("API_KEY"), "API_KEY", "is required", None),
    "placeholder API_KEY": ({**GOOD, "API_KEY": "changeme"}, "API_KEY", "placeholder", "changeme"),
    "short API_KEY": ({**GOOD, "API_KEY": "k3y-sh0rt"}, "API_KEY", "at least 16 bytes", "k3y-sh0rt"),
    "missing JWT_SECRET": (without("JWT_SECRET"), "JWT_SECRET", "is required", None),
    "short JWT_SECRET": ({**GOOD, "JWT_SECRET": "only-31-bytes-long-secret-xxxxx"}, "JWT_SECRET",
                         "at least 32 bytes", "only-31-bytes-long-secret-xxxxx"),
    "placeholder JWT_SECRET": ({**GOOD, "JWT_SECRET": "changeme-changeme-changeme-changeme"}, "JWT_SECRET",
                               "placeholder", "changeme-changeme-changeme-changeme"),
    "missing POSTGRES_PASSWORD": (without("POSTGRES_PASSWORD"), "POSTGRES_PASSWORD", "is required", None),
    "placeholder POSTGRES_PASSWORD": ({**GOOD, "POSTGRES_PASSWORD": "password"}, "POSTGRES_PASSWORD",
                                      "placeholder", "password"),
    "bad DATABASE_URL": ({**GOOD, "DATABASE_URL": "mysql://root:hunter2hunter2@db/x"}, "DATABASE_URL",
                         "postgresql://", "hunter2hunter2"),
    "bad POSTGRES_PORT": ({**GOOD, "POSTGRES_PORT": "99999"}, "POSTGRES_PORT", "less than or equal", None),
    "bad RATE_LIMIT_BACKEND": ({**GOOD, "RATE_LIMIT_BACKEND": "memcached"}, "RATE_LIMIT_BACKEND", "'redis'",
                               "memcached"),
    "bad INGEST_MAX_BATCH_ITEMS": ({**GOOD, "INGEST_MAX_BATCH_ITEMS": "0"}, "INGEST_MAX_BATCH_ITEMS",
                                   "greater than or equal to 1", None),
    "bad REDIS_URL": ({**GOOD, "REDIS_URL": "http://user:s3cr3tpass@cache/0"}, "REDIS_URL", "redis://",
                      "s3cr3tpass"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_setting_stops_startup_with_one_line(case, tmp_path):
    env, variable, rule, value = CASES[case]
    result = start(env, tmp_path)
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"ingest: configuration error: {variable}:")
    assert rule in lines[0]
    if value:
        assert value not in lines[0]


def test_secret_file_missing_names_the_file_variable(tmp_path):
    result = start({**without("JWT_SECRET"), "JWT_SECRET_FILE": str(tmp_path / "absent")}, tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"ingest: configuration error: JWT_SECRET_FILE: expected a readable file, "
                                     f"found nothing at {tmp_path / 'absent'}")


def test_short_secret_in_a_file_is_refused_without_echo(tmp_path):
    secret_file = tmp_path / "jwt_secret"
    secret_file.write_text("tiny-file-secret\n")
    secret_file.chmod(0o600)
    result = start({**without("JWT_SECRET"), "JWT_SECRET_FILE": str(secret_file)}, tmp_path)
    assert result.returncode == 2
    assert "JWT_SECRET: must be at least 32 bytes, found 16 bytes" in result.stderr
    assert "tiny-file-secret" not in result.stderr
