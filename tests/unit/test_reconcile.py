"""A half-switched host (proxy moved, state.json not written) is seen as what it really serves."""

from ingestctl.hostlayout import Ports
from ingestctl.reconcile import effective_state, parse_routing, routed_slot

PORTS = {"blue": Ports().blue, "green": Ports().green}
STATE = {
    "release": "v1", "image": "ingest:v1", "image_id": "sha256:" + "1" * 64, "config_version": "aaaaaaaaaaaa",
    "schema_head": "0002", "slot": "blue",
    "slots": {"blue": {"API_BLUE_IMAGE": "ingest:v1", "API_BLUE_VERSION": "v1", "API_BLUE_CONFIG": "aaaaaaaaaaaa"}},
}
OUTPUT = [
    f"port {PORTS['green']}",
    "API_BLUE_IMAGE=ingest:v1", "API_BLUE_VERSION=v1", "API_BLUE_CONFIG=aaaaaaaaaaaa",
    "API_GREEN_IMAGE=ingest:v2", "API_GREEN_VERSION=v2", "API_GREEN_CONFIG=bbbbbbbbbbbb",
    "POSTGRES_IMAGE=ingest-postgres:16",
]


def test_routing_reads_the_live_port_and_the_slots_variables():
    routing = parse_routing(OUTPUT)
    assert routing.ports == (PORTS["green"],)
    assert routing.slot_env["green"]["API_GREEN_VERSION"] == "v2"
    assert routed_slot(routing, PORTS) == "green"


def test_no_proxy_config_means_no_routing():
    assert parse_routing(["API_BLUE_IMAGE=ingest:v1"]) is None
    assert routed_slot(None, PORTS) is None


def test_env_values_with_shell_syntax_are_dropped():
    routing = parse_routing([f"port {PORTS['green']}", "API_GREEN_VERSION=v2$(touch /tmp/x)",
                             "API_GREEN_IMAGE=ingest:v2;reboot", "API_GREEN_CONFIG=`id`"])
    assert routing.slot_env == {}


def test_state_json_is_the_truth_when_the_proxy_agrees():
    routing = parse_routing([f"port {PORTS['blue']}", *OUTPUT[1:]])
    state, stale = effective_state(STATE, routed_slot(routing, PORTS), routing)
    assert not stale and state == STATE


def test_a_half_switched_host_is_live_on_the_routed_slot_with_the_old_slot_as_standby():
    routing = parse_routing(OUTPUT)
    state, stale = effective_state(STATE, routed_slot(routing, PORTS), routing)
    assert stale
    assert (state["slot"], state["release"], state["image"], state["config_version"]) == \
        ("green", "v2", "ingest:v2", "bbbbbbbbbbbb")
    assert state["standby"]["slot"] == "blue" and state["standby"]["release"] == "v1"
    assert set(state["slots"]) == {"blue", "green"}


def test_two_live_upstreams_are_not_one_routed_slot():
    routing = parse_routing([f"port {PORTS['blue']}", f"port {PORTS['green']}"])
    assert routed_slot(routing, PORTS) is None


def test_the_fact_reads_the_live_slot_from_the_rendered_proxy_config(tmp_path):
    """The fact's sed and the template must agree: run the real command on a rendered config."""
    import subprocess

    from ingestctl.facts.proxy import ProxyRouting
    from ingestctl.hostlayout import BASE, ClientLimits, render_proxy

    (tmp_path / "proxy").mkdir()
    (tmp_path / "proxy" / "nginx.conf").write_text(render_proxy(["green"], ["blue"], Ports(), 1 << 20, ClientLimits(64, 200, 400)))
    (tmp_path / ".env").write_text("API_GREEN_IMAGE=ingest:v2\nAPI_GREEN_VERSION=v2\nPOSTGRES_IMAGE=pg\n")
    command = ProxyRouting().command().replace(BASE, str(tmp_path))
    output = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout.splitlines()
    routing = ProxyRouting().process(output)
    assert routed_slot(routing, PORTS) == "green"
    assert routing.slot_env == {"green": {"API_GREEN_IMAGE": "ingest:v2", "API_GREEN_VERSION": "v2"}}
