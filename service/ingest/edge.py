"""Outermost middleware: request id, one JSON access-log line, and HTTP metrics for every request."""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingest.context import request_id_var
from ingest.metrics import HTTP_DURATION, HTTP_REQUESTS

access_log = logging.getLogger("ingest.access")

# A client-supplied id is echoed into logs and headers, so it must be short and harmless.
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _VALID_REQUEST_ID.match(text) else None
    return None


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, version: str = "dev", slot: str = ""):
        self.app = app
        self.version = version
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["X-Request-Id"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            route_label = getattr(route, "path", None) or "unmatched"
            HTTP_REQUESTS.labels(route_label, scope["method"], str(status), self.version, self.slot).inc()
            HTTP_DURATION.labels(route_label, self.version, self.slot).observe(elapsed)
            access_log.info(
                "request", extra={
                    "method": scope["method"], "path": scope["path"], "route": route_label,
                    "status": status, "duration_ms": round(elapsed * 1000, 2),
                    "client": (scope.get("client") or ("", 0))[0],
                },
            )
            request_id_var.reset(token)
