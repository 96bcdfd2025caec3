"""A deadline for a request's line and headers, which uvicorn's httptools protocol does not have.

uvicorn closes an idle kept-alive connection after `timeout_keep_alive`, but nothing cuts off a client that is
in the middle of sending its request line and headers: a client that sends them a byte at a time, or sends half
and stalls ("slowloris"), holds a socket and a file descriptor as long as it likes, and a few thousand such
connections exhaust the process.

`header_timeout_protocol(seconds)` is uvicorn's HttpToolsProtocol with one timer added:

- armed when the connection opens, and when the first byte of a later request arrives on a kept-alive
  connection (between requests uvicorn's own keep-alive timeout applies);
- cancelled when the headers are complete (from then on the app runs; it reads the body itself);
- if it fires first, the connection is closed: nothing is answered, as nginx does for its client_header_timeout.

The deadline is for the whole header, not per read, so trickling bytes does not extend it.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("ingest.http")


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that closes a connection whose request headers are not complete in time."""

    header_timeout_seconds: float = 10.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # The first request keeps the deadline armed at connect time (connecting and then waiting must not
        # earn extra time); a later request on a kept-alive connection gets a fresh one.
        if self._header_deadline is None:
            self._arm_header_deadline()

    def on_headers_complete(self) -> None:
        self._cancel_header_deadline()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._cancel_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout_seconds, self._header_deadline_passed)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_deadline_passed(self) -> None:
        self._header_deadline = None
        if self.transport is None or self.transport.is_closing():
            return
        log.info("closing connection: request headers not complete in time (HEADER_TIMEOUT_SECONDS)",
                 extra={"client": self.client[0] if self.client else "",
                        "header_timeout_seconds": self.header_timeout_seconds})
        self.transport.close()


def header_timeout_protocol(seconds: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class to give uvicorn as `http=`, with its header deadline set to `seconds`."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_seconds": float(seconds)})
