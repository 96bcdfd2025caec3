"""Image recipe hashes, the debootstrap command, and the import changes: what decides a rebuild."""

from __future__ import annotations

from pathlib import Path

import pytest
from ingestctl import baseimages
from ingestctl.baseimages import BaseRecipe
from ingestctl.errors import EnvironmentMissing, HostError
from ingestctl.testbed import images


def test_recipe_hash_is_stable_and_ignores_package_order():
    one = BaseRecipe("x", "img:x", "bookworm", ("python3", "ca-certificates"))
    two = BaseRecipe("y", "img:y", "bookworm", ("ca-certificates", "python3"))
    assert one.recipe_hash() == two.recipe_hash()
    assert len(one.recipe_hash()) == 16 and int(one.recipe_hash(), 16) >= 0


@pytest.mark.parametrize(
    "changed",
    [
        BaseRecipe("x", "img:x", "trixie", ("python3", "ca-certificates")),
        BaseRecipe("x", "img:x", "bookworm", ("python3",)),
        BaseRecipe("x", "img:x", "bookworm", ("python3", "ca-certificates"), version=2),
    ],
    ids=["suite", "packages", "version"],
)
def test_recipe_hash_changes_with_suite_packages_or_version(changed):
    base = BaseRecipe("x", "img:x", "bookworm", ("python3", "ca-certificates"))
    assert changed.recipe_hash() != base.recipe_hash()


def test_debootstrap_command_is_minbase_with_includes():
    recipe = baseimages.recipe("bookworm-python")
    assert recipe.debootstrap_command(Path("/tmp/root"), "http://mirror/debian") == [
        "debootstrap",
        "--variant=minbase",
        "--include=python3,python3-venv,ca-certificates",
        "bookworm",
        "/tmp/root",
        "http://mirror/debian",
    ]
    assert recipe.image == "ingest-base:bookworm"
    assert baseimages.recipe("trixie").suite == "trixie"


def test_import_changes_label_the_recipe_hash():
    recipe = baseimages.recipe("trixie")
    assert baseimages.import_changes(recipe) == [
        f"LABEL io.ingest.recipe-hash={recipe.recipe_hash()}",
        "LABEL io.ingest.recipe=trixie",
        "ENV LANG=C.UTF-8",
        'CMD ["/bin/bash"]',
    ]


def test_unknown_base_recipe_names_the_known_ones():
    with pytest.raises(EnvironmentMissing, match="'alpine'.*bookworm-python, trixie"):
        baseimages.recipe("alpine")


def test_context_hash_follows_content_exec_bit_and_base(tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM base\n")
    script = tmp_path / "entrypoint.sh"
    script.write_text("#!/bin/sh\n")
    first = images.recipe_hash(tmp_path, "base1")
    assert images.recipe_hash(tmp_path, "base1") == first
    assert images.recipe_hash(tmp_path, "base2") != first
    script.chmod(0o755)
    executable = images.recipe_hash(tmp_path, "base1")
    assert executable != first
    script.write_text("#!/bin/sh\necho changed\n")
    assert images.recipe_hash(tmp_path, "base1") not in {first, executable}


def test_context_hash_of_a_missing_directory_says_what_is_expected(tmp_path):
    with pytest.raises(HostError, match="expected a Dockerfile"):
        images.recipe_hash(tmp_path / "nope", "b")


def test_sandbox_image_recipes_exist_in_the_checkout():
    for recipe in images.SANDBOX_IMAGES.values():
        assert (recipe.context_dir() / "Dockerfile").is_file(), recipe
        baseimages.recipe(recipe.base)  # every sandbox image names a known base
    assert images.SANDBOX_IMAGES["sandbox-host"].base == "trixie"


class _NoImages:
    """A Docker client whose engine holds no image: every base image is missing."""

    class images:  # noqa: N801 - the SDK's attribute name
        @staticmethod
        def get(name):
            import docker.errors

            raise docker.errors.ImageNotFound(name)


def test_a_missing_base_image_as_a_user_names_the_one_command_to_run_as_root(monkeypatch):
    monkeypatch.setattr(baseimages.os, "geteuid", lambda: 1000)
    built = []
    monkeypatch.setattr(baseimages, "_build", lambda base, say: built.append(base))
    with pytest.raises(EnvironmentMissing, match=r"needs root \(debootstrap\): run `sudo \.venv/bin/ingestctl "
                                                 r"testbed base-images` once"):
        baseimages.ensure_base_image("trixie", client=_NoImages())
    assert built == [], "nothing is attempted without root"


def test_root_builds_a_missing_base_image_outside_the_checkout(monkeypatch, tmp_path):
    monkeypatch.setattr(baseimages.os, "geteuid", lambda: 0)
    monkeypatch.setattr(baseimages, "BUILD_DIR", tmp_path / "base")
    built = []
    monkeypatch.setattr(baseimages, "_build", lambda base, say: built.append(base.name))
    assert baseimages.ensure_base_image("trixie", client=_NoImages()) == "ingest-base:trixie"
    assert built == ["trixie"] and (tmp_path / "base" / "base-images.lock").exists()
