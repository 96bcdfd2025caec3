"""Inventories: which hosts make up an environment, and the environment's data.

An inventory is a pyinfra inventory file `inventories/ENV.py`. It calls `environment(...)` once and
exposes the groups pyinfra reads as module-level lists:

    _env = environment(name="staging", data={...}, hosts={"db1": {...}, "app2": {...}})
    db = _env.group("db")
    app = _env.group("app")

pyinfra treats every public module-level list of hostnames or `(hostname, data)` tuples as a group
(pyinfra_cli/inventory.py, `_is_inventory_group`) and merges a host's data across the groups it is
in. `group()` therefore returns tuples whose data is the environment's data merged with the host's
own, so `pyinfra inventories/staging.py deploys/deploy.py` sees `host.data.app_port`,
`host.data.roles`, ... exactly as `ingestctl` does. The `Environment` object itself is not a list, so
pyinfra ignores it; `ingestctl` finds it with `load(env)`.

Validation happens inside `environment(...)`, so both entry points fail on the same bad data with
the same path-style message: `inventories/staging.py: hosts.app2.ssh_port: expected an integer, found
'twenty-two'`.
"""

from __future__ import annotations

import ipaddress
import re
import runpy
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ingestctl import config as config_mod
from ingestctl import paths
from ingestctl.errors import ConfigError, IngestctlError
from ingestctl.imageref import ImageRef, pin_hint
from ingestctl.slospec import SLOs

Role = Literal["db", "app"]
ROLES: tuple[Role, ...] = ("db", "app")
ENV_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
# The sandbox (`ingestctl testbed up`): its images are built on this machine, so there is no digest to pin.
SANDBOX_ENV = "local"
# Inventory data naming images that come from a registry; each may be pinned as name:tag@sha256:<digest>.
IMAGE_KEYS = ("postgres_image", "redis_image", "proxy_image")


def _reject_bool(value: Any) -> Any:
    # pydantic's lax mode reads True as 1; in an inventory that is always a typo.
    if isinstance(value, bool):
        raise ValueError("bool")  # noqa: TRY004 - pydantic reports ValueError as a validation error
    return value


Integer = Annotated[int, BeforeValidator(_reject_bool)]
Number = Annotated[float, BeforeValidator(_reject_bool)]


class HostSpec(BaseModel):
    """One host: how to reach it over SSH (pyinfra's own `ssh_*` data keys) and what it runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ssh_hostname: str = Field(min_length=1)
    ssh_port: Integer = Field(default=22, ge=1, le=65535)
    ssh_user: str | None = None
    ssh_key: str | None = None
    ssh_known_hosts_file: str | None = None
    ssh_strict_host_key_checking: Literal["yes", "no", "accept-new", "off"] | None = None
    ssh_allow_agent: bool | None = None
    ssh_look_for_keys: bool | None = None
    ssh_config_file: str | None = None
    ssh_connect_retries: Integer | None = Field(default=None, ge=0, le=20)
    sudo: bool = False
    roles: tuple[Role, ...] = Field(min_length=1)

    @field_validator("roles")
    @classmethod
    def _distinct(cls, roles: tuple[Role, ...]) -> tuple[Role, ...]:
        if len(set(roles)) != len(roles):
            raise ValueError("duplicate role")
        return roles

    def pyinfra_data(self) -> dict[str, Any]:
        data = self.model_dump(exclude_none=True, exclude={"sudo", "roles"})
        data["roles"] = list(self.roles)
        if self.sudo:
            data["_sudo"] = True
        return data


def _ip_network(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError("expected an IP address or network such as 10.0.0.5 or 10.0.0.0/24") from None
    return value


class EnvData(BaseModel):
    """Environment-wide data every host of the environment carries."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str
    app_port: Integer = Field(default=8000, ge=1, le=65535)
    postgres_image: str = Field(default="postgres:16", min_length=1)
    redis_image: str = Field(default="redis:7", min_length=1)
    # The per-host proxy in front of the api slots (zero-downtime switches); see docs/ARCHITECTURE.md.
    proxy_image: str = Field(default="nginx:1.27", min_length=1)
    # What the proxy allows one client address on one host before the api sees a request (0 turns a limit off):
    # requests in progress at once, and requests per second with bursts above that rate. Refusals are 429 in
    # the api's JSON shape. Sized above one client's share of the api's own per-key limit (RATE_LIMIT_PER_MINUTE,
    # 6000 = 100/s by default) and the benchmark gate's concurrency (16 in its production profile).
    proxy_limit_conn: Integer = Field(default=64, ge=0, le=65536)
    proxy_limit_req_per_s: Integer = Field(default=200, ge=0, le=1_000_000)
    proxy_limit_req_burst: Integer = Field(default=400, ge=0, le=1_000_000)
    # The api runs as this uid (it owns the config's secret files, mode 0600); postgres_uid owns the
    # database's password file (999 in the official postgres image).
    app_uid: Integer = Field(default=10001, ge=1, le=2**31 - 1)
    postgres_uid: Integer = Field(default=999, ge=1, le=2**31 - 1)
    # Owns Redis's config file (its password): 999 in the official redis image and in the sandbox's.
    redis_uid: Integer = Field(default=999, ge=1, le=2**31 - 1)
    # PostgreSQL on the db host admits the app hosts (and itself, for migrations); these addresses or networks
    # too, e.g. an operator's bastion that reads the database. Nothing else reaches it (pg_hba).
    db_clients: list[Annotated[str, AfterValidator(_ip_network)]] = Field(default_factory=list)
    # How long a draining api slot may finish in-flight requests after SIGTERM.
    drain_grace_s: Integer = Field(default=30, ge=1, le=600)
    # Keep the previous release running, out of traffic, in the other slot: an app rollback to it is then a
    # flip of the proxy's route. Costs one idle api process per host.
    keep_standby: bool = True
    # The first batch's share of traffic, in percent, while its gates judge the new release: below 100 each of
    # its hosts' proxy sends only this share to the new slot and the rest to the previous release (still
    # running), so a bad release reaches fewer requests before it is rolled back. 100: the whole host switches.
    canary_weight: Integer = Field(default=100, ge=1, le=100)
    registry: str | None = None
    keep_releases: Integer = Field(default=5, ge=1, le=100)
    bench_profile: str = "staging"
    bench_fail_threshold_ms: Number = Field(default=250.0, gt=0)
    bench_fail_p95_threshold_ms: Number = Field(default=400.0, gt=0)
    health_timeout_s: Number = Field(default=60.0, gt=0, le=3600)
    metric_window_s: Number = Field(default=10.0, gt=0, le=600)
    max_error_ratio: Number = Field(default=0.01, ge=0, le=1)
    max_p95_ms: Number = Field(default=500.0, gt=0)
    # A window with less traffic than this proves nothing; the gate's own probes (20 per host) count.
    metric_min_requests: Integer = Field(default=10, ge=0, le=1_000_000)
    # An automatic or one-shot rollback retries a host's switch (each step is idempotent) until this deadline
    # before it gives up with exit 4: one transient container-runtime or SSH error must not make it final.
    rollback_deadline_s: Number = Field(default=120.0, gt=0, le=3600)
    # Every command on a host, and so every step, ends within this: a hung engine or SSH channel fails the step
    # (and the run rolls back) instead of holding the fleet's lock for ever. Migrations have their own bound.
    command_timeout_s: Integer = Field(default=600, ge=30, le=86400)
    # Hosts worked on at once in every per-host step (facts, lock, switch, ledger): each holds one SSH connection
    # and a few open files on this machine, and sshd's MaxStartups (default 10:30:100) bounds new connections a
    # host accepts at once, not how many hosts this machine connects to.
    parallelism: Integer = Field(default=50, ge=1, le=1000)
    # The deploy lock is a lease the running command renews every lock_ttl_s / 4; a holder silent for longer
    # (killed, its machine gone) is taken over by the next command, and the takeover is recorded.
    lock_ttl_s: Integer = Field(default=60, ge=10, le=86400)
    migration_timeout_s: Integer = Field(default=3600, ge=30, le=86400)
    config: dict[str, str | int] = Field(default_factory=dict)
    secrets_file: str | None = None
    # Change events (CDEvents JSON) are POSTed here in the background: deploy start/finish, rollbacks, gate
    # failures, incidents opened and closed. Delivery never blocks or fails a run (ingestctl.webhooks).
    webhooks: list[str] = Field(default_factory=list)

    @field_validator("webhooks")
    @classmethod
    def _webhook_urls(cls, urls: list[str]) -> list[str]:
        from urllib.parse import urlsplit

        for position, url in enumerate(urls):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
                raise ValueError(f"[{position}]: expected an http:// or https:// URL with a host, found "
                                 f"{parts.scheme or 'no scheme'}://{parts.hostname or '(no host)'}")
        if len(set(urls)) != len(urls):
            raise ValueError("the same URL is listed twice")
        return urls

    @field_validator(*IMAGE_KEYS)
    @classmethod
    def _image_reference(cls, value: str) -> str:
        return str(ImageRef.parse(value))
    # When set, the metric gate and the SLOs query this Prometheus (PromQL over /api/v1/query) instead of the
    # gate scraping each host's /metrics itself.
    prometheus_url: str | None = Field(default=None, pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$")
    slos: SLOs | None = None
    # The seed's policy: no deploy while an availability budget is exhausted (`deploy --emergency` overrides);
    # "report" only shows the budget (the sandbox, whose e2e bad releases burn it on purpose).
    error_budget_policy: Literal["refuse", "report"] = "refuse"

    @model_validator(mode="after")
    def _slos_need_prometheus(self) -> EnvData:
        if self.slos is not None and self.prometheus_url is None:
            raise ValueError("expected prometheus_url beside slos: the SLOs are read from Prometheus")
        return self

    @field_validator("config")
    @classmethod
    def _tunables(cls, values: dict[str, str | int]) -> dict[str, str | int]:
        # Raised as ConfigError (not ValueError) so the tunable's own path and rule survive unchanged.
        return dict(config_mod.validate_tunables(values))


_EXPECTATIONS = {
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "string_type": "expected a string",
    "bool_type": "expected True or False",
    "bool_parsing": "expected True or False",
    "dict_type": "expected a dict",
    "tuple_type": "expected a list",
    "list_type": "expected a list",
    "value_error": "expected a valid value",
}


def _describe(error: Mapping[str, Any], known_keys: list[str]) -> tuple[str, bool]:
    """(expectation, whether to add the found value) for one pydantic error."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "missing":
        return "is required", False
    if kind == "extra_forbidden":
        return f"unknown key; known keys: {', '.join(known_keys)}", False
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected', '')}".replace("'", ""), True
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        sign = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()), "")
        return f"expected a value {sign} {bound:g}" if isinstance(
            bound, float
        ) else f"expected a value {sign} {bound}", True
    if kind in ("too_short", "string_too_short"):
        return "expected a non-empty value", True
    if kind == "value_error" and "duplicate role" in str(error.get("msg")):
        return "expected each role once", True
    if kind == "value_error" and error["loc"][:1] == ("webhooks",):
        # A webhook URL may carry a token: the validator's message names the problem without echoing it.
        return str(error.get("msg")).removeprefix("Value error, "), False
    if kind == "string_pattern_mismatch":
        return "expected an http:// or https:// URL", True
    if kind == "value_error" and "bool" in str(error.get("msg")):
        return "expected a number, not True/False", True
    if kind == "value_error" and str(error.get("msg")).startswith("Value error, expected "):
        # A scalar that broke the rule is named; a whole section (a model's own check) is not echoed back.
        return str(error["msg"]).removeprefix("Value error, "), isinstance(error.get("input"), (str, int, float))
    return _EXPECTATIONS.get(kind, error.get("msg", "invalid value")), True


def _path_errors(exc: ValidationError, prefix: str, model: type[BaseModel]) -> list[str]:
    known = list(model.model_fields)
    lines = []
    for error in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in (prefix, *error["loc"]) if part != "")
        expectation, show_found = _describe(error, known)
        found = f", found {error['input']!r}" if show_found and "input" in error else ""
        lines.append(f"{loc}: {expectation}{found}")
    return lines


@dataclass(frozen=True)
class UnpinnedImage:
    """An image a staging or production inventory names by tag only: the registry decides what it is."""

    source: str
    key: str
    image: str

    @property
    def message(self) -> str:
        return (f"{self.source}: data.{self.key} is {self.image!r}, a bare tag the registry can move to other "
                f"content; pin it by digest: {pin_hint(self.image)}")


@dataclass(frozen=True)
class Environment:
    """A validated environment. Not a list, so pyinfra does not mistake it for a host group."""

    name: str
    data: EnvData
    hosts: Mapping[str, HostSpec]
    source: str = ""

    def host_data(self, hostname: str) -> dict[str, Any]:
        """What pyinfra's `host.data` holds for this host: environment data, then the host's own."""
        if hostname not in self.hosts:
            raise ConfigError(f"{self.source or self.name}: no host {hostname!r}; hosts: {', '.join(self.hosts)}")
        merged = self.data.model_dump(exclude_none=True)
        merged.update(self.hosts[hostname].pyinfra_data())
        return merged

    def group(self, role: Role) -> list[tuple[str, dict[str, Any]]]:
        """The pyinfra group for a role: `(hostname, data)` tuples in inventory order."""
        if role not in ROLES:
            raise ConfigError(f"{self.source or self.name}: unknown role {role!r}; roles: {', '.join(ROLES)}")
        return [(name, self.host_data(name)) for name in self.hosts if role in self.hosts[name].roles]

    def unpinned_images(self) -> list[UnpinnedImage]:
        """Images this environment names by a bare tag, outside the sandbox: each one a warning, never a failure."""
        if self.name == SANDBOX_ENV:
            return []
        references = {key: ImageRef.parse(getattr(self.data, key)) for key in IMAGE_KEYS}
        return [UnpinnedImage(self.source or self.name, key, str(ref)) for key, ref in references.items()
                if not ref.pinned]

    @property
    def db_host(self) -> str:
        return next(name for name, spec in self.hosts.items() if "db" in spec.roles)

    @property
    def app_hosts(self) -> list[str]:
        return [name for name, spec in self.hosts.items() if "app" in spec.roles]

    @property
    def all_hosts(self) -> list[str]:
        return list(self.hosts)

    def secrets_path(self) -> Path:
        """The secrets file: `secrets_file` data (relative to the checkout), else `secrets/ENV.env`."""
        if self.data.secrets_file:
            path = Path(self.data.secrets_file).expanduser()
            return path if path.is_absolute() else paths.project_root() / path
        return paths.secrets_file(self.name)


def _caller_source() -> str:
    """The inventory file calling `environment()`, relative to the checkout when inside it."""
    frame = sys._getframe(2)
    filename = frame.f_globals.get("__file__")
    if not filename:
        return ""
    return _display_path(Path(filename))


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(paths.project_root()))
    except ValueError:
        return str(path)


def environment(
    *,
    name: str,
    data: Mapping[str, Any] | None = None,
    hosts: Mapping[str, Mapping[str, Any]],
    source: str | None = None,
) -> Environment:
    """Validate an environment's data and hosts. Every problem is reported at once, each with its path."""
    where = _caller_source() if source is None else source
    label = f"{where}: " if where else ""
    problems: list[str] = []
    if not isinstance(name, str) or not ENV_NAME.match(name):
        raise ConfigError(f"{label}name: expected lower-case letters, digits, '-' or '_', found {name!r}")
    raw_data = dict(data or {})
    if "env" in raw_data and raw_data["env"] != name:
        problems.append(f"data.env: expected {name!r} (the environment's name), found {raw_data['env']!r}")
    raw_data["env"] = name
    env_data: EnvData | None = None
    try:
        env_data = EnvData(**raw_data)
    except ValidationError as exc:
        problems += _path_errors(exc, "data", EnvData)
    except ConfigError as exc:
        problems.append(f"data.config.{exc}")
    if not isinstance(hosts, Mapping) or not hosts:
        problems.append("hosts: expected at least one host, as {name: {ssh_hostname: ..., roles: [...]}}")
        hosts = {}
    specs: dict[str, HostSpec] = {}
    for hostname, spec in hosts.items():
        if not isinstance(spec, Mapping):
            problems.append(f"hosts.{hostname}: expected a dict of host data, found {type(spec).__name__}")
            continue
        try:
            specs[hostname] = HostSpec(**spec)
        except ValidationError as exc:
            problems += _path_errors(exc, f"hosts.{hostname}", HostSpec)
    if len(specs) == len(hosts):
        db_hosts = [h for h, s in specs.items() if "db" in s.roles]
        if len(db_hosts) != 1:
            found = ", ".join(db_hosts) if db_hosts else "none"
            problems.append(f"hosts: expected exactly one host with role 'db', found {len(db_hosts)} ({found})")
        if not any("app" in s.roles for s in specs.values()):
            problems.append("hosts: expected at least one host with role 'app', found none")
    if problems:
        # One line per problem, each a complete path-style message an editor can jump to.
        raise ConfigError("\n".join(label + problem for problem in problems))
    assert env_data is not None
    return Environment(name=name, data=env_data, hosts=specs, source=where)


def available() -> list[str]:
    folder = paths.project_root() / "inventories"
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def load(env: str) -> Environment:
    """Import `inventories/ENV.py` from the checkout and return its validated environment."""
    names = available()
    if not isinstance(env, str) or not ENV_NAME.match(env):
        raise ConfigError(
            f"environment name: expected lower-case letters, digits, '-' or '_', found {env!r}; "
            f"available: {', '.join(names) or 'none'}"
        )
    path = paths.project_root() / "inventories" / f"{env}.py"
    shown = f"inventories/{env}.py"
    if not path.is_file():
        raise ConfigError(f"no inventory {shown}; available: {', '.join(names) or 'none'}")
    try:
        namespace = runpy.run_path(str(path), run_name=f"ingestctl_inventory_{env}")
    except IngestctlError:
        raise
    except Exception as exc:  # the inventory is user code: any failure is a config error with its file
        raise ConfigError(f"{shown}: could not be loaded: {type(exc).__name__}: {exc}") from exc
    found = [value for value in namespace.values() if isinstance(value, Environment)]
    if len(found) != 1:
        raise ConfigError(
            f"{shown}: expected exactly one environment(...) call, found {len(found)}; see inventories/staging.py"
        )
    environment_ = found[0]
    if environment_.name != env:
        raise ConfigError(f"{shown}: name: expected {env!r} (the file's name), found {environment_.name!r}")
    for role in ROLES:
        if namespace.get(role) != environment_.group(role):
            raise ConfigError(
                f"{shown}: {role}: expected `{role} = <environment>.group({role!r})` at module level so the "
                f"plain pyinfra CLI sees the {role} group"
            )
    return environment_
