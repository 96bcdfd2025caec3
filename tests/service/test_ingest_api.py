"""Ingest and query through the real HTTP service, against real PostgreSQL and Redis."""

from __future__ import annotations

import json
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest
from conftest import API_KEY, mint_token, read_http_response

pytestmark = pytest.mark.service


def make_event(source: str = "billing", type_: str = "invoice.paid", when: datetime | None = None,
               **payload) -> dict:
    when = when or datetime.now(UTC)
    return {"id": str(uuid.uuid4()), "source": source, "type": type_, "timestamp": when.isoformat(),
            "payload": payload or {"n": 1}}


def stored_count(database_url: str, ids: list[str]) -> int:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT count(*) FROM events WHERE id = ANY(%s::uuid[])", (ids,)).fetchone()[0]


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "request_id"}
    assert body["error"]["code"] == code
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    return body["error"]


def test_single_event_is_stored_once(client, ingest_headers, database_url):
    event = make_event(amount=42)
    response = client.post("/api/v1/events", json=event, headers=ingest_headers)
    assert response.status_code == 202
    assert response.json() == {"accepted": 1, "duplicates": 0}
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT source, type, payload FROM events WHERE id = %s", (event["id"],)).fetchone()
    assert row == ("billing", "invoice.paid", {"amount": 42})


def test_retried_batches_never_duplicate(client, ingest_headers, database_url):
    batch = [make_event(i=i) for i in range(40)]
    first = client.post("/api/v1/events", json=batch, headers=ingest_headers)
    assert first.json() == {"accepted": 40, "duplicates": 0}
    retry = client.post("/api/v1/events", json=batch, headers=ingest_headers)
    assert retry.json() == {"accepted": 0, "duplicates": 40}
    # A retry that overlaps half old, half new events, sent concurrently from several clients.
    overlapping = batch[20:] + [make_event(i=i) for i in range(40, 60)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(
            lambda _: httpx.post(client.base_url.join("/api/v1/events"), json=overlapping, headers=ingest_headers,
                                 timeout=10).json(), range(8)))
    assert sum(a["accepted"] for a in answers) == 20
    assert all(a["accepted"] + a["duplicates"] == 40 for a in answers)
    ids = [e["id"] for e in batch + overlapping]
    assert stored_count(database_url, ids) == 60


def test_repeated_id_inside_one_batch_is_a_duplicate(client, ingest_headers, database_url):
    event = make_event()
    response = client.post("/api/v1/events", json=[event, dict(event)], headers=ingest_headers)
    assert response.json() == {"accepted": 1, "duplicates": 1}
    assert stored_count(database_url, [event["id"]]) == 1


def test_edge_values_are_stored_as_sent(client, ingest_headers, database_url):
    """Both decoding paths store the same values: the first event takes the fast path, the batch of the others
    pydantic's (its sub-microsecond and numeric timestamps are for pydantic to judge)."""
    ids = [str(uuid.uuid4()) for _ in range(4)]
    events = [
        {"id": ids[0].upper(), "source": "é" * 200, "type": "😀", "timestamp": "2024-05-01T12:00:00.123456+23:59",
         "payload": {"big": 10**30, "f": 1e16, "s": "\u2028\t\\\"", "nested": {"a": [None, True]}}},
        {"id": ids[1], "source": "a", "type": "b", "timestamp": "2024-05-01T12:00:00.1234567Z"},
        {"id": ids[2], "source": "a", "type": "b", "timestamp": "0001-01-01T00:00:00-05:00", "payload": {"x": 0.5}},
        {"id": ids[3], "source": "a", "type": "b", "timestamp": 1714564800},
    ]
    assert client.post("/api/v1/events", json=events[0], headers=ingest_headers).json() == {"accepted": 1,
                                                                                           "duplicates": 0}
    assert client.post("/api/v1/events", json=events[1:], headers=ingest_headers).json() == {"accepted": 3,
                                                                                            "duplicates": 0}
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT id::text, source, type, timestamp, payload FROM events"
                            " WHERE id = ANY(%s::uuid[]) ORDER BY timestamp", (ids,)).fetchall()
    assert [(r[0], r[1], r[2], r[3].astimezone(UTC), r[4]) for r in rows] == [
        (ids[2], "a", "b", datetime(1, 1, 1, 5, tzinfo=UTC), {"x": 0.5}),
        (ids[0], "é" * 200, "😀", datetime(2024, 4, 30, 12, 1, 0, 123456, tzinfo=UTC), events[0]["payload"]),
        (ids[3], "a", "b", datetime(2024, 5, 1, 12, 0, tzinfo=UTC), {}),
        (ids[1], "a", "b", datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC), {}),
    ]


def _event_json(**fields) -> str:
    # A fixed id: these bodies are refused, never stored, and parallel workers must collect the same test ids.
    event = {"id": "2f1c7a9e-5b1d-4c3e-9a8f-0d6b7e5c4a31", "source": "a", "type": "b", "timestamp": "2024-01-01T00:00:00Z", **fields}
    return json.dumps({k: v for k, v in event.items() if v is not None})


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (_event_json(id="not-a-uuid"), "id"),
        (_event_json(timestamp="2024-01-01T00:00:00"), "timestamp"),
        (_event_json(timestamp="0001-01-01T00:00:00+05:00"), "timestamp"),
        (_event_json(source=None), "source"),
        (_event_json(source=""), "source"),
        ("[" + _event_json(payload=[1]) + "]", "0.payload"),
        (_event_json(source="a\u0000"), "source"),
        (_event_json(payload={"k": "v\u0000"}), "payload"),
        (_event_json(extra=1), "extra"),
        (_event_json(payload={"x": 1}).replace('"x": 1', '"x": NaN'), "malformed JSON"),
        (_event_json(payload={"x": 1}).replace('"x": 1', '"x": 1e400'), "payload: numbers must be finite"),
        ('{"id": ', "malformed JSON"),
        ('"just a string"', "expected an event object"),
    ],
)
def test_bad_input_is_422_naming_the_field(client, ingest_headers, body, field):
    response = client.post("/api/v1/events", content=body,
                           headers={**ingest_headers, "Content-Type": "application/json"})
    error = assert_error(response, 422, "VALIDATION_ERROR")
    assert field in error["message"]


def test_batch_over_the_limit_is_413_and_stores_nothing(client, ingest_headers, database_url):
    batch = [make_event() for _ in range(51)]  # the shared service runs with INGEST_MAX_BATCH_ITEMS=50
    error = assert_error(client.post("/api/v1/events", json=batch, headers=ingest_headers), 413, "PAYLOAD_TOO_LARGE")
    assert "INGEST_MAX_BATCH_ITEMS" in error["message"]
    assert stored_count(database_url, [e["id"] for e in batch]) == 0


def test_declared_length_over_the_limit_is_413(client, ingest_headers):
    body = b"[" + b" " * 70_000 + b"]"  # MAX_REQUEST_BODY_BYTES=65536
    error = assert_error(client.post("/api/v1/events", content=body, headers=ingest_headers), 413, "PAYLOAD_TOO_LARGE")
    assert "Content-Length" in error["message"]


def test_chunked_body_without_length_is_cut_off_at_the_limit(service):
    """Over a real socket: no Content-Length, chunks keep coming; the service must answer 413 mid-stream."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        sock.sendall(
            b"POST /api/v1/events HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"X-API-Key: {API_KEY}\r\nX-Request-Id: chunked-413-test\r\n".encode()
            + b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"[" + b" " * 8191
        sent = 0
        status = None
        sock.settimeout(0.05)
        # Send up to 4x the limit; the answer must arrive before we are done.
        while sent < 4 * 65536:
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break
            except TimeoutError:
                continue
        sock.settimeout(10)
        status, headers, body = read_http_response(sock)
    assert status == 413
    assert sent < 4 * 65536, "the service read the whole oversized body before answering"
    error = json.loads(body)["error"]
    assert error["code"] == "PAYLOAD_TOO_LARGE"
    assert error["request_id"] == "chunked-413-test" == headers["x-request-id"]


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"X-API-Key": "wrong-key-0123456789"}, 401),
        ({"Authorization": f"Bearer {mint_token(expires_in=86400)}"}, 401),  # a read token does not authorize ingest
    ],
)
def test_ingest_needs_the_api_key(client, headers, status):
    response = client.post("/api/v1/events", json=make_event(), headers=headers)
    assert_error(response, status, "UNAUTHORIZED")


@pytest.mark.parametrize("path", ["/api/v1/events", "/api/v1/stats"])
@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "UNAUTHORIZED"),
        ({"X-API-Key": API_KEY}, 401, "UNAUTHORIZED"),
        ({"Authorization": "Bearer not.a.jwt"}, 401, "UNAUTHORIZED"),
        # Minted at collection: a long lifetime, so a long suite (CI runs the e2e tests first) cannot expire
        # them and turn "wrong secret" or "wrong scope" into "expired".
        ({"Authorization": f"Bearer {mint_token(secret='another-secret-that-is-long-enough-0123', expires_in=86400)}"},
         401, "UNAUTHORIZED"),
        ({"Authorization": f"Bearer {mint_token(expires_in=-3600)}"}, 401, "UNAUTHORIZED"),
        ({"Authorization": f"Bearer {mint_token(scope='events:write', expires_in=86400)}"}, 403, "FORBIDDEN"),
    ],
)
def test_queries_need_a_token_with_read_scope(client, path, headers, status, code):
    assert_error(client.get(path, headers=headers), status, code)


def test_query_filters_and_paginates_without_gaps(client, ingest_headers, read_headers):
    source = "pager-" + uuid.uuid4().hex[:8]
    base = datetime(2030, 1, 1, tzinfo=UTC)
    events = [make_event(source=source, type_="even" if i % 2 == 0 else "odd", when=base + timedelta(seconds=i))
              for i in range(25)]
    assert client.post("/api/v1/events", json=events, headers=ingest_headers).json()["accepted"] == 25

    seen, cursor = [], None
    for _ in range(10):
        params = {"source": source, "limit": 7, **({"cursor": cursor} if cursor else {})}
        page = client.get("/api/v1/events", params=params, headers=read_headers).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [e["id"] for e in events]

    odd = client.get("/api/v1/events", params={"source": source, "type": "odd", "since": (base + timedelta(seconds=10)).isoformat(),
                                                "until": (base + timedelta(seconds=20)).isoformat()},
                     headers=read_headers).json()
    assert [item["id"] for item in odd["items"]] == [e["id"] for e in events[11:20:2]]
    assert odd["next_cursor"] is None


def test_query_rejects_a_forged_cursor_and_bad_limit(client, read_headers):
    error = assert_error(client.get("/api/v1/events", params={"cursor": "garbage!"}, headers=read_headers),
                         422, "VALIDATION_ERROR")
    assert "cursor" in error["message"]
    error = assert_error(client.get("/api/v1/events", params={"limit": 0}, headers=read_headers),
                         422, "VALIDATION_ERROR")
    assert "limit" in error["message"]


def test_stats_count_by_source_and_type(client, ingest_headers, read_headers):
    source = "stats-" + uuid.uuid4().hex[:8]
    when = datetime(2031, 6, 1, tzinfo=UTC)
    events = ([make_event(source=source, type_="a", when=when)] * 1 + [make_event(source=source, type_="b", when=when)
              for _ in range(3)])
    client.post("/api/v1/events", json=events, headers=ingest_headers)
    stats = client.get("/api/v1/stats", params={"since": when.isoformat(),
                                                "until": (when + timedelta(seconds=1)).isoformat()},
                       headers=read_headers).json()
    assert stats["by_source"] == {source: 4}
    assert stats["by_type"] == {"a": 1, "b": 3}
    assert stats["total"] == 4
    bad = client.get("/api/v1/stats", params={"since": when.isoformat(), "until": when.isoformat()},
                     headers=read_headers)
    assert "since" in assert_error(bad, 422, "VALIDATION_ERROR")["message"]


def test_request_id_is_propagated_and_in_every_log_line(client, service, ingest_headers):
    response = client.post("/api/v1/events", json=make_event(), headers={**ingest_headers, "X-Request-Id": "trace-abc.123"})
    assert response.headers["x-request-id"] == "trace-abc.123"
    generated = client.get("/health/live").headers["x-request-id"]
    assert len(generated) == 32 and generated != "trace-abc.123"
    # An unsafe incoming id (log injection) is replaced, not echoed.
    forged = client.get("/health/live", headers={"X-Request-Id": "x\" injected"}).headers["x-request-id"]
    assert "injected" not in forged

    records = [json.loads(line) for line in service.log_lines()]  # every line must be JSON
    assert all("request_id" in record for record in records)
    access = [r for r in records if r.get("logger") == "ingest.access" and r["request_id"] == "trace-abc.123"]
    assert access and access[0]["status"] == 202 and access[0]["route"] == "/api/v1/events"
    logged = "\n".join(service.log_lines())
    assert API_KEY not in logged


def test_unknown_route_has_the_error_shape(client):
    assert_error(client.get("/nope"), 404, "NOT_FOUND")
    assert_error(client.delete("/api/v1/events"), 405, "METHOD_NOT_ALLOWED")


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_requests_and_events(client, ingest_headers):
    before = client.get("/metrics").text
    client.post("/api/v1/events", json=[make_event(), make_event()], headers=ingest_headers)
    event = make_event()
    client.post("/api/v1/events", json=[event, event], headers=ingest_headers)
    client.post("/api/v1/events", content=b"{", headers=ingest_headers)
    after = client.get("/metrics").text
    for name in ("ingest_http_requests_total", "ingest_http_request_duration_seconds_bucket",
                 "ingest_events_accepted_total", "ingest_events_duplicate_total", "ingest_degraded"):
        assert name in after
    assert _metric(after, "ingest_events_accepted_total") - _metric(before, "ingest_events_accepted_total") == 3
    assert _metric(after, "ingest_events_duplicate_total") - _metric(before, "ingest_events_duplicate_total") == 1
    delta_202 = (_metric(after, "ingest_http_requests_total", route="/api/v1/events", method="POST", status="202")
                 - _metric(before, "ingest_http_requests_total", route="/api/v1/events", method="POST", status="202"))
    assert delta_202 == 2
    # Both slots may run the same release: the slot keeps their counters apart for Prometheus.
    assert _metric(after, "ingest_http_requests_total", route="/api/v1/events", version="9.9.9-test",
                   slot="green") >= 2
    assert _metric(after, "ingest_http_request_duration_seconds_count", route="/api/v1/events", slot="green") >= 3
    assert _metric(after, "ingest_http_requests_total", status="422") > _metric(before, "ingest_http_requests_total", status="422")
    assert _metric(after, "ingest_degraded") == 0


def test_version_and_readiness(client, service):
    version = client.get("/version").json()
    assert version == {"version": "9.9.9-test", "schema_head": "0002", "code_schema_head": "0002"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ok"
    assert set(ready.json()["checks"]) == {"database", "schema", "redis"}
