"""Sandbox images built with `docker build` from the local base images (recipes in deploys/images/).

- `ingest-sandbox-host`: the sandbox hosts themselves (sshd + their own Docker engine).
- `ingest-sandbox-bare:bookworm|trixie`: bare hosts for `testbed up --bare` (sshd, sudo, a `deploy` user; no
  Docker), one per Debian release so that `ingestctl setup` meets both Compose generations.
- `ingest-prometheus`: the ready-made sandbox's Prometheus server, beside the hosts.
- `ingest-postgres`, `ingest-redis`: stand-ins for the official images, which cannot be pulled here. The deploy
  ships them to the hosts; their names are inventory data, so production keeps the official images.

Each image carries a label hashing its build context and its base image's recipe, and is rebuilt only when
that hash changes.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from ingestctl import baseimages, paths
from ingestctl.baseimages import RECIPE_LABEL, Progress, build_lock, image_label
from ingestctl.errors import HostError

SANDBOX_HOST_IMAGE = "ingest-sandbox-host:latest"
POSTGRES_IMAGE = "ingest-postgres:15"
REDIS_IMAGE = "ingest-redis:7"
PROXY_IMAGE = "ingest-proxy:1"
PROMETHEUS_IMAGE = "ingest-prometheus:2"
BARE_IMAGES = {"bookworm": "ingest-sandbox-bare:bookworm", "trixie": "ingest-sandbox-bare:trixie"}


@dataclass(frozen=True)
class ImageRecipe:
    image: str
    context: str  # directory under deploys/images/
    base: str  # a baseimages recipe name

    def context_dir(self) -> Path:
        return paths.project_root() / "deploys" / "images" / self.context

    def recipe_hash(self) -> str:
        return recipe_hash(self.context_dir(), baseimages.recipe(self.base).recipe_hash())


SANDBOX_IMAGES: dict[str, ImageRecipe] = {
    "sandbox-host": ImageRecipe(SANDBOX_HOST_IMAGE, "sandbox-host", "trixie"),
    "postgres": ImageRecipe(POSTGRES_IMAGE, "postgres", "bookworm-python"),
    "redis": ImageRecipe(REDIS_IMAGE, "redis", "bookworm-python"),
    "proxy": ImageRecipe(PROXY_IMAGE, "proxy", "bookworm-python"),
    # The sandbox's own Prometheus (not shipped to hosts: it runs beside them, testbed/prometheus.py).
    "prometheus": ImageRecipe(PROMETHEUS_IMAGE, "prometheus", "bookworm-python"),
    # Bare hosts reuse the two base images the sandbox already builds (bookworm's carries python3, as VMs do).
    "sandbox-bare-bookworm": ImageRecipe(BARE_IMAGES["bookworm"], "sandbox-bare", "bookworm-python"),
    "sandbox-bare-trixie": ImageRecipe(BARE_IMAGES["trixie"], "sandbox-bare", "trixie"),
}
# What each kind of testbed needs: its hosts' images, and the service images a deploy ships to them.
SERVICE_IMAGE_KEYS = ("postgres", "redis", "proxy")
READY_MADE_KEYS = ("sandbox-host", *SERVICE_IMAGE_KEYS, "prometheus")
BARE_KEYS = ("sandbox-bare-bookworm", "sandbox-bare-trixie", *SERVICE_IMAGE_KEYS)


def bare_image_key(suite: str) -> str:
    return f"sandbox-bare-{suite}"


def recipe_hash(context: Path, base_hash: str) -> str:
    """Hash of every file in the build context (path, mode's exec bit, content) and the base recipe's hash."""
    if not context.is_dir():
        raise HostError(f"image recipe directory {context} is missing; expected a Dockerfile there")
    digest = hashlib.sha256(f"base={base_hash}\n".encode())
    for path in sorted(p for p in context.rglob("*") if p.is_file()):
        executable = bool(path.stat().st_mode & 0o111)
        digest.update(f"{path.relative_to(context).as_posix()}:{int(executable)}\n".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def ensure_image(key: str, progress: Progress | None = None, client=None) -> str:
    """Build sandbox image `key` (sandbox-host, postgres, redis) if missing or its recipe changed."""
    from ingestctl.testbed.engine import docker_client

    recipe = SANDBOX_IMAGES[key]
    say = progress or (lambda _msg: None)
    client = client or docker_client(progress)
    wanted = recipe.recipe_hash()
    if image_label(client, recipe.image, RECIPE_LABEL) == wanted:
        return recipe.image
    base_image = baseimages.ensure_base_image(recipe.base, progress, client)
    with build_lock():
        if image_label(client, recipe.image, RECIPE_LABEL) == wanted:
            return recipe.image
        _build(client, recipe, base_image, wanted, say)
    return recipe.image


def ensure_all(progress: Progress | None = None, client=None, keys=READY_MADE_KEYS) -> dict[str, str]:
    """Build the images KEYS name (default: a ready-made testbed's) when missing or stale."""
    return {key: ensure_image(key, progress, client) for key in keys}


def _build(client, recipe: ImageRecipe, base_image: str, wanted: str, say: Progress) -> None:
    import docker.errors

    started = time.monotonic()
    say(f"building {recipe.image} from deploys/images/{recipe.context} (apt-get inside; a minute or two)")
    log_path = paths.state_dir() / f"build-{recipe.context}.log"
    try:
        with open(log_path, "w") as log:
            stream = client.api.build(
                path=str(recipe.context_dir()),
                tag=recipe.image,
                buildargs={"BASE_IMAGE": base_image},
                labels={RECIPE_LABEL: wanted, "io.ingest.recipe": recipe.context},
                rm=True,
                forcerm=True,
                decode=True,
            )
            for chunk in stream:
                if "error" in chunk:
                    raise HostError(
                        f"docker build of {recipe.image} failed: {chunk['error'].strip()}; full log in {log_path}"
                    )
                line = chunk.get("stream", "")
                log.write(line)
                if line.startswith("Step "):
                    say(f"  {recipe.image}: {line.strip()[:100]}")
    except docker.errors.APIError as exc:
        raise HostError(
            f"docker build of {recipe.image} failed: {exc.explanation}; log in {log_path}"
        ) from exc
    say(f"built {recipe.image} in {time.monotonic() - started:.0f}s")


def remove_all(client, progress: Progress | None = None) -> list[str]:
    """Remove the cached sandbox images (for `testbed down --purge`). Returns the names removed."""
    import docker.errors

    removed = []
    for recipe in SANDBOX_IMAGES.values():
        try:
            client.images.remove(recipe.image, force=True)
        except docker.errors.ImageNotFound:
            continue
        removed.append(recipe.image)
        if progress:
            progress(f"removed cached image {recipe.image}")
    return removed
