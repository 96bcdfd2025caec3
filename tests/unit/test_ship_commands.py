"""Shipping's pure parts: the DockerImage fact, the host-side command strings, local save/push builders,
and which images each host gets from inventory data."""

from __future__ import annotations

import shlex

import pytest
from ingestctl import local_images
from ingestctl.errors import ConfigError
from ingestctl.facts.docker import DockerImage
from ingestctl.image_layers import Codec
from ingestctl.operations import images as ops
from ingestctl.operations.shipping import images_for_host
from pyinfra.api.exceptions import FactProcessError

IMAGE_ID = "sha256:" + "ab" * 32


def test_docker_image_fact_command_is_exact():
    assert DockerImage().command(image="ingest:1.4.2") == (
        "docker image inspect --format '{{.Id}}' ingest:1.4.2 2>/dev/null"
        " || docker version --format '{{.Server.Version}}' >/dev/null"
    )


def test_docker_image_fact_quotes_the_image():
    command = DockerImage().command(image="bad name;rm -rf /")
    assert "'bad name;rm -rf /'" in command


def test_docker_image_fact_process():
    fact = DockerImage()
    assert fact.process([IMAGE_ID]) == IMAGE_ID
    assert fact.process([f"  {IMAGE_ID}  ", ""]) == IMAGE_ID
    assert fact.process([]) is None
    assert fact.process(["", "  "]) is None
    assert DockerImage.default() is None


@pytest.mark.parametrize("output", [["Error: No such image"], [IMAGE_ID, IMAGE_ID], ["sha256:abc"]])
def test_docker_image_fact_rejects_unexpected_output(output):
    with pytest.raises(FactProcessError, match="expected one image ID"):
        DockerImage().process(output)


def test_load_verify_tag_pull_commands_are_exact():
    assert ops.load_command(Codec.ZSTD) == "bash -c 'set -o pipefail; zstd -dcq | docker load --quiet'"
    assert ops.load_command(Codec.GZIP) == "bash -c 'set -o pipefail; gzip -dc | docker load --quiet'"
    assert ops.verify_image_id_command("db1", "ingest:1.4.2", IMAGE_ID) == (
        "found=$(docker image inspect --format '{{.Id}}' ingest:1.4.2 2>&1); "
        f'if [ "$found" != {IMAGE_ID} ]; then '
        f'echo "image ingest:1.4.2 on host db1: expected ID {IMAGE_ID}, found $found" >&2; exit 1; fi'
    )
    assert ops.tag_command(IMAGE_ID, "ingest:1.4.2") == f"docker tag {IMAGE_ID} ingest:1.4.2"
    assert ops.pull_command("registry.example:5000/ingest:1.4.2") == (
        "docker pull --quiet registry.example:5000/ingest:1.4.2"
    )
    assert ops.images_loaded_name(["ingest:1.4.2"]) == "Ensure image ingest:1.4.2 is loaded"
    assert ops.images_loaded_name(["ingest:2", "ingest-redis:7"]) == "Ensure images ingest:2, ingest-redis:7 are loaded"


def test_local_save_and_registry_builders_are_exact():
    assert shlex.join(local_images.save_command(IMAGE_ID)) == f"docker save {IMAGE_ID}"
    assert (
        shlex.join(local_images.inspect_id_command("ingest:1"))
        == "docker image inspect --format '{{.Id}}' ingest:1"
    )
    assert local_images.registry_reference("registry.example:5000/", "ingest:1.4.2") == (
        "registry.example:5000/ingest:1.4.2"
    )
    # Tagged from the ID resolved once: the name may have moved since (a pinned digest's tag always may).
    assert [shlex.join(c) for c in local_images.push_commands(IMAGE_ID, "registry.example:5000/postgres:16")] == [
        f"docker tag {IMAGE_ID} registry.example:5000/postgres:16",
        "docker push registry.example:5000/postgres:16",
    ]


DATA = {"image": "ingest:2", "postgres_image": "ingest-postgres:15", "redis_image": "ingest-redis:7"}


def test_images_for_db_and_app_hosts():
    assert images_for_host(DATA, ["db", "app", "local"]) == [
        "ingest:2",
        "ingest-postgres:15",
        "ingest-redis:7",
    ]
    assert images_for_host(DATA, ["app", "local"]) == ["ingest:2"]
    assert images_for_host(DATA, ["app"], app_image="ingest:3") == ["ingest:3"]


def test_explicit_images_replace_the_defaults():
    assert images_for_host({**DATA, "images": ["a:1", "b:2", "a:1"]}, ["db"]) == ["a:1", "b:2"]
    with pytest.raises(ConfigError, match="`images` must be a list of image names, found 'a:1'"):
        images_for_host({"images": "a:1"}, ["app"])


def test_no_app_image_is_a_config_error():
    with pytest.raises(ConfigError, match=r"set inventory data `image` \(e.g. `--data image=ingest:1.4.2`\)"):
        images_for_host({}, ["app"])
