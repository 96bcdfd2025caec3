"""The weighted canary: the proxy config it renders, the switch operations around it on a fake host (the commands
are the real ones), the plan --dry prints, and the inventory's `canary_weight` checked at the edge."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
from ingestctl import config, hostlayout, inventory, migrations, plan
from ingestctl import hostlayout as layout
from ingestctl.errors import ConfigError
from ingestctl.facts.release import checked_state
from ingestctl.operations import release as ops
from release_fakes import IMAGE_ID, FakeHost, live_state, put, steps

FIXTURES = Path(__file__).parent / "fixtures" / "alembic_versions"
SECRETS = {"POSTGRES_PASSWORD": "pg-0123456789abcdef", "API_KEY": "key-0123456789abcdef01",
           "JWT_SECRET": "jwt-" + "q" * 40}
PORTS = layout.Ports(public=8000)
CLIENTS = layout.ClientLimits(connections=64, requests_per_s=200, burst=400)
OLD = "aaaaaaaaaaaa"
V2_ID = "sha256:" + "2" * 64
HOSTS = {"db1": ["db", "app"], "app2": ["app"], "app3": ["app"]}


RELOAD = "nginx.conf -s reload"


def upstream(conf: str, name: str) -> list[str]:
    block = re.search(r"upstream " + name + r" \{(.*?)\n    \}", conf, re.S).group(1)
    return re.findall(r"^\s*(server .*);$", block, re.M)


# --- the proxy config -----------------------------------------------------------------------------------


def test_a_canary_weight_sends_its_share_to_the_canary_route_and_the_rest_to_the_live_one():
    conf = layout.render_proxy(PORTS, 65536, CLIENTS, canary_weight=10)
    assert upstream(conf, "ingest_api") == ["server unix:/etc/ingest-proxy/live.sock weight=90 max_fails=0",
                                            "server unix:/etc/ingest-proxy/canary.sock weight=10 max_fails=0",
                                            "server unix:/etc/ingest-proxy/live.sock max_fails=0 backup"]
    assert upstream(conf, "ingest_canary") == ["server unix:/etc/ingest-proxy/canary.sock max_fails=0"]


def test_the_gate_reaches_the_canary_route_alone_by_header_and_metrics_are_the_canary_routes():
    conf = layout.render_proxy(PORTS, 65536, CLIENTS, canary_weight=10)
    variable = "$http_" + hostlayout.CANARY_HEADER.lower().replace("-", "_")
    assert re.search(r"map " + re.escape(variable) + r" \$ingest_upstream \{\s*\"1\" ingest_canary;\s*"
                     r"default ingest_api;", conf)
    metrics = re.search(r"location = /metrics \{(.*?)\}", conf, re.S).group(1)
    assert "proxy_pass http://ingest_canary;" in metrics
    main = re.search(r"location / \{(.*?)\n        \}", conf, re.S).group(1)
    assert "proxy_pass http://$ingest_upstream;" in main


def test_a_whole_host_canary_has_no_weights():
    conf = layout.render_proxy(PORTS, 65536, CLIENTS)
    assert "weight=" not in conf
    assert upstream(conf, "ingest_api") == ["server unix:/etc/ingest-proxy/live.sock max_fails=0",
                                            "server unix:/etc/ingest-proxy/live.sock max_fails=0 backup"]


@pytest.mark.parametrize("weight", [0, 101, True, "10"])
def test_a_weight_nginx_cannot_take_is_refused(weight):
    with pytest.raises(ValueError, match="proxy canary weight: expected an integer from 1 to 100"):
        layout.render_proxy(PORTS, 65536, CLIENTS, canary_weight=weight)


# --- the operations -------------------------------------------------------------------------------------


@pytest.fixture
def ops_host(monkeypatch):
    monkeypatch.setattr(ops, "files", SimpleNamespace(put=SimpleNamespace(_inner=put)))

    def use(fake: FakeHost) -> FakeHost:
        monkeypatch.setattr(ops, "host", fake)
        return fake

    return use


V2 = dict(release="v2", image="ingest:v2", image_id=V2_ID, config_version=OLD, infra_images={}, ports=PORTS,
          clients=CLIENTS, canary_weight=10)
WEIGHTED = layout.render_proxy(PORTS, 65536, CLIENTS, canary_weight=10)


def written_state(commands: list[str]) -> dict:
    [write] = [c for c in commands if c.startswith("printf") and layout.STATE_FILE in c]
    return json.loads(shlex.split(write)[2])


def test_the_canary_starts_the_new_slot_then_flips_the_canary_route_and_records_itself(ops_host):
    ops_host(FakeHost(live_state(OLD), proxy_conf=WEIGHTED))
    commands = steps(ops.release_canary._inner(**V2))
    starts = [i for i, c in enumerate(commands) if "--force-recreate api_green" in c]
    [flip] = [i for i, c in enumerate(commands) if c == layout.route_proxy("blue", canary="green")]
    assert starts and starts[0] < flip, "the new slot runs and is ready before it gets a share"
    assert not any(RELOAD in c for c in commands), "the weights are in place already: no reload"
    state = written_state(commands)
    assert state["slot"] == "blue" and state["release"] == "v1", "the previous release stays the live one"
    assert state["canary"] == {"release": "v2", "image": "ingest:v2", "image_id": V2_ID, "config_version": OLD,
                               "slot": "green", "weight": 10}
    assert checked_state(state)["canary"]["slot"] == "green", "the fact keeps the canary"


def test_a_canary_on_a_proxy_without_the_weights_puts_them_and_reloads(ops_host):
    ops_host(FakeHost(live_state(OLD), proxy_conf=layout.render_proxy(PORTS, 65536, CLIENTS)))
    commands = steps(ops.release_canary._inner(**V2))
    [conf] = [c for c in commands if c.startswith(f"put {ops.PROXY_CONF}")]
    assert "weight=10" in conf and "weight=90" in conf
    assert any(RELOAD in c for c in commands)


def test_a_canary_in_the_standbys_slot_retires_the_standby_from_state_json(ops_host):
    older = {"release": "v0", "image": "ingest:v0", "image_id": "sha256:" + "0" * 64, "config_version": OLD,
             "slot": "green"}
    ops_host(FakeHost({**live_state(OLD), "standby": older}, proxy_conf=WEIGHTED,
                      running={"api_blue": "ingest:v1", "api_green": "ingest:v0"}))
    state = written_state(steps(ops.release_canary._inner(**V2)))
    assert state["standby"] is None and state["canary"]["slot"] == "green"


@pytest.mark.parametrize(("state", "why"), [(None, "no trusted live release"),
                                            ("live v2", "already live: no canary")])
def test_no_canary_without_a_previous_release_or_when_the_release_is_live(ops_host, state, why):
    if state == "live v2":
        state = {**live_state(OLD), "release": "v2", "image": "ingest:v2", "image_id": V2_ID}
    fake = ops_host(FakeHost(state))
    assert list(ops.release_canary._inner(**V2)) == []
    assert why in fake.noops[0]


def canary_host() -> dict:
    state = live_state(OLD)
    state["slots"]["green"] = layout.slot_env("green", "ingest:v2", "v2", OLD)
    return {**state, "canary": {"release": "v2", "image": "ingest:v2", "image_id": V2_ID, "config_version": OLD,
                                "slot": "green"}}


def test_the_full_switch_after_the_gates_keeps_the_canarys_slot_running(ops_host):
    ops_host(FakeHost(canary_host(), proxy_conf=WEIGHTED, running={"api_blue": "ingest:v1", "api_green": "ingest:v2"}))
    commands = steps(ops.release_live._inner(**V2))
    assert not any("--force-recreate" in c for c in commands), "recreating it would drop the canary's requests"
    assert layout.route_proxy("green") in commands and not any(RELOAD in c for c in commands)
    state = written_state(commands)
    assert state["slot"] == "green" and state["release"] == "v2" and "canary" not in state
    assert state["standby"]["slot"] == "blue" and state["standby"]["release"] == "v1"


def test_a_failed_canary_goes_back_to_the_previous_slot_alone_and_is_removed(ops_host):
    ops_host(FakeHost(canary_host(), proxy_conf=WEIGHTED, running={"api_blue": "ingest:v1", "api_green": "ingest:v2"}))
    commands = steps(ops.release_live._inner(
        release="v1", image="ingest:v1", image_id=IMAGE_ID, config_version=OLD, infra_images={}, ports=PORTS,
        clients=CLIENTS, canary_weight=10, clear_failed_idle=True, keep_standby=False))
    flip = commands.index(layout.route_proxy("blue"))
    stop_at = next(i for i, c in enumerate(commands) if "stop -t 1 api_green" in c)
    assert flip < stop_at, "the proxy leaves the canary's slot before it stops"
    assert not any(RELOAD in c for c in commands)
    state = written_state(commands)
    assert "canary" not in state and state["slot"] == "blue" and state["release"] == "v1"


# --- the plan ---------------------------------------------------------------------------------------------


def weighted_plan(weight: int, previous_release: str | None, revisions=None, **more) -> plan.DeployPlan:
    env = inventory.environment(name="local", source="", data={"canary_weight": weight},
                                hosts={h: {"ssh_hostname": h, "roles": roles} for h, roles in HOSTS.items()})
    cfg = config.ServiceConfig.build({}, SECRETS)
    return plan.build_deploy_plan(env=env, release="v2", image="ingest:v2", batch_spec=None, old_config=None,
                                  new_config=dict(cfg.tunables), config_version=cfg.version,
                                  previous_config_version=None,
                                  revisions=revisions if revisions is not None else [],
                                  db_head=None, previous_release=previous_release, **more)


def test_dry_shows_the_weighted_canary_on_the_first_batch_only():
    deploy = weighted_plan(10, "v1")
    lines = deploy.render()
    assert ("  batch 1 of 2: app2 (canary: 10% of their traffic to v2, the rest on v1, until the gates pass; "
            "then all)") in lines
    assert "  batch 2 of 2: app3, db1" in lines
    assert deploy.as_event()["canary_weight"] == 10


def test_a_whole_host_canary_renders_as_before():
    lines = weighted_plan(100, "v1").render()
    assert "  batch 1 of 2: app2" in lines and not any("canary" in line for line in lines)


def test_a_first_deploy_has_nothing_to_share_the_traffic_with():
    assert weighted_plan(10, None).canary_weight == 100


def test_an_incompatible_migration_switches_in_one_batch_without_a_canary():
    revisions = migrations.load_revisions(FIXTURES)
    forced = weighted_plan(10, "v1", revisions=revisions, allow_incompatible=True)
    assert forced.batches == [["app2", "app3", "db1"]] and forced.canary_weight == 100


@pytest.mark.parametrize(("value", "found"), [(0, "expected a value >= 1, found 0"),
                                              (101, "expected a value <= 100, found 101"),
                                              ("ten", "expected an integer, found 'ten'"),
                                              (True, "found True")])
def test_the_inventory_refuses_a_weight_outside_1_to_100(value, found):
    with pytest.raises(ConfigError) as refused:
        inventory.environment(name="local", source="", data={"canary_weight": value},
                              hosts={"db1": {"ssh_hostname": "a", "roles": ["db", "app"]}})
    assert "canary_weight" in str(refused.value) and found in str(refused.value)


def test_the_default_is_the_whole_host():
    env = inventory.environment(name="local", source="", hosts={"db1": {"ssh_hostname": "a", "roles": ["db", "app"]}})
    assert env.data.canary_weight == 100
