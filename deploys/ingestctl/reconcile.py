"""What a host really serves, when its proxy and its state.json disagree (a half-switched host).

A switch flips the proxy's route (a symlink to a slot's socket), then writes state.json. If SSH or the disk fails in
between, the proxy already sends traffic to the new slot while state.json still names the old one. Trusting
state.json then makes the next switch treat the slot carrying traffic as idle: recreate it, or stop it. So every
switch first reads where the proxy routes (its symlinks) and what compose runs in each slot (.env), and acts on
the *effective* state built here. Pure: unit-tested without hosts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ingestctl import hostvalues
from ingestctl.hostlayout import EMPTY_CONFIG, ROUTES, SLOT_SOCKETS, SLOTS

# .env values are read back from the host: untrusted. Only what the project itself writes is accepted.
ENV_LINE = re.compile(r"^(API_(BLUE|GREEN)_(IMAGE|VERSION|CONFIG))=(.*)$")
ENV_VALUE = {"IMAGE": hostvalues.IMAGE_REF, "VERSION": hostvalues.RELEASE, "CONFIG": hostvalues.CONFIG_VERSION}


def _valid(kind: str, value: str) -> bool:
    return ENV_VALUE[kind].matches(value) or (kind == "CONFIG" and value == EMPTY_CONFIG)
RELEASE_KEYS = ("release", "image", "image_id", "config_version", "schema_head")


@dataclass(frozen=True)
class Routing:
    """Where the proxy's routes point (the slot behind live.sock, and behind canary.sock: None when that route is
    missing or not one of the project's), and the api slots' compose variables."""

    live: str
    canary: str | None
    slot_env: Mapping[str, Mapping[str, str]]


# `ROUTE TARGET` lines, TARGET as `readlink` prints it: only the project's own slot sockets are accepted.
ROUTE_LINE = re.compile(rf"^({'|'.join(ROUTES)}) {re.escape(SLOT_SOCKETS)}/({'|'.join(SLOTS)})\.sock$")


def parse_routing(output: list[str]) -> Routing | None:
    """The ProxyRouting fact's output: `live TARGET` and `canary TARGET` lines, then `.env` lines. None when the
    host has no live route."""
    routes: dict[str, str] = {}
    slot_env: dict[str, dict[str, str]] = {}
    for raw in output:
        line = raw.strip()
        route = ROUTE_LINE.match(line)
        if route:
            routes[route.group(1)] = route.group(2)
            continue
        match = ENV_LINE.match(line)
        if match and _valid(match.group(3), match.group(4)):
            key, slot, _kind, value = match.groups()
            slot_env.setdefault(slot.lower(), {})[key] = value
    if "live" not in routes:
        return None
    return Routing(live=routes["live"], canary=routes.get("canary"), slot_env=slot_env)


def routed_slot(routing: Routing | None) -> str | None:
    """The slot the proxy sends its traffic to (a canary's share aside), or None (no routes yet)."""
    return routing.live if routing is not None else None


def effective_state(state: Mapping, routed: str | None, routing: Routing | None) -> tuple[dict, bool]:
    """(the state to act on, whether state.json is stale).

    When the proxy routes to the slot state.json calls live (or routing is unknown), state.json is the truth.
    Otherwise the routed slot is live, with what compose runs there (.env); the slot state.json calls live
    becomes the standby, since it still runs what state.json describes. `image_id` of the routed slot is
    unknown here (the caller looks it up by image name).
    """
    recorded = state.get("slot")
    if routed is None or routed == recorded or routing is None:
        return dict(state), False
    env = routing.slot_env.get(routed, {})
    prefix = f"API_{routed.upper()}"
    old_live = {key: state[key] for key in RELEASE_KEYS if key in state}
    slots = {slot: dict(values) for slot, values in routing.slot_env.items()}
    effective = {
        "release": env.get(f"{prefix}_VERSION"),
        "image": env.get(f"{prefix}_IMAGE"),
        "image_id": None,
        "config_version": env.get(f"{prefix}_CONFIG"),
        "schema_head": None,
        "slot": routed,
        "slots": slots,
        "previous": old_live or None,
        "standby": {**old_live, "slot": recorded} if (recorded and old_live) else None,
    }
    return effective, True
