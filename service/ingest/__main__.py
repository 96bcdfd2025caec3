"""`python -m ingest`: validate settings once, then serve with uvicorn until SIGTERM drains it."""

from __future__ import annotations

import signal
import sys

import uvicorn

from ingest.settings import ConfigurationError, load_settings


def main() -> int:
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        print(f"ingest: configuration error: {exc}", file=sys.stderr)
        return 2

    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    from ingest.app import create_app
    from ingest.header_timeout import header_timeout_protocol
    from ingest.jsonlog import configure_logging
    from ingest.listeners import UnixSocketPeer, listeners, trusted_peers

    configure_logging(settings.log_level)
    # X-Forwarded-For is handled here rather than by uvicorn's proxy_headers, so that a unix-socket peer (the
    # proxy) is named before the trust check.
    app = UnixSocketPeer(ProxyHeadersMiddleware(
        create_app(settings), trusted_hosts=trusted_peers(settings.forwarded_allow_ips, settings.unix_socket)))
    server = uvicorn.Server(uvicorn.Config(
        app, log_config=None, access_log=False,
        # httptools, as uvicorn's "auto" picks, plus a deadline for the request headers (slow clients).
        http=header_timeout_protocol(settings.header_timeout_seconds),
        lifespan="on", server_header=False, timeout_graceful_shutdown=settings.shutdown_grace_seconds,
        timeout_keep_alive=5, proxy_headers=False,
    ))
    # uvicorn re-raises the stop signal after its graceful shutdown, which would make the process die with
    # -SIGTERM (exit 143). A drained shutdown is a clean exit, so the re-raised signal lands on a no-op.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda *_: None)
    server.run(sockets=listeners(settings.host, settings.port, settings.unix_socket))
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
