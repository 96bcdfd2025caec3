"""The frame of one run: its validated context (environment, secrets, config), the release it moves to, its
record for the summary and the ledger, and the checkpoints where it stops when asked (abort, a signal, a lost
lease). Built at the edge: a bad input is a ConfigError (exit 2) before any host is contacted."""

from __future__ import annotations

import hashlib
import signal
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ingestctl import config as config_mod
from ingestctl import fleet, hostlayout, imageref, paths
from ingestctl import inventory as inventory_mod
from ingestctl import secrets as secrets_mod
from ingestctl.errors import IngestctlError
from ingestctl.facts.release import IngestState
from ingestctl.ledger import who_am_i
from ingestctl.output import Reporter

if TYPE_CHECKING:
    from ingestctl.runlock import LeaseKeeper


# What `hostlayout.wait_slot_ready` prints when a new slot never answers ready within the timeout.
SLOT_NOT_READY = "not ready after"


class Aborted(IngestctlError):
    """`ingestctl abort ENV` or Ctrl-C asked the running deploy to stop and roll back (exit 3)."""

    exit_code = 3


@dataclass(frozen=True)
class Release:
    version: str
    image: str
    image_id: str
    schema_head: str | None = None


@dataclass
class Context:
    """Everything validated at the edge: the environment, its secrets and config, and derived settings."""

    env: inventory_mod.Environment
    reporter: Reporter
    config: config_mod.ServiceConfig
    ports: hostlayout.Ports
    who: str = field(default_factory=lambda: who_am_i())
    # How the run reaches its hosts: over SSH unless the caller brings another fleet (the executor's tests do).
    io: fleet.FleetIO | None = None

    def __post_init__(self) -> None:
        if self.io is None:
            self.io = fleet.SshFleet(self.env.name)

    @property
    def name(self) -> str:
        return self.env.name

    @property
    def infra_references(self) -> dict[str, str]:
        """The inventory's references, digest and all: what shipping resolves in this machine's engine."""
        return {
            "POSTGRES_IMAGE": self.env.data.postgres_image,
            "REDIS_IMAGE": self.env.data.redis_image,
            "PROXY_IMAGE": self.env.data.proxy_image,
        }

    @property
    def infra_images(self) -> dict[str, str]:
        """What hosts name those images (compose files, `.env`, running containers): name:tag, never a digest,
        which shipping made point at the pinned image ID (see ingestctl.imageref)."""
        return {key: imageref.host_name(reference) for key, reference in self.infra_references.items()}

    def compose_file(self, host: str) -> str:
        """HOST's compose file, rendered for its roles and this environment's data."""
        data = self.env.data
        return hostlayout.render_compose(host, self.env.hosts[host].roles, self.db_address(host), data.app_uid,
                                         self.ports, stop_grace_s=data.drain_grace_s, postgres_uid=data.postgres_uid)

    def database_kwargs(self, cfg: config_mod.ServiceConfig) -> dict[str, Any]:
        """What `database_running` takes: both databases' passwords and the owners of their files."""
        app_addresses = [self.env.hosts[host].ssh_hostname for host in self.env.app_hosts]
        pg_hba = hostlayout.render_pg_hba(self.db_address(self.env.db_host), app_addresses, self.env.data.db_clients)
        return dict(password=cfg.secrets["POSTGRES_PASSWORD"], redis_password=cfg.secrets["REDIS_PASSWORD"],
                    postgres_uid=self.env.data.postgres_uid, redis_uid=self.env.data.redis_uid,
                    infra_images=self.infra_images, pg_hba=pg_hba)

    @property
    def client_limits(self) -> hostlayout.ClientLimits:
        """The proxy's per-client-address limits. Its body limit is not here: it follows each host's live config
        version (`operations.release.release_live` reads it there)."""
        data = self.env.data
        return hostlayout.ClientLimits(connections=data.proxy_limit_conn, requests_per_s=data.proxy_limit_req_per_s,
                                       burst=data.proxy_limit_req_burst)

    def base_url(self, host: str, port: int | None = None) -> str:
        address = self.env.hosts[host].ssh_hostname
        return f"http://{address}:{port or self.ports.public}"

    def db_address(self, for_host: str) -> str:
        return self.env.hosts[self.env.db_host].ssh_hostname


def prepare(env_name: str, reporter: Reporter, overrides: Mapping[str, str] | None = None) -> Context:
    """Preflight: validate the inventory, secrets and config. Raises ConfigError (exit 2); touches no host."""
    env = inventory_mod.load(env_name)
    values = secrets_mod.validated(env.secrets_path())
    cfg = config_mod.ServiceConfig.build(env.data.config, values)
    if overrides:
        cfg = cfg.with_changes(overrides)
    ports = hostlayout.Ports(public=env.data.app_port)
    reporter.event("step", f"preflight: inventory {env.source or env_name} and secrets valid", step="preflight",
                   env=env_name, hosts=env.all_hosts, config_version=cfg.version)
    warn_unpinned_images(env, reporter)
    return Context(env=env, reporter=reporter, config=cfg, ports=ports)


def warn_unpinned_images(env: inventory_mod.Environment, reporter: Reporter) -> None:
    """A `warning` event per image a staging or production inventory names by bare tag (never a failure)."""
    for unpinned in env.unpinned_images():
        reporter.event("warning", f"warning: {unpinned.message}", env=env.name, key=unpinned.key,
                       image=unpinned.image)


def abort_flag(env_name: str):
    """Where `ingestctl abort ENV` leaves its request for the running deploy (checked between steps).

    Keyed by the environment's hosts too: several sandboxes (INGESTCTL_TESTBED) share one state directory, and
    an abort meant for one of them must neither stop nor be swallowed by a deploy to another.
    """
    env = inventory_mod.load(env_name)
    target = ",".join(f"{spec.ssh_hostname}:{spec.ssh_port}" for spec in env.hosts.values())
    return paths.state_dir() / f"abort-{env_name}-{hashlib.sha256(target.encode()).hexdigest()[:12]}"


class Checkpoints:
    """Between steps, stop when asked: by `ingestctl abort ENV` or by Ctrl-C (SIGINT) or SIGTERM."""

    def __init__(self, env_name: str):
        self.flag = abort_flag(env_name)
        self.flag.unlink(missing_ok=True)
        self.signalled: str | None = None
        self.lease: LeaseKeeper | None = None

    def install(self) -> None:
        def handler(signum, _frame):
            self.signalled = signal.Signals(signum).name

        self._previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def uninstall(self) -> None:
        for sig, previous in getattr(self, "_previous", {}).items():
            signal.signal(sig, previous)

    def check(self, where: str) -> None:
        if self.lease is not None and self.lease.lost:
            raise Aborted(f"lost the deploy lock before {where}: {self.lease.lost}")
        if self.flag.exists():
            self.flag.unlink(missing_ok=True)
            raise Aborted(f"aborted by `ingestctl abort` before {where}")
        if self.signalled:
            raise Aborted(f"aborted by {self.signalled} before {where}")


def host_states(ctx: Context, hosts: Iterable[str] | None = None) -> dict[str, dict | None]:
    return ctx.io.get_facts(IngestState, hosts=hosts)


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


@dataclass
class RunFacts:
    """What a run decided and found, field by field as the ledger entry (`runlock.ledger_entry`) records it.

    Filled in as the run goes: a field stays None (or empty) when the run never got that far, which is what the
    summary and the ledger then say."""

    release: str | None = None
    image: str | None = None
    image_id: str | None = None
    config_version: str | None = None
    previous_config_version: str | None = None
    # The release the run's image was built for needs this schema head; the database's before and after.
    release_schema_head: str | None = None
    schema_before: str | None = None
    schema_after: str | None = None
    restore_point: str | None = None
    # Per host, the release it was live on before the run (None: a first deploy there).
    previous: dict[str, str | None] = field(default_factory=dict)
    skip_bench: bool = False
    emergency: bool = False
    rotated_secrets: list[str] = field(default_factory=list)
    lock_token: str | None = None
    lock_takeover: str | None = None
    # Set by `runlock.guarded` when the run ends: success, noop, failed, aborted, rolled-back, rollback-failed.
    outcome: str | None = None
    switched: list[str] = field(default_factory=list)
    message: str | None = None
    time_to_healthy_s: float | None = None
    unavailable_s: float | None = None


@dataclass
class Run:
    """What one deploy or rollback did, for the summary, the --json stream and the ledger."""

    id: str
    kind: str
    env: str
    who: str
    started: float = field(default_factory=time.time)
    steps: list[dict[str, Any]] = field(default_factory=list)
    gates: list[dict[str, Any]] = field(default_factory=list)
    facts: RunFacts = field(default_factory=RunFacts)

    def step(self, name: str, started: float) -> None:
        self.steps.append({"name": name, "started": round(started, 3), "duration_s": round(time.time() - started, 2)})


def summarise(run: Run, reporter: Reporter) -> None:
    facts = run.facts
    total = round(time.time() - run.started, 1)
    message = (
        f"{run.kind} {facts.release} to {run.env}: {facts.outcome}"
        + (f", {len(facts.switched)} host(s) switched" if facts.switched else ", every host already current")
        + f", config {facts.config_version}, in {total}s"
        + (" (EMERGENCY change, recorded in the ledger)" if facts.emergency else "")
    )
    reporter.event("summary", message, run_id=run.id, outcome=facts.outcome, duration_s=total,
                   release=facts.release, switched=facts.switched, steps=run.steps, gates=run.gates,
                   emergency=facts.emergency)
