"""A host for the slot operations (`release_live`, `release_canary`) to run against without SSH: it answers the
facts they read and records their noops; the commands they yield are the real ones."""

from __future__ import annotations

from collections.abc import Mapping

from ingestctl import hostlayout as layout
from ingestctl.operations import release as ops
from ingestctl.reconcile import Routing

IMAGE_ID = "sha256:" + "1" * 64
DEFAULT_BODY_LIMIT = 65536


def live_state(config_version: str, slot: str = "blue", standby: dict | None = None) -> dict:
    """state.json of a host running release v1 with CONFIG_VERSION in SLOT."""
    return {"release": "v1", "image": "ingest:v1", "image_id": IMAGE_ID, "config_version": config_version,
            "schema_head": "0001", "slot": slot,
            "slots": {slot: layout.slot_env(slot, "ingest:v1", "v1", config_version)},
            "previous": None, "standby": standby}


def state_routing(state: dict | None) -> Routing | None:
    if not state or not state.get("slot"):
        return None
    canary = (state.get("canary") or {}).get("slot", state["slot"])
    return Routing(live=state["slot"], canary=canary, slot_env=state.get("slots", {}))


class FakeHost:
    """Answers the facts the switch operations read; records their noops and which config versions' body limits
    they read (LIMITS by version, else the same limit for every version)."""

    def __init__(self, state: dict | None, proxy_conf: str | None = None, running: dict | None = None,
                 limits: Mapping[str, int] | None = None, routing: Routing | None | str = "as state.json"):
        self.name = "app2"
        self.state = state
        # The proxy's routes: by default where state.json says (its canary's slot on the canary route).
        self.routing = state_routing(state) if routing == "as state.json" else routing
        self.image_ids: dict[str, str] = {}
        self.sockets = frozenset(layout.SLOTS)  # the slots whose unix socket exists
        self.files = {ops.PROXY_CONF: proxy_conf}
        self.running = running or {}
        self.limits = limits
        self.noops: list[str] = []
        self.limits_read: list[str] = []

    def get_fact(self, fact, **kwargs):
        name = fact.__name__
        if name == "ConfigBodyLimit":
            self.limits_read.append(kwargs["version"])
            return self.limits[kwargs["version"]] if self.limits is not None else DEFAULT_BODY_LIMIT
        if name == "DockerImage":
            return self.image_ids.get(kwargs["image"])
        if name == "FileDigests":
            return {p: (ops.sha256(self.files[p]) if self.files.get(p) is not None else None) for p in kwargs["paths"]}
        # The one-round read (facts.together) runs a shell command, which a fake cannot: it prints nothing, and
        # every fact is then read on its own, from the answers above.
        return {"IngestState": self.state, "ProxyRouting": self.routing, "RunningServices": self.running,
                "ComposeBinary": "docker compose", "SlotSockets": self.sockets, "_RawLines": None}[name]

    def noop(self, message: str) -> None:
        self.noops.append(message)


def put(src, dest, mode):
    """pyinfra's `files.put._inner`, as one readable command: the destination and the content."""
    yield f"put {dest}\n{src.getvalue()}"


def steps(commands) -> list[str]:
    """An operation's commands as the steps they run, in order: a command that does several in one round trip
    (`hostlayout.in_one_round`) is split back into them."""
    flat: list[str] = []
    for command in map(str, commands):
        if command.startswith("( ") and command.endswith(" )") and layout.ROUND_JOINER in command:
            flat.extend(command[2:-2].split(layout.ROUND_JOINER))
        else:
            flat.append(command)
    return flat
