"""The deploy that ships every image a host needs, chosen from inventory data.

Inventory data it reads (host, group or `--data` override):
- `image`: the app image, e.g. `ingest:1.4.2` (the orchestrator passes it explicitly instead).
- `postgres_image`, `redis_image`: shipped to hosts in the `db` group, e.g. the sandbox's `ingest-postgres:15`.
- `images`: an explicit list that replaces the three above.
- `registry`: when set (e.g. `registry.example:5000`), images are pushed there once and pulled by hosts.

Any of them may be pinned by digest (`postgres:16@sha256:...`, see ingestctl.imageref): the reference is resolved
in this machine's engine (which holds it only if it was pulled with that digest), and the host gets that image ID
under `name:tag`, the name its compose file uses.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from ingestctl import local_images
from ingestctl.errors import ConfigError
from ingestctl.imageref import ImageRef
from ingestctl.openssh import ProgressSink
from ingestctl.operations.images import image_pulled, images_loaded, images_loaded_name
from pyinfra import host
from pyinfra.api import deploy

DB_GROUP = "db"
_push_lock = threading.Lock()
_pushed: set[tuple[str, str]] = set()


def images_for_host(data, groups: Sequence[str], app_image: str | None = None) -> list[str]:
    """The images HOST needs, in shipping order: the app image first, then the db host's services."""
    explicit = data.get("images")
    if explicit:
        if isinstance(explicit, str) or not all(isinstance(item, str) and item for item in explicit):
            raise ConfigError(f"inventory data `images` must be a list of image names, found {explicit!r}")
        return list(dict.fromkeys(explicit))
    images = [app_image or data.get("image")]
    if images[0] is None:
        raise ConfigError(
            "no app image to ship: set inventory data `image` (e.g. `--data image=ingest:1.4.2`) or pass one"
        )
    if DB_GROUP in groups:
        images += [data.get(key) for key in ("postgres_image", "redis_image") if data.get(key)]
    return list(dict.fromkeys(images))


def _pushed_reference(image: str, image_id: str, registry: str) -> str:
    """Push each image ID once per process, however many hosts pull it. IMAGE is the host's name:tag."""
    with _push_lock:
        reference = local_images.registry_reference(registry, image)
        if (image_id, reference) not in _pushed:
            local_images.push_to_registry(image_id, reference)
            _pushed.add((image_id, reference))
        return reference


def _host_names(references: Sequence[str]) -> dict[str, str]:
    """{name hosts use: reference to resolve here}; ConfigError naming a reference that is not name:tag[@digest]."""
    names: dict[str, str] = {}
    for reference in references:
        try:
            ref = ImageRef.parse(reference)
        except ValueError as exc:
            raise ConfigError(f"image {reference!r}: {exc}") from None
        if names.get(ref.host_name, reference) != reference:
            raise ConfigError(f"images {names[ref.host_name]!r} and {reference!r} would both be "
                              f"{ref.host_name} on the host: name one image per tag")
        names[ref.host_name] = reference
    return names


@deploy("Ship images")
def images_shipped(
    app_image: str | None = None, images: Sequence[str] | None = None, progress: ProgressSink | None = None
) -> None:
    """Make every image this host needs present by ID: only missing layers over OpenSSH, or a pull when
    `registry` is set."""
    wanted = list(images) if images is not None else images_for_host(host.data, host.groups, app_image)
    registry = host.data.get("registry")
    ids = {name: local_images.local_image_id(reference) for name, reference in _host_names(wanted).items()}
    if not registry:
        images_loaded(name=images_loaded_name(wanted), images=list(ids.items()), progress=progress)
        return
    for image, image_id in ids.items():
        image_pulled(
            name=f"Ensure image {image} is pulled",
            image=image,
            image_id=image_id,
            registry_reference=_pushed_reference(image, image_id, registry),
        )
