"""Image shipping end to end: real sandbox hosts over SSH, real `docker save`/`load`, real faults.

Needs the Docker engine; the session's sandbox comes from the shared `testbed` fixture (tests/e2e/conftest.py).
The registry path (`registry` inventory data) is covered only by command-string unit tests: no image
registry can be reached on this kind of machine, and none is started here.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

APP_VERSION = "e2e-ship"
CORRUPT_VERSION = "e2e-ship-corrupt"


@pytest.fixture(scope="module")
def inventory(testbed) -> Path:
    """inventories/local.py, which reads the state of the testbed INGESTCTL_TESTBED names (like the fixture)."""
    from ingestctl import paths

    return paths.project_root() / "inventories" / "local.py"


@pytest.fixture(scope="module")
def app_image(testbed):
    from ingestctl.images import build_app_image

    return build_app_image(APP_VERSION, progress=print)


def _ssh(testbed, host_name: str, command: str) -> tuple[int, str, str]:
    """Read a host over plain paramiko: verification independent of the pyinfra code under test."""
    from ingestctl.testbed import probe

    host = testbed.host(host_name)
    return probe.run_ssh(host.address, host.ssh_port, testbed.ssh_user, testbed.ssh_key, command, timeout=60)


def _host_image_id(testbed, host_name: str, image: str) -> str | None:
    status, out, _err = _ssh(testbed, host_name, f"docker image inspect --format '{{{{.Id}}}}' {image}")
    return out.strip() if status == 0 else None


def _host_images(testbed, host_name: str) -> str:
    status, out, err = _ssh(
        testbed,
        host_name,
        "docker images --all --no-trunc --format '{{.Repository}}:{{.Tag}} {{.ID}}' | sort",
    )
    assert status == 0, err
    return out


def _forget_image(testbed, host_name: str, image: str, image_id: str) -> None:
    _ssh(testbed, host_name, f"docker image rm --force {image} {image_id} >/dev/null 2>&1; true")


def _ship(inventory, app_image_name: str, **kwargs):
    from ingestctl import pyinfra_runner
    from ingestctl.operations.shipping import images_shipped

    started = time.monotonic()
    result = pyinfra_runner.run_deploy(inventory, images_shipped, app_image=app_image_name, **kwargs)
    return result, time.monotonic() - started


def _db_images(inventory_path: Path) -> list[str]:
    from ingestctl import pyinfra_runner

    inventory = pyinfra_runner.load_inventory(inventory_path)
    db_host = inventory.get_group("db")[0]
    return [db_host.data.get("postgres_image"), db_host.data.get("redis_image")]


def test_ship_to_all_hosts_then_reship_is_a_noop(testbed, inventory, app_image):
    from ingestctl import image_archive

    hosts = [host.name for host in testbed.hosts]
    for name in hosts:
        _forget_image(testbed, name, app_image.name, app_image.id)
    sidecars = _db_images(inventory)
    local_ids = {image: image_archive.local_image_id(image) for image in [app_image.name, *sidecars]}

    result, first_s = _ship(inventory, app_image.name)
    assert sorted(result.hosts) == sorted(hosts)
    assert all(r.success for r in result.hosts.values())
    assert sorted(result.changed_hosts) == sorted(hosts), (
        "every host lacked the app image, so every host changes"
    )

    # Identity survives save/upload/load: each host resolves the name to the very image ID built here.
    for name in hosts:
        assert _host_image_id(testbed, name, app_image.name) == app_image.id
        _status, out, _ = _ssh(testbed, name, "ls /tmp | grep -c ingestctl-image- || true")
        assert out.strip() == "0", f"{name}: the uploaded archive must be removed after loading"
    for db_host in testbed.hosts_with_role("db"):
        for image in sidecars:
            assert _host_image_id(testbed, db_host.name, image) == local_ids[image]
    for app_host in testbed.hosts:
        if "db" not in app_host.roles:
            assert all(_host_image_id(testbed, app_host.name, image) is None for image in sidecars), (
                "app-only hosts do not get the database images"
            )

    again, noop_s = _ship(inventory, app_image.name)
    assert all(r.success and not r.changed for r in again.hosts.values())
    for name in hosts:
        assert f"image {app_image.name} already present as {app_image.id}" in again.hosts[name].noops
    archive = image_archive.ensure_archive(app_image.id)
    print(
        f"\nMEASURED ship {app_image.name} ({archive.size / 1e6:.0f} MB gz) + db images to {len(hosts)} hosts: "
        f"{first_s:.1f}s; no-op re-ship: {noop_s:.2f}s"
    )


def test_a_new_tag_of_a_present_image_is_tagged_without_upload(testbed, inventory, app_image):
    """The host has the ID already: only `docker tag` runs. The cached archive is made unreadable to prove it."""
    from ingestctl import image_archive, pyinfra_runner
    from ingestctl.operations.shipping import images_shipped

    alias = f"ingest:{APP_VERSION}-alias"
    import subprocess

    subprocess.run(["docker", "tag", app_image.id, alias], check=True)
    archive = image_archive.ensure_archive(app_image.id)
    host = testbed.hosts[-1].name
    _ssh(testbed, host, f"docker image rm {alias} >/dev/null 2>&1; true")
    saved = archive.path.read_bytes()
    archive.path.write_bytes(b"not an archive")
    try:
        result = pyinfra_runner.run_deploy(inventory, images_shipped, images=[alias], hosts=[host])
    finally:
        archive.path.write_bytes(saved)
        subprocess.run(["docker", "image", "rm", alias], check=False, capture_output=True)
    assert result.hosts[host].changed
    assert _host_image_id(testbed, host, alias) == app_image.id
    _ssh(testbed, host, f"docker image rm {alias} >/dev/null 2>&1; true")


@pytest.mark.parametrize("fault", ["flipped-bytes", "truncated"])
def test_corrupt_upload_is_caught_and_hosts_are_untouched(testbed, inventory, fault):
    """Damage the cached archive after its checksum was recorded, as a bad disk or cut transfer would."""
    from ingestctl import image_archive, pyinfra_runner
    from ingestctl.errors import HostError
    from ingestctl.images import build_app_image
    from ingestctl.operations.shipping import images_shipped

    # Same sources, other version: another image ID that no host has.
    image = build_app_image(CORRUPT_VERSION, progress=print)
    hosts = [host.name for host in testbed.hosts]
    for name in hosts:
        _forget_image(testbed, name, image.name, image.id)
    before = {name: _host_images(testbed, name) for name in hosts}

    archive = image_archive.ensure_archive(image.id)
    try:
        with open(archive.path, "r+b") as handle:
            if fault == "truncated":
                handle.truncate(archive.size // 2)
            else:
                handle.seek(archive.size // 2)
                chunk = handle.read(4096)
                handle.seek(archive.size // 2)
                handle.write(bytes(b ^ 0xFF for b in chunk))
        with pytest.raises(HostError) as caught:
            pyinfra_runner.run_deploy(inventory, images_shipped, images=[image.name])
    finally:
        archive.path.unlink(missing_ok=True)
        archive.path.with_name(archive.path.name + ".sha256").unlink(missing_ok=True)

    message = str(caught.value)
    for name in hosts:
        assert f"host {name}: operation 'Ship images | Ensure image {image.name} is loaded' failed" in message
        assert f"upload of {image.name} to host {name} is corrupt or truncated" in message
    assert f"expected sha256 {archive.sha256}, found sha256 " in message
    for name in hosts:
        assert _host_images(testbed, name) == before[name], f"{name}: images changed after a corrupt upload"
        _status, out, _ = _ssh(testbed, name, "ls /tmp | grep -c ingestctl-image- || true")
        assert out.strip() == "0", f"{name}: the corrupt upload must be removed"
