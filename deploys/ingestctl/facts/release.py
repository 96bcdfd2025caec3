"""Facts about the ingest release on a host: which compose CLI it has, what is live, which configs it holds."""

from __future__ import annotations

import json
import re
import shlex

from pyinfra.api import FactBase
from pyinfra.api.exceptions import FactProcessError

from ingestctl.hostlayout import BASE, STATE_FILE

CONFIG_VERSION = re.compile(r"^[0-9a-f]{12}$")
# For facts, which cannot depend on other facts: pick the compose CLI inline.
COMPOSE_DETECT = "docker compose version >/dev/null 2>&1 && echo 'docker compose' || echo docker-compose"


class ComposeBinary(FactBase[str | None]):
    """`docker compose` (v2) when the plugin answers, else `docker-compose` (v1), else None."""

    def command(self) -> str:
        return (
            "if docker compose version >/dev/null 2>&1; then echo 'docker compose'; "
            "elif command -v docker-compose >/dev/null 2>&1; then echo docker-compose; fi"
        )

    def process(self, output: list[str]) -> str | None:
        lines = [line.strip() for line in output if line.strip()]
        if not lines:
            return None
        if lines[0] not in ("docker compose", "docker-compose"):
            raise FactProcessError(f"expected 'docker compose' or 'docker-compose', found {lines[0]!r}")
        return lines[0]


class IngestState(FactBase[dict | None]):
    """The host's state.json: live slot, release, image ID, config version and both slots' settings."""

    def command(self) -> str:
        return f"cat {STATE_FILE} 2>/dev/null || true"

    def process(self, output: list[str]) -> dict | None:
        text = "\n".join(output).strip()
        if not text:
            return None
        try:
            state = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FactProcessError(f"{STATE_FILE}: expected JSON, found unparsable text ({exc})") from exc
        if not isinstance(state, dict):
            raise FactProcessError(f"{STATE_FILE}: expected a JSON object, found {type(state).__name__}")
        return state


class ConfigVersions(FactBase[list[str]]):
    """Config versions fully written on the host (a version dir without its .complete marker is ignored)."""

    @staticmethod
    def default() -> list[str]:
        return []

    def command(self) -> str:
        return f"for d in {BASE}/config/*/; do [ -f \"$d.complete\" ] && basename \"$d\"; done 2>/dev/null; true"

    def process(self, output: list[str]) -> list[str]:
        return sorted(line.strip() for line in output if CONFIG_VERSION.match(line.strip()))


class SchemaHead(FactBase[str | None]):
    """The database's alembic head on the db host, or None (no database container, or an empty schema)."""

    def command(self) -> str:
        query = "SELECT version_num FROM alembic_version"
        return (
            f"cd {BASE} 2>/dev/null && $({COMPOSE_DETECT}) -p ingest -f compose.yml exec -T postgres "
            f"psql -U ingest -d ingest -tAc '{query}' 2>/dev/null || true"
        )

    def process(self, output: list[str]) -> str | None:
        heads = [line.strip() for line in output if line.strip()]
        return heads[0] if heads else None


class RunningServices(FactBase[dict[str, str]]):
    """Running containers of the ingest compose project: {service: image}."""

    @staticmethod
    def default() -> dict[str, str]:
        return {}

    def command(self) -> str:
        return (
            "docker ps --filter label=com.docker.compose.project=ingest --filter status=running "
            "--format '{{.Label \"com.docker.compose.service\"}} {{.Image}}'"
        )

    def process(self, output: list[str]) -> dict[str, str]:
        services = {}
        for line in output:
            parts = line.split()
            if len(parts) == 2:
                services[parts[0]] = parts[1]
        return services


class FileDigests(FactBase[dict[str, str | None]]):
    """sha256 of each path (None when absent): one round trip to tell whether a set of files is as wanted."""

    @staticmethod
    def default() -> dict[str, str | None]:
        return {}

    def command(self, paths: list[str]) -> str:
        quoted = " ".join(shlex.quote(p) for p in paths)
        return f"for f in {quoted}; do if [ -f \"$f\" ]; then sha256sum \"$f\"; else echo \"- $f\"; fi; done"

    def process(self, output: list[str]) -> dict[str, str | None]:
        digests: dict[str, str | None] = {}
        for line in output:
            digest, _, path = line.strip().partition(" ")
            digests[path.strip()] = None if digest == "-" else digest
        return digests
