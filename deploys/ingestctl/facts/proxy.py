"""Where a host's proxy sends traffic, read from its config file, beside what compose runs in each api slot."""

from __future__ import annotations

from pyinfra.api import FactBase

from ingestctl.hostlayout import BASE
from ingestctl.reconcile import Routing, parse_routing


class ProxyRouting(FactBase[Routing | None]):
    """The live (non-backup) upstream ports of the proxy config and the slots' .env variables, in one round."""

    def command(self) -> str:
        # The template writes one `server 127.0.0.1:PORT max_fails=0;` line per live slot; backups say `backup`.
        return (
            f"sed -n 's/^ *server 127\\.0\\.0\\.1:\\([0-9][0-9]*\\) max_fails=0;$/port \\1/p' "
            f"{BASE}/proxy/nginx.conf 2>/dev/null; grep '^API_' {BASE}/.env 2>/dev/null; true"
        )

    def process(self, output: list[str]) -> Routing | None:
        return parse_routing(output)
