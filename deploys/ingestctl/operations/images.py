"""pyinfra operations that make sure a host's Docker engine holds an exact image, by ID.

Two ways in: `images_loaded` streams the layers the host lacks over OpenSSH into `docker load` (no registry,
also the air-gapped case; see ingestctl.image_layers); `image_pulled` pulls from a registry for sites that
have one. Both read the host only through facts and report a noop when the host already has the image
under its name.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence

from ingestctl import image_layers, openssh
from ingestctl.errors import HostError
from ingestctl.facts.docker import DockerImage, HostLayers, ImageLayers, TaggedImages, tagged
from ingestctl.image_layers import Codec, LayeredImage, Shipment
from ingestctl.openssh import ProgressSink
from pyinfra import host
from pyinfra.api import FunctionCommand, StringCommand, operation

logger = logging.getLogger("pyinfra")


def images_loaded_name(images: Sequence[str]) -> str:
    if len(images) == 1:
        return f"Ensure image {images[0]} is loaded"
    return f"Ensure images {', '.join(images)} are loaded"


def load_command(codec: Codec) -> str:
    """Decode the stream and `docker load` it; either side failing fails the whole (bash: pipefail)."""
    return f"bash -c {shlex.quote(f'set -o pipefail; {codec.decompress_command()} | docker load --quiet')}"


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


def stream_images(state, host, shipment: Shipment, names: str, progress: ProgressSink | None = None) -> bool:
    """Send SHIPMENT to the host over OpenSSH and load it; False (the reason in the host's log) on failure."""
    argv = openssh.ssh_argv(host.name, host.data, load_command(shipment.codec), openssh.control_dir())
    try:
        openssh.send(host.name, argv, shipment.chunks(), shipment.size(), progress)
    except HostError as exc:
        host.log(f"shipping {names} ({len(shipment.layers)} layers): {exc}; the host's images were left "
                 "unchanged", log_func=logger.error)
        return False
    return True


def choose_codec(layers: HostLayers, controller: tuple[Codec, ...]) -> Codec:
    return Codec.ZSTD if layers.has_zstd and Codec.ZSTD in controller else Codec.GZIP


def plan_shipment(images: Sequence[LayeredImage], layers: HostLayers, codec: Codec) -> Shipment:
    """Only the layers the host lacks, each once; every layer when its engine cannot reuse present ones."""
    present = layers.chains if layers.skips_present_layers else frozenset()
    needed = image_layers.layers_to_send([image.diff_ids for image in images], present)
    return Shipment(tuple(images), needed, codec)


def present_ids(images: Sequence[str]) -> dict[str, str | None]:
    """The ID each of IMAGES has on the host: from one listing of its tagged images, a digest reference by itself."""
    listing = host.get_fact(TaggedImages) if any(tagged(image) for image in images) else {}
    return {image: listing.get(reference) if (reference := tagged(image)) else host.get_fact(DockerImage, image=image)
            for image in images}


@operation()
def images_loaded(images: Sequence[tuple[str, str]], progress: ProgressSink | None = None):
    """Ensure each IMAGE (name:tag) on the host is exactly its IMAGE_ID, in one stream of the layers it lacks.

    + images: (name:tag, sha256:... image ID) pairs, e.g. [("ingest:1.4.2", "sha256:...")]; the IDs must be
      in the local engine, which the layers come from
    + progress: called with bytes sent and rate every few seconds of a long transfer
    """
    present = present_ids([image for image, _image_id in images])
    wanted = [(image, image_id) for image, image_id in images if present[image] != image_id]
    if not wanted:
        for image, image_id in images:
            host.noop(f"image {image} already present as {image_id}")
        return

    # The host may hold an image under another tag (a release re-versioned): tagging is enough for that one.
    to_load = list(dict.fromkeys(image_id for _image, image_id in wanted
                                 if host.get_fact(DockerImage, image=image_id) != image_id))
    if to_load:
        layers = host.get_fact(ImageLayers)
        codec = choose_codec(layers, image_layers.controller_codecs())
        shipment = plan_shipment([image_layers.ensure_layers(image_id, [codec]) for image_id in to_load],
                                 layers, codec)
        names = ", ".join(image for image, image_id in wanted if image_id in to_load)
        yield FunctionCommand(stream_images, (shipment, names), {"progress": progress})
        for image_id in to_load:
            yield StringCommand(verify_image_id_command(host.name, image_id, image_id))
    for image, image_id in wanted:
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
