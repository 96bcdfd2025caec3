"""Request body -> rows ready for a binary COPY, as cheaply as correctness allows.

Large batches make per-event Python work the service's main cost. Two decoders, one set of rules:

- The fast path: msgspec decodes the body straight into `FastEvent` structs (one pass, in C, no intermediate
  dicts). It only ever accepts a subset of what the pydantic models accept, and yields the same values for it
  (tests/unit/test_service_event_codec.py checks both on the same bodies).
- Anything the fast path refuses, or cannot vouch for, goes through pydantic (`models.Event`), which alone
  decides what is valid and words every error. So validation rules, limits and error messages are exactly
  pydantic's: the fast path never answers an error itself.

The fast path steps aside for bodies with a \\u0000 escape (the only way JSON can carry a NUL, which PostgreSQL
refuses; pydantic's models check for it) and for bodies with a run of 7 or more digits after a decimal point:
a timestamp with sub-microsecond digits, which msgspec rounds and pydantic truncates.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any
from uuid import UUID

import msgspec
import pydantic_core
from pydantic import TypeAdapter, ValidationError

from ingest.errors import ApiError, describe_validation_errors
from ingest.models import Event, EventWithoutNul

# The payload goes out as jsonb's binary form: a version byte (1), then the JSON text.
EventRow = tuple[UUID, str, str, datetime, bytes]
_JSONB_VERSION = b"\x01"

_EVENTS = TypeAdapter(list[Event])
_EVENT = TypeAdapter(Event)
_EVENTS_FAST = TypeAdapter(list[EventWithoutNul])
_EVENT_FAST = TypeAdapter(EventWithoutNul)
_strict_json = json.JSONEncoder(allow_nan=False).encode

EVENT_JSON_SCHEMA = _EVENT.json_schema()

_FastName = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class FastEvent(msgspec.Struct, forbid_unknown_fields=True):
    """`models.Event` for the fast path (its NUL checks are covered by the body scan in `_decode_fast`)."""

    id: UUID
    source: _FastName
    type: _FastName
    timestamp: Annotated[datetime, msgspec.Meta(tz=True)]
    payload: dict[str, Any] = msgspec.field(default_factory=dict)


_FAST_DECODER = msgspec.json.Decoder(list[FastEvent] | FastEvent)
_SUB_MICROSECOND = re.compile(rb"\.\d{7}")
_MANY_BRACKETS = 150


def _invalid(message: str) -> ApiError:
    return ApiError(422, "VALIDATION_ERROR", message)


def _too_many(max_items: int, found: int) -> ApiError:
    return ApiError(413, "PAYLOAD_TOO_LARGE", f"batch must hold at most {max_items} events "
                                              f"(INGEST_MAX_BATCH_ITEMS), found {found}; split it")


def _payload_jsonb(payload: dict[str, Any], where: int | str) -> bytes:
    encoded = pydantic_core.to_json(payload)
    # Numbers like 1e400 parse to infinity, which JSON (and jsonb) cannot hold; pydantic-core would write
    # them as Infinity/NaN. Only then pay for the exact check.
    if b"Infinity" in encoded or b"NaN" in encoded:
        try:
            _strict_json(payload)
        except ValueError:
            raise _invalid(f"{where}.payload: numbers must be finite (found one beyond float range)") from None
    return _JSONB_VERSION + encoded


def _utc(timestamp: datetime, where: int | str) -> datetime:
    try:
        # PostgreSQL takes UTC offsets only up to 15:59 (RFC 3339 allows 23:59): store UTC.
        return timestamp.astimezone(UTC)
    except OverflowError:
        raise _invalid(f"{where}.timestamp: must fall within the years 1 to 9999 in UTC") from None


def _decode_fast(body: bytes) -> list[FastEvent] | FastEvent | None:
    """The body's events if the fast path can vouch for them, else None (pydantic then decides)."""
    if b"\\u0000" in body or _SUB_MICROSECOND.search(body):
        return None
    try:
        return _FAST_DECODER.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):  # msgspec's depth bound is Python's
        return None


def _decode_checked(body: bytes, max_items: int) -> list[EventRow]:
    """The pydantic path: every rule, and the wording of every error."""
    try:
        data = pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise _invalid(f"body: malformed JSON ({exc}); send one event object or a list") from None
    has_nul_escape = b"\\u0000" in body
    if isinstance(data, list):
        if len(data) > max_items:
            raise _too_many(max_items, len(data))
        adapter = _EVENTS if has_nul_escape else _EVENTS_FAST
    elif isinstance(data, dict):
        adapter = _EVENT if has_nul_escape else _EVENT_FAST
    else:
        raise _invalid(f"body: expected an event object or a list of event objects, found {type(data).__name__}")
    try:
        parsed = adapter.validate_python(data)
    except ValidationError as exc:
        raise _invalid(describe_validation_errors(exc.errors(include_input=False))) from None
    if isinstance(parsed, list):
        return [(e["id"], e["source"], e["type"], _utc(e["timestamp"], i),
                 _payload_jsonb(e.get("payload", {}), i)) for i, e in enumerate(parsed)]
    return [(parsed["id"], parsed["source"], parsed["type"], _utc(parsed["timestamp"], "body"),
             _payload_jsonb(parsed.get("payload", {}), "body"))]


def _fast_rows(events: list[FastEvent], single: bool) -> list[EventRow] | None:
    """Rows of the fast path's events, or None if pydantic must decide after all. Error messages name a lone
    event "body" and a batch's events by index, as pydantic's do."""
    rows: list[EventRow] = []
    for index, event in enumerate(events):
        where = "body" if single else index
        timestamp = _utc(event.timestamp, where)
        # msgspec nests deeper than pydantic-core's parser, which refuses a body past about 200 levels (and
        # its serializer fails deeper still): a payload that deep, or with that many brackets, may be one
        # pydantic refuses.
        try:
            payload = _payload_jsonb(event.payload, where)
        except pydantic_core.PydanticSerializationError:
            return None
        if payload.count(b"[") + payload.count(b"{") >= _MANY_BRACKETS:
            return None
        rows.append((event.id, event.source, event.type, timestamp, payload))
    return rows


def decode_batch(body: bytes, max_items: int) -> list[EventRow]:
    """One event or a list of them; 422 for malformed JSON or a wrong shape, 413 past `max_items`."""
    fast = _decode_fast(body)
    if fast is None:
        return _decode_checked(body, max_items)
    if isinstance(fast, FastEvent):
        rows = _fast_rows([fast], single=True)
    else:
        if len(fast) > max_items:
            raise _too_many(max_items, len(fast))
        rows = _fast_rows(fast, single=False)
    return _decode_checked(body, max_items) if rows is None else rows
