"""The console script's entry point.

pyinfra runs hosts concurrently on gevent greenlets, which only overlap when blocking I/O is cooperative, so
(like the pyinfra CLI) the process is monkey-patched before anything imports sockets, ssl or threading.
Without this, every host step would run one host after another.
"""

from gevent import monkey

monkey.patch_all()


def main() -> None:
    from ingestctl.cli import main as cli_main

    cli_main()
