"""Which database schemas this code can serve.

Supported: the database's head is the code's head; or the head is unknown to this code (a newer release
migrated) and every applied revision this code does not know is recorded as backward compatible in
`schema_migration_meta`. The second rule keeps an older release ready during a rolling deploy after the
new release's expand-only migration ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from psycopg import AsyncConnection, errors

ALEMBIC_DIR = Path(__file__).resolve().parent.parent / "alembic"


@dataclass(frozen=True)
class CodeSchema:
    head: str
    revisions: frozenset[str]


@dataclass(frozen=True)
class DatabaseSchema:
    heads: tuple[str, ...]  # alembic_version rows; empty when never migrated
    meta: dict[str, bool]   # revision -> backward_compatible, as recorded by env.py


@dataclass(frozen=True)
class SchemaVerdict:
    supported: bool
    detail: str


@lru_cache(maxsize=1)
def code_schema() -> CodeSchema:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    scripts = ScriptDirectory.from_config(config)
    heads = scripts.get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"alembic scripts in {ALEMBIC_DIR}: expected one head, found {sorted(heads)}")
    return CodeSchema(heads[0], frozenset(rev.revision for rev in scripts.walk_revisions()))


async def read_database_schema(conn: AsyncConnection) -> DatabaseSchema:
    try:
        cur = await conn.execute("SELECT version_num FROM alembic_version")
        heads = tuple(sorted(row[0] for row in await cur.fetchall()))
    except errors.UndefinedTable:
        return DatabaseSchema((), {})
    try:
        cur = await conn.execute("SELECT revision, backward_compatible FROM schema_migration_meta")
        meta = {row[0]: bool(row[1]) for row in await cur.fetchall()}
    except errors.UndefinedTable:
        meta = {}
    return DatabaseSchema(heads, meta)


def judge(code: CodeSchema, db: DatabaseSchema) -> SchemaVerdict:
    if not db.heads:
        return SchemaVerdict(False, f"database has no schema; run `python -m alembic upgrade head` "
                                    f"(this code needs {code.head})")
    if db.heads == (code.head,):
        return SchemaVerdict(True, f"at {code.head}")
    known = [head for head in db.heads if head in code.revisions]
    if known:
        return SchemaVerdict(False, f"database schema {','.join(db.heads)} is older than this code's "
                                    f"{code.head}; run `python -m alembic upgrade head`")
    if code.head not in db.meta:
        return SchemaVerdict(False, f"database schema {','.join(db.heads)} is unknown to this code and "
                                    f"schema_migration_meta does not record this code's head {code.head}")
    unrecorded = [head for head in db.heads if head not in db.meta]
    if unrecorded:
        return SchemaVerdict(False, f"database head {','.join(unrecorded)} is unknown to this code and has no "
                                    "schema_migration_meta row saying whether it is backward compatible")
    unknown = sorted(rev for rev in db.meta if rev not in code.revisions)
    breaking = [rev for rev in unknown if not db.meta[rev]]
    if breaking:
        return SchemaVerdict(False, f"database has newer revisions {','.join(breaking)} that are not backward "
                                    f"compatible with this code's {code.head}; deploy the newer release")
    return SchemaVerdict(True, f"at {','.join(db.heads)}, newer than {code.head} and backward compatible")
