"""The switch owns the proxy's config: `release_live` renders it with the body limit of the config version it
puts live (read on the host), reloads only when that config changes, and re-applies changed inventory limits to
a host already on the release. A fake host answers the facts; the commands are the real ones."""

from __future__ import annotations

import re
from functools import partial
from types import SimpleNamespace

import pytest
import release_fakes
from ingestctl import hostlayout as layout
from ingestctl.operations import release as ops
from release_fakes import IMAGE_ID, live_state, put

PORTS = layout.Ports(public=8000)
CLIENTS = layout.ClientLimits(connections=64, requests_per_s=200, burst=400)
OLD, NEW = "aaaaaaaaaaaa", "bbbbbbbbbbbb"
LIMITS = {OLD: 1048576, NEW: 4096, layout.EMPTY_CONFIG: 1048576}
FakeHost = partial(release_fakes.FakeHost, limits=LIMITS)


@pytest.fixture
def run(monkeypatch):
    monkeypatch.setattr(ops, "files", SimpleNamespace(put=SimpleNamespace(_inner=put)))

    def run(fake: release_fakes.FakeHost, config_version: str, clients: layout.ClientLimits = CLIENTS, **kwargs) -> list[str]:
        monkeypatch.setattr(ops, "host", fake)
        return [str(c) for c in ops.release_live._inner(
            release="v1", image="ingest:v1", image_id=IMAGE_ID, config_version=config_version, infra_images={},
            ports=PORTS, clients=clients, **kwargs)]

    return run


def proxy_puts(commands: list[str]) -> list[str]:
    return [c for c in commands if c.startswith(f"put {ops.PROXY_CONF}\n")]


def body_limit_of(conf: str) -> int:
    return int(re.search(r"client_max_body_size (\d+);", conf).group(1))


def test_a_config_switch_gives_the_proxy_the_new_versions_body_limit_in_the_same_reload(run):
    fake = FakeHost(live_state(OLD), proxy_conf=layout.render_proxy(["blue"], [], PORTS, LIMITS[OLD], CLIENTS))
    commands = run(fake, NEW)
    [conf] = proxy_puts(commands)
    assert body_limit_of(conf) == 4096 and "server 127.0.0.1:8002 max_fails=0;" in conf
    assert fake.limits_read[-1] == NEW
    reloads = [i for i, c in enumerate(commands) if "nginx -c /etc/ingest-proxy/nginx.conf -s reload" in c]
    assert len(reloads) == 1, "one graceful reload per switch"
    assert commands.index(next(c for c in commands if c.startswith(f"put {ops.PROXY_CONF}"))) < reloads[0]
    assert any("ready" in c for c in commands[:reloads[0]]), "the new slot is ready before the proxy moves"


def test_a_rollback_to_the_warm_standby_restores_its_config_versions_limit(run):
    standby = {"release": "v1", "image": "ingest:v1", "image_id": IMAGE_ID, "config_version": OLD,
               "schema_head": "0001", "slot": "blue"}
    fake = FakeHost(live_state(NEW, slot="green", standby=standby),
                    proxy_conf=layout.render_proxy(["green"], [], PORTS, LIMITS[NEW], CLIENTS),
                    running={"api_blue": "ingest:v1", "api_green": "ingest:v1"})
    commands = run(fake, OLD)
    [conf] = proxy_puts(commands)
    assert body_limit_of(conf) == 1048576 and "server 127.0.0.1:8001 max_fails=0;" in conf
    assert not any("--force-recreate api_" in c for c in commands), "the standby runs already: only the proxy moves"


def test_a_host_already_live_with_its_proxy_as_wanted_is_a_noop_without_a_reload(run):
    fake = FakeHost(live_state(NEW), proxy_conf=layout.render_proxy(["blue"], [], PORTS, LIMITS[NEW], CLIENTS))
    assert run(fake, NEW) == []
    assert fake.noops == ["ingest v1 with config bbbbbbbbbbbb is already live in slot blue"]


def test_changed_inventory_limits_reach_a_host_already_live_with_one_reload_and_no_switch(run):
    fake = FakeHost(live_state(NEW), proxy_conf=layout.render_proxy(["blue"], [], PORTS, LIMITS[NEW], CLIENTS))
    tighter = layout.ClientLimits(connections=8, requests_per_s=20, burst=10)
    commands = run(fake, NEW, clients=tighter)
    [conf] = proxy_puts(commands)
    assert "limit_conn ingest_conn 8;" in conf and body_limit_of(conf) == 4096
    assert "server 127.0.0.1:8001 max_fails=0;" in conf, "traffic stays on the live slot"
    assert len(commands) == 2 and "-s reload" in commands[1]
    assert not any(layout.STATE_FILE in c or "--force-recreate api_" in c for c in commands)
    assert fake.noops == []
