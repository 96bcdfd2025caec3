"""Inventories: validation with path-style errors, loading by name, and what the plain pyinfra CLI sees."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from ingestctl import inventory
from ingestctl.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

HOSTS = {
    "db1": {"ssh_hostname": "10.0.0.1", "roles": ["db", "app"]},
    "app2": {"ssh_hostname": "10.0.0.2", "ssh_port": 2222, "roles": ["app"]},
}


def make(**overrides):
    args = {"name": "staging", "data": {}, "hosts": HOSTS, "source": "inventories/staging.py"}
    args.update(overrides)
    return inventory.environment(**args)


def error_of(**overrides) -> str:
    with pytest.raises(ConfigError) as err:
        make(**overrides)
    return str(err.value)


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A throwaway checkout (inventories/ + service/) that ingestctl.paths.project_root() resolves to."""
    (tmp_path / "inventories").mkdir()
    (tmp_path / "service").mkdir()
    monkeypatch.setenv("INGESTCTL_ROOT", str(tmp_path))
    return tmp_path


def write_inventory(root: Path, name: str, body: str) -> Path:
    path = root / "inventories" / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


VALID = """
    from ingestctl.inventory import environment

    _env = environment(
        name="{name}",
        data={{"app_port": 8080, "config": {{"LOG_LEVEL": "debug"}}}},
        hosts={{
            "db1": {{"ssh_hostname": "10.0.0.1", "roles": ["db", "app"]}},
            "app2": {{"ssh_hostname": "10.0.0.2", "ssh_port": {port}, "roles": ["app"]}},
        }},
    )
    db = _env.group("db")
    app = _env.group("app")
"""


def test_defaults_and_merged_host_data():
    env = make()
    assert env.data.app_port == 8000
    assert env.data.postgres_image == "postgres:16" and env.data.redis_image == "redis:7"
    assert env.data.keep_releases == 5 and env.data.registry is None
    assert env.db_host == "db1" and env.app_hosts == ["db1", "app2"] and env.all_hosts == ["db1", "app2"]
    data = env.host_data("app2")
    assert data["env"] == "staging" and data["app_port"] == 8000
    assert data["ssh_hostname"] == "10.0.0.2" and data["ssh_port"] == 2222 and data["roles"] == ["app"]
    # Unset optional SSH keys are left out so pyinfra applies its own defaults.
    assert "ssh_user" not in data and "ssh_key" not in data and "registry" not in data


def test_proxy_client_limits_default_and_reach_the_run_context():
    from ingestctl.hostlayout import ClientLimits
    from ingestctl.runcontext import Context

    env = make()
    assert (env.data.proxy_limit_conn, env.data.proxy_limit_req_per_s, env.data.proxy_limit_req_burst) == (64, 200, 400)
    tuned = make(data={"proxy_limit_conn": 0, "proxy_limit_req_per_s": 50, "proxy_limit_req_burst": 10})
    ctx = Context(env=tuned, reporter=None, config=None, ports=None, who="unit@test")
    assert ctx.client_limits == ClientLimits(connections=0, requests_per_s=50, burst=10)


def test_groups_are_pyinfra_host_tuples():
    env = make()
    assert [name for name, _ in env.group("db")] == ["db1"]
    assert [name for name, _ in env.group("app")] == ["db1", "app2"]
    assert all(isinstance(data, dict) and data["env"] == "staging" for _, data in env.group("app"))
    with pytest.raises(ConfigError, match="unknown role 'web'"):
        env.group("web")


def test_sudo_becomes_pyinfra_global_argument():
    env = make(hosts={"db1": {"ssh_hostname": "h", "roles": ["db", "app"], "sudo": True, "ssh_user": "deploy"}})
    data = env.host_data("db1")
    assert data["_sudo"] is True and data["ssh_user"] == "deploy" and "sudo" not in data


def test_path_style_message_for_a_bad_port():
    hosts = {**HOSTS, "app2": {"ssh_hostname": "10.0.0.2", "ssh_port": "twenty-two", "roles": ["app"]}}
    assert error_of(hosts=hosts) == (
        "inventories/staging.py: hosts.app2.ssh_port: expected an integer, found 'twenty-two'"
    )


@pytest.mark.parametrize(
    ("hosts", "message"),
    [
        ({"db1": {"roles": ["db", "app"]}}, "hosts.db1.ssh_hostname: is required"),
        ({"db1": {"ssh_hostname": "h", "roles": []}}, "hosts.db1.roles: expected a non-empty value"),
        ({"db1": {"ssh_hostname": "h", "roles": ["db", "web"]}}, "hosts.db1.roles.1: expected one of db or app, found 'web'"),
        ({"db1": {"ssh_hostname": "h", "roles": ["db", "db", "app"]}}, "hosts.db1.roles: expected each role once"),
        ({"db1": {"ssh_hostname": "h", "roles": ["db", "app"], "ssh_prot": 22}},
         "hosts.db1.ssh_prot: unknown key; known keys: ssh_hostname, ssh_port"),
        ({"db1": {"ssh_hostname": "h", "roles": ["db", "app"], "ssh_port": 70000}},
         "hosts.db1.ssh_port: expected a value <= 65535, found 70000"),
        ({"db1": {"ssh_hostname": "h", "roles": ["db", "app"], "ssh_port": True}},
         "hosts.db1.ssh_port: expected a number, not True/False, found True"),
        ({"db1": "10.0.0.1"}, "hosts.db1: expected a dict of host data, found str"),
        ({}, "hosts: expected at least one host"),
        ({"app1": {"ssh_hostname": "h", "roles": ["app"]}},
         "hosts: expected exactly one host with role 'db', found 0 (none)"),
        ({"db1": {"ssh_hostname": "a", "roles": ["db"]}, "db2": {"ssh_hostname": "b", "roles": ["db", "app"]}},
         "hosts: expected exactly one host with role 'db', found 2 (db1, db2)"),
        ({"db1": {"ssh_hostname": "a", "roles": ["db"]}}, "hosts: expected at least one host with role 'app'"),
    ],
)
def test_host_errors(hosts, message):
    text = error_of(hosts=hosts)
    assert text.startswith("inventories/staging.py: ")
    assert message in text


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"app_port": "http"}, "data.app_port: expected an integer, found 'http'"),
        ({"keep_releases": 0}, "data.keep_releases: expected a value >= 1, found 0"),
        ({"max_error_ratio": 1.5}, "data.max_error_ratio: expected a value <= 1, found 1.5"),
        ({"max_p95_ms": "fast"}, "data.max_p95_ms: expected a number, found 'fast'"),
        ({"keep_relases": 3}, "data.keep_relases: unknown key; known keys: env, app_port"),
        ({"env": "prod"}, "data.env: expected 'staging' (the environment's name), found 'prod'"),
        ({"config": {"INGEST_MAX_BATCH_ITEMS": 0}},
         "data.config.INGEST_MAX_BATCH_ITEMS: expected an integer from 1 to 100000, found '0'"),
        ({"config": {"JWT_SECRET": "x" * 40}}, "data.config.JWT_SECRET: secrets do not belong in inventory config"),
        ({"db_clients": ["10.0.0.0/24", "bastion"]},
         "data.db_clients.1: expected an IP address or network such as 10.0.0.5 or 10.0.0.0/24, found 'bastion'"),
        ({"proxy_limit_conn": -1}, "data.proxy_limit_conn: expected a value >= 0, found -1"),
        ({"proxy_limit_conn": 70000}, "data.proxy_limit_conn: expected a value <= 65536, found 70000"),
        ({"proxy_limit_req_per_s": "fast"}, "data.proxy_limit_req_per_s: expected an integer, found 'fast'"),
        ({"proxy_limit_req_per_s": 2.5}, "data.proxy_limit_req_per_s: expected an integer, found 2.5"),
        ({"proxy_limit_req_burst": True}, "data.proxy_limit_req_burst: expected a number, not True/False, found True"),
    ],
)
def test_data_errors(data, message):
    assert message in error_of(data=data)


def test_every_problem_reported_one_per_line():
    hosts = {"db1": {"ssh_hostname": "h", "ssh_port": "x", "roles": ["db", "app"]},
             "app2": {"roles": ["app"]}}
    lines = error_of(hosts=hosts, data={"app_port": "y"}).splitlines()
    assert lines == [
        "inventories/staging.py: data.app_port: expected an integer, found 'y'",
        "inventories/staging.py: hosts.db1.ssh_port: expected an integer, found 'x'",
        "inventories/staging.py: hosts.app2.ssh_hostname: is required",
    ]


def test_environment_name_is_checked():
    assert "name: expected lower-case letters" in error_of(name="../etc")


def test_load_valid_inventory_and_secrets_path(checkout):
    write_inventory(checkout, "qa", VALID.format(name="qa", port=2201))
    env = inventory.load("qa")
    assert env.name == "qa" and env.source == "inventories/qa.py"
    assert env.hosts["app2"].ssh_port == 2201
    assert env.data.config == {"LOG_LEVEL": "DEBUG"}
    assert env.secrets_path() == checkout / "secrets" / "qa.env"


def test_load_reports_path_errors_from_the_file(checkout):
    write_inventory(checkout, "staging", VALID.format(name="staging", port='"twenty-two"'))
    with pytest.raises(ConfigError) as err:
        inventory.load("staging")
    assert str(err.value) == "inventories/staging.py: hosts.app2.ssh_port: expected an integer, found 'twenty-two'"


def test_load_unknown_env_lists_available(checkout):
    for name in ("local", "staging", "production"):
        write_inventory(checkout, name, VALID.format(name=name, port=22))
    (checkout / "inventories" / "_shared.py").write_text("")
    with pytest.raises(ConfigError) as err:
        inventory.load("qa")
    assert str(err.value) == "no inventory inventories/qa.py; available: local, production, staging"
    with pytest.raises(ConfigError, match="environment name: expected lower-case"):
        inventory.load("../secrets")


def test_load_rejects_mismatched_name_and_missing_groups(checkout):
    write_inventory(checkout, "qa", VALID.format(name="staging", port=22))
    with pytest.raises(ConfigError, match=r"inventories/qa.py: name: expected 'qa' \(the file's name\), found 'staging'"):
        inventory.load("qa")
    write_inventory(checkout, "qa", VALID.format(name="qa", port=22).replace('app = _env.group("app")', ""))
    with pytest.raises(ConfigError, match=r"inventories/qa.py: app: expected `app = <environment>.group\('app'\)`"):
        inventory.load("qa")
    write_inventory(checkout, "qa", "db = ['h1']\n")
    with pytest.raises(ConfigError, match=r"expected exactly one environment\(...\) call, found 0"):
        inventory.load("qa")


def test_load_wraps_broken_python(checkout):
    write_inventory(checkout, "qa", "hosts = [\n")
    with pytest.raises(ConfigError, match=r"inventories/qa.py: could not be loaded: SyntaxError"):
        inventory.load("qa")


def test_secrets_file_data_relative_and_absolute(checkout):
    env = make(data={"secrets_file": "ops/staging.env"})
    assert env.secrets_path() == checkout / "ops" / "staging.env"
    env = make(data={"secrets_file": "/etc/ingestctl/staging.env"})
    assert env.secrets_path() == Path("/etc/ingestctl/staging.env")


@pytest.mark.parametrize("name", ["staging", "production"])
def test_shipped_example_inventories_load(name, monkeypatch):
    monkeypatch.setenv("INGESTCTL_ROOT", str(REPO))
    env = inventory.load(name)
    assert env.name == name and len(env.app_hosts) >= 2
    assert env.data.postgres_image == "postgres:16" and env.data.redis_image == "redis:7"


PYINFRA_LOADER = """
import json, sys
from pyinfra.api.inventory import Inventory
from pyinfra.api.state import State
from pyinfra.context import ctx_state
from pyinfra_cli.inventory import make_inventory_from_files
with ctx_state.use(State(Inventory(([], {})))):
    inventory = make_inventory_from_files(sys.argv[1])
print(json.dumps({
    "groups": {g: sorted(h.name for h in inventory.get_group(g)) for g in ("db", "app")},
    "data": {h.name: h.data.dict() for h in inventory},
}, default=str))
"""


def test_plain_pyinfra_cli_sees_groups_and_env_data(monkeypatch):
    """The same file through pyinfra's own inventory-file loader, as `pyinfra inventories/staging.py ...` runs it.

    In a subprocess: importing pyinfra_cli monkey-patches the interpreter with gevent.
    """
    path = REPO / "inventories" / "staging.py"
    done = subprocess.run([sys.executable, "-c", PYINFRA_LOADER, str(path)], capture_output=True, text=True,
                          timeout=60, check=False, env={"INGESTCTL_ROOT": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    monkeypatch.setenv("INGESTCTL_ROOT", str(REPO))
    staging = inventory.load("staging")
    assert seen["groups"] == {"db": [staging.db_host], "app": sorted(staging.app_hosts)}
    for name in staging.all_hosts:
        data = seen["data"][name]
        assert data["env"] == "staging"
        assert data["app_port"] == staging.data.app_port
        assert data["ssh_hostname"] == staging.hosts[name].ssh_hostname
        assert data["roles"] == list(staging.hosts[name].roles)
        assert data["config"] == staging.data.config
        assert data == staging.host_data(name)


@pytest.mark.parametrize("env_name", ["staging", "production"])
def test_shipped_remote_inventories_pin_host_keys(env_name, monkeypatch):
    monkeypatch.setenv("INGESTCTL_ROOT", str(REPO))
    env = inventory.load(env_name)
    for name, spec in env.hosts.items():
        assert spec.ssh_strict_host_key_checking == "yes", f"{env_name} {name} trusts new host keys"
        assert spec.ssh_known_hosts_file and "ingest" in spec.ssh_known_hosts_file, f"{env_name} {name}"


def test_local_inventory_reads_the_testbed_state(checkout, monkeypatch):
    """inventories/local.py (the real file) against a synthetic testbed state: no sandbox needed."""
    import shutil

    shutil.copy(REPO / "inventories" / "local.py", checkout / "inventories" / "local.py")
    state_dir = checkout / ".testbed" / "tb-unit"
    state_dir.mkdir(parents=True)
    hosts = [{"name": "db1", "address": "172.30.0.2", "ssh_port": 22, "roles": ["db", "app"]},
             {"name": "app2", "address": "172.30.0.3", "ssh_port": 22, "roles": ["app"]},
             {"name": "app3", "address": "172.30.0.4", "ssh_port": 22, "roles": ["app"]}]
    (state_dir / "state.json").write_text(json.dumps({
        "name": "tb-unit", "network": "tb-unit-net", "storage_driver": "vfs", "security_mode": "explicit",
        "ssh_user": "root", "ssh_key": str(checkout / ".testbed" / "id_ed25519"), "hosts": hosts,
        "gateway": "172.30.0.1",
    }))
    monkeypatch.setenv("INGESTCTL_TESTBED", "tb-unit")
    env = inventory.load("local")
    assert env.db_host == "db1" and env.app_hosts == ["db1", "app2", "app3"]
    data = env.host_data("app3")
    assert data["ssh_hostname"] == "172.30.0.4" and data["ssh_user"] == "root"
    assert data["ssh_strict_host_key_checking"] == "no" and data["ssh_allow_agent"] is False
    # The sandbox cannot pull official images, so local.py names the ones it builds.
    assert data["postgres_image"] != "postgres:16"
    # PostgreSQL admits this machine (the sandbox's gateway) besides the hosts: the benchmarks count events.
    assert env.data.db_clients == ["172.30.0.1"]
    assert_sandbox_proxy_admits_the_test_loads(env)

    monkeypatch.setenv("INGESTCTL_TESTBED", "tb-missing")
    with pytest.raises(ConfigError, match="is not up .* run `INGESTCTL_TESTBED=tb-missing ingestctl testbed up`"):
        inventory.load("local")


def assert_sandbox_proxy_admits_the_test_loads(env) -> None:
    """Every sandbox client is this one machine, one address to the proxy: its loads must never be throttled.

    At once on one host: bench/load.py's workers (the zero-downtime bench, e2e loads), the benchmark gate's
    concurrency and the metric gate's probe. Per second: no more than the api's own per-key limit, which the
    sandbox raises for those loads (RATE_LIMIT_PER_MINUTE), so the proxy must allow at least as much.
    """
    import importlib.util
    import inspect

    from ingest.tools.query_benchmark import PROFILES

    spec = importlib.util.spec_from_file_location("bench_load", REPO / "bench" / "load.py")
    load = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = load  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(load)
    finally:
        del sys.modules[spec.name]
    workers = inspect.signature(load.Load).parameters["workers"].default
    at_once = workers + PROFILES[env.data.bench_profile].concurrency + 1
    assert env.data.proxy_limit_conn >= at_once, f"{env.data.proxy_limit_conn} at once < the loads' {at_once}"
    per_second = int(env.data.config["RATE_LIMIT_PER_MINUTE"]) / 60
    assert env.data.proxy_limit_req_per_s >= per_second and env.data.proxy_limit_req_burst >= per_second
