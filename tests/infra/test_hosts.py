"""Each host runs sshd and Docker, logs in by key only, and keeps key and secret files private (0600)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

HOST_SECRETS_ROOT = "/opt/ingest"  # ingestctl.hostlayout.BASE: config/<version>/secrets/ and db/secrets/


def _private(mode: int) -> bool:
    return mode & 0o077 == 0


def test_sshd_is_listening_on_port_22(host):
    listening = host.socket("tcp://0.0.0.0:22").is_listening or host.socket("tcp://:::22").is_listening
    assert listening, f"{host.backend.hostname}: nothing listens on TCP port 22"


def test_sshd_process_runs(host):
    assert host.process.filter(comm="sshd"), f"{host.backend.hostname}: no sshd process"


def test_docker_engine_answers(host):
    result = host.run("docker info --format '{{.ServerVersion}}'")
    assert result.rc == 0, f"{host.backend.hostname}: `docker info` failed: {result.stderr.strip()}"
    assert result.stdout.strip(), f"{host.backend.hostname}: `docker info` printed no server version"


def test_docker_compose_v2_available(host):
    result = host.run("docker compose version --short")
    assert result.rc == 0, f"{host.backend.hostname}: `docker compose` (v2) missing: {result.stderr.strip()}"
    assert result.stdout.strip().split(".")[0] in {"2", "v2"}, (
        f"{host.backend.hostname}: expected Compose v2, found {result.stdout.strip()}"
    )


def test_password_login_is_disabled(host):
    settings = host.run("sshd -T 2>/dev/null || /usr/sbin/sshd -T")
    assert settings.rc == 0, f"{host.backend.hostname}: `sshd -T` failed: {settings.stderr.strip()}"
    lines = set(settings.stdout.lower().splitlines())
    assert "passwordauthentication no" in lines, f"{host.backend.hostname}: sshd accepts passwords"
    root = next((line.split()[1] for line in lines if line.startswith("permitrootlogin ")), "?")
    assert root in {"no", "prohibit-password", "without-password"}, (
        f"{host.backend.hostname}: PermitRootLogin is {root!r}; expected key-only or no root login"
    )


def test_authorized_keys_are_private(host):
    path = host.run('printf %s "$HOME"').stdout + "/.ssh/authorized_keys"
    keys = host.file(path)
    assert keys.exists, f"{host.backend.hostname}: {path} missing, yet we logged in by key"
    assert _private(keys.mode), f"{host.backend.hostname}: {path} has mode {keys.mode:04o}; expected 0600"


@pytest.mark.after_deploy
def test_secret_files_on_host_are_private(host):
    found = host.run(
        f"find {HOST_SECRETS_ROOT} -path '*/secrets/*' -type f -printf '%m %p\\n' 2>/dev/null"
    ).stdout.split("\n")
    files = [line.split(" ", 1) for line in found if line.strip()]
    if not files:
        pytest.skip(reason=
            f"{host.backend.hostname}: no secret files under {HOST_SECRETS_ROOT}: deploy first "
            "(`ingestctl deploy ENV`), or deselect with -m 'not after_deploy'"
        )
    loose = [f"{path} ({mode})" for mode, path in files if not _private(int(mode, 8))]
    assert not loose, f"{host.backend.hostname}: secret files readable by group or others: {', '.join(loose)}"


def test_controller_ssh_key_is_private(ssh_identity_file):
    if not ssh_identity_file:
        pytest.skip(reason="no --ssh-identity-file given: the SSH agent or ssh_config supplies the key")
    path = Path(ssh_identity_file).expanduser()
    assert path.is_file(), f"{path}: SSH identity file missing"
    mode = stat.S_IMODE(path.stat().st_mode)
    assert _private(mode), f"{path}: SSH private key has mode {mode:04o}; expected 0600"


def test_controller_secrets_file_is_private(ingest_env):
    from ingestctl import paths

    path = paths.secrets_file(ingest_env)
    if not path.exists():
        pytest.skip(reason=f"{path} absent: {ingest_env}'s secrets come from the environment or *_FILE")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert _private(mode), f"{path}: secrets file has mode {mode:04o}; expected 0600 (`chmod 600 {path}`)"
