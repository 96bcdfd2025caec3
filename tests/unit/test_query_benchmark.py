"""The query benchmark times queries, not the rate limiter's Retry-After waits (a real loopback HTTP server)."""

import asyncio
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from ingest.tools.query_benchmark import Profile, Runner, render_table, summarize


class ThrottleEveryOther(BaseHTTPRequestHandler):
    """Answers 429 (Retry-After: 1) to every other request, 200 to the rest: a limiter whose bucket is empty."""

    calls = 0
    lock = threading.Lock()

    def do_GET(self):  # noqa: N802 (http.server's naming)
        with self.lock:
            type(self).calls += 1
            throttled = type(self).calls % 2 == 1
        body = b'{"items": [], "next_cursor": null}'
        self.send_response(429 if throttled else 200)
        if throttled:
            self.send_header("Retry-After", "1")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def throttling_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ThrottleEveryOther)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_throttled_waits_are_counted_apart_not_added_to_latency(throttling_server):
    profile = Profile("t", seed_events=0, concurrency=2, requests_per_endpoint=4, max_seconds_per_endpoint=30)

    async def measure():
        runner = Runner(throttling_server, "key", "token", profile)
        try:
            latencies, errors = await runner.measure("q", [{"path": "/api/v1/events", "params": {}}])
            return latencies, errors, runner.throttled
        finally:
            await runner.close()

    latencies, errors, throttled = asyncio.run(measure())
    assert errors == 0 and len(latencies) == 4
    assert throttled >= 2
    # Each sample is one loopback request; a Retry-After wait of 1 s would put every throttled one above 1000 ms.
    assert max(latencies) < 1000, latencies


def test_table_shows_max_and_throttled_requests():
    result = summarize("stats", "http://h:8000", [1.0, 2.0, 900.0], 0, None, None)
    table = render_table(Profile("local", 1, 1, 1, 1), [result], {"http://h:8000": 7})
    assert "max ms" in table and "900.0" in table
    assert "http://h:8000: 7 request(s) answered 429" in table
