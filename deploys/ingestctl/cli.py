"""The `ingestctl` console script: parses arguments, calls the layer that does the work, maps errors to exit codes.

Subcommand groups live beside the code they drive and are attached here, so each stays one concern.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from ingestctl import paths
from ingestctl import secrets as secrets_mod
from ingestctl.errors import IngestctlError
from ingestctl.output import Reporter

json_option = click.option("--json", "json_mode", is_flag=True, help="One JSON object per line on stdout, for CI.")


def reporting(func: Callable[..., Any]) -> Callable[..., Any]:
    """Give the command a Reporter and turn IngestctlError into its exit code with a one-line reason."""

    @functools.wraps(func)
    def wrapper(*args: Any, json_mode: bool = False, **kwargs: Any) -> Any:
        reporter = Reporter(json_mode=json_mode)
        try:
            return func(*args, reporter=reporter, **kwargs)
        except IngestctlError as exc:
            reporter.event("error", f"error: {exc}", error=type(exc).__name__, exit_code=exc.exit_code)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            reporter.event("error", "interrupted", exit_code=130)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Build, ship, gate and roll back the ingest service on a fleet of hosts."""


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


def _attach_optional_groups() -> None:
    """Attach subcommand groups defined in their own modules."""
    from ingestctl.testbed.commands import testbed

    main.add_command(testbed)


_attach_optional_groups()
