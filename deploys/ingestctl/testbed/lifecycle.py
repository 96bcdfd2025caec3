"""Bring a testbed up, take it down, report on it. The CLI in commands.py is a thin layer over these."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

from ingestctl import paths
from ingestctl import secrets as secrets_mod
from ingestctl.baseimages import RECIPE_LABEL, Progress, remove_base_images
from ingestctl.errors import ConfigError, HostError
from ingestctl.testbed import hostspec, images, keys, probe
from ingestctl.testbed import prometheus as prometheus_mod
from ingestctl.testbed import state as state_mod
from ingestctl.testbed.engine import docker_client
from ingestctl.testbed.hostspec import EXPLICIT_CAPS, MAX_APP_HOSTS, PRIVILEGED, HostSpec
from ingestctl.testbed.state import HostState, TestbedState

READY_DEADLINE_S = 180.0
STORAGE_ENV = "INGESTCTL_TESTBED_STORAGE"
STORAGE_CHOICES = ("auto", "overlay2", "vfs")
SSH_USER = hostspec.READY_SSH_USER


@dataclass
class UpResult:
    state: TestbedState
    health: list[probe.HostHealth]
    already_up: bool


def _storage_choice() -> str:
    """INGESTCTL_TESTBED_STORAGE: auto (overlay2 on the volume, else vfs), overlay2 or vfs."""
    choice = os.environ.get(STORAGE_ENV, "auto")
    if choice not in STORAGE_CHOICES:
        raise ConfigError(f"{STORAGE_ENV}={choice!r}: expected one of {', '.join(STORAGE_CHOICES)}")
    return choice


@contextmanager
def _testbed_lock(name: str):
    """Two `up`/`down` runs on one testbed take turns instead of racing for container names."""
    with paths.file_lock(paths.state_dir() / "locks" / f"{name}.lock"):
        yield


@contextmanager
def _engine_errors(name: str, action: str):
    """Docker SDK errors become one HostError naming the testbed and what was being done."""
    import docker.errors

    try:
        yield
    except docker.errors.DockerException as exc:
        raise HostError(f"testbed {name}: {action} failed in the Docker engine: {_short(exc)}") from exc


def up(
    progress: Progress, name: str | None = None, bare: bool | None = None, app_hosts: int | None = None
) -> UpResult:
    """Start the testbed NAME: ready-made hosts (sshd + Docker, root login), or with BARE only sshd and a
    `deploy` user with passwordless sudo (for `ingestctl setup`); APP_HOSTS app hosts beside db1 (default 2).

    BARE/APP_HOSTS None: what the running testbed already is, else ready-made with 2 app hosts. A running
    testbed of another kind or size is a ConfigError: `testbed down` first, nothing is touched.
    """
    name = name or hostspec.testbed_name()
    _storage_choice()  # a bad value fails before anything is built
    if app_hosts is not None:
        hostspec.testbed_hosts(app_hosts)  # a bad count fails before anything is built
    client = docker_client(progress)
    with _engine_errors(name, "testbed up"):
        quick, unhealthy = _already_up(client, name, progress, bare, app_hosts)
        if quick is not None:
            return quick
        with _testbed_lock(name):
            # Another `up` may have finished while we waited: then this one has nothing to do.
            quick, unhealthy = _already_up(client, name, progress, bare, app_hosts)
            if quick is not None:
                return quick
            kind = _recorded_kind(name)
            if kind is not None:
                bare = kind[0] if bare is None else bare
                app_hosts = kind[1] if app_hosts is None else app_hosts
            else:
                _clear_leftovers(client, name, progress)
            return _bring_up(
                client, name, progress, restart=unhealthy, bare=bool(bare),
                app_hosts=hostspec.DEFAULT_APP_HOSTS if app_hosts is None else app_hosts,
            )


def _clear_leftovers(client, name: str, progress: Progress) -> None:
    """Hosts, volumes and networks named NAME that this checkout has no state for, removed before a fresh start.

    They were left by another checkout (or a killed run) and hold its deployments, made with its key pair and
    secrets: reused, they refuse this checkout's key, or their databases this checkout's passwords.
    """
    left = _take_down(client, name, purge=False, progress=lambda _message: None)
    if left.containers or left.volumes or left.networks:
        progress(f"removed leftovers of an earlier testbed {name} this checkout did not start: "
                 + ", ".join([*left.containers, *left.volumes, *left.networks]))


def _recorded_kind(name: str) -> tuple[bool, int] | None:
    try:
        testbed = state_mod.load(name)
    except ConfigError:
        return None
    return testbed.bare, testbed.app_host_count


def _check_kind(testbed: TestbedState, bare: bool | None, app_hosts: int | None) -> None:
    """A running testbed is never silently rebuilt as another kind or size: that would lose its hosts' state."""
    problems = []
    if bare is not None and bare != testbed.bare:
        have, want = ("bare", "ready-made") if testbed.bare else ("ready-made", "bare (--bare)")
        problems.append(f"it is {have}, {want} was asked for")
    if app_hosts is not None and app_hosts != testbed.app_host_count:
        problems.append(f"it has {testbed.app_host_count} app hosts beside db1, --hosts {app_hosts} was asked for")
    if problems:
        hint = "" if testbed.name == hostspec.DEFAULT_TESTBED else f"INGESTCTL_TESTBED={testbed.name} "
        raise ConfigError(
            f"testbed {testbed.name} is already up and {'; '.join(problems)}; "
            f"take it down first: `{hint}ingestctl testbed down` (its hosts' deployed state is lost)"
        )


def _host_image(host: HostSpec, bare: bool) -> str:
    return images.BARE_IMAGES[host.suite] if bare else hostspec.SANDBOX_IMAGE


def _bring_up(
    client, name: str, progress: Progress, restart: frozenset[str] = frozenset(), bare: bool = False,
    app_hosts: int = hostspec.DEFAULT_APP_HOSTS,
) -> UpResult:
    specs = hostspec.testbed_hosts(app_hosts, bare=bare)
    ssh_user = hostspec.BARE_SSH_USER if bare else SSH_USER
    # Every testbed shares the key pair and the local secrets: two `up`s at once (parallel test workers) must
    # not both generate them, or one testbed gets a key the other just replaced.
    with paths.file_lock(paths.state_dir() / "locks" / "shared-files.lock"):
        key_file, public_key = keys.ensure_key_pair(state_mod.key_path())
        generated = secrets_mod.generate_file(paths.secrets_file("local"))
        if generated:
            progress(f"generated {', '.join(generated)} in {paths.secrets_file('local')} (mode 0600)")
    built = images.ensure_all(progress, client, keys=images.BARE_KEYS if bare else images.READY_MADE_KEYS)
    progress(f"images ready: {', '.join(built.values())}")

    network = _ensure_network(client, name)
    mode = _existing_security_mode(client, name)
    containers = {}
    for host in specs:
        container, mode = _ensure_container(
            client, name, host, mode, public_key, progress, host.name in restart, image=_host_image(host, bare)
        )
        containers[host.name] = container

    hosts = [
        HostState(
            name=host.name,
            address=_address(containers[host.name], network.name),
            ssh_port=22,
            roles=list(host.roles),
            container=containers[host.name].name,
            suite=host.suite if bare else "",
        )
        for host in specs
    ]
    testbed = TestbedState(
        name=name,
        network=network.name,
        storage_driver="starting",
        security_mode=mode,
        ssh_user=ssh_user,
        ssh_key=str(key_file.resolve()),
        hosts=hosts,
        bare=bare,
        sudo=bare,
        gateway=_gateway(network),
    )
    if bare:
        progress(f"waiting for sshd and passwordless sudo for {ssh_user} on every host")
    else:
        progress("waiting for sshd and the inner Docker engine on every host")
    health = probe.wait_ready(hosts, ssh_user, testbed.ssh_key, READY_DEADLINE_S, on_wait=progress, bare=bare)
    not_ready = [h for h in health if not h.ready]
    if not_ready:
        details = "; ".join(f"{h.name}: {h.detail or 'not answering'}" for h in not_ready)
        raise HostError(
            f"testbed {name}: hosts not ready (waited up to {READY_DEADLINE_S:.0f}s): {details}; "
            f"inspect with `docker logs {hostspec.container_name(name, not_ready[0].name)}` and "
            f"`docker exec {hostspec.container_name(name, not_ready[0].name)} cat /var/log/dockerd.log`"
        )
    drivers = sorted({h.storage_driver for h in health if h.storage_driver})
    if bare and not drivers:
        drivers = ["none (bare: `ingestctl setup` installs Docker)"]
    testbed.storage_driver = drivers[0] if len(drivers) == 1 else ",".join(drivers)
    if not bare:
        testbed.prometheus_url = prometheus_mod.ensure(client, name, images.PROMETHEUS_IMAGE,
                                                       testbed.hosts_with_role("app"), progress)
    testbed.ssh_config = str(state_mod.write_ssh_config(testbed))
    state_mod.save(testbed)
    return UpResult(testbed, health, already_up=False)


def _already_up(
    client, name: str, progress: Progress, bare: bool | None = None, app_hosts: int | None = None
) -> tuple[UpResult | None, frozenset[str]]:
    """The no-op path: state present, every container running at its recorded address, every host answering.

    Otherwise (None, names of running hosts that do not answer), so `up` can restart just those.
    """
    nothing = (None, frozenset())
    try:
        testbed = state_mod.load(name)
    except ConfigError:
        return nothing
    _check_kind(testbed, bare, app_hosts)
    running = {
        c.name: c
        for c in client.containers.list(filters={"label": f"{hostspec.LABEL}={name}", "status": "running"})
    }
    for host in testbed.hosts:
        container = running.get(host.container)
        if container is None or _address(container, testbed.network) != host.address:
            return nothing
    if not testbed.bare:
        # A missing, re-addressed or reconfigured Prometheus sends `up` the full way, which keeps the hosts and
        # starts it again.
        url = prometheus_mod.running_url(client, name, images.PROMETHEUS_IMAGE, testbed.hosts_with_role("app"))
        if url is None or url != testbed.prometheus_url:
            return nothing  # `up` starts (or re-addresses) Prometheus; the hosts themselves are kept
    stale = []
    for host in testbed.hosts:
        key = images.bare_image_key(host.suite or "trixie") if testbed.bare else "sandbox-host"
        container = running[host.container]
        if container.labels.get(RECIPE_LABEL) != images.SANDBOX_IMAGES[key].recipe_hash():
            stale.append(container.name)
    if stale:
        flags = " --bare" if testbed.bare else ""
        progress(
            f"note: {', '.join(sorted(stale))} run an older sandbox image recipe; "
            f"`ingestctl testbed down && ingestctl testbed up{flags}` rebuilds them (deployed state is lost)"
        )
    health = probe.check_all(testbed.hosts, testbed.ssh_user, testbed.ssh_key, bare=testbed.bare)
    unhealthy = frozenset(h.name for h in health if not h.ready)
    if unhealthy:
        return None, unhealthy
    return UpResult(testbed, health, already_up=True), frozenset()


def _ensure_network(client, name: str):
    import docker.errors

    net_name = hostspec.network_name(name)
    try:
        return client.networks.get(net_name)
    except docker.errors.NotFound:
        return client.networks.create(net_name, driver="bridge", labels=hostspec.labels(name))


def _existing_security_mode(client, name: str) -> str | None:
    """Keep the mode of hosts that survive from an earlier `up`, so the testbed is never half privileged."""
    for container in client.containers.list(all=True, filters={"label": f"{hostspec.LABEL}={name}"}):
        return PRIVILEGED if container.attrs["HostConfig"].get("Privileged") else EXPLICIT_CAPS
    return None


def _ensure_container(
    client,
    name: str,
    host: HostSpec,
    mode: str | None,
    public_key: str,
    progress: Progress,
    restart: bool = False,
    image: str = hostspec.SANDBOX_IMAGE,
):
    """(running container, security mode used). Starts a stopped one, restarts a silent one, creates a missing one."""
    import docker.errors

    container_name = hostspec.container_name(name, host.name)
    try:
        container = client.containers.get(container_name)
    except docker.errors.NotFound:
        container = None
    if container is not None:
        if container.status != "running":
            progress(f"starting stopped sandbox host {host.name}")
            container.start()
        elif restart:
            progress(f"restarting sandbox host {host.name}: its sshd or Docker engine did not answer")
            container.restart(timeout=5)
        return container, mode or PRIVILEGED

    _ensure_volume(client, name, host.name)
    modes = [mode] if mode else [PRIVILEGED, EXPLICIT_CAPS]
    last_error = None
    for candidate in modes:
        spec = hostspec.container_spec(
            name, host, candidate, public_key, storage_driver=_storage_choice(), image=image
        )
        container = client.containers.get(client.api.create_container(**spec.create_kwargs())["Id"])
        try:
            container.start()
        except docker.errors.APIError as exc:
            container.remove(force=True, v=True)
            last_error = exc
            if candidate == PRIVILEGED and len(modes) > 1:
                progress(f"--privileged is refused here ({_short(exc)}); using the explicit capability list")
            continue
        progress(f"started sandbox host {host.name} ({candidate})")
        container.reload()
        return container, candidate
    raise HostError(
        f"sandbox host {host.name}: the container did not start in mode(s) {modes}: {_short(last_error)}; "
        "the engine must allow the capabilities in DESIGN section 5"
    )


def _ensure_volume(client, name: str, host: str) -> None:
    import docker.errors

    vol_name = hostspec.volume_name(name, host)
    try:
        client.volumes.get(vol_name)
    except docker.errors.NotFound:
        client.volumes.create(vol_name, labels=hostspec.labels(name, host))


def _gateway(network) -> str:
    """The network's gateway: the controller's own address as the sandbox hosts see it ("" if Docker names none)."""
    network.reload()
    configs = (network.attrs.get("IPAM") or {}).get("Config") or [{}]
    return next((c["Gateway"] for c in configs if c.get("Gateway")), "")


def _address(container, network: str) -> str:
    container.reload()
    address = container.attrs["NetworkSettings"]["Networks"].get(network, {}).get("IPAddress")
    if not address:
        raise HostError(
            f"sandbox container {container.name}: expected an address on network {network}, found none"
        )
    return address


def _short(exc) -> str:
    text = getattr(exc, "explanation", None) or str(exc)
    return str(text).strip().splitlines()[0][:200] if text else "unknown error"


@dataclass
class DownResult:
    containers: list[str]
    volumes: list[str]
    networks: list[str]
    images: list[str]


def down(progress: Progress, name: str | None = None, purge: bool = False) -> DownResult:
    """Remove every container, volume and network labelled for (or named after) the testbed, and its state."""
    name = name or hostspec.testbed_name()
    client = docker_client(progress)
    with _engine_errors(name, "testbed down"), _testbed_lock(name):
        return _take_down(client, name, purge, progress)


def _take_down(client, name: str, purge: bool, progress: Progress) -> DownResult:
    import docker.errors

    label = {"label": f"{hostspec.LABEL}={name}"}
    result = DownResult([], [], [], [])

    containers = {c.id: c for c in client.containers.list(all=True, filters=label)}
    for host in hostspec.testbed_hosts(MAX_APP_HOSTS):
        try:
            found = client.containers.get(hostspec.container_name(name, host.name))
            containers.setdefault(found.id, found)
        except docker.errors.NotFound:
            pass
    for container in containers.values():
        container.remove(force=True, v=True)
        result.containers.append(container.name)
        progress(f"removed container {container.name}")

    volumes = {v.name: v for v in client.volumes.list(filters=label)}
    for host in hostspec.testbed_hosts(MAX_APP_HOSTS):
        try:
            volumes.setdefault(
                hostspec.volume_name(name, host.name),
                client.volumes.get(hostspec.volume_name(name, host.name)),
            )
        except docker.errors.NotFound:
            pass
    for volume in volumes.values():
        _remove_with_retry(lambda v=volume: v.remove(force=True))
        result.volumes.append(volume.name)
        progress(f"removed volume {volume.name}")

    networks = {n.id: n for n in client.networks.list(filters=label)}
    networks.update(
        {
            n.id: n
            for n in client.networks.list(names=[hostspec.network_name(name)])
            if n.name == hostspec.network_name(name)
        }
    )
    for network in networks.values():
        _remove_with_retry(network.remove)
        result.networks.append(network.name)
        progress(f"removed network {network.name}")

    state_mod.remove(name)
    if purge:
        result.images += images.remove_all(client, progress)
        result.images += remove_base_images(client, progress)
    return result


def _remove_with_retry(remove, attempts: int = 10) -> None:
    """Volumes and networks can stay busy for a moment after their container is force-removed."""
    import docker.errors

    for attempt in range(attempts):
        try:
            remove()
            return
        except docker.errors.NotFound:
            return
        except docker.errors.APIError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.3)


def status(name: str | None = None) -> tuple[TestbedState, list[probe.HostHealth]]:
    testbed = state_mod.load(name)
    return testbed, probe.check_all(testbed.hosts, testbed.ssh_user, testbed.ssh_key, bare=testbed.bare)
