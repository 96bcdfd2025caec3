"""Request body size guard as pure ASGI middleware.

A declared Content-Length over the limit is refused before one byte of the body is handed to the app. Bodies
without a length (chunked) are counted as they stream in and cut off as soon as they pass the limit, so a client
cannot make the service buffer an unbounded body.

Either way the client may still be uploading when the 413 is ready. Closing a socket with unread data in it
makes the kernel send an RST, and the client (or nginx, which then answers 502) loses the 413 to it. So the
413 goes out at once, but the response is only completed, and the connection closed, after the rest of the body
has been read and thrown away: the "lingering close" of RFC 9112 section 9.6.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingest.context import current_request_id
from ingest.errors import ApiError

# Bounds on reading a refused body: enough for any honest client that uploads before it reads (a batch of tens
# of MB, a slow link), small enough that a client cannot keep the service reading for it. Past either bound the
# 413 stands and the connection closes, reset or not.
DISCARD_MAX_BYTES = 64 * 1024 * 1024
DISCARD_MAX_SECONDS = 10.0


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
            await _send_error(receive, send, BodyTooLarge(self.max_bytes, f"Content-Length {declared}"))
            return

        received = 0
        body_unread = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, body_unread
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    body_unread = message.get("more_body", False)
                    raise BodyTooLarge(self.max_bytes, f"more than {self.max_bytes} bytes in a streamed body")
            return message

        async def lingering_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                if body_unread:
                    # The discard is bounded: past a bound the connection must not be kept for more requests.
                    MutableHeaders(scope=message)["connection"] = "close"
            if body_unread and _is_last_body(message):
                await _finish_after_discarding(receive, send, message)
                return
            await send(message)

        try:
            await self.app(scope, limited_receive, lingering_send)
        except BodyTooLarge as exc:
            # Raised where nothing inside translated it (e.g. a body read outside a route); answer it here.
            if response_started:
                raise
            await _send_error(receive, send, exc)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _is_last_body(message: Message) -> bool:
    return message["type"] == "http.response.body" and not message.get("more_body", False)


async def _send_error(receive: Receive, send: Send, exc: BodyTooLarge) -> None:
    body = json.dumps(
        {"error": {"code": exc.code, "message": exc.message, "request_id": current_request_id()}}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await _finish_after_discarding(receive, send, {"type": "http.response.body", "body": body})


async def _finish_after_discarding(receive: Receive, send: Send, last_body: Message) -> None:
    """Send the whole last body, which the client can read right away, but complete the response only after the
    request body is discarded: the server closes the connection, and stops reading it, when the response is
    complete."""
    await send({**last_body, "more_body": True})
    await _discard_request_body(receive)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _discard_request_body(receive: Receive) -> None:
    """Read the rest of the request body, one chunk at a time and none kept, within the discard bounds."""
    discarded = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DISCARD_MAX_SECONDS):
            while discarded <= DISCARD_MAX_BYTES:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
                discarded += len(message.get("body", b""))
