"""The registry path end to end: a real Distribution registry (Debian's `docker-registry`, installed by
scripts/setup.sh) served over TLS on the sandbox network, `docker push` from this machine, `docker pull` on
every sandbox host, image IDs checked on the hosts from outside.

The registry's certificate is self-signed for its IP; this machine's engine and each host's engine trust it
through `/etc/docker/certs.d/<address>/ca.crt`, the way a site trusts its own registry's CA.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e

APP_VERSION = "e2e-registry"
CERTS_D = Path("/etc/docker/certs.d")


def _ssh(testbed, host_name: str, command: str) -> tuple[int, str, str]:
    from ingestctl.testbed import probe

    host = testbed.host(host_name)
    return probe.run_ssh(host.address, host.ssh_port, testbed.ssh_user, testbed.ssh_key, command, timeout=60)


def _gateway(testbed) -> str:
    """The sandbox network's gateway: this machine's address as the hosts see it."""
    import docker

    client = docker.from_env()
    try:
        networks = client.containers.get(testbed.hosts[0].container).attrs["NetworkSettings"]["Networks"]
    finally:
        client.close()
    return next(iter(networks.values()))["Gateway"]


def _free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def registry(testbed, tmp_path_factory) -> Iterator[str]:
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.skip(reason="Debian's docker-registry is not installed: run ./scripts/setup.sh (apt-get install docker-registry)")
    gateway = _gateway(testbed)
    address = f"{gateway}:{_free_port(gateway)}"
    folder = tmp_path_factory.mktemp("registry")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=ingest-e2e-registry",
         "-addext", f"subjectAltName=IP:{gateway}", "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem")],
        check=True, capture_output=True,
    )
    (folder / "config.yml").write_text(
        "version: 0.1\n"
        f"storage:\n  filesystem:\n    rootdirectory: {folder / 'data'}\n"
        f"http:\n  addr: {address}\n  tls:\n    certificate: {folder / 'cert.pem'}\n    key: {folder / 'key.pem'}\n"
    )
    certificate = (folder / "cert.pem").read_text()
    (CERTS_D / address).mkdir(parents=True, exist_ok=True)
    (CERTS_D / address / "ca.crt").write_text(certificate)
    for host in testbed.hosts:
        status, _out, err = _ssh(testbed, host.name, f"mkdir -p /etc/docker/certs.d/{address} && "
                                                     f"printf '%s' '{certificate}' > /etc/docker/certs.d/{address}/ca.crt")
        assert status == 0, err
    server = subprocess.Popen([binary, "serve", str(folder / "config.yml")], stdout=subprocess.DEVNULL,
                              stderr=open(folder / "registry.log", "w"))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"https://{address}/v2/", verify=ssl.create_default_context(cafile=folder / "cert.pem"), timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (folder / "registry.log").read_text()
            time.sleep(0.3)
        yield address
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(CERTS_D / address, ignore_errors=True)
        for host in testbed.hosts:
            _ssh(testbed, host.name, f"rm -rf /etc/docker/certs.d/{address}")


@pytest.fixture(scope="module")
def app_image(testbed):
    from ingestctl.images import build_app_image

    return build_app_image(APP_VERSION, progress=print)


def _host_image_id(testbed, host_name: str, image: str) -> str | None:
    status, out, _err = _ssh(testbed, host_name, f"docker image inspect --format '{{{{.Id}}}}' {image}")
    return out.strip() if status == 0 else None


def test_hosts_pull_the_exact_image_from_a_real_registry(testbed, registry, app_image):
    from ingestctl import paths, pyinfra_runner
    from ingestctl.operations.shipping import images_shipped

    hosts = [host.name for host in testbed.hosts]
    for name in hosts:
        _ssh(testbed, name, f"docker image rm --force {app_image.name} {registry}/{app_image.name} "
                            f"{app_image.id} >/dev/null 2>&1; true")
    inventory = paths.project_root() / "inventories" / "local.py"
    result = pyinfra_runner.run_deploy(inventory, images_shipped, images=[app_image.name],
                                       data={"registry": registry})
    assert sorted(result.changed_hosts) == sorted(hosts)
    for name in hosts:
        assert _host_image_id(testbed, name, app_image.name) == app_image.id, f"{name}: wrong image after pull"
        assert _host_image_id(testbed, name, f"{registry}/{app_image.name}") == app_image.id

    # The registry really holds it: its API lists the repository and the tag.
    tags = httpx.get(f"https://{registry}/v2/ingest/tags/list", verify=ssl.create_default_context(cafile=CERTS_D / registry / "ca.crt"),
                     timeout=10).json()
    assert APP_VERSION in tags["tags"]

    again = pyinfra_runner.run_deploy(inventory, images_shipped, images=[app_image.name], data={"registry": registry})
    assert not again.changed_hosts, "a host that has the image by ID pulls nothing"
    subprocess.run(["docker", "image", "rm", f"{registry}/{app_image.name}"], capture_output=True, check=False)


def test_an_image_pinned_by_digest_is_resolved_here_and_named_by_its_tag_on_the_host(testbed, registry):
    """`name:tag@sha256:...` in inventory data: this machine's engine resolves it (it knows the digest only of what
    it pushed or pulled), the host gets that image ID under name:tag (`docker tag` cannot create a digest
    reference), streamed over SSH without the registry."""
    from ingestctl import local_images, paths, pyinfra_runner
    from ingestctl.operations.shipping import images_shipped
    from ingestctl.testbed.images import REDIS_IMAGE

    named = f"{registry}/{REDIS_IMAGE}"
    for argv in (["docker", "tag", REDIS_IMAGE, named], ["docker", "push", "--quiet", named]):
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
    host = testbed.hosts[-1].name
    try:
        repo_digest = subprocess.run(["docker", "image", "inspect", "--format", "{{index .RepoDigests 0}}", named],
                                     capture_output=True, text=True, check=True).stdout.strip()
        pinned = f"{named}@{repo_digest.split('@')[1]}"
        image_id = local_images.local_image_id(pinned)
        assert image_id == local_images.local_image_id(REDIS_IMAGE)
        _ssh(testbed, host, f"docker image rm --force {named} >/dev/null 2>&1; true")
        inventory = paths.project_root() / "inventories" / "local.py"
        result = pyinfra_runner.run_deploy(inventory, images_shipped, images=[pinned], hosts=[host])
        assert result.changed_hosts == [host]
        assert _host_image_id(testbed, host, named) == image_id, f"{host}: {named} is not the pinned image"
        again = pyinfra_runner.run_deploy(inventory, images_shipped, images=[pinned], hosts=[host])
        assert not again.changed_hosts, "a host holding the pinned image by ID under its tag is a noop"
    finally:
        _ssh(testbed, host, f"docker image rm {named} >/dev/null 2>&1; true")
        subprocess.run(["docker", "image", "rm", named], capture_output=True, check=False)
