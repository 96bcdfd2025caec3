"""The sandbox's Prometheus: its own small container on the sandbox network (no SSH, no inner engine), scraping
every app host's /metrics through the host's proxy port twice a second, so gates and SLO windows in the
sandbox stay short. `inventories/local.py` reads its URL from the testbed's state.

The config and the container's settings are pure (unit-tested); `ensure` talks to the local engine.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import httpx

from ingestctl.baseimages import Progress
from ingestctl.errors import HostError
from ingestctl.testbed import hostspec
from ingestctl.testbed.state import HostState

PORT = 9090
# inventories/local.py leaves app_port at its default: the proxy listens here on every app host.
APP_PORT = 8000
# Half a second: a metric gate waits up to one interval for the scrape that follows its window.
SCRAPE_INTERVAL = "500ms"
READY_DEADLINE_S = 60.0


def container_name(testbed: str) -> str:
    return f"{testbed}-prometheus"


def config_text(app_hosts: Sequence[HostState], app_port: int = APP_PORT, interval: str = SCRAPE_INTERVAL) -> str:
    """prometheus.yml for the app hosts, one target per host labelled with its name. JSON is YAML."""
    config = {
        "global": {"scrape_interval": interval, "scrape_timeout": interval},
        "scrape_configs": [{
            "job_name": "ingest",
            "metrics_path": "/metrics",
            "static_configs": [{"targets": [f"{host.address}:{app_port}"], "labels": {"host": host.name}}
                               for host in app_hosts],
        }],
    }
    return json.dumps(config, indent=2)


def container_kwargs(testbed: str, image: str, config: str) -> dict:
    """`client.containers.run` arguments: on the sandbox network, labelled so `testbed down` removes it."""
    return {
        "image": image,
        "name": container_name(testbed),
        "hostname": "prometheus",
        "detach": True,
        "network": hostspec.network_name(testbed),
        "labels": hostspec.labels(testbed, "prometheus"),
        "environment": {"PROMETHEUS_CONFIG": config},
        "restart_policy": {"Name": "no"},
    }


def url_of(address: str) -> str:
    return f"http://{address}:{PORT}"


def ensure(client, testbed: str, image: str, app_hosts: Sequence[HostState], progress: Progress) -> str:
    """The Prometheus container scraping APP_HOSTS, running and ready; its URL. Recreated when its config
    differs (new host addresses after a restart)."""
    import docker.errors

    config = config_text(app_hosts)
    try:
        container = client.containers.get(container_name(testbed))
    except docker.errors.NotFound:
        container = None
    if container is not None and not _current(container, config, image):
        container.remove(force=True)
        container = None
    if container is None:
        container = client.containers.run(**container_kwargs(testbed, image, config))
        progress(f"started Prometheus ({container_name(testbed)}), scraping {len(app_hosts)} app host(s) "
                 f"every {SCRAPE_INTERVAL}")
    container.reload()
    address = container.attrs["NetworkSettings"]["Networks"].get(hostspec.network_name(testbed), {}).get("IPAddress")
    if not address:
        raise HostError(f"Prometheus container {container.name}: expected an address on the sandbox network, "
                        "found none")
    url = url_of(address)
    wait_ready(url, container.name)
    return url


def _current(container, config: str, image: str) -> bool:
    """Running with this config (the scrape interval and the hosts' addresses) and this image."""
    return (container.status == "running"
            and (container.attrs["Config"].get("Env") or []).count(f"PROMETHEUS_CONFIG={config}") == 1
            and container.attrs["Config"].get("Image") == image)


def wait_ready(url: str, name: str, deadline_s: float = READY_DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/-/ready", timeout=2.0)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    raise HostError(f"Prometheus at {url} not ready within {deadline_s:g}s ({last}); see `docker logs {name}`")


def running_url(client, testbed: str, image: str, app_hosts: Sequence[HostState]) -> str | None:
    """The URL of the testbed's Prometheus when it runs IMAGE with the config for APP_HOSTS, else None."""
    import docker.errors

    try:
        container = client.containers.get(container_name(testbed))
    except docker.errors.NotFound:
        return None
    if not _current(container, config_text(app_hosts), image):
        return None
    address = container.attrs["NetworkSettings"]["Networks"].get(hostspec.network_name(testbed), {}).get("IPAddress")
    return url_of(address) if address else None
