"""What a host's proxy is configured from: where its routes send traffic (beside what compose runs in each api
slot), and the body limit of a config version, which the proxy's client_max_body_size follows."""

from __future__ import annotations

from pyinfra.api import FactBase
from pyinfra.api.exceptions import FactProcessError

from ingestctl import config as config_mod
from ingestctl import hostvalues
from ingestctl.errors import ConfigError
from ingestctl.hostlayout import BASE, EMPTY_CONFIG, ROUTES
from ingestctl.reconcile import Routing, parse_routing

BODY_LIMIT_KEY = "MAX_REQUEST_BODY_BYTES"


class ProxyRouting(FactBase[Routing | None]):
    """Where the proxy's routes (live.sock, canary.sock) point and the slots' .env variables, in one round."""

    def command(self) -> str:
        return (
            f"for route in {' '.join(ROUTES)}; do t=$(readlink {BASE}/proxy/$route.sock 2>/dev/null) "
            f'&& echo "$route $t"; done; grep \'^API_\' {BASE}/.env 2>/dev/null; true'
        )

    def process(self, output: list[str]) -> Routing | None:
        return parse_routing(output)


def body_limit(output: list[str]) -> int:
    """MAX_REQUEST_BODY_BYTES from the `grep` of a config version's app.env: the tunable's own rule, since the
    file is read back from a host (untrusted) and the number goes into the proxy's config."""
    where = f"config app.env {BODY_LIMIT_KEY}"
    try:
        values = config_mod.parse_env_file_text("\n".join(output), where)
    except ConfigError:
        raise hostvalues.HostValueError(where, f"{BODY_LIMIT_KEY}=<bytes>", "\n".join(output)) from None
    if BODY_LIMIT_KEY not in values:
        return default_body_limit()
    value = values[BODY_LIMIT_KEY]
    try:
        return int(config_mod.validate_tunable(BODY_LIMIT_KEY, value))
    except ConfigError:
        raise hostvalues.HostValueError(where, config_mod.TUNABLES[BODY_LIMIT_KEY].rule, value) from None


def default_body_limit() -> int:
    """The service's own default, for a config version that does not set the key (or a host with none yet)."""
    return int(config_mod.TUNABLES[BODY_LIMIT_KEY].default)


class ConfigBodyLimit(FactBase[int]):
    """MAX_REQUEST_BODY_BYTES of config VERSION on the host, or the service's default when the version (or its
    key) is absent. A value not in the tunable's rule fails the fact, and so this host's step, naming it."""

    @staticmethod
    def default() -> int:
        return default_body_limit()

    def command(self, version: str) -> str:
        if version != EMPTY_CONFIG:
            hostvalues.CONFIG_VERSION.check(version, "config version")
        return f"grep -m1 '^{BODY_LIMIT_KEY}=' {BASE}/config/{version}/app.env 2>/dev/null || true"

    def process(self, output: list[str]) -> int:
        try:
            return body_limit(output)
        except hostvalues.HostValueError as exc:
            # pyinfra fails only this host on a FactProcessError and logs the message; anything else would stop
            # the whole run for one host's bad file.
            raise FactProcessError(str(exc)) from None


class ConfigBodyLimits(FactBase[dict]):
    """Every config version's MAX_REQUEST_BODY_BYTES line on the host, unprocessed: {version: its lines}. Read
    under the deploy lock, before the run has decided which version goes live; `ConfigBodyLimit` of that version
    is then processed from its lines (`limit_of`), with the same rule and the same errors."""

    def command(self) -> str:
        return (
            f"for f in {BASE}/config/*/app.env; do [ -f \"$f\" ] || continue; d=${{f%/app.env}}; "
            f"printf '%s ' \"${{d##*/}}\"; grep -m1 '^{BODY_LIMIT_KEY}=' \"$f\" || echo; done"
        )

    def process(self, output: list[str]) -> dict[str, list[str]]:
        versions: dict[str, list[str]] = {}
        for line in output:
            version, _, found = line.partition(" ")
            versions[version] = [found] if found.strip() else []
        return versions


def limit_of(limits: dict[str, list[str]], version: str) -> int:
    """`ConfigBodyLimit(version)` from `ConfigBodyLimits`' LIMITS; FactProcessError as that fact would raise."""
    lines = limits.get(version, [])
    return ConfigBodyLimit().process(lines) if lines else ConfigBodyLimit.default()
