"""Local base images built with debootstrap and `docker import`, because no image registry can be reached.

A base image is rebuilt only when its recipe changes: the image carries a label with a hash of the recipe
(suite, package list, recipe version), and `ensure_base_image` compares that label before doing any work.

Other code asks for a base by recipe name, e.g. the app image build:

    from ingestctl.baseimages import ensure_base_image
    base = ensure_base_image("bookworm-python")   # -> "ingest-base:bookworm"
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ingestctl import paths
from ingestctl.errors import EnvironmentMissing, HostError

RECIPE_LABEL = "io.ingest.recipe-hash"
# Where root debootstraps (a few hundred MB, removed after the import) and keeps the log: on disk, not tmpfs.
BUILD_DIR = Path("/var/tmp/ingestctl-base-images")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BaseRecipe:
    """What goes into a base image. Bump `version` when the build steps below change meaning."""

    name: str
    image: str
    suite: str
    packages: tuple[str, ...]
    version: int = 1

    def recipe_hash(self) -> str:
        """A stable hash of everything that decides the image's content (the mirror is not part of it)."""
        canonical = json.dumps(
            {"suite": self.suite, "packages": sorted(self.packages), "version": self.version},
            sort_keys=True,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def debootstrap_command(self, target: Path, mirror: str = DEFAULT_MIRROR) -> list[str]:
        command = ["debootstrap", "--variant=minbase"]
        if self.packages:
            command.append("--include=" + ",".join(self.packages))
        return [*command, self.suite, str(target), mirror]


RECIPES: dict[str, BaseRecipe] = {
    # The app image's BASE_IMAGE: bookworm's python3 is 3.11, like the host that builds the wheelhouse.
    "bookworm-python": BaseRecipe(
        name="bookworm-python",
        image="ingest-base:bookworm",
        suite="bookworm",
        packages=("python3", "python3-venv", "ca-certificates"),
    ),
    # The sandbox hosts: trixie's docker-compose package gives `docker compose` v2.
    "trixie": BaseRecipe(
        name="trixie",
        image="ingest-base:trixie",
        suite="trixie",
        packages=("ca-certificates",),
    ),
}


def recipe(name: str) -> BaseRecipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise EnvironmentMissing(
            f"base image recipe {name!r} is unknown; expected one of: {', '.join(sorted(RECIPES))}"
        ) from None


def import_changes(base: BaseRecipe) -> list[str]:
    """Dockerfile instructions applied by `docker import`: label the hash, give a sane default command."""
    return [
        f"LABEL {RECIPE_LABEL}={base.recipe_hash()}",
        f"LABEL io.ingest.recipe={base.name}",
        "ENV LANG=C.UTF-8",
        'CMD ["/bin/bash"]',
    ]


def ensure_all(progress: Progress | None = None, client=None) -> list[str]:
    """Every base image the sandbox and the app image use, built when missing or stale (as root)."""
    return [ensure_base_image(name, progress, client) for name in RECIPES]


@contextmanager
def build_lock() -> Iterator[None]:
    """Serialise image builds across processes: two `testbed up` runs must not debootstrap the same suite twice."""
    with paths.file_lock(paths.state_dir() / "images.lock"):
        yield


def image_label(client, image: str, label: str) -> str | None:
    """The label's value on a local image, or None when the image does not exist."""
    import docker.errors

    try:
        return (client.images.get(image).labels or {}).get(label)
    except docker.errors.ImageNotFound:
        return None


def ensure_base_image(name: str, progress: Progress | None = None, client=None) -> str:
    """The image name for recipe `name`, building it first if it is missing or its recipe changed."""
    from ingestctl.testbed.engine import docker_client

    base = recipe(name)
    client = client or docker_client(progress)
    say = progress or (lambda _msg: None)
    if image_label(client, base.image, RECIPE_LABEL) == base.recipe_hash():
        return base.image
    if os.geteuid() != 0:
        # The only step of the sandbox that needs root; once built, the image serves every user of the engine.
        raise EnvironmentMissing(
            f"building base image {base.image} needs root (debootstrap): run `sudo .venv/bin/ingestctl testbed "
            "base-images` once, then go on as this user"
        )
    # Root's work stays outside the checkout (a root-owned .testbed/ would lock its user out), and the lock is
    # machine-wide: two checkouts must not debootstrap the same suite at once either.
    with paths.file_lock(BUILD_DIR / "base-images.lock"):
        # Someone else may have built it while we waited for the lock.
        if image_label(client, base.image, RECIPE_LABEL) == base.recipe_hash():
            return base.image
        _build(base, say)
    return base.image


def _build(base: BaseRecipe, say: Progress) -> None:
    if shutil.which("debootstrap", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") is None:
        raise EnvironmentMissing(
            f"building base image {base.image} needs debootstrap: run `apt-get install debootstrap`"
        )
    mirror = os.environ.get("INGESTCTL_DEBIAN_MIRROR", DEFAULT_MIRROR)
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix=f"{base.suite}-", dir=BUILD_DIR))
    log_path = BUILD_DIR / f"debootstrap-{base.name}.log"
    started = time.monotonic()
    say(f"building base image {base.image}: debootstrap {base.suite} (about a minute; log {log_path})")
    try:
        with open(log_path, "w") as log:
            result = subprocess.run(
                base.debootstrap_command(target, mirror), check=False, stdout=log, stderr=subprocess.STDOUT
            )
        if result.returncode != 0:
            raise HostError(
                f"debootstrap {base.suite} for {base.image} failed with exit {result.returncode}; "
                f"see {log_path} (mirror {mirror}; set INGESTCTL_DEBIAN_MIRROR to use another)"
            )
        # Downloaded .debs and apt lists are dead weight in an image.
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (target / leftover).glob("*"):
                if entry.is_file():
                    entry.unlink()
        say(f"importing {base.image} ({time.monotonic() - started:.0f}s so far)")
        _docker_import(target, base)
    finally:
        shutil.rmtree(target, ignore_errors=True)
    say(f"built base image {base.image} in {time.monotonic() - started:.0f}s")


def _docker_import(rootfs: Path, base: BaseRecipe) -> None:
    """`tar -C DIR -c . | docker import --change ... - IMAGE`, streamed so the rootfs never sits in memory."""
    import_cmd = ["docker", "import"]
    for change in import_changes(base):
        import_cmd += ["--change", change]
    import_cmd += ["-", base.image]
    tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    try:
        imported = subprocess.run(import_cmd, check=False, stdin=tar.stdout, capture_output=True, text=True)
    finally:
        assert tar.stdout is not None
        tar.stdout.close()
        tar_rc = tar.wait()
    if tar_rc != 0 or imported.returncode != 0:
        raise HostError(
            f"docker import of {base.image} failed (tar exit {tar_rc}, docker exit {imported.returncode}): "
            f"{imported.stderr.strip()[-500:]}"
        )


def remove_base_images(client, progress: Progress | None = None) -> list[str]:
    """Remove every cached base image (for `testbed down --purge`). Returns the names removed."""
    import docker.errors

    removed = []
    for base in RECIPES.values():
        try:
            client.images.remove(base.image, force=True)
            removed.append(base.image)
            if progress:
                progress(f"removed cached base image {base.image}")
        except docker.errors.ImageNotFound:
            continue
    return removed
