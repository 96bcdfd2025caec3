"""Request body -> rows ready for COPY, as cheaply as correctness allows.

Large batches make per-event Python work the service's main cost, so: JSON is parsed and payloads are
re-encoded by pydantic-core (Rust); events validate into plain dicts; the per-string U+0000 walk runs only
when the raw body contains a \\u0000 escape (the only way JSON can carry a NUL, which PostgreSQL refuses).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import pydantic_core
from pydantic import TypeAdapter, ValidationError

from ingest.errors import ApiError, describe_validation_errors
from ingest.models import Event, EventWithoutNul

EventRow = tuple[UUID, str, str, datetime, str]

_EVENTS = TypeAdapter(list[Event])
_EVENT = TypeAdapter(Event)
_EVENTS_FAST = TypeAdapter(list[EventWithoutNul])
_EVENT_FAST = TypeAdapter(EventWithoutNul)
_strict_json = json.JSONEncoder(allow_nan=False).encode

EVENT_JSON_SCHEMA = _EVENT.json_schema()


def _invalid(message: str) -> ApiError:
    return ApiError(422, "VALIDATION_ERROR", message)


def _payload_json(payload: dict[str, Any], where: str) -> str:
    encoded = pydantic_core.to_json(payload)
    # Numbers like 1e400 parse to infinity, which JSON (and jsonb) cannot hold; pydantic-core would write
    # them as Infinity/NaN. Only then pay for the exact check.
    if b"Infinity" in encoded or b"NaN" in encoded:
        try:
            _strict_json(payload)
        except ValueError:
            raise _invalid(f"{where}.payload: numbers must be finite (found one beyond float range)") from None
    return encoded.decode()


def decode_batch(body: bytes, max_items: int) -> list[EventRow]:
    """One event or a list of them; 422 for malformed JSON or a wrong shape, 413 past `max_items`."""
    try:
        data = pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise _invalid(f"body: malformed JSON ({exc}); send one event object or a list") from None
    has_nul_escape = b"\\u0000" in body
    if isinstance(data, list):
        if len(data) > max_items:
            raise ApiError(413, "PAYLOAD_TOO_LARGE", f"batch must hold at most {max_items} events "
                                                     f"(INGEST_MAX_BATCH_ITEMS), found {len(data)}; split it")
        adapter = _EVENTS if has_nul_escape else _EVENTS_FAST
        prefix = True
    elif isinstance(data, dict):
        adapter = _EVENT if has_nul_escape else _EVENT_FAST
        prefix = False
    else:
        raise _invalid(f"body: expected an event object or a list of event objects, found {type(data).__name__}")
    try:
        parsed = adapter.validate_python(data)
    except ValidationError as exc:
        raise _invalid(describe_validation_errors(exc.errors(include_input=False))) from None
    events = parsed if prefix else [parsed]

    rows: list[EventRow] = []
    for index, event in enumerate(events):
        where = str(index) if prefix else "body"
        try:
            # PostgreSQL takes UTC offsets only up to 15:59 (RFC 3339 allows 23:59): store UTC.
            timestamp = event["timestamp"].astimezone(UTC)
        except OverflowError:
            raise _invalid(f"{where}.timestamp: must fall within the years 1 to 9999 in UTC") from None
        rows.append((event["id"], event["source"], event["type"], timestamp,
                     _payload_json(event.get("payload", {}), where)))
    return rows
