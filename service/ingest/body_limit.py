"""Request body size guard as pure ASGI middleware.

A declared Content-Length over the limit is refused before one byte of the body is read. Bodies without a
length (chunked) are counted as they stream in and cut off as soon as they pass the limit, so a client
cannot make the service buffer an unbounded body.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingest.context import current_request_id
from ingest.errors import ApiError


class BodyTooLarge(ApiError):
    def __init__(self, limit: int, seen: str):
        super().__init__(
            413, "PAYLOAD_TOO_LARGE",
            f"request body must be at most {limit} bytes (MAX_REQUEST_BODY_BYTES), found {seen}; "
            "split the batch into smaller requests",
        )


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _send_error(send, BodyTooLarge(self.max_bytes, f"Content-Length {declared}"))
            return

        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes, f"more than {self.max_bytes} bytes in a streamed body")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:
            # Raised where nothing inside translated it (e.g. a body read outside a route); answer it here.
            if response_started:
                raise
            await _send_error(send, exc)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_error(send: Send, exc: BodyTooLarge) -> None:
    body = json.dumps(
        {"error": {"code": exc.code, "message": exc.message, "request_id": current_request_id()}}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
