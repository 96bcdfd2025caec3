"""Wire models: what an event is, and what the API answers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, NotRequired
from uuid import UUID

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints
from typing_extensions import TypedDict  # pydantic needs typing_extensions' TypedDict on Python < 3.12


def _no_nul(value: str) -> str:
    # PostgreSQL text and jsonb cannot store U+0000; refuse it here instead of failing in the database.
    if "\x00" in value:
        raise ValueError("must not contain the NUL character (U+0000)")
    return value


def _payload_storable(value: dict[str, Any]) -> dict[str, Any]:
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if "\x00" in key:
                    raise ValueError("keys must not contain the NUL character (U+0000)")
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and "\x00" in item:
            raise ValueError("strings must not contain the NUL character (U+0000)")
    return value


Name = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(_no_nul)]


def _utc(value: datetime) -> datetime:
    # PostgreSQL only takes UTC offsets up to 15:59 (RFC 3339 allows 23:59): compare and store in UTC.
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("must fall within the years 1 to 9999 in UTC") from None


# Query parameters: normalised by a validator (a few per request).
Timestamp = Annotated[AwareDatetime, AfterValidator(_utc)]


_EVENT_EXAMPLE = {"id": "0f8fad5b-d9cb-469f-a165-70867728950e", "source": "billing", "type": "invoice.paid",
                  "timestamp": "2024-05-01T12:00:00Z", "payload": {"amount": 42}}

PlainName = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class Event(TypedDict):
    """An event as clients send it. Validated into a plain dict: a model instance per event costs more
    than the database write on large batches."""

    __pydantic_config__ = ConfigDict(extra="forbid", json_schema_extra={"example": _EVENT_EXAMPLE})  # type: ignore

    id: UUID
    source: Name
    type: Name
    timestamp: Annotated[AwareDatetime, Field(description="RFC 3339 with a UTC offset")]
    payload: NotRequired[Annotated[dict[str, Any], AfterValidator(_payload_storable)]]


class EventWithoutNul(TypedDict):
    """The same shape without the U+0000 checks: used when the raw body holds no \\u0000 escape, the only
    way JSON can carry a NUL, so the per-string walk would find nothing."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore

    id: UUID
    source: PlainName
    type: PlainName
    timestamp: AwareDatetime
    payload: NotRequired[dict[str, Any]]


class StoredEvent(BaseModel):
    id: UUID
    source: str
    type: str
    timestamp: datetime
    payload: dict[str, Any]
    received_at: datetime


class IngestResult(BaseModel):
    accepted: int = Field(description="events newly stored")
    duplicates: int = Field(description="events whose id was already stored (not stored again)")


class EventPage(BaseModel):
    items: list[StoredEvent]
    next_cursor: str | None = Field(description="pass as `cursor` to read the next page; null on the last page")


class StatsResult(BaseModel):
    since: datetime
    until: datetime
    total: int
    by_source: dict[str, int]
    by_type: dict[str, int]


class ErrorDetail(BaseModel):
    code: str
    message: str
    request_id: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
