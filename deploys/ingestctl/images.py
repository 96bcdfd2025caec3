"""Build the app image `ingest:<version>` from the checkout, without network access inside the build.

Steps: a wheelhouse on this machine (pip reaches PyPI here, containers cannot) holding exactly the hash-locked
wheels of service/requirements.lock for the *image's* Python and platform (ingestctl.wheelhouse), then
`docker build` of `service/` on a local debootstrap base image.
The image is labelled with the git revision and build time of its first build, the Alembic head it ships and
a hash of everything that went into it. The version is only the tag (the service reads APP_VERSION from the
host's compose file), so a new version of unchanged inputs is a new tag of the same image ID: a build whose
hash matches a local image is skipped, and hosts that have that ID only re-tag it (0 bytes shipped).

Command builders are pure functions (tested by exact strings); `build_app_image` runs them.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ingestctl import paths, wheelhouse
from ingestctl.errors import BuildError, ConfigError, EnvironmentMissing

IMAGE_REPOSITORY = "ingest"
BASE_RECIPE = "bookworm-python"
BASE_IMAGE_ENV = "INGEST_BASE_IMAGE"
LABEL_REVISION = "org.opencontainers.image.revision"
LABEL_CREATED = "org.opencontainers.image.created"
LABEL_SCHEMA_HEAD = "io.ingest.schema-head"
LABEL_SOURCE_HASH = "io.ingest.source-hash"
# An image of a checkout without migrations still needs a label value the deploy can compare.
NO_SCHEMA_HEAD = "none"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuiltImage:
    name: str
    id: str
    version: str
    labels: Mapping[str, str] = field(default_factory=dict)
    cached: bool = False
    seconds: float = 0.0


# --- pure command builders ---------------------------------------------------------------------------


def describe_command() -> list[str]:
    return ["git", "describe", "--tags", "--always", "--dirty"]


def revision_command() -> list[str]:
    return ["git", "rev-parse", "HEAD"]


def source_files_command() -> list[str]:
    """Files docker's build context would carry that git knows about: tracked, plus untracked-not-ignored."""
    return ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "service"]


def build_command(
    context: Path,
    image: str,
    base_image: str,
    labels: Mapping[str, str],
    no_cache: bool = False,
) -> list[str]:
    command = [
        # --force-rm: a failed step's container is removed too, so failed builds leave nothing behind.
        "docker",
        "build",
        "--force-rm",
        "--file",
        str(context / "Dockerfile"),
        "--tag",
        image,
        "--build-arg",
        f"BASE_IMAGE={base_image}",
    ]
    if no_cache:
        command.append("--no-cache")
    for key in sorted(labels):
        command += ["--label", f"{key}={labels[key]}"]
    return [*command, str(context)]


def image_name(version: str) -> str:
    return f"{IMAGE_REPOSITORY}:{version}"


# --- pure helpers ------------------------------------------------------------------------------------


def valid_tag(version: str) -> bool:
    """Docker's tag grammar: [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}."""
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", version))


def source_hash(files: Iterable[tuple[str, bytes, bool]], wheelhouse_stamp: str, base_image_id: str) -> str:
    """Hash of (relative path, content, executable bit) of each file, the wheelhouse stamp and the base image ID.

    Order-independent in its input, so it is stable across file systems and git versions.
    """
    digest = hashlib.sha256()
    for path, content, executable in sorted(files):
        digest.update(
            path.encode() + b"\0" + (b"x" if executable else b"-") + hashlib.sha256(content).digest()
        )
    digest.update(b"wheelhouse\0" + wheelhouse_stamp.encode())
    digest.update(b"base\0" + base_image_id.encode())
    return digest.hexdigest()


def schema_head(versions_dir: Path) -> str | None:
    """The Alembic head the image ships (its label): read with the same parser and rules as the deploy's
    planning (`ingestctl.migrations`, a linear history), so the label and the plan never disagree."""
    from ingestctl import migrations

    try:
        return migrations.chain_head(migrations.load_revisions(versions_dir))
    except ConfigError as exc:
        raise BuildError(f"{versions_dir}: {exc}") from None


# --- running ------------------------------------------------------------------------------------------


def _run(argv: list[str], cwd: Path, what: str) -> str:
    try:
        result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise EnvironmentMissing(f"{what} needs `{argv[0]}`, which is not installed") from exc
    if result.returncode != 0:
        raise BuildError(
            f"{what} failed: `{' '.join(argv)}` exited {result.returncode}: {result.stderr.strip()[-800:]}"
        )
    return result.stdout


def checkout_version(root: Path) -> str:
    version = _run(describe_command(), root, "reading the release version (git describe)").strip()
    if not valid_tag(version):
        raise BuildError(f"git describe gave {version!r}, which is not a valid image tag; pass --version")
    return version


def resolve_base_image(progress: Progress) -> str:
    override = os.environ.get(BASE_IMAGE_ENV)
    if override:
        return override
    from ingestctl.baseimages import ensure_base_image

    return ensure_base_image(BASE_RECIPE, progress=progress)


def _inspect(reference: str) -> dict | None:
    import docker
    import docker.errors

    try:
        client = docker.from_env()
        try:
            return client.images.get(reference).attrs
        finally:
            client.close()
    except docker.errors.ImageNotFound:
        return None
    except docker.errors.DockerException as exc:
        raise EnvironmentMissing(
            f"the Docker engine does not answer ({exc}); install docker.io and start `dockerd`"
        ) from exc


def _image_with_source_hash(image: str, digest: str) -> dict | None:
    """IMAGE when it was built from DIGEST's inputs; else any local image that was, tagged IMAGE here."""
    existing = _inspect(image)
    if existing is not None and (existing["Config"].get("Labels") or {}).get(LABEL_SOURCE_HASH) == digest:
        return existing
    listed = subprocess.run(
        ["docker", "image", "ls", "--quiet", "--no-trunc", "--filter", f"label={LABEL_SOURCE_HASH}={digest}"],
        capture_output=True, text=True, check=False,
    )
    for image_id in dict.fromkeys(listed.stdout.split()):
        same = _inspect(image_id)
        if same is not None:
            _run(["docker", "tag", image_id, image], paths.project_root(), f"tagging {image_id[:19]} as {image}")
            return _inspect(image)
    return None


def _source_files(root: Path) -> list[tuple[str, bytes, bool]]:
    listed = _run(source_files_command(), root, "listing the image's source files (git ls-files)")
    files = []
    for relative in sorted(set(filter(None, listed.split("\0")))):
        path = root / relative
        if path.is_file():  # tracked but deleted in the working tree: not in the build context either
            files.append((relative, path.read_bytes(), os.access(path, os.X_OK)))
    return files


def compute_source_hash(root: Path, wheelhouse_stamp: str, base_image_id: str) -> str:
    return source_hash(_source_files(root), wheelhouse_stamp, base_image_id)


def _stream_build(argv: list[str], root: Path, progress: Progress) -> None:
    tail: deque[str] = deque(maxlen=40)
    try:
        process = subprocess.Popen(
            argv,
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # Without buildx, the CLI's legacy builder is the one that works; say so to silence its notice.
            env={**os.environ, "DOCKER_BUILDKIT": os.environ.get("DOCKER_BUILDKIT", "0")},
        )
    except FileNotFoundError as exc:
        raise EnvironmentMissing(
            "docker CLI not found: install Debian's docker.io (apt-get install docker.io)"
        ) from exc
    assert process.stdout is not None
    for line in process.stdout:
        line = line.rstrip()
        tail.append(line)
        if line.startswith("Step "):
            progress(line)
    if process.wait() != 0:
        raise BuildError("docker build failed:\n" + "\n".join(tail))


def build_app_image(
    version: str | None = None, progress: Progress | None = None, no_cache: bool = False
) -> BuiltImage:
    """Build (or reuse) `ingest:<version>`; version defaults to the checkout's `git describe`.

    NO_CACHE rebuilds every layer and the image even when its source hash is unchanged.
    """
    say = progress or (lambda _message: None)
    started = time.monotonic()
    root = paths.project_root()
    service = root / "service"
    if not (service / "Dockerfile").is_file():
        raise BuildError(f"{service / 'Dockerfile'} is missing: the app image is built from it")
    version = version or checkout_version(root)
    if not valid_tag(version):
        raise BuildError(
            f"version {version!r} is not a valid image tag: use letters, digits, '_', '.' and '-'"
        )
    image = image_name(version)
    # One build at a time on this machine: two at once (parallel test workers, two terminals) would race on the
    # wheelhouse, and the second of two builds of one source would get another ID (the created label) where
    # it should re-tag the first.
    with build_lock():
        return _build_locked(root, service, version, image, say, no_cache, started)


def fill_wheelhouse(root: Path, say: Progress) -> str:
    """ROOT's service/wheelhouse filled for the base image (a no-op when its stamp matches), under the build
    lock; returns the stamp. A copy of ROOT that takes the filled wheelhouse along downloads nothing."""
    with build_lock():
        return _wheelhouse_for_base(root, say)[0]


def build_lock():
    """One build or wheelhouse fill at a time per state directory (a variant of a checkout shares its `.testbed`)."""
    return paths.file_lock(paths.state_dir() / "locks" / "app-build.lock")


def _wheelhouse_for_base(root: Path, say: Progress) -> tuple[str, str, dict]:
    """(wheelhouse stamp, base image, its inspect record), the wheelhouse filled for that base."""
    base_image = resolve_base_image(say)
    base = _inspect(base_image)
    if base is None:
        raise BuildError(
            f"base image {base_image} is not in the local engine; unset {BASE_IMAGE_ENV} or build it"
        )
    stamp = wheelhouse.ensure_wheelhouse(root, base_image, base["Id"], say, wheelhouse.wheelhouse_target(base))
    return stamp, base_image, base


def _build_locked(root: Path, service: Path, version: str, image: str, say: Progress, no_cache: bool,
                  started: float) -> BuiltImage:
    stamp, base_image, base = _wheelhouse_for_base(root, say)
    digest = compute_source_hash(root, stamp, base["Id"])

    if not no_cache:
        same = _image_with_source_hash(image, digest)
        if same is not None:
            say(f"{image} is up to date (source hash {digest[:12]}, image {same['Id'][:19]})")
            return BuiltImage(image, same["Id"], version, same["Config"]["Labels"], cached=True,
                              seconds=time.monotonic() - started)

    labels = {
        LABEL_REVISION: _run(revision_command(), root, "reading the git revision").strip(),
        LABEL_CREATED: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        LABEL_SCHEMA_HEAD: schema_head(service / "alembic" / "versions") or NO_SCHEMA_HEAD,
        LABEL_SOURCE_HASH: digest,
    }
    say(f"building {image} on {base_image}")
    _stream_build(build_command(Path("service"), image, base_image, labels, no_cache), root, say)
    built = _inspect(image)
    if built is None:
        raise BuildError(f"docker build reported success but {image} is not in the local engine")
    seconds = time.monotonic() - started
    say(f"built {image} as {built['Id']} in {seconds:.1f}s")
    return BuiltImage(image, built["Id"], version, built["Config"]["Labels"], cached=False, seconds=seconds)
