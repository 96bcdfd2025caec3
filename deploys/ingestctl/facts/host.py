"""Facts about a host as `ingestctl setup` prepares it: its Debian release, init system, Docker engine, files.

Every fact here answers on a bare host too (no Docker, no nftables yet): a missing tool is an answer (None, or
a field saying so), never a failing command, because `setup --dry` and change detection read them before
anything is installed.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable

from pyinfra.api import FactBase
from pyinfra.api.exceptions import FactProcessError

# The server's version, asked of the engine: `docker version`, not `docker info`, which also runs every CLI plugin
# to list it (Compose: 25 ms more of the host's CPU). Either can hang on an engine that is starting or wedged:
# bound it.
ENGINE_VERSION = "timeout 20 docker version --format '{{.Server.Version}}' 2>/dev/null"


class InitSystem(FactBase[str]):
    """`systemd` when PID 1 is systemd (sd_booted(3): /run/systemd/system exists), else PID 1's name.

    Real Debian servers and VMs boot systemd. Containers (the sandbox hosts) run something else as PID 1
    (tini, docker-init, sshd), and services there are started by hand.
    """

    def command(self) -> str:
        return "if [ -d /run/systemd/system ]; then echo systemd; else cat /proc/1/comm 2>/dev/null || echo unknown; fi"

    def process(self, output: list[str]) -> str:
        lines = [line.strip() for line in output if line.strip()]
        return lines[0] if lines else "unknown"


class OsRelease(FactBase[dict]):
    """/etc/os-release's ID, VERSION_ID and VERSION_CODENAME, e.g. {"id": "debian", "version_id": "12",
    "codename": "bookworm"}; empty values when the file lacks them (Debian testing has no VERSION_ID)."""

    def command(self) -> str:
        return (
            "if [ -r /etc/os-release ]; then . /etc/os-release; fi; "
            'printf "%s\\n%s\\n%s\\n" "${ID:-}" "${VERSION_ID:-}" "${VERSION_CODENAME:-}"'
        )

    def process(self, output: list[str]) -> dict:
        values = [line.strip() for line in output] + ["", "", ""]
        return {"id": values[0], "version_id": values[1], "codename": values[2]}


class DockerEngine(FactBase[str | None]):
    """The Docker engine's server version when it answers, else None (not installed, or not running)."""

    def command(self) -> str:
        return f"{ENGINE_VERSION} || true"

    def process(self, output: list[str]) -> str | None:
        lines = [line.strip() for line in output if line.strip()]
        return lines[0] if lines else None


class FileStates(FactBase[dict]):
    """{path: {"sha256", "mode" (octal text, e.g. "600"), "uid", "gid", "user", "group"}, or None when absent}."""

    def command(self, paths: Iterable[str]) -> str:
        quoted = " ".join(shlex.quote(path) for path in paths)
        return (
            f'for f in {quoted}; do if [ -f "$f" ]; then '
            'printf "%s %s %s\\n" "$(stat -c "%a %u %g %U %G" "$f")" "$(sha256sum "$f" | cut -d" " -f1)" "$f"; '
            'else printf -- "- - - - - - %s\\n" "$f"; fi; done'
        )

    def process(self, output: list[str]) -> dict:
        found: dict = {}
        for line in output:
            if not line.strip():
                continue
            parts = line.rstrip("\n").split(" ", 6)
            if len(parts) != 7:
                raise FactProcessError(f"expected 'MODE UID GID USER GROUP SHA256 PATH', found {line!r}")
            mode, uid, gid, user, group, digest, path = parts
            found[path] = None if mode == "-" else {
                "sha256": digest, "mode": mode, "uid": uid, "gid": gid, "user": user, "group": group,
            }
        return found


class FirewallState(FactBase[dict]):
    """Whether nftables can run here, and whether the ingest table is loaded from exactly the rules file.

    {"nft": bool, "error": str, "loaded": bool, "loaded_sha256": str}: `loaded_sha256` is what the last load
    recorded in MARKER (on /run, which is emptied on boot, as the kernel's rules are).
    """

    def command(self, table: str, marker: str) -> str:
        family_table = shlex.quote(table)
        return (
            "if ! command -v nft >/dev/null 2>&1; then echo 'nft=missing'; exit 0; fi; "
            "if out=$(nft list tables 2>&1); then echo nft=ok; "
            'else echo nft=error; printf "error=%s\\n" "$(echo "$out" | tail -n 1)"; exit 0; fi; '
            f"if nft list table {family_table} >/dev/null 2>&1; then echo loaded=yes; else echo loaded=no; fi; "
            f'printf "marker=%s\\n" "$(cat {shlex.quote(marker)} 2>/dev/null)"'
        )

    def process(self, output: list[str]) -> dict:
        values = dict(line.strip().split("=", 1) for line in output if "=" in line)
        nft = values.get("nft", "missing")
        error = values.get("error", "")
        if nft == "missing":
            error = "nft is not installed"
        return {
            "nft": nft == "ok",
            "error": error,
            "loaded": values.get("loaded") == "yes",
            "loaded_sha256": values.get("marker", ""),
        }


# ----- readiness: what `deploy` needs, read in one round trip (also outside pyinfra's operation model) -------

READINESS_COMMAND = (
    "printf 'init=%s\\n' \"$(if [ -d /run/systemd/system ]; then echo systemd; else cat /proc/1/comm; fi)\"; "
    "if [ -r /etc/os-release ]; then . /etc/os-release; fi; "
    "printf 'os=%s %s %s\\n' \"${ID:-?}\" \"${VERSION_ID:-?}\" \"${VERSION_CODENAME:-?}\"; "
    "if command -v docker >/dev/null 2>&1; then echo docker_cli=yes; else echo docker_cli=no; fi; "
    # The engine and Compose answer at once (each line is one write, and lines are read by key): 80 ms a host.
    f"(printf 'engine=%s\\n' \"$({ENGINE_VERSION})\") & "
    # Compose v2 is found where the docker CLI looks for plugins first (running `docker compose version` costs
    # 63 ms of the host's CPU, every deploy); asked only when it is not there (a directory set in config.json).
    "(plugin=; for d in \"${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins\" /usr/local/lib/docker/cli-plugins "
    "/usr/local/libexec/docker/cli-plugins /usr/lib/docker/cli-plugins /usr/libexec/docker/cli-plugins; do "
    "if [ -x \"$d/docker-compose\" ]; then plugin=yes; break; fi; done; "
    "if [ -n \"$plugin\" ] || docker compose version >/dev/null 2>&1; then echo 'compose=docker compose'; "
    "elif command -v docker-compose >/dev/null 2>&1; then echo compose=docker-compose; else echo compose=; fi) & "
    "missing=; for t in sha256sum flock base64 gzip stat; do command -v $t >/dev/null 2>&1 || missing=\"$missing $t\"; "
    "done; printf 'missing_tools=%s\\n' \"${missing# }\"; "
    "if [ -f /etc/ingest/setup.json ]; then printf 'setup=%s\\n' \"$(cat /etc/ingest/setup.json)\"; "
    "else echo setup=; fi; wait"
)


def parse_readiness(output: str | list[str]) -> dict:
    """READINESS_COMMAND's output as a dict: init, os, docker_cli (bool), engine, compose, missing_tools, setup."""
    lines = output.splitlines() if isinstance(output, str) else list(output)
    values = dict(line.strip().split("=", 1) for line in lines if "=" in line)
    return {
        "init": values.get("init", ""),
        "os": values.get("os", ""),
        "docker_cli": values.get("docker_cli") == "yes",
        "engine": values.get("engine", "").strip() or None,
        "compose": values.get("compose", "").strip() or None,
        "missing_tools": values.get("missing_tools", "").split(),
        "setup": values.get("setup", "").strip() or None,
    }


class Readiness(FactBase[dict]):
    """Whether the host can take a deploy: `parse_readiness` of READINESS_COMMAND."""

    runs_long = True  # read together, it runs in the background beside the other parts

    def command(self) -> str:
        return READINESS_COMMAND

    def process(self, output: list[str]) -> dict:
        return parse_readiness(output)


class SystemdUnit(FactBase[dict]):
    """{"enabled": `systemctl is-enabled UNIT`, "active": `systemctl is-active UNIT`} (e.g. "enabled", "active";
    "not-found"/"unknown" when there is no such unit or no systemctl)."""

    def command(self, unit: str) -> str:
        quoted = shlex.quote(unit)
        return (
            f'printf "enabled=%s\\nactive=%s\\n" "$(systemctl is-enabled {quoted} 2>/dev/null || true)" '
            f'"$(systemctl is-active {quoted} 2>/dev/null || true)"'
        )

    def process(self, output: list[str]) -> dict:
        values = dict(line.strip().split("=", 1) for line in output if "=" in line)
        return {
            "enabled": values.get("enabled", "").strip() or "not-found",
            "active": values.get("active", "").strip() or "unknown",
        }


class Account(FactBase[dict]):
    """Who holds uid/gid UID and the name ACCOUNT: {"user": "name:uid" of `getent passwd UID` (or of ACCOUNT if
    the uid is free), "group": the same for groups}; "" when neither the id nor the name exists."""

    def command(self, uid: int, account: str) -> str:
        ident, quoted = int(uid), shlex.quote(account)
        return (
            f"u=$(getent passwd {ident} || getent passwd {quoted}); "
            f"g=$(getent group {ident} || getent group {quoted}); "
            'printf "user=%s\\ngroup=%s\\n" "$(echo "$u" | cut -d: -f1,3)" "$(echo "$g" | cut -d: -f1,3)"'
        )

    def process(self, output: list[str]) -> dict:
        values = dict(line.strip().split("=", 1) for line in output if "=" in line)
        return {"user": values.get("user", "").strip(), "group": values.get("group", "").strip()}


class DirectoryModes(FactBase[dict]):
    """{path: "OWNER:GROUP MODE" (e.g. "root:root 755") or None when PATH is not a directory}."""

    def command(self, paths: Iterable[str]) -> str:
        quoted = " ".join(shlex.quote(path) for path in paths)
        return (
            f'for d in {quoted}; do if [ -d "$d" ]; then printf "%s %s\\n" "$(stat -c "%U:%G %a" "$d")" "$d"; '
            'else printf -- "- - %s\\n" "$d"; fi; done'
        )

    def process(self, output: list[str]) -> dict:
        found: dict = {}
        for line in output:
            parts = line.strip().split(" ", 2)
            if len(parts) == 3:
                owner, mode, path = parts
                found[path] = None if owner == "-" else f"{owner} {mode}"
        return found
