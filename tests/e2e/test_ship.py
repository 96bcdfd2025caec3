"""Image shipping end to end: real sandbox hosts, real `docker save`/`load` over OpenSSH, real faults.

Bytes are read from outside the code under test: each sandbox host's eth0 counter, through `docker exec`.
The registry path has its own module (test_registry.py). The session's sandbox comes from the shared `testbed`
fixture (tests/e2e/conftest.py).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from releases import ingestctl, variant

pytestmark = pytest.mark.e2e

APP_VERSION = "e2e-ship"
# A code-only release: one comment line in the service's code.
CODE_CHANGE = {"service/ingest/app.py": lambda text: text + "\n# e2e-ship: a code-only release\n"}
# Everything a code-only release may cost a host on the wire, SSH and the facts' round trips included.
CODE_RELEASE_MAX_BYTES = 2_000_000
RETAG_MAX_BYTES = 200_000


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
    """Read a host over plain paramiko: verification independent of the code under test."""
    from ingestctl.testbed import probe

    host = testbed.host(host_name)
    return probe.run_ssh(host.address, host.ssh_port, testbed.ssh_user, testbed.ssh_key, command, timeout=60)


def _host_image_id(testbed, host_name: str, image: str) -> str | None:
    status, out, _err = _ssh(testbed, host_name, f"docker image inspect --format '{{{{.Id}}}}' {image}")
    return out.strip() if status == 0 else None


def _host_images(testbed, host_name: str) -> str:
    status, out, err = _ssh(
        testbed, host_name, "docker images --all --no-trunc --format '{{.Repository}}:{{.Tag}} {{.ID}}' | sort"
    )
    assert status == 0, err
    return out


def _forget_image(testbed, host_name: str, image: str, image_id: str) -> None:
    _ssh(testbed, host_name, f"docker image rm --force {image} {image_id} >/dev/null 2>&1; true")


def _received(testbed) -> dict[str, int]:
    from ingestctl.testbed import probe

    return {host.name: probe.received_bytes(host.container) for host in testbed.hosts}


def _ship(inventory, **kwargs):
    from ingestctl import pyinfra_runner
    from ingestctl.operations.shipping import images_shipped

    return pyinfra_runner.run_deploy(inventory, images_shipped, **kwargs)


def _db_images(inventory_path: Path) -> list[str]:
    from ingestctl import pyinfra_runner

    inventory = pyinfra_runner.load_inventory(inventory_path)
    db_host = inventory.get_group("db")[0]
    return [db_host.data.get("postgres_image"), db_host.data.get("redis_image")]


def _build_in(root: Path, version: str) -> str:
    built = ingestctl("image", "build", "--version", version, "--json", root=root)
    assert built.code == 0, built.explain()
    return subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", f"ingest:{version}"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_ship_to_all_hosts_then_reship_is_a_noop(testbed, inventory, app_image):
    from ingestctl import local_images

    hosts = [host.name for host in testbed.hosts]
    for name in hosts:
        _forget_image(testbed, name, app_image.name, app_image.id)
    sidecars = _db_images(inventory)
    local_ids = {image: local_images.local_image_id(image) for image in [app_image.name, *sidecars]}

    result = _ship(inventory, app_image=app_image.name)
    assert sorted(result.hosts) == sorted(hosts)
    assert all(r.success for r in result.hosts.values())
    assert sorted(result.changed_hosts) == sorted(hosts), "every host lacked the app image, so every host changes"

    # Identity survives save/stream/load: each host resolves the name to the very image ID built here.
    for name in hosts:
        assert _host_image_id(testbed, name, app_image.name) == app_image.id
    for db_host in testbed.hosts_with_role("db"):
        for image in sidecars:
            assert _host_image_id(testbed, db_host.name, image) == local_ids[image]
    for app_host in testbed.hosts:
        if "db" not in app_host.roles:
            assert all(_host_image_id(testbed, app_host.name, image) is None for image in sidecars), (
                "app-only hosts do not get the database images"
            )

    again = _ship(inventory, app_image=app_image.name)
    assert all(r.success and not r.changed for r in again.hosts.values())
    for name in hosts:
        assert f"image {app_image.name} already present as {app_image.id}" in again.hosts[name].noops


def test_a_code_only_release_sends_each_host_only_the_changed_layer(testbed, inventory, app_image, tmp_path):
    """The hosts hold the previous release; one comment line changes. Measured on each host's interface."""
    hosts = [host.name for host in testbed.hosts]
    assert _ship(inventory, images=[app_image.name], hosts=hosts).hosts  # the previous release everywhere
    image = f"ingest:{APP_VERSION}-code"
    image_id = _build_in(variant(tmp_path, CODE_CHANGE), f"{APP_VERSION}-code")
    assert image_id != app_image.id
    for name in hosts:
        _forget_image(testbed, name, image, image_id)

    before = _received(testbed)
    result = _ship(inventory, images=[image])
    after = _received(testbed)

    assert sorted(result.changed_hosts) == sorted(hosts)
    for name in hosts:
        assert _host_image_id(testbed, name, image) == image_id
        received = after[name] - before[name]
        print(f"MEASURED code-only release to {name}: {received} bytes on eth0")
        assert received <= CODE_RELEASE_MAX_BYTES, f"{name} received {received} bytes for a code-only release"
        _forget_image(testbed, name, image, image_id)


def test_a_new_version_of_the_same_inputs_is_a_retag_with_nothing_sent(testbed, inventory, app_image, monkeypatch):
    from ingestctl import image_layers
    from ingestctl.images import build_app_image

    again = build_app_image(f"{APP_VERSION}-again", progress=print)
    assert again.id == app_image.id and again.cached, "same inputs, new version: the same image, not a rebuild"

    hosts = [host.name for host in testbed.hosts]
    before = _received(testbed)
    monkeypatch.setattr(image_layers, "ensure_layers", _refuse)  # a host that has the ID gets no layer
    result = _ship(inventory, images=[again.name])
    after = _received(testbed)
    assert sorted(result.changed_hosts) == sorted(hosts)
    for name in hosts:
        assert _host_image_id(testbed, name, again.name) == app_image.id
        assert after[name] - before[name] <= RETAG_MAX_BYTES
        _ssh(testbed, name, f"docker image rm {again.name} >/dev/null 2>&1; true")
    subprocess.run(["docker", "image", "rm", again.name], check=False, capture_output=True)


def _refuse(*_args, **_kwargs):
    raise AssertionError("layers were prepared for a host that only needed a tag")


@pytest.mark.parametrize("fault", ["flipped-bytes", "truncated"])
def test_a_corrupt_layer_is_caught_and_hosts_are_untouched(testbed, inventory, app_image, fault):
    """Damage a cached layer after it was written, as a bad disk would: the stream fails on every host."""
    from ingestctl import image_layers
    from ingestctl.errors import HostError

    image = f"ingest:{APP_VERSION}-{fault}"
    # A layer no host has: one more file on top of the app image.
    build = subprocess.run(["docker", "build", "-q", "-t", image, "-"], capture_output=True, text=True,
                           input=f"FROM {app_image.id}\nRUN head -c 300000 /dev/urandom > /tmp/{fault}\n")
    assert build.returncode == 0, build.stderr
    image_id = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", image],
                              capture_output=True, text=True, check=True).stdout.strip()
    hosts = [host.name for host in testbed.hosts]
    assert _ship(inventory, images=[app_image.name], hosts=hosts).hosts
    before = {name: _host_images(testbed, name) for name in hosts}

    codecs = image_layers.controller_codecs()[:1]
    layered = image_layers.ensure_layers(image_id, codecs)
    frame = image_layers.frame_path(layered.diff_ids[-1], codecs[0])
    size = frame.stat().st_size
    try:
        with open(frame, "r+b") as handle:
            if fault == "truncated":
                handle.truncate(size // 2)
            else:
                handle.seek(size // 2)
                chunk = handle.read(256)
                handle.seek(size // 2)
                handle.write(bytes(b ^ 0xFF for b in chunk))
        with pytest.raises(HostError) as caught:
            _ship(inventory, images=[image])
    finally:
        frame.unlink(missing_ok=True)
        image_layers.config_path(image_id).unlink(missing_ok=True)
        subprocess.run(["docker", "image", "rm", image], check=False, capture_output=True)

    message = str(caught.value)
    for name in hosts:
        assert f"host {name}: operation 'Ship images | Ensure image {image} is loaded' failed" in message
        assert f"shipping {image} (1 layers): host {name}: stream of" in message
        assert _host_images(testbed, name) == before[name], f"{name}: images changed after a corrupt stream"
