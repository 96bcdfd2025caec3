"""The on-host layout and the shell commands that change it, pinned as exact strings (Kamal style)."""

import http.server
import re
import shutil
import socket
import subprocess
import threading
import time

import pytest
import yaml
from ingestctl import hostlayout as layout

PORTS = layout.Ports(public=8000)
CLIENTS = layout.ClientLimits(connections=64, requests_per_s=200, burst=400)


def test_slot_ports_follow_the_public_port():
    assert (PORTS.public, PORTS.blue, PORTS.green, PORTS["redis"]) == (8000, 8001, 8002, 6379)


@pytest.mark.parametrize(("live", "idle"), [(None, "blue"), ("blue", "green"), ("green", "blue")])
def test_new_release_starts_in_the_idle_slot(live, idle):
    assert layout.other_slot(live) == idle


def test_unknown_slot_is_refused_with_the_value():
    with pytest.raises(ValueError, match="found 'red'"):
        layout.other_slot("red")


def test_compose_command_runs_in_the_project_directory():
    assert layout.compose("docker compose", "ps") == "cd /opt/ingest && docker compose -p ingest -f compose.yml ps"


def test_compose_env_is_set_for_the_command_only():
    command = layout.run_migrate("docker-compose", "ingest:1.4.2", "abc123def456", "upgrade", "head")
    assert command == (
        "cd /opt/ingest && MIGRATE_CONFIG=abc123def456 MIGRATE_IMAGE=ingest:1.4.2 docker-compose -p ingest "
        "-f compose.yml run --rm --no-deps migrate python -m alembic upgrade head"
    )


def test_start_slot_never_touches_other_services():
    assert layout.start_slot("docker compose", "green") == (
        "cd /opt/ingest && docker compose -p ingest -f compose.yml up -d --no-deps --force-recreate api_green"
    )


def test_stop_slot_drains_with_sigterm_grace_then_removes():
    assert layout.stop_slot("docker compose", "blue", 30) == (
        "cd /opt/ingest && docker compose -p ingest -f compose.yml stop -t 30 api_blue && "
        "cd /opt/ingest && docker compose -p ingest -f compose.yml rm -f api_blue"
    )


def test_reload_proxy_reloads_a_running_proxy_else_starts_it():
    assert layout.reload_proxy("docker compose") == (
        "c=$(docker ps -q --filter label=com.docker.compose.project=ingest "
        "--filter label=com.docker.compose.service=proxy); if [ -n \"$c\" ]; then docker exec \"$c\" nginx -c "
        "/etc/ingest-proxy/nginx.conf -s reload; else cd /opt/ingest && docker compose -p ingest -f compose.yml "
        "up -d --no-deps proxy; fi"
    )


def test_wait_slot_ready_is_bounded_and_names_the_slot():
    command = layout.wait_slot_ready("green", 8002, 30)
    assert "seq 1 300" in command, "30 s at 10 tries a second"
    assert "/dev/tcp/127.0.0.1/8002" in command and "GET /health/ready" in command
    assert "label=com.docker.compose.service=api_green" in command
    assert "api_green on port 8002 not ready after 30s" in command
    assert "docker exec" not in command, "no process start in the container per try"


class _Ready(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(self.status if self.path == "/health/ready" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def ready_server():
    def start(status: int) -> int:
        handler = type("Handler", (_Ready,), {"status": status})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    servers: list = []
    yield start
    for server in servers:
        server.shutdown()


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed: apt-get install bash")
def test_wait_slot_ready_passes_on_a_200_from_a_real_server(ready_server):
    port = ready_server(200)
    started = time.monotonic()
    done = subprocess.run(["sh", "-c", layout.wait_slot_ready("blue", port, 5)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 2


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed: apt-get install bash")
@pytest.mark.parametrize("status", [503, None])
def test_wait_slot_ready_fails_within_its_timeout_naming_the_slot(ready_server, status):
    if status is None:  # nothing listens
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    else:
        port = ready_server(status)
    started = time.monotonic()
    done = subprocess.run(["sh", "-c", layout.wait_slot_ready("blue", port, 1)], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().endswith(f"api_blue on port {port} not ready after 1s"), done.stderr
    assert time.monotonic() - started < 5


def test_write_state_is_atomic_and_quoted():
    command = layout.write_state({"slot": "blue", "release": "it's"})
    assert command == (
        "printf '%s\\n' '{\"release\": \"it'\"'\"'s\", \"slot\": \"blue\"}' > /opt/ingest/state.json.tmp "
        "&& mv /opt/ingest/state.json.tmp /opt/ingest/state.json"
    )


def test_dotenv_is_sorted_and_refuses_shell_characters():
    assert layout.render_dotenv({"B": "2", "A": "1"}) == "A=1\nB=2\n"
    with pytest.raises(ValueError, match="API_BLUE_IMAGE"):
        layout.render_dotenv({"API_BLUE_IMAGE": "x $(reboot)"})


def test_db_and_app_host_compose_has_every_service():
    text = layout.render_compose("db1", ["db", "app"], "10.0.0.2", 10001, PORTS)
    services = yaml.safe_load(text)["services"]
    assert set(services) == {"postgres", "redis", "migrate", "api_blue", "api_green", "proxy"}
    assert services["api_green"]["environment"]["PORT"] == "8002"
    assert services["api_blue"]["user"] == "10001:10001", "the api runs as the app user that owns the secrets"
    assert all(s.get("network_mode") == "host" for s in services.values())


def test_api_slots_listen_on_loopback_behind_the_proxy():
    services = yaml.safe_load(layout.render_compose("app2", ["app"], "10.0.0.2", 10001, PORTS))["services"]
    assert services["api_blue"]["environment"]["HOST"] == "127.0.0.1"
    assert services["api_green"]["environment"]["HOST"] == "127.0.0.1"


def test_each_api_slot_names_itself_so_its_metrics_stay_its_own():
    services = yaml.safe_load(layout.render_compose("app2", ["app"], "10.0.0.2", 10001, PORTS))["services"]
    assert services["api_blue"]["environment"]["APP_SLOT"] == "blue"
    assert services["api_green"]["environment"]["APP_SLOT"] == "green"


def test_app_host_compose_has_no_database():
    services = yaml.safe_load(layout.render_compose("app2", ["app"], "10.0.0.2", 10001, PORTS))["services"]
    assert set(services) == {"api_blue", "api_green", "proxy"}
    assert services["api_blue"]["environment"]["POSTGRES_HOST"] == "10.0.0.2"


def test_compose_never_carries_a_secret_value():
    text = layout.render_compose("db1", ["db", "app"], "10.0.0.2", 10001, PORTS)
    assert "PASSWORD:" not in text.replace("POSTGRES_PASSWORD_FILE:", "")
    assert "/run/secrets:ro" in text, "secrets reach containers as read-only files"


def test_proxy_reaches_the_slots_through_its_routes_retries_posts_and_keeps_no_slot_connection():
    text = layout.render_proxy(PORTS, 1048576, CLIENTS)
    assert "server unix:/etc/ingest-proxy/live.sock max_fails=0;" in text
    assert "server unix:/etc/ingest-proxy/live.sock max_fails=0 backup;" in text
    assert "server unix:/etc/ingest-proxy/canary.sock max_fails=0;" in text
    assert "127.0.0.1:" not in text, "no slot is named by its port: a switch must not need a new config"
    # An upstream connection kept alive would carry requests to the old slot after a flip.
    assert not re.search(r"^\s*keepalive\b", text, re.M)
    assert "proxy_next_upstream error timeout http_502 non_idempotent;" in text
    assert "reuseport" not in text.replace("No `reuseport`", "")


def test_compose_gives_each_slot_its_socket_and_the_proxy_the_sockets_read_only():
    services = yaml.safe_load(layout.render_compose("app2", ["app"], "10.0.0.2", 10001, PORTS))["services"]
    for slot in ("blue", "green"):
        assert services[f"api_{slot}"]["environment"]["UNIX_SOCKET"] == layout.slot_socket(slot)
        assert f"./run:{layout.SLOT_SOCKETS}" in services[f"api_{slot}"]["volumes"]
    assert f"./run:{layout.SLOT_SOCKETS}:ro" in services["proxy"]["volumes"]
    assert f"./proxy:{layout.PROXY_ROUTES}:ro" in services["proxy"]["volumes"]


def test_redis_password_lives_in_its_config_file_never_in_the_compose_file():
    text = layout.render_compose("db1", ["db", "app"], "10.0.0.2", 10001, PORTS)
    redis = yaml.safe_load(text)["services"]["redis"]
    assert redis["command"][:2] == ["redis-server", "/run/redis/redis.conf"]
    assert redis["command"][-3:] == ["--bind", "127.0.0.1", "10.0.0.2"], "loopback and the db host's address"
    assert "./db/redis/secrets:/run/redis:ro" in redis["volumes"]
    assert "--protected-mode" not in redis["command"], "protected mode stays on"


def test_redis_listens_everywhere_only_when_the_db_host_is_named_not_numbered():
    redis = yaml.safe_load(layout.render_compose("db1", ["db"], "db1.example.internal", 10001, PORTS))["services"]
    assert "--bind" not in redis["redis"]["command"]


def test_redis_conf_sets_the_password_and_denies_the_dangerous_commands():
    conf = layout.render_redis_conf("r" * 24)
    user = next(line for line in conf.splitlines() if line.startswith("user default"))
    assert user.startswith("user default on >" + "r" * 24 + " ")
    for command in ("flushall", "config", "replicaof", "keys", "debug", "module"):
        assert f" -{command}" in user


def test_migrations_run_as_the_owner_from_the_db_hosts_own_secret_the_api_as_the_app_role():
    services = yaml.safe_load(layout.render_compose("db1", ["db", "app"], "10.0.0.2", 10001, PORTS,
                                                    postgres_uid=999))["services"]
    migrate = services["migrate"]
    assert migrate["user"] == "999:999"
    assert migrate["environment"]["POSTGRES_USER"] == "ingest"
    assert migrate["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/db-secrets/postgres_password"
    assert migrate["volumes"] == ["./db/secrets:/run/db-secrets:ro"], "the api's config secrets stay out of it"
    # The api's user comes from its config (POSTGRES_USER=ingest_app in app.env): compose must not override it.
    assert "POSTGRES_USER" not in services["api_blue"]["environment"]


def test_app_role_sql_grants_rows_only_and_refuses_what_would_break_its_literals():
    sql = layout.app_role_sql("ingest_app", "ab" * 32)
    assert "NOSUPERUSER NOCREATEDB NOCREATEROLE" in sql
    assert "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO ingest_app" in sql
    assert "ALTER DEFAULT PRIVILEGES FOR ROLE ingest IN SCHEMA public" in sql
    assert "REVOKE CREATE ON SCHEMA public FROM PUBLIC" in sql
    for role, password in (("ingest_app", "x'; DROP ROLE ingest; --" + "a" * 40), ("app; drop", "ab" * 32),
                           ("ingest_app", "abc")):
        with pytest.raises(ValueError):
            layout.app_role_sql(role, password)


def test_postgres_listens_on_loopback_and_the_db_hosts_address_and_reads_ingestctls_pg_hba():
    postgres = yaml.safe_load(layout.render_compose("db1", ["db"], "10.0.0.2", 10001, PORTS))["services"]["postgres"]
    assert postgres["command"] == ["postgres", "-c", "listen_addresses=127.0.0.1,10.0.0.2", "-c",
                                   "hba_file=/run/pg/pg_hba.conf"]
    assert "./db/pg:/run/pg:ro" in postgres["volumes"]
    named = yaml.safe_load(layout.render_compose("db1", ["db"], "db1.example.internal", 10001, PORTS))["services"]
    assert named["postgres"]["command"][2] == "listen_addresses=*", "a host name cannot be bound"


def hba_rules(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line and not line.startswith("#")]


def test_pg_hba_admits_the_db_host_the_app_hosts_and_named_clients_only_with_a_password():
    rules = hba_rules(layout.render_pg_hba("10.0.0.2", ["10.0.0.3", "10.0.0.4", "10.0.0.2"], ["192.168.5.0/24"]))
    assert rules == [
        ["local", "all", "all", "trust"],
        ["host", "all", "all", "127.0.0.1/32", "scram-sha-256"],
        ["host", "all", "all", "::1/128", "scram-sha-256"],
        ["host", "ingest", "all", "10.0.0.2/32", "scram-sha-256"],
        ["host", "ingest", "all", "10.0.0.3/32", "scram-sha-256"],
        ["host", "ingest", "all", "10.0.0.4/32", "scram-sha-256"],
        ["host", "ingest", "all", "192.168.5.0/24", "scram-sha-256"],
    ]
    assert not [r for r in rules if r[0] == "host" and r[3] in ("all", "0.0.0.0/0")], "nobody else"


def test_pg_hba_with_host_names_admits_any_address_and_says_why():
    text = layout.render_pg_hba("db1.example.internal", ["app2.example.internal"])
    assert ["host", "ingest", "all", "all", "scram-sha-256"] in hba_rules(text)
    assert "# db1.example.internal, app2.example.internal: host names, which pg_hba cannot pin" in text
