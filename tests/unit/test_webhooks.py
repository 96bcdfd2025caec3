"""Change events: the CDEvents payloads, and their delivery to real HTTP receivers on loopback (one that fails the
first attempt, one that never answers), retried with backoff and never holding the caller."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from ingestctl import cdevents, inventory, webhooks
from ingestctl.errors import ConfigError

IMAGE = "sha256:" + "ab" * 32


# --- payloads ------------------------------------------------------------------------------------------------


def test_service_events_have_the_cdevents_context_and_subject():
    payload = cdevents.service_changed("service.upgraded", "prod", "1.4.2", IMAGE, "20240501T120000-abcdef", "1.4.1")
    context, subject = payload["context"], payload["subject"]
    assert context["version"] == "0.4.1" and context["type"] == "dev.cdevents.service.upgraded.0.2.0"
    assert context["source"] == "/ingestctl/prod" and context["timestamp"].endswith("Z") and len(context["id"]) == 36
    assert subject == {"id": "prod/ingest", "source": "/ingestctl/prod", "type": "service",
                       "content": {"environment": {"id": "prod", "source": "/ingestctl/prod"},
                                   "artifactId": f"pkg:oci/ingest@sha256%3A{'ab' * 32}?tag=1.4.2"}}
    assert payload["customData"]["previousRelease"] == "1.4.1"
    assert payload["customDataContentType"] == "application/json"


@pytest.mark.parametrize("kind", ["service.deployed", "service.rolledback"])
def test_deployed_and_rolled_back_types(kind):
    assert cdevents.service_changed(kind, "e", "v", None, "r")["context"]["type"] == f"dev.cdevents.{kind}.0.2.0"


def test_incident_and_gate_and_pipeline_events():
    detected = cdevents.incident("incident.detected", "local", "inc-20240501-0a0b0c", "errors", 2, "v2", "draft",
                                 "20240501T120000-abcdef")
    assert detected["context"]["type"] == "dev.cdevents.incident.detected.0.2.0"
    assert detected["subject"]["type"] == "incident" and detected["subject"]["id"] == "inc-20240501-0a0b0c"
    assert detected["subject"]["content"]["description"] == "errors"
    assert detected["customData"]["severity"] == "SEV-2"
    resolved = cdevents.incident("incident.resolved", "local", "inc-20240501-0a0b0c", "errors", 2, None, "closed", None)
    assert resolved["context"]["type"] == "dev.cdevents.incident.resolved.0.2.0"
    gate = cdevents.gate_failed("local", "r1", "metrics", {"app1.error_ratio": 0.4}, "metric gate failed")
    assert gate["subject"]["type"] == "testCaseRun" and gate["subject"]["content"]["outcome"] == "fail"
    assert gate["customData"]["numbers"] == {"app1.error_ratio": 0.4}
    finished = cdevents.pipeline_finished("local", "r1", "v2", "failure", 3, "gate failed")
    assert finished["subject"]["content"] == {"pipelineName": "deploy local", "outcome": "failure",
                                              "errors": "gate failed"}
    assert finished["customData"]["exitCode"] == 3
    assert cdevents.pipeline_started("local", "r1", "v2")["context"]["type"] == "dev.cdevents.pipelinerun.started.0.2.0"


# --- inventory ------------------------------------------------------------------------------------------------


def test_inventory_webhooks_are_validated_without_echoing_the_url():
    hosts = {"db1": {"ssh_hostname": "10.0.0.1", "roles": ["db", "app"]}}
    env = inventory.environment(name="prod", data={"webhooks": ["https://hooks.example/T0K3N"]}, hosts=hosts,
                                source="inventories/prod.py")
    assert env.data.webhooks == ["https://hooks.example/T0K3N"]
    with pytest.raises(ConfigError, match=r"data.webhooks: \[0\]: expected an http:// or https:// URL") as raised:
        inventory.environment(name="prod", data={"webhooks": ["ftp://hooks.example/S3CRET"]}, hosts=hosts,
                              source="inventories/prod.py")
    assert "S3CRET" not in str(raised.value)


# --- delivery -----------------------------------------------------------------------------------------------


class Receiver(http.server.BaseHTTPRequestHandler):
    """Answers 503 to the first FAIL_FIRST posts, then 202; records every body it received."""

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        with server.lock:
            server.attempts += 1
            failing = server.attempts <= server.fail_first
            if not failing:
                server.received.append(body)
        self.send_response(503 if failing else 202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@contextmanager
def receiver(fail_first: int = 0) -> Iterator[http.server.HTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    server.attempts, server.fail_first, server.received, server.lock = 0, fail_first, [], threading.Lock()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def silent_receiver() -> Iterator[str]:
    """A listening socket that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    finally:
        sock.close()


def url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/hook/token"


def test_a_failed_first_attempt_is_retried_and_delivered():
    with receiver(fail_first=1) as server:
        notifier = webhooks.Notifier([url(server)], backoff_s=(0.05, 0.1))
        payload = cdevents.pipeline_started("local", "r1", "v2")
        notifier.emit(payload)
        assert notifier.flush(cap_s=5) == 0
    assert server.attempts == 2 and server.received == [payload]
    assert notifier.outcome.delivered == [(url(server), payload["context"]["type"])] and not notifier.outcome.failed


def test_a_receiver_that_keeps_failing_is_given_up_after_the_backoff_schedule():
    with receiver(fail_first=100) as server:
        notifier = webhooks.Notifier([url(server)], backoff_s=(0.01, 0.02, 0.04))
        notifier.emit(cdevents.pipeline_started("local", "r1", "v2"))
        assert notifier.flush(cap_s=5) == 0
    assert server.attempts == 4  # one attempt, then one per backoff step
    assert notifier.outcome.failed[0][2] == "HTTP 503"


def test_a_receiver_that_never_answers_holds_neither_emit_nor_exit_and_others_still_get_events():
    with silent_receiver() as hanging, receiver() as good:
        notifier = webhooks.Notifier([hanging, url(good)], attempt_timeout_s=2.0, backoff_s=(0.1,))
        started = time.monotonic()
        for n in range(3):
            notifier.emit(cdevents.pipeline_started("local", f"r{n}", "v2"))
        assert time.monotonic() - started < 0.2  # emit only queues
        left = notifier.flush(cap_s=1.0)
        elapsed = time.monotonic() - started
    assert elapsed < 1.5, f"flush held the caller {elapsed:.1f}s past its 1s cap"
    assert left > 0  # the hanging receiver's deliveries were dropped at the cap, and counted


def test_emit_after_flush_and_without_urls_does_nothing():
    with receiver() as server:
        notifier = webhooks.Notifier([url(server)])
        notifier.flush(cap_s=0.1)
        notifier.emit(cdevents.pipeline_started("local", "r1", "v2"))
        time.sleep(0.1)
    assert server.attempts == 0
    assert webhooks.Notifier([]).flush(cap_s=0) == 0


def test_shown_url_never_includes_the_path_or_credentials():
    assert webhooks.shown_url("https://user:pw@hooks.example:8443/services/T0K3N?x=1") == "https://hooks.example:8443/…"
