"""The app image build's pure parts: command strings, source hash, schema head (the wheelhouse: test_wheelhouse)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from ingestctl import images
from ingestctl.errors import BuildError

ROOT = Path(__file__).resolve().parents[2]


def test_build_command_is_exact():
    labels = {"io.ingest.source-hash": "abc", "io.ingest.schema-head": "0002"}
    command = images.build_command(Path("service"), "ingest:1.4.2", "ingest-base:bookworm", labels)
    # No version goes into the image: a re-versioned build of the same inputs must be the same image ID.
    assert shlex.join(command) == (
        "docker build --force-rm --file service/Dockerfile --tag ingest:1.4.2"
        " --build-arg BASE_IMAGE=ingest-base:bookworm"
        " --label io.ingest.schema-head=0002 --label io.ingest.source-hash=abc service"
    )


def test_build_command_without_layer_cache():
    command = images.build_command(Path("service"), "ingest:1", "b", {}, no_cache=True)
    assert shlex.join(command) == (
        "docker build --force-rm --file service/Dockerfile --tag ingest:1 --build-arg BASE_IMAGE=b --no-cache service"
    )


def test_git_commands_are_exact():
    assert shlex.join(images.describe_command()) == "git describe --tags --always --dirty"
    assert shlex.join(images.revision_command()) == "git rev-parse HEAD"
    assert shlex.join(images.source_files_command()) == (
        "git ls-files -z --cached --others --exclude-standard -- service"
    )


def test_image_name_and_tag_rules():
    assert images.image_name("v1.2.3-4-gabc-dirty") == "ingest:v1.2.3-4-gabc-dirty"
    assert images.valid_tag("1.4.2")
    assert images.valid_tag("v0.1.0-3-g5dc6f26-dirty")
    assert not images.valid_tag("-leading-dash")
    assert not images.valid_tag("has/slash")
    assert not images.valid_tag("x" * 129)


FILES = [("service/a.py", b"print(1)\n", False), ("service/run.sh", b"#!/bin/sh\n", True)]


def test_source_hash_is_stable_and_order_independent():
    first = images.source_hash(FILES, "stamp", "sha256:base")
    assert first == images.source_hash(list(reversed(FILES)), "stamp", "sha256:base")
    assert len(first) == 64


@pytest.mark.parametrize(
    "files, stamp, base",
    [
        ([("service/a.py", b"print(2)\n", False), FILES[1]], "stamp", "sha256:base"),  # content
        ([("service/b.py", b"print(1)\n", False), FILES[1]], "stamp", "sha256:base"),  # path
        ([FILES[0], ("service/run.sh", b"#!/bin/sh\n", False)], "stamp", "sha256:base"),  # exec bit
        (FILES, "other-stamp", "sha256:base"),  # wheelhouse
        (FILES, "stamp", "sha256:other"),  # base image
        (FILES[:1], "stamp", "sha256:base"),  # a file removed
    ],
)
def test_source_hash_changes_with_every_input(files, stamp, base):
    assert images.source_hash(files, stamp, base) != images.source_hash(FILES, "stamp", "sha256:base")


def _migration(revision, down):
    return f'"""doc"""\nfrom alembic import op\nrevision = {revision!r}\ndown_revision = {down!r}\n'


def _versions(tmp_path, migrations):
    folder = tmp_path / "versions"
    folder.mkdir()
    for index, (revision, down) in enumerate(migrations):
        (folder / f"{index:04d}_m.py").write_text(_migration(revision, down))
    return folder


def test_schema_head_of_a_linear_history(tmp_path):
    folder = _versions(tmp_path, [("a1", None), ("b2", "a1"), ("c3", "b2")])
    assert images.schema_head(folder) == "c3"


def test_schema_head_refuses_a_merge_like_the_deploy_planning(tmp_path):
    folder = _versions(tmp_path, [("a", None), ("b", "a"), ("c", "a"), ("m", ("b", "c"))])
    with pytest.raises(BuildError, match="merge point.*linear migration history only"):
        images.schema_head(folder)


def test_schema_head_rejects_two_heads(tmp_path):
    folder = _versions(tmp_path, [("a", None), ("b", "a"), ("c", "a")])
    with pytest.raises(BuildError, match=r"all follow a: the history forks"):
        images.schema_head(folder)


def test_schema_head_rejects_a_dangling_down_revision(tmp_path):
    folder = _versions(tmp_path, [("b", "a")])
    with pytest.raises(BuildError, match="down_revision 'a' is not a known revision"):
        images.schema_head(folder)


def test_schema_head_without_migrations_is_none(tmp_path):
    (tmp_path / "versions").mkdir()
    assert images.schema_head(tmp_path / "versions") is None


def test_schema_head_of_the_service_is_the_plans_head():
    from ingestctl import migrations

    versions = ROOT / "service" / "alembic" / "versions"
    assert images.schema_head(versions) == migrations.load_revisions(versions)[-1].revision
