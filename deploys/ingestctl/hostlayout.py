"""What a release looks like on a host, and the pure shell commands that change it.

Kamal's split: everything here builds strings and files; nothing runs. pyinfra operations in
`ingestctl.operations.release` yield these commands, and unit tests pin them exactly.

On-host layout (BASE = /opt/ingest):
    compose.yml         rendered per host from deploys/templates/host-compose.yml.j2
    .env                compose variables: images, versions and config versions of the two api slots
    state.json          the live slot and what it runs (read by the IngestHostState fact)
    config/<version>/   app.env + secrets/ (0600, owned by the app user): content-addressed config versions
    db/secrets/         the database's own password file (db host)
    proxy/nginx.conf    the proxy: the live config's body limit, per-client limits, the canary weight
    proxy/live.sock     symlink to the live slot's unix socket (canary.sock: the canary's, else the live one's)
    run/                the slots' unix sockets (owned by the app user)
    backups/            restore points (pg_dump -Fc) on the db host
"""

from __future__ import annotations

import ipaddress
import json
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jinja2

BASE = "/opt/ingest"
PROJECT = "ingest"
SLOTS = ("blue", "green")
TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
STATE_FILE = f"{BASE}/state.json"
EMPTY_CONFIG = "none"


@dataclass(frozen=True)
class Ports:
    public: int = 8000
    redis: int = 6379

    @property
    def blue(self) -> int:
        return self.public + 1

    @property
    def green(self) -> int:
        return self.public + 2

    def __getitem__(self, slot: str) -> int:
        return {"blue": self.blue, "green": self.green, "public": self.public, "redis": self.redis}[slot]


def checked_slot(slot: str) -> str:
    if slot not in SLOTS:
        raise ValueError(f"slot: expected one of {SLOTS}, found {slot!r}")
    return slot


def other_slot(slot: str | None) -> str:
    """The idle slot a new release starts in. A host with nothing live starts in blue."""
    if slot is None:
        return "blue"
    return "green" if checked_slot(slot) == "blue" else "blue"


@lru_cache(maxsize=1)
def _templates() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render_compose(
    host: str, roles: Iterable[str], db_address: str, app_uid: int, ports: Ports, stop_grace_s: int = 30,
    postgres_uid: int = 999,
) -> str:
    return (
        _templates()
        .get_template("host-compose.yml.j2")
        .render(
            host=host,
            roles=sorted(roles),
            db_address=db_address,
            app_uid=app_uid,
            postgres_uid=postgres_uid,
            ports=ports,
            stop_grace_s=stop_grace_s,
            redis_bind=redis_bind(db_address),
            postgres_listen=postgres_listen(db_address),
        )
    )


# Under a secrets/ directory like every file holding a secret, so the host checks (tests/infra) cover it.
REDIS_CONF = f"{BASE}/db/redis/secrets/redis.conf"
# What the app's Redis user may not run: wiping data, reconfiguring or replicating the server, reading every key.
# The rate limiter needs only PING, AUTH and its Lua script (EVALSHA / SCRIPT LOAD).
REDIS_DENIED = ("flushall", "flushdb", "config", "debug", "replicaof", "slaveof", "module", "shutdown", "monitor",
                "acl", "keys", "migrate", "save", "bgsave", "bgrewriteaof", "sync", "psync", "failover")


def render_redis_conf(password: str) -> str:
    """The password and the app user's rights, in a 0600 file: never on the command line (`ps`, `docker inspect`).

    The password is checked by ingestctl.secrets (no whitespace, quotes or backslash: redis.conf would split it).
    """
    denied = " ".join(f"-{command}" for command in REDIS_DENIED)
    return (
        "# Written by ingestctl; the next deploy rewrites it.\n"
        f"user default on >{password} ~* &* +@all {denied}\n"
    )


APP_ROLE_FILE = f"{BASE}/db/secrets/app_role_password"


def app_role_sql(role: str, password: str, owner: str = "ingest", database: str = "ingest") -> str:
    """The api's role: it may log in and read and write rows, nothing more (no superuser, no DDL).

    Default privileges carry the grants to every table and sequence the owner's later migrations create.
    ROLE and PASSWORD are checked here: both go into SQL literals.
    """
    if not role.isidentifier() or not all(ch in "0123456789abcdef" for ch in password) or len(password) < 32:
        raise ValueError(f"app role {role!r}: expected an identifier and a hex password of 32+ characters")
    return f"""\
DO $do$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN CREATE ROLE {role}; END IF;
END $do$;
ALTER ROLE {role} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD '{password}';
GRANT CONNECT, TEMPORARY ON DATABASE {database} TO {role};
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role};
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role};
ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {role};
ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO {role};
"""


def psql_stdin(binary: str) -> str:
    """psql as the owner in the postgres container, reading its SQL from stdin (so no secret is on a command line)."""
    return compose(binary, "exec", "-T", "postgres", "psql", "-U", "ingest", "-d", "ingest", "-v", "ON_ERROR_STOP=1",
                   "-q")


PG_HBA = f"{BASE}/db/pg/pg_hba.conf"


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        return None


def postgres_listen(db_address: str) -> str:
    """PostgreSQL's listen_addresses: loopback and the address the app hosts use, when the inventory gives an IP.

    A host name (staging's) cannot be bound here: PostgreSQL then listens on every address, and pg_hba and the
    db host's firewall (`ingestctl setup`) keep everyone but the app hosts out.
    """
    return f"127.0.0.1,{db_address}" if _ip(db_address) else "*"


def render_pg_hba(db_address: str, app_addresses: Iterable[str], clients: Iterable[str] = ()) -> str:
    """Who may log in, from where: the container itself, the db host (migrations), the app hosts and CLIENTS.

    Every network login needs a password (scram-sha-256), and only to the ingest database. An address given as a
    host name cannot be pinned (pg_hba would need reverse DNS to match it): the file then admits any address, and
    the firewall is what keeps others out, which the comment in the file says.
    """
    lines = ["# Written by ingestctl; the next deploy rewrites it. TYPE DATABASE USER ADDRESS METHOD",
             "# The container's own socket: health checks and the owner's maintenance (docker exec psql).",
             "local all all trust",
             "host all all 127.0.0.1/32 scram-sha-256",
             "host all all ::1/128 scram-sha-256"]
    named = []
    for address in dict.fromkeys([db_address, *app_addresses]):
        ip = _ip(address)
        if ip is None:
            named.append(address)
            continue
        lines.append(f"host ingest all {ip}/{ip.max_prefixlen} scram-sha-256")
    for network in clients:
        lines.append(f"host ingest all {ipaddress.ip_network(network, strict=False)} scram-sha-256")
    if named:
        lines.append(f"# {', '.join(named)}: host names, which pg_hba cannot pin; the firewall admits only them.")
        lines.append("host ingest all all scram-sha-256")
    return "\n".join(lines) + "\n"


def reload_postgres(binary: str) -> str:
    """Re-read pg_hba.conf without a restart: connections already open stay."""
    return compose(binary, "exec", "-T", "postgres", "psql", "-U", "ingest", "-d", "ingest", "-q", "-c",
                   shlex.quote("SELECT pg_reload_conf()"))


def redis_bind(db_address: str) -> list[str]:
    """Addresses Redis listens on: loopback, and the db host's private address when the inventory names an IP.

    A host name (staging's) cannot be bound: Redis then listens on every address, behind its password and the
    db host's firewall (`ingestctl setup`).
    """
    return ["127.0.0.1", db_address] if _ip(db_address) else []


@dataclass(frozen=True)
class ClientLimits:
    """What the proxy allows one client address (inventory data `proxy_limit_*`); 0 turns a limit off.

    connections: requests in progress at once; requests_per_s and burst: nginx's leaky bucket (`limit_req`),
    where up to BURST requests above the rate are served at once and the rest refused.
    """

    connections: int
    requests_per_s: int
    burst: int


# During a canary, a request carrying this header with the value 1 goes to the new slot alone (nginx.conf.j2
# reads it as $http_x_ingest_canary): the metric gate's probes use it.
CANARY_HEADER = "X-Ingest-Canary"


# Where the slots listen and how the proxy reaches them (see nginx.conf.j2 and docs/ARCHITECTURE.md). Each slot
# serves on a unix socket in SLOT_SOCKETS (host: BASE/run, owned by the app user); the proxy connects through the
# symlinks live.sock and canary.sock in its own directory (host: BASE/proxy, root's). Both are seen at the same
# paths inside the containers, so a symlink's target is a path the proxy's container resolves.
SLOT_SOCKETS = "/run/ingest-slots"
PROXY_ROUTES = "/etc/ingest-proxy"
ROUTES = ("live", "canary")


def slot_socket(slot: str) -> str:
    return f"{SLOT_SOCKETS}/{checked_slot(slot)}.sock"


def render_proxy(ports: Ports, max_body_bytes: int, clients: ClientLimits, canary_weight: int = 100,
                 routes: str = PROXY_ROUTES) -> str:
    """The proxy's config, listening on PORTS.public. MAX_BODY_BYTES is the live config version's
    MAX_REQUEST_BODY_BYTES, so a body the api would refuse is refused before nginx buffers it; CLIENTS are the
    inventory's per-address limits; below 100, CANARY_WEIGHT is the share of requests the canary route gets.
    Which slot serves is not in it: the symlinks in ROUTES are (`route_proxy`)."""
    # Rendered into nginx directives: only plain integers may get there. A body limit of 0 would mean none.
    for name, value, low in (("max_body_bytes", max_body_bytes, 1), ("connections", clients.connections, 0),
                             ("requests_per_s", clients.requests_per_s, 0), ("burst", clients.burst, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"proxy {name}: expected an integer >= {low}, found {value!r}")
    # Both weights must be nginx's positive integers: 100 means no canary share at all.
    if isinstance(canary_weight, bool) or not isinstance(canary_weight, int) or not 1 <= canary_weight <= 100:
        raise ValueError(f"proxy canary weight: expected an integer from 1 to 100, found {canary_weight!r}")
    return (
        _templates()
        .get_template("nginx.conf.j2")
        .render(ports=ports, max_body_bytes=max_body_bytes, clients=clients, canary_weight=canary_weight,
                routes=routes)
    )


def route_proxy(live: str, canary: str | None = None) -> str:
    """Point the proxy's routes at slots: canary.sock at CANARY (the live slot when None), then live.sock at LIVE.

    Each is a symlink replaced by rename(2), so a connect sees the old slot or the new one, never neither; nginx
    resolves the path at every connect, so the next request goes to the new slot with no reload.
    """
    commands = []
    for route, slot in (("canary", canary or live), ("live", live)):
        commands.append(f"ln -sfn {slot_socket(slot)} .{route}.sock.new && mv -Tf .{route}.sock.new {route}.sock")
    return f"cd {BASE}/proxy && " + " && ".join(commands)


def unroute_proxy() -> str:
    """Remove the proxy's routes: a host with no live release routes nowhere."""
    return f"rm -f {BASE}/proxy/live.sock {BASE}/proxy/canary.sock"


def render_dotenv(values: Mapping[str, str]) -> str:
    """Compose's .env: sorted KEY=VALUE lines. Values here are image names and versions, never secrets."""
    for key, value in values.items():
        if any(ch in str(value) for ch in "\n\r\"'$ "):
            raise ValueError(f".env value for {key}: expected no quotes, spaces or $, found {value!r}")
    return "".join(f"{key}={values[key]}\n" for key in sorted(values))


def slot_env(slot: str, image: str, version: str, config_version: str) -> dict[str, str]:
    prefix = f"API_{slot.upper()}"
    return {f"{prefix}_IMAGE": image, f"{prefix}_VERSION": version, f"{prefix}_CONFIG": config_version}


# ----- command builders -------------------------------------------------------------------------------------


# The Compose command chosen by the host when the command runs, for a rare branch (facts.release.ComposeBinary
# asks ahead, when a command surely needs it). Unquoted on purpose: `docker compose` must split into two words.
COMPOSE_ON_HOST = ("$(if docker compose version >/dev/null 2>&1; then echo 'docker compose'; "
                   "else echo docker-compose; fi)")


# Between the steps of `in_one_round`: each step in its own subshell (a `cd` in one does not move the next).
ROUND_JOINER = " ) && ( "


def in_one_round(*steps: str) -> str:
    """STEPS as one shell command, in order, stopping at the first that fails: one round trip, not one each."""
    return "( " + ROUND_JOINER.join(steps) + " )"


def compose(binary: str, *args: str, env: Mapping[str, str] | None = None) -> str:
    """A compose command in the project directory. `binary` is `docker compose` or `docker-compose` (a fact).

    ENV sets compose variables for this command only (they win over .env).
    """
    prefix = "".join(f"{key}={shlex.quote(value)} " for key, value in sorted((env or {}).items()))
    return f"cd {BASE} && {prefix}{binary} -p {PROJECT} -f compose.yml " + " ".join(args)


def start_slot(binary: str, slot: str) -> str:
    # --no-deps: starting a slot must never restart the database or the other slot.
    return compose(binary, "up", "-d", "--no-deps", "--force-recreate", f"api_{slot}")


def stop_slot(binary: str, slot: str, grace_s: int) -> str:
    # SIGTERM, then the service drains in-flight requests for up to grace_s before compose kills it.
    return stop_service(binary, f"api_{slot}", grace_s)


def stop_service(binary: str, service: str, grace_s: int) -> str:
    return compose(binary, "stop", "-t", str(grace_s), service) + " && " + compose(binary, "rm", "-f", service)


def remove_state() -> str:
    return f"rm -f {STATE_FILE}"


def container_of(service: str) -> str:
    """The running container of a compose service, found by compose's labels (same for v1 and v2)."""
    return (
        f"$(docker ps -q --filter label=com.docker.compose.project={PROJECT} "
        f"--filter label=com.docker.compose.service={service})"
    )


def ready_probe(port: int) -> str:
    """One `/health/ready` request to 127.0.0.1:PORT with bash's own /dev/tcp (no curl or python needed on the
    host, and no `docker exec`, which costs a process start in the container): exits 0 on a 200 within 2 s."""
    request = "GET /health/ready HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n"
    return (
        f"(exec 3<>/dev/tcp/127.0.0.1/{port} && printf '{request}' >&3 && IFS= read -r -t 2 line <&3 "
        '&& case "$line" in "HTTP/1."?" 200"*) exit 0;; esac; exit 1) 2>/dev/null'
    )


def wait_slot_ready(slot: str, port: int, timeout_s: int) -> str:
    """Poll the slot's readiness from the host, ten times a second, until TIMEOUT_S (wall clock: each try takes
    its own time on a busy host, so a count of tries alone would not bound the wait).

    The slot binds its unix socket (the proxy's route) before it serves, so ready here means routable. The
    verdict goes last, after the container's log tail: error reports keep the end of stderr, and the pipeline
    reads it there (a release that never got ready).
    """
    script = (
        f"end=$(( $(date +%s) + {timeout_s} )); "
        f"for i in $(seq 1 {max(1, timeout_s * 10)}); do {ready_probe(port)} && exit 0; "
        f'[ "$(date +%s)" -ge "$end" ] && break; sleep 0.1; done; '
        f'docker logs --tail 30 "{container_of(f"api_{slot}")}" >&2; '
        f"echo 'api_{slot} on port {port} not ready after {timeout_s}s' >&2; exit 1"
    )
    return f"bash -c {shlex.quote(script)}"


def proxy_started(binary: str) -> str:
    """Start the proxy when it does not run (a host's first release); a running one is left alone."""
    return f'c={container_of("proxy")}; [ -n "$c" ] || {{ {compose(binary, "up", "-d", "--no-deps", "proxy")}; }}'


def reload_proxy(binary: str) -> str:
    """Graceful reload when the proxy runs; start it otherwise."""
    return (
        f'c={container_of("proxy")}; if [ -n "$c" ]; then '
        'docker exec "$c" nginx -c /etc/ingest-proxy/nginx.conf -s reload; '
        f"else {compose(binary, 'up', '-d', '--no-deps', 'proxy')}; fi"
    )


def start_db(binary: str) -> str:
    return compose(binary, "up", "-d", "--no-deps", "postgres", "redis")


def restart_service(binary: str, service: str) -> str:
    return compose(binary, "restart", service)


def wait_db_healthy(binary: str, timeout_s: int = 120) -> str:
    check = compose(binary, "exec", "-T", "postgres", "pg_isready", "-U", "ingest", "-d", "ingest", "-h", "127.0.0.1")
    return (
        f"for i in $(seq 1 {timeout_s * 2}); do ({check}) >/dev/null 2>&1 && exit 0; sleep 0.5; done; "
        f"echo 'postgres not ready after {timeout_s}s' >&2; exit 1"
    )


def restore_point(binary: str, path: str) -> str:
    """pg_dump -Fc inside the database container, written atomically on the host."""
    dump = compose(binary, "exec", "-T", "postgres", "pg_dump", "-Fc", "-U", "ingest", "-d", "ingest")
    target = shlex.quote(path)
    return f"mkdir -p {BASE}/backups && ({dump}) > {target}.part && mv {target}.part {target}"


def run_migrate(binary: str, image: str, config_version: str, *alembic_args: str) -> str:
    """alembic in a one-off container of IMAGE; its image and config come from the command's environment,
    not from .env, so the api slots' settings stay untouched."""
    return compose(
        binary,
        "run",
        "--rm",
        "--no-deps",
        "migrate",
        "python",
        "-m",
        "alembic",
        *alembic_args,
        env={"MIGRATE_IMAGE": image, "MIGRATE_CONFIG": config_version},
    )


def write_state(state: Mapping[str, object]) -> str:
    body = json.dumps(dict(state), sort_keys=True)
    return f"printf '%s\\n' {shlex.quote(body)} > {STATE_FILE}.tmp && mv {STATE_FILE}.tmp {STATE_FILE}"
