"""pyinfra operations that put an ingest release live on a host with zero downtime, and its config in place.

They read the host only through facts (`ingestctl.facts.release`), yield the commands that
`ingestctl.hostlayout` builds, and report a noop with the reason when the host is already as asked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Generator, Mapping
from io import StringIO

from ingestctl import hostlayout as layout
from ingestctl import reconcile, sshpool
from ingestctl.errors import HostError
from ingestctl.facts.docker import DockerImage
from ingestctl.facts.proxy import ConfigBodyLimit, ConfigBodyLimits, ProxyRouting, limit_of
from ingestctl.facts.release import (
    REJECTED,
    ComposeBinary,
    ConfigVersions,
    FileDigests,
    IngestState,
    RunningServices,
    SchemaHead,
    SlotSockets,
)
from ingestctl.facts.together import FactKey, HostFacts, wanted_key
from ingestctl.operations import secretfiles
from ingestctl.reconcile import Routing
from ingestctl.secrets import APP_DB_ROLE, app_database_password
from pyinfra import host
from pyinfra.api import deploy, operation
from pyinfra.api.exceptions import FactProcessError
from pyinfra.operations import files


def compose_binary() -> str:
    # Asked by most operations, and `docker compose version` costs 60 ms a host: once per connection.
    binary = sshpool.remembered(host, "compose-binary", lambda: host.get_fact(ComposeBinary))
    if binary is None:
        raise HostError(
            f"host {host.name}: expected `docker compose` or `docker-compose`, found neither; "
            "install Docker Compose (Debian: apt-get install docker-compose)"
        )
    return binary


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def dotenv(infra_images: Mapping[str, str], slots: Mapping[str, Mapping[str, str]]) -> str:
    values = dict(infra_images)
    for slot_values in slots.values():
        values.update(slot_values)
    return layout.render_dotenv(values)


@operation()
def layout_present(compose_for: Mapping[str, str], infra_images: Mapping[str, str], app_uid: int):
    """Ensure the ingest directory, compose file and compose .env exist on the host.

    The proxy's config is the switch's (`release_live`): it follows the live slot and that slot's config version.

    + compose_for: the rendered compose file for each host name (hosts differ by role)
    """
    compose_text = compose_for[host.name]
    state = host.get_fact(IngestState) or {}
    wanted = {
        f"{layout.BASE}/compose.yml": compose_text,
        f"{layout.BASE}/.env": dotenv(infra_images, state.get("slots", {})),
    }
    # One round trip for the common case, a re-deploy: every file already as wanted.
    if host.get_fact(FileDigests, paths=sorted(wanted)) == {path: sha256(text) for path, text in wanted.items()}:
        host.noop("ingest host layout already in place")
        return
    yield from files.directory._inner(path=layout.BASE, mode="755")
    for sub, mode in (("config", "711"), ("backups", "700"), ("proxy", "755"), ("db", "700")):
        yield from files.directory._inner(path=f"{layout.BASE}/{sub}", mode=mode)
    # An empty config keeps compose happy for slots that have never run.
    yield from files.directory._inner(path=f"{layout.BASE}/config/{layout.EMPTY_CONFIG}/secrets", mode="700")
    # The slots' unix sockets: the app user creates them, nobody else writes here.
    yield f"mkdir -p {layout.BASE}/run && chown {app_uid}:{app_uid} {layout.BASE}/run && chmod 755 {layout.BASE}/run"
    yield from files.file._inner(path=f"{layout.BASE}/config/{layout.EMPTY_CONFIG}/app.env", mode="600")
    for path, text in wanted.items():
        yield from files.put._inner(src=StringIO(text), dest=path, mode="644")
    if "proxy" in host.get_fact(RunningServices):
        # A running proxy is brought to the compose file's definition (recreated only when it changed, as when
        # the slots' sockets were first mounted into it); a first release starts it in its switch.
        yield layout.compose(compose_binary(), "up", "-d", "--no-deps", "proxy")


@operation()
def config_version_present(version: str, env_text: str, secret_files: Mapping[str, str], app_uid: int):
    """Ensure config VERSION (app.env + secret files, 0600, owned by the app user) exists on the host.

    Versions are content-addressed, so an existing complete version is never rewritten.
    """
    if version in host.get_fact(ConfigVersions):
        host.noop(f"config {version} already on host")
        return
    staging = f"{layout.BASE}/config/.{version}.partial"
    final = f"{layout.BASE}/config/{version}"
    yield f"rm -rf {staging} && mkdir -p {staging}/secrets && chmod 700 {staging} {staging}/secrets"
    # Through stdin, never an upload: on a sudo host pyinfra's upload passes through a world-readable /tmp file.
    yield secretfiles.write_command(f"{staging}/app.env", env_text, mode="600")
    for name, value in sorted(secret_files.items()):
        yield secretfiles.write_command(f"{staging}/secrets/{name}", value, mode="600")
    # Written whole, then renamed: a half-written version is never visible to a deploy or a rollback.
    yield (
        f"touch {staging}/.complete && chown -R {app_uid}:{app_uid} {staging} && chmod 700 {staging} "
        f"&& rm -rf {final} && mv {staging} {final}"
    )


@operation()
def database_running(password: str, redis_password: str, postgres_uid: int, redis_uid: int,
                     infra_images: Mapping[str, str], pg_hba: str):
    """Ensure PostgreSQL and Redis run on the db host, Redis behind REDIS_PASSWORD, and PostgreSQL answers.

    A changed Redis password restarts Redis: the api slots still on the old one run in degrade mode (their
    in-process rate limit) until they are switched to the config that has the new one. A changed pg_hba.conf
    (PG_HBA: who may connect from where) is reloaded, not restarted: open connections stay.
    """
    if "db" not in host.groups:
        host.noop("not the db host")
        return
    password_file = f"{layout.BASE}/db/secrets/postgres_password"
    redis_conf = layout.render_redis_conf(redis_password)
    app_password = app_database_password(password)
    running = host.get_fact(RunningServices)
    wanted = {"postgres": infra_images["POSTGRES_IMAGE"], "redis": infra_images["REDIS_IMAGE"]}
    digests = host.get_fact(FileDigests, paths=[password_file, layout.REDIS_CONF, layout.APP_ROLE_FILE,
                                                 layout.PG_HBA])
    password_in_place = digests.get(password_file) == sha256(password)
    pg_hba_in_place = digests.get(layout.PG_HBA) == sha256(pg_hba)
    redis_conf_in_place = digests.get(layout.REDIS_CONF) == sha256(redis_conf)
    app_role_in_place = digests.get(layout.APP_ROLE_FILE) == sha256(app_password)
    all_running = all(running.get(service) == image for service, image in wanted.items())
    if password_in_place and redis_conf_in_place and app_role_in_place and pg_hba_in_place and all_running:
        host.noop("postgres and redis already running, the app role and pg_hba in place")
        return
    binary = compose_binary()
    yield secretfiles.write_command(layout.PG_HBA, pg_hba, mode="600", user=str(postgres_uid),
                                    group=str(postgres_uid))
    yield secretfiles.write_command(password_file, password, mode="600", user=str(postgres_uid),
                                    group=str(postgres_uid))
    yield secretfiles.write_command(layout.REDIS_CONF, redis_conf, mode="600", user=str(redis_uid),
                                    group=str(redis_uid))
    yield layout.start_db(binary)
    if not redis_conf_in_place and running.get("redis"):
        yield layout.restart_service(binary, "redis")  # `up` keeps a running container: it read the old file
    yield layout.wait_db_healthy(binary)
    if not pg_hba_in_place and running.get("postgres"):
        yield layout.reload_postgres(binary)  # `up` kept a running container, which read the old file
    yield secretfiles.stdin_command(layout.psql_stdin(binary), layout.app_role_sql(APP_DB_ROLE, app_password))
    # Written last: its digest says the role has this password (the noop check above).
    yield secretfiles.write_command(layout.APP_ROLE_FILE, app_password, mode="600", user=str(postgres_uid),
                                    group=str(postgres_uid))


RELEASE_KEYS = ("release", "image", "image_id", "config_version", "schema_head")


PROXY_CONF = f"{layout.BASE}/proxy/nginx.conf"


def switch_fact_list(config_version: str | None) -> list:
    """Every fact a switch or a canary reads before it yields its first command."""
    return [ProxyRouting, IngestState, (ConfigBodyLimit, {"version": body_limit_version(config_version)}),
            (FileDigests, {"paths": [PROXY_CONF]}), RunningServices, SlotSockets]


def switch_facts(config_version: str | None) -> HostFacts:
    """`switch_fact_list`, read in one round trip, less those handed over from the lock's round (`handed_switch`)."""
    return HostFacts(host).read_together(*switch_fact_list(config_version))


def switch_ahead() -> list:
    """`switch_fact_list` as the deploy lock's round reads it for an app rollback, before the version is decided:
    every config version's body limit in place of one version's. Derived, so a fact added to the switch is read
    ahead too."""
    return [ConfigBodyLimits if wanted_key(wanted)[0] is ConfigBodyLimit else wanted
            for wanted in switch_fact_list(None)]


def handed_switch(facts: HostFacts, config_version: str | None) -> dict[FactKey, object]:
    """From FACTS, read with `switch_ahead()` under the lock: the switch's facts for CONFIG_VERSION, as
    `switch_facts` keys them; only those the lock's round did read (the rest the switch reads itself)."""
    values: dict[FactKey, object] = {}
    for wanted in switch_fact_list(config_version):
        key = wanted_key(wanted)
        cls, kwargs = key[0], dict(key[1])
        if cls is ConfigBodyLimit:
            if facts.known(ConfigBodyLimits):
                try:
                    values[key] = limit_of(facts.get(ConfigBodyLimits), kwargs["version"])
                except FactProcessError:
                    pass  # the switch reads it on its own, and fails this host naming the value
        elif facts.known(cls, **kwargs):
            values[key] = facts.get(cls, **kwargs)
    return values


def live_state(facts: HostFacts) -> tuple[dict, bool, Routing | None]:
    """What the host really serves: state.json, unless the proxy's routes point elsewhere (see reconcile).

    Returns (state, stale, routing); when stale, the live slot's image ID is read from the engine by its image
    name.
    """
    routing = facts.get(ProxyRouting)
    state, stale = reconcile.effective_state(facts.get(IngestState) or {}, reconcile.routed_slot(routing),
                                             routing)
    if stale and state.get("image"):
        state["image_id"] = facts.get(DockerImage, image=state["image"])
    return state, stale, routing


def body_limit_version(config_version: str | None) -> str:
    return config_version or layout.EMPTY_CONFIG


def proxy_conf(config_version: str | None, ports: layout.Ports, clients: layout.ClientLimits,
               canary_weight: int, facts: HostFacts) -> str:
    """The proxy's config for CONFIG_VERSION's body limit, the inventory's CLIENTS limits and CANARY_WEIGHT."""
    limit = facts.get(ConfigBodyLimit, version=body_limit_version(config_version))
    return layout.render_proxy(ports, limit, clients, canary_weight)


def proxy_conf_put(text: str, facts: HostFacts) -> list[str]:
    """The commands that put the proxy's config when the file on the host differs from TEXT (reloading is the
    caller's): none when it is already in place."""
    if facts.get(FileDigests, paths=[PROXY_CONF]).get(PROXY_CONF) == sha256(text):
        return []
    return list(files.put._inner(src=StringIO(text), dest=PROXY_CONF, mode="644"))


def proxy_applied(puts: list[str], facts: HostFacts) -> list[str]:
    """After a config put (PUTS): reload the proxy gracefully. Without one: start it only if the switch's facts
    found it stopped (rare), and otherwise nothing: a `docker ps` of its own would cost the host 25 ms of CPU in
    the round a rollback waits on, to learn what `RunningServices` said a moment before."""
    if puts:
        return [layout.reload_proxy(compose_binary())]
    if "proxy" not in facts.get(RunningServices):
        return [layout.proxy_started(layout.COMPOSE_ON_HOST)]
    return []


@operation()
def release_live(
    release: str,
    image: str,
    image_id: str,
    config_version: str,
    infra_images: Mapping[str, str],
    ports: layout.Ports,
    clients: layout.ClientLimits,
    canary_weight: int = 100,
    ready_timeout_s: int = 60,
    drain_grace_s: int = 30,
    schema_head: str | None = None,
    keep_standby: bool = True,
    clear_failed_idle: bool = False,
):
    """Ensure RELEASE runs live with CONFIG_VERSION, switching slots behind the proxy without downtime.

    The idle slot gets the release (unless it already runs it, warm, as the standby), must answer ready, then
    the proxy's routes are flipped to it (`layout.route_proxy`): the next request goes there, requests in flight
    on the old slot finish there, and no client connection is closed, since nginx is not reloaded. The old slot
    stays up as the warm standby (`keep_standby`), so rolling back to it is another flip; without
    `keep_standby` it is drained with SIGTERM and removed.

    The proxy's config changes only with its settings: CONFIG_VERSION's MAX_REQUEST_BODY_BYTES (as written on the
    host), the inventory's CLIENTS limits and CANARY_WEIGHT. Then, and only then, it is reloaded gracefully.

    + clear_failed_idle: when RELEASE is already live, also remove whatever runs in the idle slot that state.json
      does not record as the standby: the leftover of a switch that failed (a release that never got ready), or
      a canary whose gates failed (its route goes back to the live slot first).
    """
    wanted = {"release": release, "image": image, "image_id": image_id, "config_version": config_version,
              "schema_head": schema_head}
    facts = switch_facts(config_version)
    state, stale, routing = live_state(facts)
    puts = proxy_conf_put(proxy_conf(config_version, ports, clients, canary_weight, facts), facts)
    if all(state.get(key) == wanted[key] for key in ("release", "image_id", "config_version")):
        live = state["slot"]
        yield from puts
        if stale:
            # Half-switched towards this very release: the routes point here, state.json was never written.
            # Route whole and reload (a reload may be what failed), then record it; nothing else moves.
            yield layout.route_proxy(live)
            yield layout.reload_proxy(compose_binary())
            yield layout.write_state({**state, "schema_head": schema_head})
            return
        # A canary that failed its gate goes back to the live slot first, so nothing is sent to it while it stops.
        routed = routing is not None and routing.live == live and routing.canary == live
        if not routed:
            yield layout.route_proxy(live)
        if puts or not routed:
            # The proxy's settings changed (the inventory's limits, the template), or its routes were not in place
            # (an upgrade from a proxy that named the slot in its config): applied without a switch.
            yield from proxy_applied(puts, facts)
        if clear_failed_idle:
            idle = layout.other_slot(live)
            standby = state.get("standby") or {}
            running = facts.get(RunningServices).get(f"api_{idle}")
            if state.get("canary"):
                yield layout.write_state({k: v for k, v in state.items() if k != "canary"})
            if running and not (standby.get("slot") == idle and standby.get("image") == running):
                # Nothing routes to it any more; a request that reached it just before the flip is finished within
                # the grace, and one refused while it stops is retried by the proxy on the live route.
                yield layout.stop_slot(compose_binary(), idle, 1)
                return
        if not puts and routed:
            host.noop(f"ingest {release} with config {config_version} is already live in slot {live}")
        return
    live = state.get("slot")
    new, slots, ready = yield from idle_slot_started(state, wanted, infra_images, ports, ready_timeout_s, facts)
    previous = {key: state[key] for key in RELEASE_KEYS if key in state}
    yield from after_ready(ready, puts, [
        layout.route_proxy(new),
        *proxy_applied(puts, facts),
        *([layout.stop_slot(compose_binary(), live, drain_grace_s)] if live and not keep_standby else []),
        layout.write_state(
            {
                **wanted,
                "slot": new,
                # Both slots, exactly as .env has them, so the layout's .env render matches and stays a noop.
                "slots": slots,
                "previous": previous or None,
                "standby": {**previous, "slot": live} if (live and keep_standby) else None,
            }
        ),
    ])


def after_ready(ready: str, puts: list, then: list[str]) -> Generator:
    """READY (the new slot's readiness wait), the proxy config's PUTS, then THEN (the flip and its record).

    Without puts, one command does it all (`hostlayout.in_one_round`): a switch to a warm slot costs two round
    trips a host, its facts and this, whatever the latency; the first step that fails stops the rest, as it
    would stop the operation. A put is a file upload, a step of its own.
    """
    if puts:
        yield ready
        yield from puts
        yield layout.in_one_round(*then)
    else:
        yield layout.in_one_round(ready, *then)


def idle_slot_started(state: Mapping, wanted: Mapping[str, str | None], infra_images: Mapping[str, str],
                      ports: layout.Ports, ready_timeout_s: int,
                      facts: HostFacts) -> Generator[str, None, tuple[str, dict, str]]:
    """The release WANTED running in the slot the proxy does not route to; returns (that slot, both slots'
    compose variables, the command that waits for it to answer ready). A release already warm there (the
    standby, or this run's canary) is reused: recreating it would drop the requests a canary is serving."""
    new = layout.other_slot(state.get("slot"))
    running = facts.get(RunningServices).get(f"api_{new}")
    # A slot with no socket was started before the layout had them: the proxy could not reach it.
    warm = running == wanted["image"] and new in facts.get(SlotSockets) and any(
        candidate.get("slot") == new
        and all(candidate.get(key) == wanted[key] for key in ("release", "image_id", "config_version"))
        for candidate in (state.get("standby") or {}, state.get("canary") or {})
    )
    slots = dict(state.get("slots", {}))
    if warm:
        host.noop(f"ingest {wanted['release']} already runs warm in slot {new}: not restarting it")
    else:
        slots[new] = layout.slot_env(new, str(wanted["image"]), str(wanted["release"]), str(wanted["config_version"]))
        yield from files.put._inner(
            src=StringIO(dotenv(infra_images, slots)), dest=f"{layout.BASE}/.env", mode="644"
        )
        yield layout.start_slot(compose_binary(), new)
    return new, slots, layout.wait_slot_ready(new, ports[new], ready_timeout_s)


@operation()
def release_canary(
    release: str,
    image: str,
    image_id: str,
    config_version: str,
    infra_images: Mapping[str, str],
    ports: layout.Ports,
    clients: layout.ClientLimits,
    canary_weight: int,
    ready_timeout_s: int = 60,
):
    """Ensure RELEASE takes CANARY_WEIGHT percent of the host's requests from its idle slot, the rest staying on
    the live release, until `release_live` switches the host whole (the gates passed) or back (they failed).

    The share is the proxy config's (the inventory's canary_weight, there before the canary starts); the canary
    starts by flipping the canary route to the new slot, with no reload. state.json keeps the live release as
    live and records the canary, so a switch or rollback from here acts as from the live release, and the full
    switch reuses the canary's running slot instead of recreating it.
    """
    wanted = {"release": release, "image": image, "image_id": image_id, "config_version": config_version}
    # The canary's proxy config keeps the live config's body limit. Read together here is the limit of the config
    # the canary brings, usually the live one; when they differ, the live one is read on its own below.
    facts = switch_facts(config_version)
    state, _stale, _routing = live_state(facts)
    if all(state.get(key) == wanted[key] for key in ("release", "image_id", "config_version")):
        host.noop(f"ingest {release} with config {config_version} is already live: no canary")
        return
    live = state.get("slot")
    if not live or state.get(REJECTED):
        # Nothing to share the traffic with, or a state.json that cannot be trusted to write back: the switch
        # that follows the gates moves the host whole, as without a canary.
        host.noop("no trusted live release to share the traffic with: the switch moves the host whole")
        return
    new, slots, ready = yield from idle_slot_started(state, wanted, infra_images, ports, ready_timeout_s, facts)
    puts = proxy_conf_put(proxy_conf(state.get("config_version"), ports, clients, canary_weight, facts), facts)
    standby = state.get("standby") or {}
    if standby.get("slot") == new and standby.get("image_id") != image_id:
        standby = {}  # the canary took the standby's slot: a rollback can no longer find it warm there
    yield from after_ready(ready, puts, [
        layout.route_proxy(live, canary=new),
        *proxy_applied(puts, facts),
        layout.write_state({**state, "slots": slots, "standby": standby or None,
                            "canary": {**wanted, "slot": new, "weight": canary_weight}}),
    ])


@operation()
def release_withdrawn(drain_grace_s: int = 30):
    """Take the api out of service on a host that had nothing live before this run (its first deploy failed).

    That is the rollback of a first deploy: back to what the host ran before, which is nothing. The proxy
    goes too, so clients get a refused connection rather than a 502 from a proxy with no upstream, and so do its
    routes: a host with no live release routes nowhere.
    """
    running = host.get_fact(RunningServices)
    serving = sorted(service for service in running if service.startswith("api_") or service == "proxy")
    if not serving and host.get_fact(IngestState) is None and host.get_fact(ProxyRouting) is None:
        host.noop("no ingest release in service")
        return
    binary = compose_binary()
    for service in serving:
        yield layout.stop_service(binary, service, drain_grace_s)
    yield layout.unroute_proxy()
    yield layout.remove_state()


@operation()
def schema_migrated(image: str, config_version: str, infra_images: Mapping[str, str], restore_point: str,
                    alembic_args: tuple[str, ...] = ("upgrade", "head"), target_head: str | None = None):
    """Take a restore point (pg_dump -Fc), then run alembic in a one-off container of IMAGE on the db host.

    + target_head: when given and the database is already there, nothing runs (a noop).
    """
    if target_head is not None and host.get_fact(SchemaHead) == target_head:
        host.noop(f"schema already at {target_head}")
        return
    binary = compose_binary()
    yield layout.restore_point(binary, restore_point)
    yield layout.run_migrate(binary, image, config_version, *alembic_args)


@deploy("Ship the images this host needs")
def images_for_role_shipped(images_for: Mapping[str, list[str]], progress=None):
    """The app and proxy images everywhere, the database images on the db host: one run for the fleet."""
    from ingestctl.operations.shipping import images_shipped

    images_shipped(images=images_for[host.name], progress=progress)
