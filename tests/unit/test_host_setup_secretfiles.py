"""Secret files reach sudo hosts through stdin, never through a world-readable file in /tmp.

The write script is run here for real (a local `sh`), so what lands on disk, its mode and what is left behind
are checked, not only the command's text.
"""

from __future__ import annotations

import base64
import os
import stat
import subprocess

import pytest
from ingestctl.operations import secretfiles


def run_write(command, tmp_path, payload=None) -> subprocess.CompletedProcess:
    """Run the command pyinfra would run (the bits joined), feeding its `_stdin` as pyinfra's write_stdin does."""
    stdin = command.connector_arguments["_stdin"] if payload is None else payload
    data = stdin if stdin.endswith("\n") else stdin + "\n"
    return subprocess.run(command.get_raw_value(), shell=True, input=data.encode(), capture_output=True,
                          cwd=tmp_path, check=False)


def test_command_carries_content_on_stdin_only():
    secret = "s3cr3t-value-not-in-argv"
    command = secretfiles.write_command("/opt/ingest/config/v1/app.env", secret, mode="600")
    raw = command.get_raw_value()
    assert raw.startswith("sh -c ")
    assert secret not in raw and secret not in str(command) and secret not in repr(command)
    assert base64.b64decode(command.connector_arguments["_stdin"]) == secret.encode()
    assert "/tmp" not in raw
    assert "umask 077" in raw and "mktemp" in raw and "mv -f" in raw


@pytest.mark.parametrize(
    "content",
    ["no trailing newline", "two lines\nwith newline\n", "", "quotes ' \" $HOME `id` \\ and unicode ✓",
     b"\x00\x01binary\xff"],
    ids=["plain", "lines", "empty", "shell-meta", "binary"],
)
def test_written_file_is_byte_exact_with_mode_0600(tmp_path, content):
    dest = tmp_path / "secrets" / "api_key"
    result = run_write(secretfiles.write_command(str(dest), content), tmp_path)
    assert result.returncode == 0, result.stderr
    expected = content.encode() if isinstance(content, str) else content
    assert dest.read_bytes() == expected
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert sorted(p.name for p in dest.parent.iterdir()) == ["api_key"], "a temporary file was left behind"


def test_rewrite_replaces_atomically_and_keeps_the_mode(tmp_path):
    dest = tmp_path / "password"
    assert run_write(secretfiles.write_command(str(dest), "one", mode="640"), tmp_path).returncode == 0
    assert run_write(secretfiles.write_command(str(dest), "two", mode="640"), tmp_path).returncode == 0
    assert dest.read_text() == "two"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == ["password"]


def test_the_temporary_file_is_never_readable_by_others(tmp_path):
    """The umask applies before mktemp: even a reader racing the write sees a 0600 file, never 0644."""
    dest = tmp_path / "token"
    command = secretfiles.write_command(str(dest), "x")
    # The same script, recording the temporary file's mode just before the content is decoded into it.
    decode = 'base64 -d > "$t"'
    assert decode in command.get_raw_value()
    spy = command.get_raw_value().replace(decode, f'stat -c %a "$t" > {tmp_path / "seen"}; {decode}')
    result = subprocess.run(spy, shell=True, input=b"eA==\n", capture_output=True, check=False)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "seen").read_text().strip() == "600"


def test_a_failed_write_leaves_neither_a_temporary_file_nor_a_half_file(tmp_path):
    dest = tmp_path / "password"
    dest.write_text("old")
    result = run_write(secretfiles.write_command(str(dest), "new"), tmp_path, payload="!!! not base64 !!!")
    assert result.returncode != 0
    assert dest.read_text() == "old"
    assert os.listdir(tmp_path) == ["password"]


def test_owner_and_mode_are_validated():
    assert secretfiles.owner_spec("10001", "10001") == "10001:10001"
    assert secretfiles.owner_spec("root", None) == "root"
    assert secretfiles.owner_spec(None, "999") == ":999"
    assert secretfiles.owner_spec(None, None) == ""
    with pytest.raises(ValueError, match="owner"):
        secretfiles.owner_spec("root; rm -rf /", None)
    with pytest.raises(ValueError, match="mode"):
        secretfiles.write_command("/x", "y", mode="u+rw")
    with pytest.raises(ValueError, match="absolute path"):
        secretfiles.write_command("relative/path", "y")


def test_in_place_compares_content_mode_and_owner():
    state = {"sha256": secretfiles.sha256("pw"), "mode": "600", "uid": "999", "gid": "999",
             "user": "UNKNOWN", "group": "UNKNOWN"}
    assert secretfiles.in_place(state, "pw", "600", "999", "999")
    assert secretfiles.in_place(state, "pw", "0600")
    assert not secretfiles.in_place(state, "pw2", "600")
    assert not secretfiles.in_place(state, "pw", "644")
    assert not secretfiles.in_place(state, "pw", "600", "10001")
    assert not secretfiles.in_place(None, "pw", "600")


class FakeHost:
    name = "db1"
    groups = ("db",)

    def __init__(self, facts):
        self.facts = facts
        self.noops: list[str] = []

    def get_fact(self, fact, **kwargs):
        return self.facts[fact.__name__]

    def noop(self, message):
        self.noops.append(message)


def test_secret_file_operation_is_a_noop_when_in_place(monkeypatch):
    state = {"sha256": secretfiles.sha256("pw"), "mode": "600", "uid": "0", "gid": "0", "user": "root",
             "group": "root"}
    fake = FakeHost({"FileStates": {"/opt/ingest/db/secrets/pw": state}})
    monkeypatch.setattr(secretfiles, "host", fake)
    assert list(secretfiles.secret_file._inner(dest="/opt/ingest/db/secrets/pw", content="pw")) == []
    assert fake.noops == ["/opt/ingest/db/secrets/pw already in place"]
    commands = list(secretfiles.secret_file._inner(dest="/opt/ingest/db/secrets/pw", content="new"))
    assert len(commands) == 1 and commands[0].connector_arguments["_stdin"]
