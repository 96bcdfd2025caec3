"""`ingestctl testbed up|down|status`: local sandbox hosts reachable over SSH (DESIGN section 5)."""

from __future__ import annotations

import click

from ingestctl.clikit import json_option, reporting
from ingestctl.errors import HostError
from ingestctl.output import Reporter
from ingestctl.testbed import hostspec


@click.group("testbed")
def testbed() -> None:
    """Local sandbox hosts (db1, app2, app3) reachable over SSH.

    `up --bare` starts hosts with only sshd and a `deploy` user with passwordless sudo (db1 on Debian 12, the
    app hosts on Debian 13), for `ingestctl setup local`; `--hosts N` gives N app hosts beside db1.

    INGESTCTL_TESTBED names the testbed (default ingest-tb): it prefixes the Docker objects and selects
    the state in .testbed/NAME/, so tests can run their own testbed beside a developer's.
    """


def _report_hosts(reporter: Reporter, testbed_state, health) -> None:
    by_name = {h.name: h for h in health}
    if reporter.json_mode:
        for host in testbed_state.hosts:
            h = by_name[host.name]
            reporter.event(
                "host",
                testbed=testbed_state.name,
                name=host.name,
                roles=host.roles,
                address=host.address,
                ssh_port=host.ssh_port,
                ssh_user=testbed_state.ssh_user,
                sudo=testbed_state.sudo,
                bare=testbed_state.bare,
                suite=host.suite or None,
                ssh_key=testbed_state.ssh_key,
                sshd=h.sshd,
                sudo_ok=h.sudo,
                docker=h.docker,
                docker_version=h.docker_version,
                storage_driver=h.storage_driver,
                detail=h.detail,
            )
        if testbed_state.prometheus_url:
            reporter.event("prometheus", testbed=testbed_state.name, url=testbed_state.prometheus_url)
        return
    # Every host shares the key, so it is printed once under the table rather than squeezing each row.
    rows = []
    for host in testbed_state.hosts:
        h = by_name[host.name]
        row = [
            host.name,
            ",".join(host.roles),
            host.address,
            host.ssh_port,
            "yes" if h.sshd else "NO",
        ]
        if testbed_state.bare:
            row += [host.suite, "yes" if h.sudo else "NO"]
        row += ["yes" if h.docker else ("no" if testbed_state.bare else "NO"), h.storage_driver or h.detail]
        rows.append(row)
    columns = ["host", "roles", "address", "ssh port", "sshd"]
    if testbed_state.bare:
        columns += ["debian", "sudo"]
    kind = f"{testbed_state.security_mode}, bare" if testbed_state.bare else testbed_state.security_mode
    reporter.table(
        f"testbed {testbed_state.name} ({kind})",
        [*columns, "docker", "storage / problem"],
        rows,
    )
    via = ", root through passwordless sudo" if testbed_state.sudo else ""
    reporter.event(
        "info", f"ssh key (every host): {testbed_state.ssh_key}, user {testbed_state.ssh_user}{via}"
    )
    if testbed_state.prometheus_url:
        reporter.event("info", f"Prometheus (scrapes every app host's /metrics): {testbed_state.prometheus_url}")


@testbed.command("up")
@click.option(
    "--bare",
    is_flag=True,
    default=None,
    help="Hosts with only sshd and a `deploy` user with passwordless sudo (no Docker), for `ingestctl setup`.",
)
@click.option(
    "--hosts",
    "app_hosts",
    type=int,
    default=None,
    help=f"App hosts beside db1 (default {hostspec.DEFAULT_APP_HOSTS}): app2, app3, ...",
)
@json_option
@reporting
def up_command(bare: bool | None, app_hosts: int | None, reporter: Reporter) -> None:
    """Build missing images, start db1, app2, app3 and wait until sshd and Docker (--bare: sudo) answer on each."""
    from ingestctl.testbed import lifecycle

    result = lifecycle.up(lambda message: reporter.event("progress", message), bare=bare, app_hosts=app_hosts)
    _report_hosts(reporter, result.state, result.health)
    verb = "already up" if result.already_up else "up"
    if result.state.bare:
        what = (
            f"{len(result.state.hosts)} bare hosts (user {result.state.ssh_user} with sudo); "
            "next: `ingestctl setup local`"
        )
    else:
        what = f"{len(result.state.hosts)} hosts, storage driver {result.state.storage_driver}"
    reporter.event(
        "summary",
        f"testbed {result.state.name} {verb}: {what}; ssh: ssh -F {result.state.ssh_config} db1",
        testbed=result.state.name,
        already_up=result.already_up,
        bare=result.state.bare,
        ssh_user=result.state.ssh_user,
        sudo=result.state.sudo,
        hosts=[host.name for host in result.state.hosts],
        storage_driver=result.state.storage_driver,
        security_mode=result.state.security_mode,
        ssh_config=result.state.ssh_config,
    )


@testbed.command("base-images")
@json_option
@reporting
def base_images_command(reporter: Reporter) -> None:
    """Build the Debian base images (debootstrap) when missing: the one step that needs root. Run it once with
    sudo; `testbed up`, deploys and tests then run as any user in the docker group."""
    from ingestctl import baseimages

    built = baseimages.ensure_all(lambda message: reporter.event("progress", message))
    reporter.event("summary", f"base images ready: {', '.join(built)}", images=built)


@testbed.command("down")
@click.option("--purge", is_flag=True, help="Also remove the cached base and sandbox images.")
@json_option
@reporting
def down_command(purge: bool, reporter: Reporter) -> None:
    """Remove the testbed's containers, volumes, network and state (cached images stay unless --purge)."""
    from ingestctl.testbed import lifecycle

    name = hostspec.testbed_name()
    result = lifecycle.down(lambda message: reporter.event("progress", message), name=name, purge=purge)
    reporter.event(
        "summary",
        f"testbed {name} down: removed {len(result.containers)} containers, {len(result.volumes)} volumes, "
        f"{len(result.networks)} networks" + (f", {len(result.images)} images" if purge else ""),
        testbed=name,
        containers=result.containers,
        volumes=result.volumes,
        networks=result.networks,
        images=result.images,
    )


@testbed.command("status")
@json_option
@reporting
def status_command(reporter: Reporter) -> None:
    """Each host's name, address, SSH port, key path and whether sshd and Docker answer (exit 2 if not)."""
    from ingestctl.testbed import lifecycle

    testbed_state, health = lifecycle.status()
    _report_hosts(reporter, testbed_state, health)
    down_hosts = [h.name for h in health if not h.ready]
    if down_hosts:
        raise HostError(
            f"testbed {testbed_state.name}: {', '.join(down_hosts)} not answering; run `ingestctl testbed up`"
            + ("" if not testbed_state.bare else " (bare hosts need sshd and passwordless sudo)")
        )
    if testbed_state.bare:
        with_docker = len([h for h in health if h.docker])
        message = (
            f"testbed {testbed_state.name}: all {len(health)} bare hosts answer over SSH with sudo; "
            f"Docker on {with_docker} of them" + ("" if with_docker == len(health) else " (`ingestctl setup local`)")
        )
    else:
        message = f"testbed {testbed_state.name}: all {len(health)} hosts answer over SSH and Docker"
    reporter.event(
        "summary",
        message,
        testbed=testbed_state.name,
        ready=True,
        bare=testbed_state.bare,
        ssh_user=testbed_state.ssh_user,
        sudo=testbed_state.sudo,
    )
