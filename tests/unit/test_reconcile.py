"""A half-switched host (proxy moved, state.json not written) is seen as what it really serves."""

import subprocess

from ingestctl import hostlayout as layout
from ingestctl.facts.proxy import ProxyRouting
from ingestctl.reconcile import effective_state, parse_routing, routed_slot

STATE = {
    "release": "v1", "image": "ingest:v1", "image_id": "sha256:" + "1" * 64, "config_version": "aaaaaaaaaaaa",
    "schema_head": "0002", "slot": "blue",
    "slots": {"blue": {"API_BLUE_IMAGE": "ingest:v1", "API_BLUE_VERSION": "v1", "API_BLUE_CONFIG": "aaaaaaaaaaaa"}},
}
ENV = ["API_BLUE_IMAGE=ingest:v1", "API_BLUE_VERSION=v1", "API_BLUE_CONFIG=aaaaaaaaaaaa",
       "API_GREEN_IMAGE=ingest:v2", "API_GREEN_VERSION=v2", "API_GREEN_CONFIG=bbbbbbbbbbbb",
       "POSTGRES_IMAGE=ingest-postgres:16"]
OUTPUT = ["live /run/ingest-slots/green.sock", "canary /run/ingest-slots/green.sock", *ENV]


def test_routing_reads_the_routes_and_the_slots_variables():
    routing = parse_routing(OUTPUT)
    assert (routing.live, routing.canary) == ("green", "green")
    assert routing.slot_env["green"]["API_GREEN_VERSION"] == "v2"
    assert routed_slot(routing) == "green"


def test_no_live_route_means_no_routing():
    assert parse_routing(["API_BLUE_IMAGE=ingest:v1"]) is None
    assert parse_routing(["canary /run/ingest-slots/blue.sock"]) is None
    assert routed_slot(None) is None


def test_a_route_to_anything_but_a_slot_socket_is_not_a_route():
    """Read back from the host: untrusted. A symlink someone pointed elsewhere names no slot."""
    for target in ("/run/ingest-slots/red.sock", "/tmp/blue.sock", "/run/ingest-slots/blue.sock; reboot",
                   "/run/ingest-slots/../ingest-slots/blue.sock"):
        assert parse_routing([f"live {target}"]) is None, target


def test_env_values_with_shell_syntax_are_dropped():
    routing = parse_routing(["live /run/ingest-slots/green.sock", "API_GREEN_VERSION=v2$(touch /tmp/x)",
                             "API_GREEN_IMAGE=ingest:v2;reboot", "API_GREEN_CONFIG=`id`"])
    assert routing.slot_env == {}


def test_state_json_is_the_truth_when_the_proxy_agrees():
    routing = parse_routing(["live /run/ingest-slots/blue.sock", *ENV])
    state, stale = effective_state(STATE, routed_slot(routing), routing)
    assert not stale and state == STATE


def test_during_a_canary_the_live_route_is_the_previous_slot_so_state_json_stays_the_truth():
    routing = parse_routing(["live /run/ingest-slots/blue.sock", "canary /run/ingest-slots/green.sock", *ENV])
    state, stale = effective_state(STATE, routed_slot(routing), routing)
    assert not stale and state == STATE


def test_a_half_switched_host_is_live_on_the_routed_slot_with_the_old_slot_as_standby():
    routing = parse_routing(OUTPUT)
    state, stale = effective_state(STATE, routed_slot(routing), routing)
    assert stale
    assert (state["slot"], state["release"], state["image"], state["config_version"]) == \
        ("green", "v2", "ingest:v2", "bbbbbbbbbbbb")
    assert state["standby"]["slot"] == "blue" and state["standby"]["release"] == "v1"
    assert set(state["slots"]) == {"blue", "green"}


def test_the_fact_reads_the_routes_the_switch_writes(tmp_path):
    """The switch's real command flips the symlinks, the fact's real command reads them back."""
    (tmp_path / "proxy").mkdir()
    (tmp_path / ".env").write_text("API_GREEN_IMAGE=ingest:v2\nAPI_GREEN_VERSION=v2\nPOSTGRES_IMAGE=pg\n")

    def sh(command: str) -> list[str]:
        command = command.replace(layout.BASE, str(tmp_path))
        return subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout.splitlines()

    assert ProxyRouting().process(sh(ProxyRouting().command())) is None
    sh(layout.route_proxy("blue", canary="green"))
    routing = ProxyRouting().process(sh(ProxyRouting().command()))
    assert (routing.live, routing.canary) == ("blue", "green")
    assert routing.slot_env == {"green": {"API_GREEN_IMAGE": "ingest:v2", "API_GREEN_VERSION": "v2"}}
    sh(layout.route_proxy("green"))
    routing = ProxyRouting().process(sh(ProxyRouting().command()))
    assert (routing.live, routing.canary) == ("green", "green")
    assert sorted(p.name for p in (tmp_path / "proxy").iterdir()) == ["canary.sock", "live.sock"], "no leftovers"
    sh(layout.unroute_proxy())
    assert ProxyRouting().process(sh(ProxyRouting().command())) is None
