"""Pure rules: which schemas the code supports, migration declarations, cursors, and token buckets."""

from __future__ import annotations

import ast
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

SERVICE_DIR = Path(__file__).resolve().parents[2] / "service"
sys.path.insert(0, str(SERVICE_DIR))

from ingest.ratelimit import MemoryBuckets
from ingest.repository import InvalidCursor, decode_cursor, encode_cursor
from ingest.schema_status import CodeSchema, DatabaseSchema, code_schema, judge

CODE = CodeSchema("0002", frozenset({"0001", "0002"}))


@pytest.mark.parametrize(
    ("heads", "meta", "supported", "phrase"),
    [
        (("0002",), {"0001": True, "0002": True}, True, "at 0002"),
        ((), {}, False, "no schema"),
        (("0001",), {"0001": True}, False, "older than this code"),
        (("0003",), {"0001": True, "0002": True, "0003": True}, True, "backward compatible"),
        (("0004",), {"0001": True, "0002": True, "0003": True, "0004": False}, False, "0004"),
        (("0003",), {"0001": True, "0003": True}, False, "does not record this code's head"),
        (("0003",), {"0001": True, "0002": True}, False, "no schema_migration_meta row"),
    ],
)
def test_schema_support(heads, meta, supported, phrase):
    verdict = judge(CODE, DatabaseSchema(heads, meta))
    assert verdict.supported is supported
    assert phrase in verdict.detail


def test_code_schema_is_a_single_linear_chain():
    schema = code_schema()
    assert schema.head == "0002"
    assert schema.revisions == {"0001", "0002"}


def _declarations(path: Path) -> dict[str, object]:
    tree = ast.parse(path.read_text())
    found = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Constant)):
            found[node.targets[0].id] = node.value.value
    return found


@pytest.mark.parametrize("path", sorted((SERVICE_DIR / "alembic" / "versions").glob("*.py")), ids=lambda p: p.name)
def test_every_migration_declares_compatibility_statically(path):
    declared = _declarations(path)
    assert isinstance(declared.get("backward_compatible"), bool), f"{path.name}: backward_compatible literal"
    assert isinstance(declared.get("downgrade_data_safe"), bool), f"{path.name}: downgrade_data_safe literal"
    assert isinstance(declared.get("revision"), str)


def test_declarations_are_truthful():
    versions = SERVICE_DIR / "alembic" / "versions"
    first = _declarations(next(versions.glob("0001_*.py")))
    second = _declarations(next(versions.glob("0002_*.py")))
    assert first["downgrade_data_safe"] is False  # drops the events table
    assert "DROP TABLE events" in next(versions.glob("0001_*.py")).read_text()
    assert second == {**second, "backward_compatible": True, "downgrade_data_safe": True}
    assert "DROP TABLE" not in next(versions.glob("0002_*.py")).read_text()


def test_cursor_round_trip_and_forgery():
    when, event_id = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC), uuid.uuid4()
    assert decode_cursor(encode_cursor(when, event_id)) == (when, event_id)
    for forged in ("", "garbage!", "W10", encode_cursor(when, event_id)[:-3]):
        with pytest.raises(InvalidCursor):
            decode_cursor(forged)


def test_memory_bucket_allows_burst_then_refills(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("ingest.ratelimit.time.monotonic", lambda: clock[0])
    buckets = MemoryBuckets(per_minute=60, burst=3)
    assert [buckets.take("a").allowed for _ in range(4)] == [True, True, True, False]
    assert buckets.take("b").allowed  # separate clients, separate buckets
    refused = buckets.take("a")
    assert refused.retry_after_seconds == pytest.approx(1.0)
    clock[0] += 1.0
    assert buckets.take("a").allowed
    assert not buckets.take("a").allowed


def test_memory_buckets_forget_the_oldest_clients():
    buckets = MemoryBuckets(per_minute=60, burst=1, max_keys=2)
    for client in ("a", "b", "c"):
        buckets.take(client)
    assert buckets.take("a").allowed  # "a" was evicted and starts with a full bucket
