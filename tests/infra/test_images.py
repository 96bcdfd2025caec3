"""The release's image is on every host by its digest (the image ID `docker save`/`load` preserve), labelled.

Which image: INGEST_IMAGE (e.g. `ingest:1.4.2`), else `ingest:<git describe>` of this checkout, the
default `ingestctl deploy` ships. Which digest: INGEST_IMAGE_ID (`sha256:...`), else the ID of that image
in this machine's Docker engine when it has it; with neither, presence and labels are checked.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

pytestmark = pytest.mark.after_deploy

# No version label: the version is the tag (one image ID may carry several versions' tags).
REQUIRED_LABELS = (
    "org.opencontainers.image.revision",
    "org.opencontainers.image.created",
    "io.ingest.schema-head",
    "io.ingest.source-hash",
)


@pytest.fixture
def expected_image(host) -> tuple[str, str | None]:
    """INGEST_IMAGE / INGEST_IMAGE_ID when given; else what the host's state.json records as live (the
    release `ingestctl deploy` put there); else `ingest:<git describe>` and its local ID."""
    name = os.environ.get("INGEST_IMAGE")
    image_id = os.environ.get("INGEST_IMAGE_ID")
    if not name:
        state = host.run("cat /opt/ingest/state.json")
        if state.rc == 0 and state.stdout.strip():
            live = json.loads(state.stdout)
            return live["image"], image_id or live.get("image_id")
        from ingestctl.images import checkout_version, image_name
        from ingestctl.paths import project_root

        name = image_name(checkout_version(project_root()))
    if not image_id:
        try:
            local = subprocess.run(
                ["docker", "image", "inspect", "--format", "{{.Id}}", name],
                capture_output=True,
                text=True,
                check=False,
            )
        except FileNotFoundError:
            local = None
        if local is not None and local.returncode == 0:
            image_id = local.stdout.strip()
    return name, image_id


def _inspect(host, image: str) -> dict | None:
    result = host.run("docker image inspect %s", image)
    if result.rc != 0:
        return None
    return json.loads(result.stdout)[0]


def test_release_image_is_present_by_digest(host, expected_image):
    name, image_id = expected_image
    found = _inspect(host, name)
    assert found is not None, (
        f"{host.backend.hostname}: image {name} is missing; ship it with `ingestctl image ship ENV` "
        "(or set INGEST_IMAGE to the release deployed)"
    )
    if image_id:
        assert found["Id"] == image_id, (
            f"{host.backend.hostname}: {name} is {found['Id']}, expected {image_id}"
        )


def test_release_image_carries_release_labels(host, expected_image):
    name, _image_id = expected_image
    found = _inspect(host, name)
    if found is None:
        pytest.fail(f"{host.backend.hostname}: image {name} is missing")
    labels = found["Config"].get("Labels") or {}
    missing = [label for label in REQUIRED_LABELS if not labels.get(label)]
    assert not missing, f"{host.backend.hostname}: {name} lacks labels {', '.join(missing)}"


def test_release_runs_under_its_own_version(host, expected_image):
    """The version reaches the service from the compose file, not the image: the live slot reports it."""
    name, _image_id = expected_image
    state = host.run("cat /opt/ingest/state.json")
    if state.rc != 0 or not state.stdout.strip():
        pytest.skip(reason="no release is live on this host (deploy first: `ingestctl deploy ENV`)")
    live = json.loads(state.stdout)
    env = host.run("cat /opt/ingest/.env")
    assert env.rc == 0, f"{host.backend.hostname}: /opt/ingest/.env is unreadable: {env.stderr}"
    assert f"_VERSION={live['release']}" in env.stdout, (
        f"{host.backend.hostname}: the compose environment does not carry version {live['release']!r}"
    )
