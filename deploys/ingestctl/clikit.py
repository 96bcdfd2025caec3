"""What every ingestctl subcommand shares: the --json flag and the error-to-exit-code wrapper.

Its own module so that command groups living beside their code (testbed, image) import it without a cycle.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from ingestctl.errors import IngestctlError
from ingestctl.output import Reporter

json_option = click.option("--json", "json_mode", is_flag=True, help="One JSON object per line on stdout, for CI.")


OUTCOME_BY_EXIT = {2: "refused", 3: "rolled-back", 4: "rollback-failed", 5: "locked"}


def reporting(func: Callable[..., Any]) -> Callable[..., Any]:
    """Give the command a Reporter and turn IngestctlError into its exit code with a one-line reason."""

    @functools.wraps(func)
    def wrapper(*args: Any, json_mode: bool = False, **kwargs: Any) -> Any:
        reporter = Reporter(json_mode=json_mode)
        try:
            return func(*args, reporter=reporter, **kwargs)
        except IngestctlError as exc:
            reporter.event("error", f"error: {exc}", error=type(exc).__name__, exit_code=exc.exit_code)
            if reporter.json_mode:
                # CI reads the last summary: it always comes, with the outcome the exit code stands for.
                reporter.event("summary", str(exc), outcome=OUTCOME_BY_EXIT.get(exc.exit_code, "failed"),
                               exit_code=exc.exit_code, error=str(exc))
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            reporter.event("error", "interrupted", exit_code=130)
            sys.exit(130)
        except click.ClickException:
            raise  # usage errors: click prints them and exits 2
        except Exception as exc:  # a bug: still one last `error` line for CI, the traceback for the report
            import traceback

            where = traceback.extract_tb(exc.__traceback__)[-1]
            reporter.event("error", f"unexpected error (a bug in ingestctl): {type(exc).__name__}: {exc}",
                           error=type(exc).__name__, exit_code=1, at=f"{where.filename}:{where.lineno}")
            traceback.print_exc(file=sys.stderr)
            sys.exit(1)

    return wrapper


