"""Static reading of the service's Alembic migrations, and the schema-safety rules for rollbacks.

Migrations are parsed with `ast`, never imported or executed: reading them must not need the
service's dependencies, and planning must not run arbitrary code. Each migration declares, at
module level, `backward_compatible` (the previous release runs against this schema) and
`downgrade_data_safe` (its downgrade loses no data). A schema rollback proceeds only when the
declaration says data-safe AND a static check of `downgrade()` finds no data-losing operation.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ingestctl.errors import ConfigError


def restore_hint(env: str = "ENV") -> str:
    return (
        "Restore from the restore point instead: the deploy that applied it took one with `pg_dump -Fc` "
        f"(its path is in `ingestctl history {env} --json`, field restore_point); on the db host run "
        "`pg_restore --clean --if-exists -d ingest <restore point>` with the api stopped, or roll forward "
        f"with a fixed release: `ingestctl deploy {env} --version <fixed>`."
    )


# Raw SQL: what follows DROP decides. These lose no rows (an index or constraint can be rebuilt).
_SAFE_DROP_KINDS = frozenset(
    {
        "INDEX",
        "CONSTRAINT",
        "TRIGGER",
        "VIEW",
        "MATERIALIZED",
        "FUNCTION",
        "PROCEDURE",
        "EXTENSION",
        "TYPE",
        "RULE",
        "POLICY",
        "DEFAULT",
        "NOT",
        "IDENTITY",
        "EXPRESSION",
    }
)
_NAMED_DROP_KINDS = frozenset({"TABLE", "COLUMN", "SCHEMA", "DATABASE", "SEQUENCE", "OWNED"})
_DROP = re.compile(r"\bDROP\s+(?:IF\s+EXISTS\s+)?(\w+)(?:\s+(?:IF\s+EXISTS\s+)?([\w.]+))?", re.IGNORECASE)
_OTHER_UNSAFE_SQL = [
    (re.compile(r"\bTRUNCATE\b(?:\s+TABLE)?(?:\s+ONLY)?\s*([\w.]+)?", re.IGNORECASE), "truncates {0}"),
    (re.compile(r"\bDELETE\s+FROM\s+(?:ONLY\s+)?([\w.]+)", re.IGNORECASE), "deletes rows from {0}"),
    (
        re.compile(r"\bALTER\s+COLUMN\s+(\w+)\s+(?:SET\s+DATA\s+)?TYPE\b", re.IGNORECASE),
        "changes the type of column {0}",
    ),
]


def sql_findings(sql: str) -> list[str]:
    """What a raw SQL string does that loses data, e.g. ["drops table events"]; [] when nothing does."""
    found = []
    for match in _DROP.finditer(sql):
        kind, name = match.group(1).upper(), match.group(2)
        if kind in _SAFE_DROP_KINDS:
            continue
        if kind in _NAMED_DROP_KINDS:
            found.append(f"drops {kind.lower()} {name or '?'}")
        else:
            # `ALTER TABLE t DROP tags`: in PostgreSQL the COLUMN keyword is optional.
            found.append(f"drops column {match.group(1)}")
    for pattern, template in _OTHER_UNSAFE_SQL:
        for match in pattern.finditer(sql):
            found.append(template.format(match.group(1) or "a table"))
    return found


@dataclass(frozen=True)
class UnsafeOperation:
    """One data-losing operation found in a downgrade, with where it is."""

    call: str  # e.g. "op.drop_column"
    line: int
    description: str  # e.g. "drops column events.tags"

    def __str__(self) -> str:
        return f"{self.description} ({self.call} at line {self.line})"


@dataclass(frozen=True)
class Migration:
    name: str  # the file's stem, what operators see in `service/alembic/versions/`
    revision: str
    down_revision: str | None
    backward_compatible: bool | None  # None: the migration does not declare it
    downgrade_data_safe: bool | None
    path: str = ""
    unsafe_operations: tuple[UnsafeOperation, ...] = field(default=())
    has_downgrade: bool = True

    @property
    def statically_safe(self) -> bool:
        return self.has_downgrade and not self.unsafe_operations


def _literal(node: ast.AST | None) -> object:
    try:
        return ast.literal_eval(node) if node is not None else None
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return _NOT_LITERAL


_NOT_LITERAL = object()


def _module_assignments(tree: ast.Module) -> dict[str, tuple[ast.AST | None, int]]:
    found: dict[str, tuple[ast.AST | None, int]] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = (node.value, node.lineno)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found[node.target.id] = (node.value, node.lineno)
    return found


def _string_arg(call: ast.Call, position: int, keyword: str) -> str | None:
    node: ast.AST | None = None
    if len(call.args) > position:
        node = call.args[position]
    for kw in call.keywords:
        if kw.arg == keyword:
            node = kw.value
    value = _literal(node)
    return value if isinstance(value, str) else None


def _sql_text(node: ast.AST) -> str | None:
    """The SQL of `"..."` or `sa.text("...")` / `text("...")`; None when it is built at run time."""
    if isinstance(node, ast.Call) and node.args:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name == "text":
            node = node.args[0]
    value = _literal(node)
    return value if isinstance(value, str) else None


class _DowngradeChecker(ast.NodeVisitor):
    """Collects data-losing calls in a downgrade body, following `with op.batch_alter_table(t) as b`."""

    def __init__(self, local_functions: dict[str, ast.FunctionDef]) -> None:
        self.found: list[UnsafeOperation] = []
        self.batch_tables: dict[str, str] = {}
        self.local_functions = local_functions
        self.visited: set[str] = set()

    def visit_With(self, node: ast.With) -> None:
        for item in node.items:
            call = item.context_expr
            if (
                isinstance(call, ast.Call)
                and isinstance(call.func, ast.Attribute)
                and call.func.attr == "batch_alter_table"
                and isinstance(item.optional_vars, ast.Name)
            ):
                self.batch_tables[item.optional_vars.id] = _string_arg(call, 0, "table_name") or "?"
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in self.local_functions and func.id not in self.visited:
            # A helper defined in the migration and called from downgrade(): check its body too.
            self.visited.add(func.id)
            for statement in self.local_functions[func.id].body:
                self.visit(statement)
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            self._check(func.value.id, func.attr, node)
        elif isinstance(func, ast.Attribute) and func.attr in ("execute", "exec_driver_sql"):
            # e.g. op.get_bind().execute(...)
            self._check_sql(f"{ast.unparse(func.value)}.{func.attr}", node)
        self.generic_visit(node)

    def _add(self, call: str, node: ast.AST, description: str) -> None:
        self.found.append(UnsafeOperation(call=call, line=node.lineno, description=description))

    def _check(self, owner: str, method: str, node: ast.Call) -> None:
        call = f"{owner}.{method}"
        batch_table = self.batch_tables.get(owner)
        if batch_table is not None:
            # batch_op methods take no table argument: the table comes from the `with`.
            shift, table = -1, batch_table
        else:
            shift, table = 0, None
        if method == "drop_table":
            self._add(call, node, f"drops table {_string_arg(node, 0, 'table_name') or '?'}")
        elif method == "drop_column":
            table = table or _string_arg(node, 0, "table_name") or "?"
            column = _string_arg(node, 1 + shift, "column_name") or "?"
            self._add(call, node, f"drops column {table}.{column}")
        elif method == "alter_column" and any(kw.arg == "type_" for kw in node.keywords):
            table = table or _string_arg(node, 0, "table_name") or "?"
            column = _string_arg(node, 1 + shift, "column_name") or "?"
            self._add(call, node, f"changes the type of column {table}.{column} (a lossy type change)")
        elif method in ("execute", "exec_driver_sql"):
            self._check_sql(call, node)

    def _check_sql(self, call: str, node: ast.Call) -> None:
        if not node.args:
            return
        sql = _sql_text(node.args[0])
        if sql is None:
            self._add(call, node, "runs SQL built at run time, which the static check cannot verify")
            return
        for finding in sql_findings(sql):
            self._add(call, node, f"runs SQL that {finding}")


def _check_downgrade(tree: ast.Module) -> tuple[bool, tuple[UnsafeOperation, ...]]:
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    downgrade = functions.get("downgrade")
    if downgrade is None:
        return False, ()
    body = [s for s in downgrade.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    if any(isinstance(s, ast.Raise) for s in body):
        return False, ()
    checker = _DowngradeChecker({k: v for k, v in functions.items() if k not in ("upgrade", "downgrade")})
    for statement in body:
        checker.visit(statement)
    return True, tuple(checker.found)


def read_migration(path: Path) -> Migration:
    """One migration file, read statically. ConfigError names the file and what is missing or wrong."""
    return parse_migration(path.stem, path.read_text(), str(path))


def parse_migration(stem: str, text: str, shown: str) -> Migration:
    """One migration's source, read statically (never imported): from a checkout, or from an image's files."""
    try:
        tree = ast.parse(text, filename=shown)
    except SyntaxError as exc:
        raise ConfigError(f"{shown}: not valid Python (line {exc.lineno}): {exc.msg}") from None
    assigned = _module_assignments(tree)
    revision = _literal(assigned.get("revision", (None, 0))[0])
    if not isinstance(revision, str) or not revision:
        raise ConfigError(f'{shown}: expected a module-level `revision = "..."` string, found {revision!r}')
    down = _literal(assigned.get("down_revision", (None, 0))[0])
    if isinstance(down, (tuple, list)):
        raise ConfigError(
            f"{shown}: down_revision is a merge point {tuple(down)}; ingestctl supports a linear migration history only"
        )
    if down is not None and not isinstance(down, str):
        raise ConfigError(f"{shown}: expected down_revision to be a string or None, found {down!r}")
    flags: dict[str, bool | None] = {}
    for name in ("backward_compatible", "downgrade_data_safe"):
        if name not in assigned:
            flags[name] = None
            continue
        value = _literal(assigned[name][0])
        if not isinstance(value, bool):
            raise ConfigError(
                f"{shown}:{assigned[name][1]}: expected `{name} = True` or `False` (a literal), "
                f"found {ast.unparse(assigned[name][0]) if assigned[name][0] else None}"
            )
        flags[name] = value
    has_downgrade, unsafe = _check_downgrade(tree)
    return Migration(
        name=stem,
        revision=revision,
        down_revision=down,
        path=shown,
        backward_compatible=flags["backward_compatible"],
        downgrade_data_safe=flags["downgrade_data_safe"],
        unsafe_operations=unsafe,
        has_downgrade=has_downgrade,
    )


def order_chain(migrations: Iterable[Migration]) -> list[Migration]:
    """Base first, head last. A fork, a cycle or a dangling down_revision is a ConfigError naming them."""
    by_revision: dict[str, Migration] = {}
    for migration in migrations:
        if migration.revision in by_revision:
            raise ConfigError(
                f"revision {migration.revision!r} is declared twice: "
                f"{by_revision[migration.revision].name} and {migration.name}"
            )
        by_revision[migration.revision] = migration
    children: dict[str | None, list[Migration]] = {}
    for migration in by_revision.values():
        if migration.down_revision is not None and migration.down_revision not in by_revision:
            raise ConfigError(
                f"{migration.name}: down_revision {migration.down_revision!r} is not a known "
                "revision; a migration file is missing"
            )
        children.setdefault(migration.down_revision, []).append(migration)
    for parent, kids in children.items():
        if len(kids) > 1:
            names = ", ".join(sorted(k.name for k in kids))
            raise ConfigError(
                f"migrations {names} all follow {parent or 'the base'!s}: the history forks; "
                "make them a single line (alembic merge is not supported)"
            )
    ordered: list[Migration] = []
    current: str | None = None
    while current in children:
        (nxt,) = children[current]
        ordered.append(nxt)
        current = nxt.revision
    if len(ordered) != len(by_revision):
        stray = sorted(set(by_revision) - {m.revision for m in ordered})
        raise ConfigError(f"revisions {', '.join(stray)} form a cycle and are not reachable from the base")
    return ordered


def load_revisions(versions_dir: Path) -> list[Migration]:
    """Every migration in `versions_dir`, ordered base first."""
    if not versions_dir.is_dir():
        raise ConfigError(f"{versions_dir}: expected the Alembic versions directory, found nothing there")
    return order_chain(read_migration(p) for p in sorted(versions_dir.glob("*.py")) if p.stem != "__init__")


def chain_head(revisions: Sequence[Migration]) -> str | None:
    return revisions[-1].revision if revisions else None


def _index(revisions: Sequence[Migration], revision: str | None, what: str) -> int:
    """Position of `revision` in the chain; -1 for the empty database (None)."""
    if revision is None:
        return -1
    for position, migration in enumerate(revisions):
        if migration.revision == revision:
            return position
    known = ", ".join(m.revision for m in revisions) or "none"
    raise ConfigError(
        f"{what} {revision!r} is not a revision this checkout knows (known: {known}); "
        "run ingestctl from a checkout that has every migration applied to the database"
    )


def revisions_between(revisions: Sequence[Migration], from_head: str | None, to_head: str | None) -> list[Migration]:
    """The migrations an upgrade from `from_head` to `to_head` applies, oldest first (empty when equal)."""
    start = _index(revisions, from_head, "schema head")
    end = _index(revisions, to_head, "target schema head")
    if start > end:
        raise ConfigError(
            f"the database is at {from_head!r}, newer than the target {to_head!r}; an upgrade "
            "cannot go backwards (use `ingestctl rollback schema ENV`)"
        )
    return list(revisions[start + 1 : end + 1])


def _undeclared(flag: str) -> str:
    return f"does not declare `{flag}`; add `{flag} = True` or `False` at module level once you have checked it"


def plan_schema_rollback(
    revisions: Sequence[Migration],
    current_head: str | None,
    steps: int = 1,
    running_release_heads: Iterable[str | None] = (),
    env: str = "ENV",
) -> list[Migration]:
    """The migrations to undo, newest first, or ConfigError naming the migration and operation that forbid it.

    `running_release_heads` are the schema heads the releases running on the app hosts were built for:
    a rollback may not remove a revision one of them needs.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"--steps: expected a whole number of migrations to undo, at least 1, found {steps!r}")
    if current_head is None:
        raise ConfigError("nothing to roll back: the database has no migration applied")
    position = _index(revisions, current_head, "database schema head")
    if steps > position + 1:
        raise ConfigError(
            f"--steps {steps}: only {position + 1} migration(s) are applied "
            f"(head {current_head!r}); use --steps {position + 1} or fewer"
        )
    to_undo = list(reversed(revisions[position - steps + 1 : position + 1]))
    new_head = revisions[position - steps].revision if position - steps >= 0 else None
    removed = {m.revision for m in to_undo}
    for head in running_release_heads:
        if head in removed:
            needed = next(m for m in to_undo if m.revision == head)
            raise ConfigError(
                f"{needed.name}: the running release needs schema head {head!r}, which this rollback would "
                f"remove (new head: {new_head or 'empty'}); roll the application back first with "
                f"`ingestctl rollback app {env}`, then roll back the schema"
            )
    for migration in to_undo:
        require_data_safe(migration, restore_hint(env))
    return to_undo


def require_data_safe(migration: Migration, hint: str) -> None:
    ops = "; ".join(map(str, migration.unsafe_operations))
    if not migration.has_downgrade:
        raise ConfigError(
            f"{migration.name}: has no working downgrade() (missing, or it raises); it cannot be undone. {hint}"
        )
    if migration.downgrade_data_safe is None:
        found = f" The static check finds: {ops}." if ops else ""
        raise ConfigError(f"{migration.name}: {_undeclared('downgrade_data_safe')}.{found} {hint}")
    if migration.downgrade_data_safe and migration.unsafe_operations:
        raise ConfigError(
            f"{migration.name}: declares downgrade_data_safe = True, but its downgrade {ops}; the declaration "
            f"and the static check disagree, so it is not data-safe. Fix the declaration. {hint}"
        )
    if not migration.downgrade_data_safe and migration.unsafe_operations:
        raise ConfigError(f"{migration.name}: downgrade {ops}; it is not data-safe. {hint}")
    if not migration.downgrade_data_safe:
        raise ConfigError(
            f"{migration.name}: declares downgrade_data_safe = False, but the static check finds no data-losing "
            "operation; the declaration and the static check disagree, so it is refused. Check the downgrade "
            f"and fix the declaration. {hint}"
        )


@dataclass(frozen=True)
class AppRollbackCheck:
    """The schema side of an app rollback: fine, with the migrations the older release will run alongside."""

    db_head: str | None
    target_head: str | None
    newer_migrations: tuple[Migration, ...]


def check_app_rollback(
    revisions: Sequence[Migration], db_head: str | None, target_release_head: str | None, env: str = "ENV"
) -> AppRollbackCheck:
    """OK when the target release can run on the database's schema; else ConfigError naming the blocker."""
    db_position = _index(revisions, db_head, "database schema head")
    target_position = _index(revisions, target_release_head, "the target release's schema head")
    if target_position > db_position:
        raise ConfigError(
            f"the target release needs schema head {target_release_head!r} but the database is at "
            f"{db_head or 'no migration'!s}; deploy that release with `ingestctl deploy {env} --version <release>` "
            "(it migrates) instead of rolling back to it"
        )
    newer = revisions[target_position + 1 : db_position + 1]
    blocking = [m for m in newer if not m.backward_compatible]
    if blocking:
        first = blocking[0]
        reason = (
            "declares backward_compatible = False"
            if first.backward_compatible is False
            else _undeclared("backward_compatible")
        )
        steps = db_position - target_position
        names = ", ".join(m.name for m in blocking)
        if all(m.downgrade_data_safe and m.statically_safe for m in newer):
            instead = (
                f"run `ingestctl rollback schema {env} --steps {steps}` first (its downgrade is data-safe), "
                "then roll the application back"
            )
        else:
            instead = (
                f"roll forward instead with a fixed release: `ingestctl deploy {env} --version <fixed>`; "
                "the schema cannot be rolled back without data loss"
            )
        raise ConfigError(
            f"{first.name}: {reason}: the target release (schema {target_release_head or 'empty'}) cannot run "
            f"on the database's schema {db_head}. Blocking migration(s): {names}. Instead, {instead}."
        )
    return AppRollbackCheck(db_head=db_head, target_head=target_release_head, newer_migrations=tuple(newer))


@dataclass(frozen=True)
class AppliedMigration:
    """One revision as the database records it when it is applied (schema_migration_meta)."""

    revision: str
    backward_compatible: bool
    downgrade_data_safe: bool


@dataclass(frozen=True)
class AppliedRollbackCheck:
    """An app rollback judged from the database's own record: the revisions newer than the target release's
    head, and whether the schema must come down with it (`--with-schema`)."""

    db_head: str | None
    target_head: str | None
    newer: tuple[AppliedMigration, ...]
    needs_downgrade: bool


def check_app_rollback_applied(applied: Sequence[AppliedMigration], db_head: str | None,
                               target_head: str | None, env: str = "ENV",
                               with_schema: bool = False) -> AppliedRollbackCheck:
    """OK when the target release can run on the database's schema, or (WITH_SCHEMA) when every revision it
    does not know declares a data-safe downgrade; else ConfigError saying which of the ways back is possible."""
    revisions = [m.revision for m in applied]
    if db_head is not None and (not revisions or revisions[-1] != db_head):
        raise ConfigError(f"the database is at {db_head!r} but schema_migration_meta records "
                          f"{', '.join(revisions) or 'nothing'}; it was changed outside ingestctl: check it first")
    if target_head is not None and target_head not in revisions:
        raise ConfigError(
            f"the target release needs schema head {target_head!r}, which the database does not have "
            f"(it is at {db_head or 'no migration'}); deploy that release with `ingestctl deploy {env} --version "
            "<release>` (it migrates) instead of rolling back to it")
    newer = tuple(applied[revisions.index(target_head) + 1:] if target_head is not None else applied)
    blocking = [m for m in newer if not m.backward_compatible]
    if not blocking:
        return AppliedRollbackCheck(db_head, target_head, newer, needs_downgrade=False)
    names = ", ".join(m.revision for m in blocking)
    unsafe = [m.revision for m in newer if not m.downgrade_data_safe]
    if unsafe:
        raise ConfigError(
            f"{blocking[0].revision}: not backward-compatible: the target release (schema {target_head or 'empty'}) "
            f"cannot run on the database's schema {db_head} (blocking: {names}), and {', '.join(unsafe)} "
            f"{'does' if len(unsafe) == 1 else 'do'} not declare a data-safe downgrade, so the schema cannot come "
            f"back without data loss. Roll forward with a fixed release: `ingestctl deploy {env} --version <fixed>`. "
            + restore_hint(env))
    if not with_schema:
        raise ConfigError(
            f"{blocking[0].revision}: not backward-compatible: the target release (schema {target_head or 'empty'}) "
            f"cannot run on the database's schema {db_head} (blocking: {names}). Every revision in between declares "
            f"a data-safe downgrade: `ingestctl rollback app {env} --with-schema` downgrades the schema to "
            f"{target_head or 'empty'} and switches in one command (brief unavailability while it does)")
    return AppliedRollbackCheck(db_head, target_head, newer, needs_downgrade=True)
