"""The ingest body decoder: the msgspec fast path must accept only what the pydantic path accepts, yield the
same rows for it, and leave every refusal (status, code, message) to the pydantic path."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "service"))

from ingest import event_codec
from ingest.errors import ApiError

MAX_ITEMS = 5
ID = "0f8fad5b-d9cb-469f-a165-70867728950e"


def event(**fields) -> dict:
    base = {"id": ID, "source": "billing", "type": "invoice.paid", "timestamp": "2024-05-01T12:00:00Z",
            "payload": {"amount": 42}}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def body(value) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def outcome(decode, raw: bytes):
    try:
        return "rows", decode(raw, MAX_ITEMS)
    except ApiError as exc:
        return "error", (exc.status_code, exc.code, exc.message)


# Bodies the fast path takes: each must give exactly the pydantic path's rows.
ACCEPTED = [
    body(event()),
    body([event(), event(id="1f8fad5b-d9cb-469f-a165-70867728950e", payload=None)]),
    body([event(), event()]),  # a repeated id: both rows go to the repository, which counts the duplicate
    body([]),
    body(event(id="0F8FAD5BD9CB469FA16570867728950E")),
    body(event(timestamp="2024-05-01T12:00:00+23:59")),  # beyond PostgreSQL's 15:59: stored in UTC
    body(event(timestamp="2024-05-01T12:00:00.123456-07:30")),
    body(event(timestamp="2024-05-01t12:00:00z")),
    body(event(timestamp="2024-05-01T12:00:00-00:00")),
    body(event(source="é" * 200, type="😀" * 200)),  # limits count characters, not bytes
    body(event(payload={"big": 10**30, "neg": -(2**63) - 1, "f": [0.1, 1e16, 1.5e-7, -0.0], "n": None,
                        "t": True, "s": "é\u2028\n\t\\\"", "nested": {"a": [{"b": []}]}})),
    body(event(payload={"a": 1})).replace(b'{"a": 1}', b'{"a": 1, "a": 2}'),  # the last duplicate key wins
    b"  " + body(event()) + b"\n",
]

# Bodies the fast path hands to pydantic: refused ones, and accepted ones whose value it would not match.
HANDED_OVER = [
    body(event(id="not-a-uuid")),
    body(event(id="urn:uuid:" + ID)),
    body(event(id=12)),
    body(event(timestamp="2024-05-01T12:00:00")),  # no offset
    body(event(timestamp="0001-01-01T00:00:00+05:00")),  # before year 1 in UTC
    body(event(timestamp="2024-05-01T12:00:00.1234567Z")),  # pydantic truncates, msgspec would round
    body(event(timestamp="2024-05-01T12:00:00.9999999Z")),
    body(event(timestamp="2024-05-01T12:00Z")),
    body(event(timestamp=1714564800)),
    body(event(source=None)),
    body(event(source="")),
    body(event(source="x" * 201)),
    body(event(source=5)),
    body(event(extra=1)),
    body(event(payload=[1])),
    body(event(payload="x")),
    body([event(), event(payload=[1]), event(type=None)]),
    body(event(source="a\u0000")),
    body(event(payload={"k": "v\u0000"})),
    body(event(payload={"k\u0000": 1})),
    body(event(payload={"x": 1})).replace(b'"x": 1', b'"x": NaN'),
    body(event(payload={"x": 1})).replace(b'"x": 1', b'"x": 1e400'),
    body(event(payload={"x": 1})).replace(b'"x": 1', b'"x": "\\ud800"'),
    body(event(payload={"x": 1})).replace(b'"x": 1', b'"x": ' + b"[" * 300 + b"]" * 300),
    body([event()] * (MAX_ITEMS + 1)),
    body([event(extra=1)] * (MAX_ITEMS + 1)),  # too many and invalid: 413 first, as before
    b'{"id": ',
    b'"just a string"',
    b"42",
    b"null",
    b"",
    body(event()) + b" x",
    "\ufeff".encode() + body(event()),
]


@pytest.mark.parametrize("raw", ACCEPTED)
def test_fast_path_gives_the_pydantic_rows(raw):
    assert event_codec._decode_fast(raw) is not None
    assert outcome(event_codec.decode_batch, raw) == outcome(event_codec._decode_checked, raw)
    kind, rows = outcome(event_codec.decode_batch, raw)
    assert kind == "rows"
    for row in rows:
        assert row[3].tzinfo == UTC and row[4].startswith(b"\x01")


@pytest.mark.parametrize("raw", HANDED_OVER)
def test_what_the_fast_path_cannot_vouch_for_goes_to_pydantic(raw):
    assert outcome(event_codec.decode_batch, raw) == outcome(event_codec._decode_checked, raw)


def test_errors_keep_their_status_and_field_paths():
    bad_batch = body([event(), event(payload=[1]), event(type=None, extra=1)])
    assert outcome(event_codec.decode_batch, bad_batch)[1][:2] == (422, "VALIDATION_ERROR")
    message = outcome(event_codec.decode_batch, bad_batch)[1][2]
    assert "1.payload:" in message and "2.type:" in message and "2.extra:" in message
    too_many = outcome(event_codec.decode_batch, body([event()] * (MAX_ITEMS + 1)))[1]
    assert too_many[:2] == (413, "PAYLOAD_TOO_LARGE") and f"found {MAX_ITEMS + 1}" in too_many[2]
    overflow = outcome(event_codec.decode_batch, body([event(), event(timestamp="0001-01-01T00:00:00+05:00")]))
    assert overflow[1][2].startswith("1.timestamp: must fall within the years 1 to 9999 in UTC")


def test_values_are_normalised_as_before():
    (row,) = event_codec.decode_batch(body(event(timestamp="2024-05-01T12:00:00.1234567+23:59",
                                                 payload={"big": 10**30})), MAX_ITEMS)
    assert row[0] == UUID(ID)
    assert row[3] == datetime(2024, 4, 30, 12, 1, 0, 123456, tzinfo=UTC)  # truncated, in UTC
    assert row[4] == b'\x01{"big":1000000000000000000000000000000}'


@pytest.mark.parametrize("depth", [150, 199, 200, 201, 260, 400, 1000, 100_000])
def test_deep_payloads_get_the_pydantic_verdict(depth):
    for raw in (body(event(payload={"x": 1})).replace(b'"x": 1', b'"x": ' + b"[" * depth + b"]" * depth),
                body([event(payload={"x": 1})]).replace(b'"x": 1', b'"x": ' + b"{\"k\": " * depth + b"1" + b"}" * depth)):
        assert outcome(event_codec.decode_batch, raw) == outcome(event_codec._decode_checked, raw)
