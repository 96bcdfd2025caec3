"""The `ingestctl` console script: parses arguments, calls the layer that does the work, maps errors to exit codes.

Subcommand groups live beside the code they drive and are attached here, so each stays one concern.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from ingestctl import paths
from ingestctl import secrets as secrets_mod
from ingestctl.clikit import json_option, reporting
from ingestctl.output import Reporter


class LazyGroup(click.Group):
    """Subcommand groups imported only when named (click's documented lazy loading): `rollback app` at 3 a.m.
    does not pay for the incident, SLO, testbed and image modules' imports."""

    def __init__(self, *args, lazy_subcommands: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = lazy_subcommands  # command name -> "module:attribute"

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy_subcommands])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_subcommands:
            module, _, attribute = self.lazy_subcommands[cmd_name].partition(":")
            return getattr(importlib.import_module(module), attribute)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]}, lazy_subcommands={
    "testbed": "ingestctl.testbed.commands:testbed",
    "image": "ingestctl.images_cli:image",
    "setup": "ingestctl.setup_cli:setup",
    "incident": "ingestctl.incident_cli:incident",
    "slo": "ingestctl.slo:slo_command",
})
def main() -> None:
    """Build, ship, gate and roll back the ingest service on a fleet of hosts."""
    # pyinfra and paramiko log through `logging`; without a handler Python prints their warnings (e.g. about
    # sandbox host keys) raw on stderr. ingestctl reports what matters itself, through its Reporter.
    for name in ("pyinfra", "paramiko"):
        logging.getLogger(name).addHandler(logging.NullHandler())
        logging.getLogger(name).propagate = False


@main.group("secrets")
def secrets_group() -> None:
    """Validate secrets without touching any host."""


@secrets_group.command("check")
@click.argument("env")
@json_option
@reporting
def secrets_check(env: str, reporter: Reporter) -> None:
    """Validate ENV's secrets (environment, NAME_FILE, secrets/ENV.env). Exit 2 on any problem."""
    env_file = paths.secrets_file(env)
    values = secrets_mod.validated(env_file)
    reporter.event(
        "summary",
        f"secrets for {env}: {', '.join(sorted(values))} present and valid",
        env=env,
        secrets={name: "valid" for name in values},
    )


def parse_lock_wait(value: str | None) -> float:
    if value is None:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        raise click.BadParameter(f"expected seconds as a number, found {value!r}") from None
    if seconds < 0:
        raise click.BadParameter(f"expected 0 or more seconds, found {value}")
    return seconds


def ensure_sandbox(reporter: Reporter) -> None:
    """`deploy local` on a machine with nothing: start the sandbox first (its first start builds images)."""
    from ingestctl.errors import ConfigError
    from ingestctl.testbed import lifecycle
    from ingestctl.testbed import state as testbed_state

    try:
        testbed_state.load()
        return
    except ConfigError:
        pass
    reporter.event("step", "no sandbox running: starting it (`ingestctl testbed up`)", step="testbed")
    lifecycle.up(lambda message: reporter.event("progress", message, step="testbed"))


@main.command("deploy")
@click.argument("env")
@click.option("--version", "version", help="Release version (image tag). Default: the checkout's git describe.")
@click.option("--batch", help="Hosts per batch after the canary: N or P%. Default: one host, then the rest.")
@click.option("--skip-bench", is_flag=True, help="Skip the benchmark gate (recorded in the ledger).")
@click.option("--dry", is_flag=True, help="Print the plan (hosts, batches, image, config diff, migrations) only.")
@click.option("--lock-wait", "lock_wait", metavar="S", help="Wait up to S seconds for the deploy lock.")
@click.option("--allow-incompatible", is_flag=True,
              help="Run a non-backward-compatible migration: every app host switches in one batch after it, and a "
                   "gate failure runs the declared data-safe downgrade before the old release returns.")
@click.option("--emergency", is_flag=True,
              help="Deploy even while the availability error budget is exhausted (a fix forward); recorded in "
                   "the ledger as an emergency change.")
@json_option
@reporting
def deploy_command(env: str, version: str | None, batch: str | None, skip_bench: bool, dry: bool,
                   lock_wait: str | None, allow_incompatible: bool, emergency: bool, reporter: Reporter) -> None:
    """Build, ship, migrate and roll out ENV in gated batches; roll back by itself on any gate failure."""
    from ingestctl import pipeline, runcontext

    if env == "local":
        ensure_sandbox(reporter)
    run = pipeline.deploy(env, reporter, version=version, batch=batch, skip_bench=skip_bench, dry=dry,
                          lock_wait_s=parse_lock_wait(lock_wait), allow_incompatible=allow_incompatible,
                          emergency=emergency)
    if not dry:
        runcontext.summarise(run, reporter)
        if not reporter.json_mode:
            from ingestctl import fleetview

            fleetview.show_status(env, reporter)  # what a person wants to see next: the fleet, host by host


@main.command("abort")
@click.argument("env")
@json_option
@reporting
def abort_command(env: str, reporter: Reporter) -> None:
    """Ask a running deploy of ENV to stop between steps and roll its switched hosts back (it exits 3)."""
    from ingestctl import runcontext

    flag = runcontext.abort_flag(env)
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.write_text(f"requested at {__import__('time').time()}\n")
    reporter.event("summary", f"abort requested for {env}: the running deploy stops at its next step", env=env)


@main.command("status")
@click.argument("env")
@json_option
@reporting
def status_command(env: str, reporter: Reporter) -> None:
    """Per host: release, image, config version, schema head, health and the lock."""
    from ingestctl import fleetview

    fleetview.show_status(env, reporter)


@main.command("history")
@click.argument("env")
@json_option
@reporting
def history_command(env: str, reporter: Reporter) -> None:
    """The ledger: deploys and rollbacks with outcome and durations, newest first."""
    from ingestctl import fleetview

    fleetview.show_history(env, reporter)


def _finish(run, reporter: Reporter) -> None:
    from ingestctl import runcontext

    if run.facts.outcome:
        from ingestctl import changes

        changes.rolled_back(run.env, run, reporter)
        runcontext.summarise(run, reporter)


lock_wait_option = click.option("--lock-wait", "lock_wait", metavar="S", help="Wait up to S seconds for the lock.")
dry_option = click.option("--dry", is_flag=True,
                          help="Print the plan, decided as the real run decides it, and change nothing.")


@main.group("rollback")
def rollback_group() -> None:
    """One-shot rollbacks of the application, the schema or the configuration."""


@rollback_group.command("app")
@click.argument("env")
@click.option("--to", "to", metavar="RELEASE", help="Release to go back to. Default: the previous known-good one.")
@click.option("--with-schema", is_flag=True,
              help="Also downgrade the schema to the target release's head when the migrations in between are not "
                   "backward-compatible but declare data-safe downgrades (brief unavailability, measured).")
@dry_option
@lock_wait_option
@json_option
@reporting
def rollback_app_command(env: str, to: str | None, with_schema: bool, dry: bool, lock_wait: str | None,
                         reporter: Reporter) -> None:
    """Put ENV's app hosts back on the previous known-good release (or --to RELEASE), gated by health."""
    from ingestctl import rollbacks

    _finish(rollbacks.rollback_app(env, reporter, to=to, lock_wait_s=parse_lock_wait(lock_wait),
                                   with_schema=with_schema, dry=dry), reporter)


@rollback_group.command("schema")
@click.argument("env")
@click.option("--steps", type=click.IntRange(min=1), default=1, show_default=True, help="Migrations to undo.")
@dry_option
@lock_wait_option
@json_option
@reporting
def rollback_schema_command(env: str, steps: int, dry: bool, lock_wait: str | None, reporter: Reporter) -> None:
    """`alembic downgrade -N` made safe: only data-safe downgrades the running release does not need."""
    from ingestctl import rollbacks

    _finish(rollbacks.rollback_schema(env, reporter, steps=steps, lock_wait_s=parse_lock_wait(lock_wait), dry=dry),
            reporter)


@rollback_group.command("config")
@click.argument("env")
@click.option("--to", "to", metavar="CONFIG_VERSION", help="Config version (or unique prefix). Default: previous.")
@dry_option
@lock_wait_option
@json_option
@reporting
def rollback_config_command(env: str, to: str | None, dry: bool, lock_wait: str | None, reporter: Reporter) -> None:
    """Restore ENV's previous config version (or --to VERSION), gated; a failing one is undone (exit 3)."""
    from ingestctl import rollbacks

    _finish(rollbacks.rollback_config(env, reporter, to=to, lock_wait_s=parse_lock_wait(lock_wait), dry=dry),
            reporter)


@main.group("config")
def config_group() -> None:
    """Gated config rollouts and the live config per host."""


@config_group.command("set")
@click.argument("env")
@click.argument("assignments", nargs=-1, required=True, metavar="KEY=VALUE...")
@dry_option
@lock_wait_option
@json_option
@reporting
def config_set_command(env: str, assignments: tuple[str, ...], dry: bool, lock_wait: str | None,
                       reporter: Reporter) -> None:
    """Roll out a new config version (e.g. a lower INGEST_MAX_BATCH_ITEMS in a surge) in gated batches."""
    from ingestctl import rollbacks

    _finish(rollbacks.config_set(env, reporter, list(assignments), lock_wait_s=parse_lock_wait(lock_wait), dry=dry),
            reporter)


@config_group.command("show")
@click.argument("env")
@json_option
@reporting
def config_show_command(env: str, reporter: Reporter) -> None:
    """The config version live on each host and its values, secrets masked."""
    from ingestctl import rollbacks

    rollbacks.config_show(env, reporter)


@main.group("lock")
def lock_group() -> None:
    """The deploy lock: see who holds it, break a stale one on purpose."""


@lock_group.command("show")
@click.argument("env")
@json_option
@reporting
def lock_show_command(env: str, reporter: Reporter) -> None:
    """Who holds ENV's deploy lock on each host, since when, running what."""
    from ingestctl import runlock

    runlock.show_lock(env, reporter)


@lock_group.command("break")
@click.argument("env")
@click.option("--force", is_flag=True, help="Break it without asking (the lock shown is still the only one removed).")
@json_option
@reporting
def lock_break_command(env: str, force: bool, reporter: Reporter) -> None:
    """Break ENV's deploy lock on purpose, after checking that its run is really gone: shows the lock, asks
    (or --force), and removes only the lock it showed."""
    from ingestctl import runlock

    interactive = sys.stdin.isatty() and not reporter.json_mode
    runlock.break_lock(env, reporter, force=force,
                        confirm=(lambda question: click.confirm(question, default=False)) if interactive else None)


@main.command("verify")
@click.argument("env")
@click.argument("pytest_args", nargs=-1)
@reporting
def verify_command(env: str, pytest_args: tuple[str, ...], reporter: Reporter) -> None:
    """Run the testinfra suite (tests/infra) against ENV's hosts over SSH."""
    from ingestctl import verify

    code = verify.run(env, reporter, list(pytest_args))
    if code != 0:
        sys.exit(code)

