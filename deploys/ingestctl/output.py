"""Human output with rich, or one JSON object per line (`--json`) for CI pipelines.

Every event has a `type` (plan, step, gate, rollback, progress, summary, error, ...) and a timestamp.
Secrets never reach this module: callers pass masked values only.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.console import Console
from rich.markup import escape


class Reporter:
    def __init__(self, json_mode: bool = False) -> None:
        self.json_mode = json_mode
        self.started = time.monotonic()
        # soft_wrap: long lines (errors, summaries) stay whole when piped into logs or CI output.
        self.console = Console(stderr=False, highlight=False, soft_wrap=True)
        if not self.console.is_terminal:
            # Piped into a CI log: rich would squeeze tables into 80 columns.
            self.console.width = 200

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 2)

    def event(self, type_: str, message: str = "", **fields: Any) -> None:
        """Emit one event: a JSON line in --json mode, else a readable line."""
        if self.json_mode:
            record = {"type": type_, "ts": round(time.time(), 3), "elapsed_s": self.elapsed(), **fields}
            if message:
                record["message"] = message
            sys.stdout.write(json.dumps(record, default=str) + "\n")
            sys.stdout.flush()
            return
        if message:
            style = {"error": "bold red", "gate": "cyan", "rollback": "yellow", "summary": "bold green"}.get(type_, "")
            prefix = f"[dim]{self.elapsed():7.1f}s[/dim] "
            # Messages carry host output: as rich markup, a `[/x]` in it would raise instead of printing.
            message = escape(message)
            self.console.print(prefix + (f"[{style}]{message}[/{style}]" if style else message))

    def table(self, title: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A table for humans; in --json mode each row becomes one event of type `row`."""
        if self.json_mode:
            for row in rows:
                self.event("row", table=title, **dict(zip(columns, row, strict=True)))
            return
        from rich.table import Table

        table = Table(title=title)
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*("" if v is None else str(v) for v in row))
        self.console.print(table)
