"""The switch owns the proxy: `release_live` moves traffic by flipping the proxy's routes (symlinks), writes the
proxy's config only when its settings change (the body limit of the config version it puts live, read on the
host; the inventory's limits), and reloads nginx only then. A fake host answers the facts; the commands are the
real ones."""

from __future__ import annotations

import re
import subprocess
from functools import partial
from types import SimpleNamespace

import pytest
import release_fakes
from ingestctl import hostlayout as layout
from ingestctl.operations import release as ops
from ingestctl.reconcile import Routing
from release_fakes import IMAGE_ID, live_state, put, steps

PORTS = layout.Ports(public=8000)
CLIENTS = layout.ClientLimits(connections=64, requests_per_s=200, burst=400)
OLD, NEW = "aaaaaaaaaaaa", "bbbbbbbbbbbb"
LIMITS = {OLD: 1048576, NEW: 4096, layout.EMPTY_CONFIG: 1048576}
FakeHost = partial(release_fakes.FakeHost, limits=LIMITS)
RELOAD = "nginx -c /etc/ingest-proxy/nginx.conf -s reload"


@pytest.fixture
def run(monkeypatch):
    monkeypatch.setattr(ops, "files", SimpleNamespace(put=SimpleNamespace(_inner=put)))

    def run(fake: release_fakes.FakeHost, config_version: str, clients: layout.ClientLimits = CLIENTS,
            **kwargs) -> list[str]:
        monkeypatch.setattr(ops, "host", fake)
        return steps(ops.release_live._inner(
            release="v1", image="ingest:v1", image_id=IMAGE_ID, config_version=config_version, infra_images={},
            ports=PORTS, clients=clients, **kwargs))

    return run


def proxy_puts(commands: list[str]) -> list[str]:
    return [c for c in commands if c.startswith(f"put {ops.PROXY_CONF}\n")]


def body_limit_of(conf: str) -> int:
    return int(re.search(r"client_max_body_size (\d+);", conf).group(1))


def index_of(commands: list[str], needle: str) -> int:
    return next(i for i, c in enumerate(commands) if needle in c)


def test_a_release_switch_flips_the_routes_without_a_reload(run):
    fake = FakeHost(live_state(OLD), proxy_conf=layout.render_proxy(PORTS, LIMITS[OLD], CLIENTS),
                    running={"api_blue": "ingest:v0"})
    fake.state["release"], fake.state["image_id"] = "v0", "sha256:" + "0" * 64
    commands = run(fake, OLD)
    assert proxy_puts(commands) == [], "the proxy's settings did not change"
    assert not any(RELOAD in c for c in commands), "no reload: kept-alive client connections stay open"
    flip = index_of(commands, "mv -Tf .live.sock.new live.sock")
    assert layout.route_proxy("green") in commands[flip]
    assert index_of(commands, "ready") < flip, "the new slot is ready before the proxy moves"
    assert flip < index_of(commands, layout.STATE_FILE), "state.json follows the routes"


def test_a_config_switch_gives_the_proxy_the_new_versions_body_limit_in_one_reload_after_the_flip(run):
    fake = FakeHost(live_state(OLD), proxy_conf=layout.render_proxy(PORTS, LIMITS[OLD], CLIENTS))
    commands = run(fake, NEW)
    [conf] = proxy_puts(commands)
    assert body_limit_of(conf) == 4096
    assert fake.limits_read[-1] == NEW
    reloads = [i for i, c in enumerate(commands) if RELOAD in c]
    assert len(reloads) == 1, "one graceful reload, for the body limit"
    assert commands.index(conf) < index_of(commands, "mv -Tf .live.sock.new") < reloads[0]


def test_a_rollback_to_the_warm_standby_is_a_flip_and_restores_its_config_versions_limit(run):
    standby = {"release": "v1", "image": "ingest:v1", "image_id": IMAGE_ID, "config_version": OLD,
               "schema_head": "0001", "slot": "blue"}
    fake = FakeHost(live_state(NEW, slot="green", standby=standby),
                    proxy_conf=layout.render_proxy(PORTS, LIMITS[NEW], CLIENTS),
                    running={"api_blue": "ingest:v1", "api_green": "ingest:v1"})
    commands = run(fake, OLD)
    [conf] = proxy_puts(commands)
    assert body_limit_of(conf) == 1048576
    assert layout.route_proxy("blue") in commands
    assert not any("--force-recreate api_" in c for c in commands), "the standby runs already: only the proxy moves"


def test_a_switch_to_the_warm_standby_is_one_command_after_its_facts(monkeypatch):
    """Same proxy settings, standby warm: the readiness wait, the flip and its record go in one round trip, in
    that order, and the first that fails stops the rest."""
    standby = {"release": "v1", "image": "ingest:v1", "image_id": IMAGE_ID, "config_version": OLD,
               "schema_head": "0001", "slot": "blue"}
    fake = FakeHost(live_state(NEW, slot="green", standby=standby),
                    proxy_conf=layout.render_proxy(PORTS, LIMITS[OLD], CLIENTS),
                    running={"api_blue": "ingest:v1", "api_green": "ingest:v2"})
    monkeypatch.setattr(ops, "host", fake)
    [command] = list(ops.release_live._inner(release="v1", image="ingest:v1", image_id=IMAGE_ID, config_version=OLD,
                                             infra_images={}, ports=PORTS, clients=CLIENTS))
    parts = steps([command])
    ready, flip, state = (index_of(parts, "/health/ready"), parts.index(layout.route_proxy("blue")),
                          index_of(parts, layout.STATE_FILE))
    assert ready < flip < state
    assert command == layout.in_one_round(*parts)


@pytest.mark.parametrize("proxy_running", [True, False])
def test_a_switch_starts_the_proxy_only_where_its_facts_found_it_stopped(run, proxy_running):
    """The proxy's container state comes from the switch's facts (RunningServices), not from a `docker ps` of
    its own after the flip: a stopped proxy is started, a running one is left alone."""
    running = {"api_blue": "ingest:v0", **({"proxy": "ingest-proxy:1"} if proxy_running else {})}
    fake = FakeHost(live_state(OLD), proxy_conf=layout.render_proxy(PORTS, LIMITS[OLD], CLIENTS), running=running)
    fake.state["release"], fake.state["image_id"] = "v0", "sha256:" + "0" * 64
    commands = run(fake, OLD)
    checked = any("com.docker.compose.service=proxy" in c for c in commands)
    assert checked is not proxy_running, commands


def test_a_warm_switch_handed_the_lock_rounds_facts_reads_nothing_and_does_the_same(monkeypatch):
    """A warm rollback's switch takes the facts the lock's round read (`handed_switch` of `switch_ahead()`, every
    config version's body limit among them): no fact is read, and the command is the one a read would give."""
    from ingestctl.facts import together
    from ingestctl.facts.proxy import ConfigBodyLimits
    from ingestctl.facts.together import HostFacts, fact_key, wanted_key

    standby = {"release": "v1", "image": "ingest:v1", "image_id": IMAGE_ID, "config_version": OLD,
               "schema_head": "0001", "slot": "blue"}
    fake = FakeHost(live_state(NEW, slot="green", standby=standby),
                    proxy_conf=layout.render_proxy(PORTS, LIMITS[OLD], CLIENTS),
                    running={"api_blue": "ingest:v1", "api_green": "ingest:v2", "proxy": "ingest-proxy:1"})
    monkeypatch.setattr(ops, "host", fake)

    def switch() -> list[str]:
        return list(ops.release_live._inner(release="v1", image="ingest:v1", image_id=IMAGE_ID, config_version=OLD,
                                            infra_images={}, ports=PORTS, clients=CLIENTS))

    read_itself = switch()
    lock_round = HostFacts(fake)
    for wanted in ops.switch_ahead():
        cls, kwargs = wanted_key(wanted)
        if cls is not ConfigBodyLimits:
            lock_round.values[(cls, kwargs)] = fake.get_fact(cls, **dict(kwargs))
    lock_round.values[fact_key(ConfigBodyLimits, {})] = ConfigBodyLimits().process(
        [f"{OLD} MAX_REQUEST_BODY_BYTES={LIMITS[OLD]}", f"{NEW} MAX_REQUEST_BODY_BYTES={LIMITS[NEW]}"])
    together.hand_over("app2", ops.handed_switch(lock_round, OLD))
    reads = []
    monkeypatch.setattr(fake, "get_fact", lambda fact, **kwargs: reads.append(fact.__name__))
    try:
        assert switch() == read_itself
    finally:
        together.forget_handed()
    assert reads == []


def test_steps_in_one_round_run_in_order_each_in_its_own_directory_and_stop_at_the_first_failure(tmp_path):
    command = layout.in_one_round(f"cd {tmp_path} && echo one > a", "pwd", "false", "echo never")
    done = subprocess.run(["sh", "-c", command], cwd="/", capture_output=True, text=True, check=False)
    assert (tmp_path / "a").read_text() == "one\n"
    assert done.stdout == "/\n", "a cd in one step moved the next"
    assert done.returncode == 1


def test_a_standby_started_before_the_slots_had_sockets_is_recreated_not_routed_to(run):
    """After the upgrade to routed slots, the old standby container serves no socket: a rollback to it must start
    it afresh, or the flip would send every request to a path nothing listens on."""
    standby = {"release": "v1", "image": "ingest:v1", "image_id": IMAGE_ID, "config_version": OLD,
               "schema_head": "0001", "slot": "blue"}
    fake = FakeHost(live_state(NEW, slot="green", standby=standby),
                    proxy_conf=layout.render_proxy(PORTS, LIMITS[OLD], CLIENTS),
                    running={"api_blue": "ingest:v1", "api_green": "ingest:v1"})
    fake.sockets = frozenset({"green"})
    commands = run(fake, OLD)
    assert index_of(commands, "--force-recreate api_blue") < index_of(commands, layout.route_proxy("blue"))


def test_a_host_already_live_with_its_proxy_as_wanted_is_a_noop_without_a_reload(run):
    fake = FakeHost(live_state(NEW), proxy_conf=layout.render_proxy(PORTS, LIMITS[NEW], CLIENTS))
    assert run(fake, NEW) == []
    assert fake.noops == ["ingest v1 with config bbbbbbbbbbbb is already live in slot blue"]


def test_changed_inventory_limits_reach_a_host_already_live_with_one_reload_and_no_switch(run):
    fake = FakeHost(live_state(NEW), proxy_conf=layout.render_proxy(PORTS, LIMITS[NEW], CLIENTS))
    tighter = layout.ClientLimits(connections=8, requests_per_s=20, burst=10)
    commands = run(fake, NEW, clients=tighter)
    [conf] = proxy_puts(commands)
    assert "limit_conn ingest_conn 8;" in conf and body_limit_of(conf) == 4096
    assert len(commands) == 2 and RELOAD in commands[1]
    assert not any(layout.STATE_FILE in c or "--force-recreate api_" in c or ".live.sock.new" in c for c in commands)
    assert fake.noops == []


def test_a_live_host_without_routes_gets_them_before_its_new_config_is_loaded(run):
    """A host upgraded from a proxy that named the slot in its config: routes first, then the reload, so nginx
    never runs a config whose routes do not exist."""
    fake = FakeHost(live_state(NEW), proxy_conf="an older template", routing=None)
    commands = run(fake, NEW)
    assert index_of(commands, layout.route_proxy("blue")) < index_of(commands, RELOAD)
    assert not any(layout.STATE_FILE in c for c in commands)


def test_a_half_switched_host_is_routed_whole_reloaded_and_recorded(run):
    """The routes already point at the release wanted (state.json was never written): nothing restarts."""
    state = {**live_state(OLD), "release": "v0", "image": "ingest:v0", "image_id": "sha256:" + "0" * 64}
    routed = Routing(live="green", canary="green",
                     slot_env={"green": layout.slot_env("green", "ingest:v1", "v1", NEW)})
    fake = FakeHost(state, proxy_conf=layout.render_proxy(PORTS, LIMITS[NEW], CLIENTS), routing=routed)
    fake.image_ids = {"ingest:v1": IMAGE_ID}
    commands = run(fake, NEW)
    assert layout.route_proxy("green") in commands and any(RELOAD in c for c in commands)
    assert not any("--force-recreate" in c or "stop" in c for c in commands)
    assert '"slot": "green"' in commands[-1] and layout.STATE_FILE in commands[-1]


def test_routes_are_symlinks_replaced_by_rename_canary_first():
    command = layout.route_proxy("green", canary="blue")
    assert command == ("cd /opt/ingest/proxy && "
                       "ln -sfn /run/ingest-slots/blue.sock .canary.sock.new && mv -Tf .canary.sock.new canary.sock && "
                       "ln -sfn /run/ingest-slots/green.sock .live.sock.new && mv -Tf .live.sock.new live.sock")
    with pytest.raises(ValueError, match="slot: expected one of"):
        layout.route_proxy("green; rm -rf /")


def test_the_lock_rounds_read_for_a_rollback_holds_every_fact_the_switch_reads_for_any_version():
    """`switch_ahead()` is derived from `switch_fact_list`: every switch fact, with every config version's body
    limit in place of one version's, so a fact added to the switch cannot be missed by the lock's round."""
    from ingestctl.facts.proxy import ConfigBodyLimit, ConfigBodyLimits
    from ingestctl.facts.together import wanted_key

    ahead = {wanted_key(w) for w in ops.switch_ahead()}
    for wanted in ops.switch_fact_list(OLD):
        cls, kwargs = wanted_key(wanted)
        assert (ConfigBodyLimits, ()) in ahead if cls is ConfigBodyLimit else (cls, kwargs) in ahead
    assert not any(cls is ConfigBodyLimit for cls, _ in ahead)
