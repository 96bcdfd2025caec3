"""Write a file's content on a host without it ever passing through a world-readable file.

pyinfra's `files.put` on a `sudo: True` host uploads over SFTP as the SSH user to a predictable
`/tmp/pyinfra-<sha1>` (with the SFTP default mode, typically 0644) and then moves it into place as root: for
that moment any local user can read the secret. Here the content travels on the command's stdin instead
(base64, so it arrives byte for byte whatever it holds), and one root shell writes it:

    umask 077; tmp=$(mktemp DEST_DIR/.ingestctl-XXXXXXXX); base64 -d > $tmp; chown; chmod; mv -f $tmp DEST

The temporary file is created mode 0600 by `mktemp` under umask 077, in the destination's own directory (so
the rename is atomic and never crosses into /tmp), and is removed if anything fails. The content never
appears in a command line (`ps`) or in pyinfra's output.

Two ways to use it inside pyinfra operations:

    yield secretfiles.write_command(dest, text, mode="600", user="10001", group="10001")   # always writes
    yield from secretfiles.secret_file._inner(dest=dest, content=text, mode="600")        # noop if in place

and `secretfiles.secret_file(...)` as an operation of its own in a deploy.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shlex

from ingestctl.facts.host import FileStates
from pyinfra import host
from pyinfra.api import StringCommand, operation

# $1 destination, $2 mode, $3 owner (user[:group], may be empty). The content arrives base64 on stdin.
WRITE_SCRIPT = (
    'set -e; d=$(dirname "$1"); mkdir -p "$d"; umask 077; '
    't=$(mktemp "$d/.ingestctl-XXXXXXXX"); trap \'rm -f "$t"\' EXIT; '
    'base64 -d > "$t"; if [ -n "$3" ]; then chown "$3" "$t"; fi; chmod "$2" "$t"; '
    'mv -f "$t" "$1"; trap - EXIT'
)
_MODE = re.compile(r"^0?[0-7]{3}$")
_OWNER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _as_bytes(content: str | bytes) -> bytes:
    return content.encode() if isinstance(content, str) else bytes(content)


def sha256(content: str | bytes) -> str:
    return hashlib.sha256(_as_bytes(content)).hexdigest()


def owner_spec(user: str | int | None, group: str | int | None) -> str:
    """`chown`'s argument: "user", "user:group", ":group" or "" (leave root's)."""
    for value in (user, group):
        if value is not None and not _OWNER.match(str(value)):
            raise ValueError(f"owner: expected a user/group name or numeric id, found {value!r}")
    if user is None and group is None:
        return ""
    return f"{'' if user is None else user}{'' if group is None else f':{group}'}"


def stdin_payload(content: str | bytes) -> str:
    """What goes on stdin: base64 lines. pyinfra appends a newline to stdin lines; `base64 -d` ignores it."""
    return base64.encodebytes(_as_bytes(content)).decode() or "\n"


def write_command(
    dest: str, content: str | bytes, mode: str = "600", user: str | int | None = None, group: str | int | None = None
) -> StringCommand:
    """One command writing CONTENT to DEST (mode, owner) through stdin: runs as root under the host's sudo."""
    if not dest.startswith("/") or "\n" in dest:
        raise ValueError(f"dest: expected an absolute path on one line, found {dest!r}")
    if not _MODE.match(str(mode)):
        raise ValueError(f"mode: expected octal like '600', found {mode!r}")
    return StringCommand(
        "sh",
        "-c",
        shlex.quote(WRITE_SCRIPT),
        "ingestctl-write",
        shlex.quote(dest),
        str(mode),
        shlex.quote(owner_spec(user, group)),
        _stdin=stdin_payload(content),
    )


def stdin_command(command: str, content: str | bytes) -> StringCommand:
    """COMMAND (a shell line) reading CONTENT on its stdin: for secrets a command needs, kept off every argv."""
    return StringCommand("sh", "-c", shlex.quote(f"base64 -d | ({command})"), _stdin=stdin_payload(content))


def _owner_matches(wanted: str | int | None, numeric: str, name: str) -> bool:
    return wanted is None or str(wanted) in (numeric, name)


def in_place(state: dict | None, content: str | bytes, mode: str, user=None, group=None) -> bool:
    """Whether a FileStates entry already has this content, mode and owner."""
    return bool(
        state
        and state["sha256"] == sha256(content)
        and int(state["mode"], 8) == int(str(mode), 8)
        and _owner_matches(user, state["uid"], state["user"])
        and _owner_matches(group, state["gid"], state["group"])
    )


@operation()
def secret_file(dest: str, content: str | bytes, mode: str = "600", user: str | int | None = None,
                group: str | int | None = None):
    """Ensure DEST holds CONTENT with MODE and owner, written via stdin (never through a file in /tmp).

    + dest: absolute path on the host; its directory is created when missing
    + content: the file's exact content (text or bytes); it is never logged
    + mode: octal permissions, default 600
    + user, group: owner (names or numeric ids); default root's
    """
    state = host.get_fact(FileStates, paths=[dest]).get(dest)
    if in_place(state, content, mode, user, group):
        host.noop(f"{dest} already in place")
        return
    yield write_command(dest, content, mode, user, group)
