"""pyinfra operations that make sure a host's Docker engine holds an exact image, by ID.

Two ways in: `image_loaded` uploads a cached `docker save` archive over SSH and loads it (no registry, also
the air-gapped case); `image_pulled` pulls from a registry for sites that have one. Both read the host only
through the `DockerImage` fact and report a noop when the host already has the image under its name.
"""

from __future__ import annotations

import shlex

from ingestctl.facts.docker import DockerImage
from pyinfra import host
from pyinfra.api import FileUploadCommand, StringCommand, operation


def image_loaded_name(image: str) -> str:
    return f"Ensure image {image} is loaded"


def remote_archive_path(image_id: str, temp_dir: str = "/tmp") -> str:
    return f"{temp_dir.rstrip('/')}/ingestctl-image-{image_id.removeprefix('sha256:')}.tar.gz"


def verify_upload_command(host_name: str, image: str, remote_path: str, sha256: str) -> str:
    """Fail, naming the host and both checksums, and remove the upload, unless it is byte-identical.

    Runs before `docker load`, so a truncated or corrupt upload never reaches the host's engine.
    """
    path = shlex.quote(remote_path)
    message = (
        f"upload of {image} to host {host_name} is corrupt or truncated: "
        f"expected sha256 {sha256}, found sha256 $found ($size bytes); the host's images were left unchanged"
    )
    return (
        f"found=$(sha256sum {path} | cut -d' ' -f1); size=$(stat -c %s {path}); "
        f'if [ "$found" != {shlex.quote(sha256)} ]; then rm -f {path}; echo "{message}" >&2; exit 1; fi'
    )


def load_archive_command(remote_path: str) -> str:
    """`docker load` the archive and remove it whatever the outcome, so failed loads leave no litter."""
    path = shlex.quote(remote_path)
    return f"docker load --quiet --input {path}; status=$?; rm -f {path}; exit $status"


def verify_image_id_command(host_name: str, reference: str, image_id: str) -> str:
    """Fail, naming the host, unless REFERENCE now resolves to exactly IMAGE_ID."""
    return (
        f"found=$(docker image inspect --format '{{{{.Id}}}}' {shlex.quote(reference)} 2>&1); "
        f'if [ "$found" != {shlex.quote(image_id)} ]; then '
        f'echo "image {reference} on host {host_name}: expected ID {image_id}, found $found" >&2; exit 1; fi'
    )


def tag_command(source: str, image: str) -> str:
    return f"docker tag {shlex.quote(source)} {shlex.quote(image)}"


def pull_command(reference: str) -> str:
    return f"docker pull --quiet {shlex.quote(reference)}"


@operation()
def image_loaded(image: str, image_id: str, archive: str, sha256: str, temp_dir: str = "/tmp"):
    """Ensure IMAGE (name:tag) on the host is exactly IMAGE_ID, loading the local ARCHIVE if needed.

    + image: the name:tag the host must have, e.g. ingest:1.4.2
    + image_id: the sha256:... image ID it must resolve to
    + archive: local path of the gzip'd `docker save` of IMAGE_ID
    + sha256: checksum of ARCHIVE, checked on the host before `docker load`
    + temp_dir: where the archive lands on the host (removed after loading)
    """
    current = host.get_fact(DockerImage, image=image)
    if current == image_id:
        host.noop(f"image {image} already present as {image_id}")
        return

    # The host may hold the same image under another tag (e.g. a release re-tagged): tagging is enough.
    if host.get_fact(DockerImage, image=image_id) != image_id:
        remote_path = remote_archive_path(image_id, temp_dir)
        yield FileUploadCommand(archive, remote_path)
        yield StringCommand(verify_upload_command(host.name, image, remote_path, sha256))
        yield StringCommand(load_archive_command(remote_path))
        yield StringCommand(verify_image_id_command(host.name, image_id, image_id))
    yield StringCommand(tag_command(image_id, image))
    yield StringCommand(verify_image_id_command(host.name, image, image_id))


@operation()
def image_pulled(image: str, image_id: str, registry_reference: str):
    """Ensure IMAGE on the host is exactly IMAGE_ID, pulling REGISTRY_REFERENCE if needed.

    A registry push/pull keeps the image ID (the config digest), so the pulled image is checked by ID too.
    """
    current = host.get_fact(DockerImage, image=image)
    if current == image_id:
        host.noop(f"image {image} already present as {image_id}")
        return
    yield StringCommand(pull_command(registry_reference))
    yield StringCommand(verify_image_id_command(host.name, registry_reference, image_id))
    yield StringCommand(tag_command(registry_reference, image))
