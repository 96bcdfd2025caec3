"""The controller's own Docker engine: image IDs, `docker save`, and pushes for sites with a registry.

The registry-less digest of an image is its ID (`sha256:` of its config), which `docker save` / `docker load`
preserve; hosts are checked against it (see ingestctl.image_layers for how layers reach them). Sites with a
registry push instead (`push_commands`); their hosts pull (see ingestctl.operations.images).
"""

from __future__ import annotations

import re
import subprocess

from ingestctl.errors import BuildError, EnvironmentMissing

IMAGE_ID = re.compile(r"^sha256:([0-9a-f]{64})$")


def inspect_id_command(image: str) -> list[str]:
    return ["docker", "image", "inspect", "--format", "{{.Id}}", image]


def save_command(image_id: str) -> list[str]:
    return ["docker", "save", image_id]


def registry_reference(registry: str, image: str) -> str:
    """Where IMAGE lives in REGISTRY.

    `registry.example:5000` + `ingest:1.4.2` -> `registry.example:5000/ingest:1.4.2`.
    """
    return f"{registry.rstrip('/')}/{image}"


def push_commands(image_id: str, reference: str) -> list[list[str]]:
    """Tag IMAGE_ID (never a name, which may have moved since it was resolved) as REFERENCE and push it."""
    return [["docker", "tag", image_id, reference], ["docker", "push", reference]]


def _run_docker(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise EnvironmentMissing(
            "docker CLI not found: install Debian's docker.io (apt-get install docker.io)"
        ) from exc


def local_image_id(image: str) -> str:
    """The ID of IMAGE in the local engine; BuildError naming the image when it is not there."""
    result = _run_docker(inspect_id_command(image))
    if result.returncode != 0:
        detail = result.stderr.strip() or "no output"
        if "@sha256:" in image:
            # The engine knows a digest only for an image pulled with it: that pull is what checks the content.
            raise BuildError(
                f"image {image} is not in the local Docker engine ({detail}); pull it by its digest first "
                f"(`docker pull {image}`), or correct the digest in the inventory data"
            )
        raise BuildError(
            f"image {image} is not in the local Docker engine ({detail}); "
            "build it first (`ingestctl image build`) or check the image name in the inventory data"
        )
    image_id = result.stdout.strip()
    if not IMAGE_ID.match(image_id):
        raise BuildError(f"image {image} has ID {image_id!r}, not of the form sha256:<64 hex digits>")
    return image_id


def local_image_ids() -> set[str]:
    result = _run_docker(["docker", "image", "ls", "--all", "--quiet", "--no-trunc"])
    if result.returncode != 0:
        raise BuildError(f"listing local images failed: {result.stderr.strip() or 'no output'}")
    return set(result.stdout.split())


def push_to_registry(image_id: str, reference: str) -> str:
    """Push IMAGE_ID as REFERENCE (registry_reference); returns the reference hosts pull."""
    for argv in push_commands(image_id, reference):
        result = _run_docker(argv)
        if result.returncode != 0:
            raise BuildError(f"`{' '.join(argv)}` failed: {result.stderr.strip() or 'no output'}")
    return reference
