"""Static reading of Alembic migrations and the schema-safety rules for schema and app rollbacks."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from ingestctl import migrations
from ingestctl.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures" / "alembic_versions"
SERVICE_VERSIONS = Path(__file__).resolve().parents[2] / "service" / "alembic" / "versions"


@pytest.fixture(scope="module")
def chain():
    return migrations.load_revisions(FIXTURES)


def migration_file(tmp_path: Path, name: str, *, revision: str | None = None, down: str | None = None,
                   flags: str = "backward_compatible = True\ndowngrade_data_safe = True\n",
                   downgrade: str = "pass", extra: str = "") -> Path:
    path = tmp_path / f"{name}.py"
    body = (f"from alembic import op\nimport sqlalchemy as sa\n\nrevision = {revision or name!r}\n"
            f"down_revision = {down!r}\n{flags}\n{extra}\n\ndef upgrade():\n    pass\n\n\n"
            f"def downgrade():\n{textwrap.indent(textwrap.dedent(downgrade).strip(), '    ')}\n")
    path.write_text(body)
    return path


def read_downgrade(tmp_path, downgrade: str, extra: str = ""):
    return migrations.read_migration(migration_file(tmp_path, "m", downgrade=downgrade, extra=extra))


def test_chain_is_ordered_base_first(chain):
    assert [m.revision for m in chain] == ["0001_create_events", "0002_add_tags", "0003_index_source",
                                           "0004_rename_payload"]
    assert migrations.chain_head(chain) == "0004_rename_payload"
    assert migrations.chain_head([]) is None
    tags = chain[1]
    assert (tags.name, tags.down_revision, tags.backward_compatible, tags.downgrade_data_safe) == (
        "0002_add_tags", "0001_create_events", True, False)


def test_static_check_finds_drops_with_line_numbers(chain):
    create, tags, index, rename = chain
    assert [str(op) for op in create.unsafe_operations] == ["drops table events (op.drop_table at line 23)"]
    assert [str(op) for op in tags.unsafe_operations] == ["drops column events.tags (op.drop_column at line 27)"]
    assert index.unsafe_operations == () and index.statically_safe
    assert rename.unsafe_operations == () and rename.statically_safe


@pytest.mark.parametrize(
    ("downgrade", "expected"),
    [
        ('op.drop_table("events")', ["drops table events (op.drop_table at line"]),
        ('op.drop_column("events", "tags")', ["drops column events.tags (op.drop_column"]),
        ('op.drop_column(table_name="events", column_name="tags")', ["drops column events.tags"]),
        ('op.alter_column("events", "source", type_=sa.String(20))',
         ["changes the type of column events.source (a lossy type change) (op.alter_column"]),
        ('op.execute("DELETE FROM events WHERE source = \'x\'")', ["runs SQL that deletes rows from events"]),
        ('op.execute("TRUNCATE events")', ["runs SQL that truncates events"]),
        ('op.execute(sa.text("DROP TABLE IF EXISTS audit"))', ["runs SQL that drops table audit"]),
        ('op.execute("ALTER TABLE events DROP COLUMN tags")', ["runs SQL that drops column tags"]),
        ('op.execute("alter table events alter column tags type text")',
         ["runs SQL that changes the type of column tags"]),
        ('op.get_bind().execute(sa.text("DELETE FROM events"))',
         ["runs SQL that deletes rows from events (op.get_bind().execute"]),
        ('table = "events"\nop.execute(f"DROP TABLE {table}")',
         ["runs SQL built at run time, which the static check cannot verify"]),
        ('with op.batch_alter_table("events") as batch_op:\n    batch_op.drop_column("tags")',
         ["drops column events.tags (batch_op.drop_column"]),
        ('with op.batch_alter_table("events") as b:\n    b.alter_column("source", type_=sa.Text())',
         ["changes the type of column events.source"]),
        ("_drop_everything()", ["drops table events (op.drop_table"]),
    ],
)
def test_unsafe_downgrade_operations(tmp_path, downgrade, expected):
    extra = 'def _drop_everything():\n    op.drop_table("events")\n'
    found = [str(op) for op in read_downgrade(tmp_path, downgrade, extra).unsafe_operations]
    assert len(found) == len(expected)
    for text, prefix in zip(found, expected):
        assert text.startswith(prefix) or prefix in text


@pytest.mark.parametrize(
    "downgrade",
    [
        'op.drop_index("ix_events_source", table_name="events")',
        'op.drop_constraint("fk_x", "events", type_="foreignkey")',
        'op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_a")',
        'op.execute("ALTER TABLE events DROP CONSTRAINT uq_x")',
        'op.execute("ALTER TABLE events ALTER COLUMN source DROP NOT NULL")',
        'op.alter_column("events", "body", new_column_name="payload")',
        'op.add_column("events", sa.Column("x", sa.Text()))',
        'with op.get_context().autocommit_block():\n    op.execute("DROP INDEX IF EXISTS ix_b")',
        '"""A docstring only."""\npass',
    ],
)
def test_safe_downgrade_operations(tmp_path, downgrade):
    migration = read_downgrade(tmp_path, downgrade)
    assert migration.unsafe_operations == () and migration.has_downgrade


def test_downgrade_that_raises_or_is_missing_has_no_downgrade(tmp_path):
    assert not read_downgrade(tmp_path, 'raise NotImplementedError("one way only")').has_downgrade
    path = tmp_path / "nodown.py"
    path.write_text('revision = "x"\ndown_revision = None\n\ndef upgrade():\n    pass\n')
    assert not migrations.read_migration(path).has_downgrade


def test_annotated_assignments_and_undeclared_flags(tmp_path):
    path = tmp_path / "0001_a.py"
    path.write_text('revision: str = "abc"\ndown_revision: str | None = None\n\ndef downgrade():\n    pass\n')
    migration = migrations.read_migration(path)
    assert (migration.revision, migration.down_revision) == ("abc", None)
    assert migration.backward_compatible is None and migration.downgrade_data_safe is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('down_revision = None\n', "expected a module-level `revision = \"...\"` string, found None"),
        ('revision = "a"\ndown_revision = ("b", "c")\n', "down_revision is a merge point ('b', 'c')"),
        ('revision = "a"\ndown_revision = None\ndowngrade_data_safe = "yes"\n',
         ":3: expected `downgrade_data_safe = True` or `False` (a literal), found 'yes'"),
        ('revision = "a"\ndown_revision = None\nbackward_compatible = check()\n',
         ":3: expected `backward_compatible = True` or `False` (a literal), found check()"),
        ("revision = (\n", "not valid Python"),
    ],
)
def test_malformed_migration_files(tmp_path, content, message):
    path = tmp_path / "0009_bad.py"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        migrations.read_migration(path)
    assert str(err.value).startswith(str(path))
    assert message in str(err.value)


def test_chain_errors(tmp_path):
    migration_file(tmp_path, "a")
    migration_file(tmp_path, "b", down="a")
    migration_file(tmp_path, "c", down="a")
    with pytest.raises(ConfigError, match="migrations b, c all follow a: the history forks"):
        migrations.load_revisions(tmp_path)
    (tmp_path / "c.py").unlink()
    migration_file(tmp_path, "d", down="zzz")
    with pytest.raises(ConfigError, match="d: down_revision 'zzz' is not a known revision"):
        migrations.load_revisions(tmp_path)
    (tmp_path / "d.py").unlink()
    migration_file(tmp_path, "b2", revision="b", down="a")
    with pytest.raises(ConfigError, match="revision 'b' is declared twice: b and b2"):
        migrations.load_revisions(tmp_path)
    with pytest.raises(ConfigError, match="expected the Alembic versions directory"):
        migrations.load_revisions(tmp_path / "missing")


def test_cycle_detected(tmp_path):
    migration_file(tmp_path, "a")
    migration_file(tmp_path, "x", down="y")
    migration_file(tmp_path, "y", down="x")
    with pytest.raises(ConfigError, match="revisions x, y form a cycle"):
        migrations.load_revisions(tmp_path)


def test_revisions_between(chain):
    names = lambda ms: [m.name for m in ms]
    assert names(migrations.revisions_between(chain, None, "0002_add_tags")) == ["0001_create_events", "0002_add_tags"]
    assert names(migrations.revisions_between(chain, "0002_add_tags", "0004_rename_payload")) == [
        "0003_index_source", "0004_rename_payload"]
    assert migrations.revisions_between(chain, "0004_rename_payload", "0004_rename_payload") == []
    with pytest.raises(ConfigError, match="newer than the target '0002_add_tags'"):
        migrations.revisions_between(chain, "0003_index_source", "0002_add_tags")
    with pytest.raises(ConfigError, match="schema head '0099_future' is not a revision this checkout knows"):
        migrations.revisions_between(chain, "0099_future", "0004_rename_payload")


def test_schema_rollback_of_a_data_safe_migration(chain):
    undo = migrations.plan_schema_rollback(chain, "0003_index_source", steps=1)
    assert [m.name for m in undo] == ["0003_index_source"]
    undo = migrations.plan_schema_rollback(chain, "0004_rename_payload", steps=2)
    assert [m.name for m in undo] == ["0004_rename_payload", "0003_index_source"]


def test_schema_rollback_refuses_a_column_drop_naming_migration_and_operation(chain):
    with pytest.raises(ConfigError) as err:
        migrations.plan_schema_rollback(chain, "0002_add_tags", steps=1, env="staging")
    text = str(err.value)
    assert text.startswith("0002_add_tags: downgrade drops column events.tags (op.drop_column at line 27); "
                           "it is not data-safe. Restore from the restore point instead:")
    assert "ingestctl history staging --json" in text and "pg_restore" in text


def test_schema_rollback_stops_at_the_first_unsafe_migration_within_steps(chain):
    with pytest.raises(ConfigError, match="^0002_add_tags: downgrade drops column"):
        migrations.plan_schema_rollback(chain, "0004_rename_payload", steps=3)


def test_declaration_and_static_check_must_agree(tmp_path):
    migration_file(tmp_path, "a", flags="backward_compatible = True\ndowngrade_data_safe = True\n",
                   downgrade='op.drop_column("events", "tags")')
    with pytest.raises(ConfigError) as err:
        migrations.plan_schema_rollback(migrations.load_revisions(tmp_path), "a")
    assert ("a: declares downgrade_data_safe = True, but its downgrade drops column events.tags "
            "(op.drop_column at line") in str(err.value)
    assert "disagree" in str(err.value)

    migration_file(tmp_path, "a", flags="backward_compatible = True\ndowngrade_data_safe = False\n",
                   downgrade='op.drop_index("ix")')
    with pytest.raises(ConfigError, match="declares downgrade_data_safe = False, but the static check finds no"):
        migrations.plan_schema_rollback(migrations.load_revisions(tmp_path), "a")


def test_undeclared_or_irreversible_downgrades_are_refused(tmp_path):
    migration_file(tmp_path, "a", flags="", downgrade='op.drop_index("ix")')
    with pytest.raises(ConfigError, match="a: does not declare `downgrade_data_safe`"):
        migrations.plan_schema_rollback(migrations.load_revisions(tmp_path), "a")
    migration_file(tmp_path, "a", downgrade="raise NotImplementedError()")
    with pytest.raises(ConfigError, match=r"a: has no working downgrade\(\)"):
        migrations.plan_schema_rollback(migrations.load_revisions(tmp_path), "a")


def test_schema_rollback_refuses_what_the_running_release_needs(chain):
    with pytest.raises(ConfigError) as err:
        migrations.plan_schema_rollback(chain, "0003_index_source", 1, running_release_heads=["0003_index_source"],
                                        env="local")
    assert str(err.value).startswith("0003_index_source: the running release needs schema head '0003_index_source'")
    assert "ingestctl rollback app local" in str(err.value)
    # A release built for an older head runs fine once the newer migration is undone.
    assert migrations.plan_schema_rollback(chain, "0003_index_source", 1, running_release_heads=["0002_add_tags"])


@pytest.mark.parametrize(("head", "steps", "message"), [
    (None, 1, "nothing to roll back: the database has no migration applied"),
    ("0002_add_tags", 3, "--steps 3: only 2 migration(s) are applied"),
    ("0002_add_tags", 0, "--steps: expected a whole number of migrations to undo, at least 1, found 0"),
    ("0099_x", 1, "database schema head '0099_x' is not a revision this checkout knows"),
])
def test_schema_rollback_bad_input(chain, head, steps, message):
    with pytest.raises(ConfigError) as err:
        migrations.plan_schema_rollback(chain, head, steps)
    assert message in str(err.value)


def test_app_rollback_across_compatible_migrations_is_allowed(chain):
    check = migrations.check_app_rollback(chain, "0003_index_source", "0001_create_events")
    assert [m.name for m in check.newer_migrations] == ["0002_add_tags", "0003_index_source"]
    assert migrations.check_app_rollback(chain, "0003_index_source", "0003_index_source").newer_migrations == ()


def test_app_rollback_across_an_incompatible_migration_is_refused(chain):
    with pytest.raises(ConfigError) as err:
        migrations.check_app_rollback(chain, "0004_rename_payload", "0003_index_source", env="local")
    text = str(err.value)
    assert text.startswith("0004_rename_payload: declares backward_compatible = False: the target release "
                           "(schema 0003_index_source) cannot run on the database's schema 0004_rename_payload.")
    assert "run `ingestctl rollback schema local --steps 1` first" in text


def test_app_rollback_suggests_roll_forward_when_the_schema_cannot_go_back(chain):
    with pytest.raises(ConfigError) as err:
        migrations.check_app_rollback(chain, "0004_rename_payload", "0001_create_events", env="local")
    assert "Blocking migration(s): 0004_rename_payload" in str(err.value)
    assert "roll forward instead with a fixed release: `ingestctl deploy local --version <fixed>`" in str(err.value)


def test_app_rollback_to_a_release_needing_a_newer_schema_is_refused(chain):
    with pytest.raises(ConfigError, match="the target release needs schema head '0004_rename_payload'"):
        migrations.check_app_rollback(chain, "0003_index_source", "0004_rename_payload")


def test_undeclared_compatibility_blocks_app_rollback(tmp_path):
    migration_file(tmp_path, "a")
    migration_file(tmp_path, "b", down="a", flags="downgrade_data_safe = True\n", downgrade='op.drop_index("i")')
    with pytest.raises(ConfigError, match="b: does not declare `backward_compatible`"):
        migrations.check_app_rollback(migrations.load_revisions(tmp_path), "b", "a")


def test_the_service_migrations_read_cleanly():
    """The real service/alembic/versions: every migration declares both flags and agrees with the check."""
    if not SERVICE_VERSIONS.is_dir():
        pytest.skip(reason="service/alembic/versions is not in this checkout yet")
    chain = migrations.load_revisions(SERVICE_VERSIONS)
    assert chain, "expected at least one migration"
    for migration in chain:
        assert migration.backward_compatible is not None, migration.name
        assert migration.downgrade_data_safe is not None, migration.name
        assert migration.has_downgrade, migration.name
        assert migration.downgrade_data_safe == migration.statically_safe, (
            f"{migration.name}: declared downgrade_data_safe={migration.downgrade_data_safe} but the static "
            f"check found {[str(o) for o in migration.unsafe_operations]}")


# --- app rollbacks judged from the database's own record (any checkout) ------------------------------------

from ingestctl.migrations import AppliedMigration, check_app_rollback_applied  # noqa: E402

APPLIED = [AppliedMigration("0001", True, False), AppliedMigration("0002", True, True),
           AppliedMigration("0003", False, True)]


def test_a_compatible_rollback_needs_no_downgrade():
    check = check_app_rollback_applied(APPLIED[:2], "0002", "0001")
    assert not check.needs_downgrade and [m.revision for m in check.newer] == ["0002"]


def test_an_incompatible_but_data_safe_revision_points_to_with_schema():
    with pytest.raises(ConfigError, match=r"0003: not backward-compatible.*rollback app local --with-schema"):
        check_app_rollback_applied(APPLIED, "0003", "0002", env="local")
    check = check_app_rollback_applied(APPLIED, "0003", "0002", env="local", with_schema=True)
    assert check.needs_downgrade and [m.revision for m in check.newer] == ["0003"]


def test_without_a_data_safe_downgrade_the_only_way_is_forward():
    applied = [*APPLIED[:2], AppliedMigration("0003", False, False)]
    with pytest.raises(ConfigError, match=r"cannot come back without data loss.*deploy local --version <fixed>"):
        check_app_rollback_applied(applied, "0003", "0002", env="local", with_schema=True)


def test_a_target_newer_than_the_database_is_a_deploy():
    with pytest.raises(ConfigError, match="needs schema head '0004'.*deploy that release"):
        check_app_rollback_applied(APPLIED, "0003", "0004", env="local")


def test_a_record_that_disagrees_with_the_head_is_refused():
    with pytest.raises(ConfigError, match="changed outside ingestctl"):
        check_app_rollback_applied(APPLIED[:2], "0003", "0001")


def test_the_schema_record_reads_the_head_and_the_applied_migrations_from_one_query():
    from ingestctl.facts.release import SchemaRecord
    from ingestctl.hostvalues import HostValueError

    assert SchemaRecord().process(["head|0002", "applied|0001|t|f", "applied|0002|t|t"]) == ("0002", APPLIED[:2])
    # No alembic_version yet (psql reports that query's error and runs the next): an empty schema.
    assert SchemaRecord().process([]) == (None, [])
    with pytest.raises(HostValueError, match="schema record row 1"):
        SchemaRecord().process(["0002|t|t"])
    with pytest.raises(HostValueError, match="alembic_version"):
        SchemaRecord().process(["head|0002; DROP TABLE events"])


def test_the_facts_read_the_record_and_the_image_files():
    from ingestctl.facts.release import MIGRATION_FILE_MARK, ImageMigrations, applied_migrations
    from ingestctl.hostvalues import HostValueError

    assert applied_migrations(["0001|t|f", "0002|t|t"]) == APPLIED[:2]
    with pytest.raises(HostValueError):
        applied_migrations(["0002$(id)|t|t"])
    files = ImageMigrations().process([f"{MIGRATION_FILE_MARK}0002_index.py", 'revision = "0002"', "x = 1"])
    assert files == {"0002_index": 'revision = "0002"\nx = 1\n'}
    with pytest.raises(HostValueError):
        ImageMigrations().process([f"{MIGRATION_FILE_MARK}../../etc/passwd.py"])
