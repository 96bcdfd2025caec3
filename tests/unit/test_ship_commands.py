"""Shipping's pure parts: the DockerImage fact, the host-side command strings, local archive/push builders,
and which images each host gets from inventory data."""

from __future__ import annotations

import shlex
import subprocess

import pytest
from ingestctl import image_archive
from ingestctl.errors import BuildError, ConfigError
from ingestctl.facts.docker import DockerImage
from ingestctl.operations import images as ops
from ingestctl.operations.shipping import images_for_host
from pyinfra.api.exceptions import FactProcessError

IMAGE_ID = "sha256:" + "ab" * 32
SHA = "cd" * 32


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


def test_remote_archive_path():
    assert ops.remote_archive_path(IMAGE_ID) == f"/tmp/ingestctl-image-{'ab' * 32}.tar.gz"
    assert ops.remote_archive_path(IMAGE_ID, "/var/tmp/") == f"/var/tmp/ingestctl-image-{'ab' * 32}.tar.gz"


def test_verify_upload_command_is_exact():
    assert ops.verify_upload_command("app2", "ingest:1.4.2", "/tmp/x.tar.gz", SHA) == (
        "found=$(sha256sum /tmp/x.tar.gz | cut -d' ' -f1); size=$(stat -c %s /tmp/x.tar.gz); "
        f'if [ "$found" != {SHA} ]; then rm -f /tmp/x.tar.gz; '
        f'echo "upload of ingest:1.4.2 to host app2 is corrupt or truncated: expected sha256 {SHA}, '
        "found sha256 $found ($size bytes); the host's images were left unchanged\" >&2; exit 1; fi"
    )


def _sh(script: str, cwd) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", script], cwd=cwd, capture_output=True, text=True, check=False)


def test_verify_upload_command_really_catches_a_truncated_file(tmp_path):
    """Runs the generated shell for real: a good file passes, a truncated one fails and is removed."""
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(b"0123456789" * 1000)
    good = subprocess.run(
        ["sha256sum", str(archive)], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    assert _sh(ops.verify_upload_command("db1", "ingest:1", str(archive), good), tmp_path).returncode == 0
    assert archive.exists()

    archive.write_bytes(b"0123456789" * 500)
    result = _sh(ops.verify_upload_command("db1", "ingest:1", str(archive), good), tmp_path)
    assert result.returncode == 1
    assert (
        f"upload of ingest:1 to host db1 is corrupt or truncated: expected sha256 {good}, found sha256 "
        in result.stderr
    )
    assert "(5000 bytes)" in result.stderr
    assert not archive.exists()


def test_load_verify_tag_pull_commands_are_exact():
    assert ops.load_archive_command("/tmp/x.tar.gz") == (
        "docker load --quiet --input /tmp/x.tar.gz; status=$?; rm -f /tmp/x.tar.gz; exit $status"
    )
    assert ops.verify_image_id_command("db1", "ingest:1.4.2", IMAGE_ID) == (
        "found=$(docker image inspect --format '{{.Id}}' ingest:1.4.2 2>&1); "
        f'if [ "$found" != {IMAGE_ID} ]; then '
        f'echo "image ingest:1.4.2 on host db1: expected ID {IMAGE_ID}, found $found" >&2; exit 1; fi'
    )
    assert ops.tag_command(IMAGE_ID, "ingest:1.4.2") == f"docker tag {IMAGE_ID} ingest:1.4.2"
    assert ops.pull_command("registry.example:5000/ingest:1.4.2") == (
        "docker pull --quiet registry.example:5000/ingest:1.4.2"
    )
    assert ops.image_loaded_name("ingest:1.4.2") == "Ensure image ingest:1.4.2 is loaded"


def test_local_archive_and_registry_builders_are_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("INGESTCTL_ROOT", str(tmp_path))
    assert shlex.join(image_archive.save_command(IMAGE_ID)) == f"docker save {IMAGE_ID}"
    assert (
        shlex.join(image_archive.inspect_id_command("ingest:1"))
        == "docker image inspect --format '{{.Id}}' ingest:1"
    )
    assert image_archive.archive_path(IMAGE_ID) == tmp_path / ".build" / "images" / f"{'ab' * 32}.tar.gz"
    assert image_archive.registry_reference("registry.example:5000/", "ingest:1.4.2") == (
        "registry.example:5000/ingest:1.4.2"
    )
    assert [shlex.join(c) for c in image_archive.push_commands("ingest:1.4.2", "registry.example:5000")] == [
        "docker tag ingest:1.4.2 registry.example:5000/ingest:1.4.2",
        "docker push registry.example:5000/ingest:1.4.2",
    ]


def test_archive_path_rejects_names():
    with pytest.raises(BuildError, match="is not of the form sha256:<64 hex digits>"):
        image_archive.archive_path("ingest:1.4.2")


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


def test_prune_archives_keeps_only_images_still_present(tmp_path, monkeypatch):
    monkeypatch.setenv("INGESTCTL_ROOT", str(tmp_path))
    folder = tmp_path / ".build" / "images"
    folder.mkdir(parents=True)
    kept, gone = "1" * 64, "2" * 64
    for digest in (kept, gone):
        (folder / f"{digest}.tar.gz").write_bytes(b"x")
        (folder / f"{digest}.tar.gz.sha256").write_text(f"{'0' * 64}  {digest}.tar.gz\n")
    removed = image_archive.prune_archives(keep={f"sha256:{kept}"})
    assert removed == [folder / f"{gone}.tar.gz"]
    assert sorted(p.name for p in folder.iterdir()) == [f"{kept}.tar.gz", f"{kept}.tar.gz.sha256"]
