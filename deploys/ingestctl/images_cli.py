"""`ingestctl image build|ship`: build the app image from the checkout, ship images to an environment's hosts."""

from __future__ import annotations

import time

import click

from ingestctl.clikit import json_option, reporting
from ingestctl.output import Reporter


@click.group("image")
def image() -> None:
    """Build the app image and ship images to hosts without a registry."""


@image.command("build")
@click.option(
    "--version",
    "version",
    default=None,
    help="Image tag; defaults to `git describe --tags --always --dirty`.",
)
@click.option("--no-cache", is_flag=True, help="Rebuild every layer even when the sources are unchanged.")
@json_option
@reporting
def build_command(version: str | None, no_cache: bool, reporter: Reporter) -> None:
    """Build ingest:VERSION from service/ (skipped when its sources are unchanged)."""
    from ingestctl.images import build_app_image

    built = build_app_image(
        version, progress=lambda message: reporter.event("progress", message), no_cache=no_cache
    )
    verb = "up to date" if built.cached else "built"
    reporter.event(
        "summary",
        f"{built.name} {verb}: {built.id} ({built.seconds:.1f}s)",
        image=built.name,
        id=built.id,
        cached=built.cached,
        seconds=round(built.seconds, 2),
        labels=dict(built.labels),
    )


@image.command("ship")
@click.argument("env")
@click.option("--version", "version", default=None, help="App image tag to ship; defaults to the checkout's.")
@click.option("--host", "hosts", multiple=True, help="Ship only to this host (repeatable).")
@json_option
@reporting
def ship_command(env: str, version: str | None, hosts: tuple[str, ...], reporter: Reporter) -> None:
    """Make every host of ENV hold its images by ID: the app image, plus PostgreSQL/Redis on the db host."""
    from ingestctl import inventory, pyinfra_runner
    from ingestctl.images import checkout_version, image_name
    from ingestctl.operations.shipping import images_shipped
    from ingestctl.paths import project_root
    from ingestctl.runcontext import warn_unpinned_images

    warn_unpinned_images(inventory.load(env), reporter)
    app_image = image_name(version or checkout_version(project_root()))
    started = time.monotonic()
    reporter.event("step", f"shipping {app_image} to {env}", image=app_image, env=env)
    result = pyinfra_runner.run_deploy(env, images_shipped, app_image=app_image, hosts=list(hosts) or None,
                                       progress=lambda sent: reporter.event("progress", sent.describe()))
    rows = []
    for name, host_result in result.hosts.items():
        state = "changed" if host_result.changed else "noop"
        rows.append(
            [name, state, "; ".join(host_result.noops) or ", ".join(op.name for op in host_result.operations)]
        )
    reporter.table(f"images on {env}", ["host", "result", "detail"], rows)
    reporter.event(
        "summary",
        f"shipped {app_image} to {len(result.hosts)} hosts in {time.monotonic() - started:.1f}s "
        f"({len(result.changed_hosts)} changed)",
        image=app_image,
        env=env,
        changed=result.changed_hosts,
        seconds=round(time.monotonic() - started, 2),
    )
