"""The zero-downtime soak's negative control: a deliberately racy proxy switch, done by the bench itself.

Every app host's proxy is restarted (`docker restart -t 0`: SIGTERM, then SIGKILL at once) instead of
gracefully reloaded, the way a naive switch that re-creates the proxy with a new config would do it. The
connections it holds are cut and new ones are refused until nginx listens again, so the soak must count
failed requests here; a soak that shows none would be blind to a dropped request. The live slot does not
change: only the proxy's handling of its connections is under test.
"""

from __future__ import annotations

import shlex
import time
from concurrent.futures import ThreadPoolExecutor

RESTART = ("c=$(docker ps -q --filter label=com.docker.compose.project=ingest "
           "--filter label=com.docker.compose.service=proxy); test -n \"$c\" && docker restart -t 0 \"$c\"")


def restart_proxies() -> tuple[int, list[float]]:
    """Restart every app host's proxy at once; (0, [the time the last restart returned]) like a switch action."""
    from ingestctl.testbed import state as testbed_state
    from ingestctl.testbed.probe import run_ssh

    state = testbed_state.load()
    command = f"sudo -n sh -c {shlex.quote(RESTART)}" if state.sudo else RESTART
    apps = [h for h in state.hosts if "app" in h.roles]

    def restart(host) -> None:
        code, _out, err = run_ssh(host.address, host.ssh_port, state.ssh_user, state.ssh_key, command, timeout=60)
        if code != 0:
            raise SystemExit(f"{host.name}: restarting the proxy failed (exit {code}): {err[-500:]}")

    with ThreadPoolExecutor(len(apps)) as pool:
        list(pool.map(restart, apps))
    return 0, [time.time()]
