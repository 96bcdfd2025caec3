"""Pure description of a sandbox: host names and roles, resource names, and the container settings.

Nothing here talks to Docker, so every value is checked by exact-value unit tests.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ingestctl.errors import ConfigError

TESTBED_ENV = "INGESTCTL_TESTBED"
DEFAULT_TESTBED = "ingest-tb"
LABEL = "io.ingest.testbed"
LABEL_HOST = "io.ingest.testbed.host"
LABEL_ROLES = "io.ingest.testbed.roles"
SANDBOX_IMAGE = "ingest-sandbox-host:latest"

# Every capability Docker 20.10+ knows (linux/capability.h order).
ALL_CAPABILITIES = (
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
)
# Where --privileged fails ("unable to apply caps"), these four are what the runtime cannot grant (DESIGN 5).
UNGRANTABLE_CAPABILITIES = frozenset({"SYS_RESOURCE", "PERFMON", "BPF", "CHECKPOINT_RESTORE"})
FALLBACK_CAPABILITIES = tuple(cap for cap in ALL_CAPABILITIES if cap not in UNGRANTABLE_CAPABILITIES)

PRIVILEGED = "privileged"
EXPLICIT_CAPS = "explicit-caps"
SECURITY_MODES = (PRIVILEGED, EXPLICIT_CAPS)

# The inner engines' own networks stay clear of the outer engine's 172.16/12 pools.
INNER_BRIDGE_IP = "10.250.0.1/24"
INNER_ADDRESS_POOL = "base=10.251.0.0/16,size=24"

_NAME_RULE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,40}$")


@dataclass(frozen=True)
class HostSpec:
    name: str
    roles: tuple[str, ...]
    # The Debian release of a bare host (`testbed up --bare`); ready-made hosts all run the sandbox-host image.
    suite: str = "trixie"


DEFAULT_HOSTS = (
    HostSpec("db1", ("db", "app")),
    HostSpec("app2", ("app",)),
    HostSpec("app3", ("app",)),
)
DEFAULT_APP_HOSTS = 2
MAX_APP_HOSTS = 8
# Bare testbeds mix the Debian releases so that `ingestctl setup` meets both: db1 on bookworm (Compose v1,
# `docker-compose`), the app hosts on trixie (Compose v2, `docker compose`).
BARE_DB_SUITE = "bookworm"
BARE_APP_SUITE = "trixie"
BARE_SSH_USER = "deploy"
READY_SSH_USER = "root"


def testbed_hosts(app_hosts: int = DEFAULT_APP_HOSTS, bare: bool = False) -> tuple[HostSpec, ...]:
    """db1 (db and app) and APP_HOSTS app hosts beside it: app2, app3, ... (`testbed up --hosts N`)."""
    if not isinstance(app_hosts, int) or isinstance(app_hosts, bool) or not 1 <= app_hosts <= MAX_APP_HOSTS:
        raise ConfigError(f"--hosts: expected a number of app hosts from 1 to {MAX_APP_HOSTS}, found {app_hosts!r}")
    db_suite, app_suite = (BARE_DB_SUITE, BARE_APP_SUITE) if bare else ("trixie", "trixie")
    return (
        HostSpec("db1", ("db", "app"), db_suite),
        *(HostSpec(f"app{n}", ("app",), app_suite) for n in range(2, app_hosts + 2)),
    )


def testbed_name(environ=None) -> str:
    """The testbed's name from INGESTCTL_TESTBED (default `ingest-tb`); it prefixes every Docker object."""
    environ = os.environ if environ is None else environ
    name = environ.get(TESTBED_ENV) or DEFAULT_TESTBED
    if not _NAME_RULE.match(name):
        raise ConfigError(
            f"{TESTBED_ENV}={name!r}: expected lower-case letters, digits, '.', '_' or '-' "
            "(at most 41 characters, starting with a letter or digit)"
        )
    return name


def network_name(testbed: str) -> str:
    return f"{testbed}-net"


def container_name(testbed: str, host: str) -> str:
    return f"{testbed}-{host}"


def volume_name(testbed: str, host: str) -> str:
    return f"{testbed}-{host}-docker"


def labels(testbed: str, host: str | None = None) -> dict[str, str]:
    result = {LABEL: testbed}
    if host is not None:
        result[LABEL_HOST] = host
    return result


def security_host_config(mode: str) -> dict:
    """The Engine API `HostConfig` fields that let the container run its own dockerd.

    `systempaths=unconfined` is a docker CLI option, not an engine one: the CLI turns it into empty
    MaskedPaths and ReadonlyPaths, so that is what is sent here.
    """
    if mode == PRIVILEGED:
        return {"Privileged": True}
    if mode == EXPLICIT_CAPS:
        return {
            "CapAdd": list(FALLBACK_CAPABILITIES),
            "SecurityOpt": ["seccomp=unconfined", "apparmor=unconfined"],
            "MaskedPaths": [],
            "ReadonlyPaths": [],
            "DeviceCgroupRules": ["a *:* rwm"],
        }
    raise ValueError(f"security mode {mode!r}: expected one of {SECURITY_MODES}")


@dataclass(frozen=True)
class ContainerSpec:
    """One sandbox host as Engine API create arguments (docker SDK `client.api.create_container`)."""

    name: str
    hostname: str
    image: str
    network: str
    labels: dict
    environment: dict
    host_config: dict

    def create_kwargs(self) -> dict:
        return {
            "image": self.image,
            "name": self.name,
            "hostname": self.hostname,
            "labels": self.labels,
            "environment": self.environment,
            "detach": True,
            "host_config": self.host_config,
            "networking_config": {"EndpointsConfig": {self.network: {}}},
        }


def container_spec(
    testbed: str,
    host: HostSpec,
    mode: str,
    public_key: str,
    storage_driver: str = "auto",
    image: str = SANDBOX_IMAGE,
) -> ContainerSpec:
    """Everything the engine needs to create one sandbox host."""
    binds = [f"{volume_name(testbed, host.name)}:/var/lib/docker:rw"]
    if mode == EXPLICIT_CAPS:
        # Without --privileged the inner dockerd cannot mount its cgroup hierarchy; it uses the host's.
        binds.append("/sys/fs/cgroup:/sys/fs/cgroup:rw")
    host_config = {
        "Binds": binds,
        "Tmpfs": {"/run": "rw,exec", "/tmp": "rw,exec"},
        # tini as PID 1 reaps the entrypoint's orphaned background engine starter.
        "Init": True,
        "NetworkMode": network_name(testbed),
        "RestartPolicy": {"Name": "no"},
        **security_host_config(mode),
    }
    return ContainerSpec(
        name=container_name(testbed, host.name),
        hostname=host.name,
        image=image,
        network=network_name(testbed),
        labels={**labels(testbed, host.name), LABEL_ROLES: ",".join(host.roles)},
        environment={
            "SSH_AUTHORIZED_KEY": public_key,
            "INNER_STORAGE_DRIVER": storage_driver,
            "INNER_BRIDGE_IP": INNER_BRIDGE_IP,
            "INNER_ADDRESS_POOL": INNER_ADDRESS_POOL,
        },
        host_config=host_config,
    )


def docker_run_args(spec: ContainerSpec) -> list[str]:
    """The same container as a `docker run` command line, for humans reproducing a host by hand."""
    hc = spec.host_config
    args = [
        "docker",
        "run",
        "-d",
        "--init",
        "--name",
        spec.name,
        "--hostname",
        spec.hostname,
        "--network",
        spec.network,
    ]
    if hc.get("Privileged"):
        args.append("--privileged")
    args += [f"--cap-add={cap}" for cap in hc.get("CapAdd", [])]
    args += [f"--security-opt={opt}" for opt in hc.get("SecurityOpt", [])]
    if hc.get("MaskedPaths") == [] and hc.get("ReadonlyPaths") == []:
        args.append("--security-opt=systempaths=unconfined")
    args += [f"--device-cgroup-rule={rule}" for rule in hc.get("DeviceCgroupRules", [])]
    for bind in hc["Binds"]:
        args += ["-v", bind]
    for path, options in hc["Tmpfs"].items():
        args += ["--tmpfs", f"{path}:{options}"]
    for key, value in spec.labels.items():
        args += ["--label", f"{key}={value}"]
    for key in spec.environment:
        # Names only: `-e NAME` takes the value from the caller's environment, keeping the line short.
        args += ["-e", key]
    args.append(spec.image)
    return args
