"""The artifacts that carry a built image to hosts without a registry: a gzip'd `docker save`, cached by image ID.

The registry-less digest of an image is its ID (`sha256:` of its config), which `docker save` / `docker load`
preserve. Archives are saved by ID, not by name, so one cached file serves every tag of the same image; the
host tags the loaded ID itself. Each archive has a `sha256sum`-format sidecar written while the archive was
produced, which is what hosts verify the upload against.

Sites with a registry push instead (`push_commands`); their hosts pull (see ingestctl.operations.images).
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ingestctl import paths
from ingestctl.errors import BuildError, EnvironmentMissing

IMAGE_ID = re.compile(r"^sha256:([0-9a-f]{64})$")
CHUNK = 1 << 20
# Level 3 keeps most of gzip -6's ratio on image layers at about half the CPU time.
COMPRESS_LEVEL = 3

# Deploy files run once per host in parallel greenlets (pyinfra CLI patches threading for gevent), so the
# first caller saves the archive and the others wait for it instead of saving it again.
_archive_lock = threading.Lock()


@dataclass(frozen=True)
class ImageArchive:
    image_id: str
    path: Path
    sha256: str
    size: int


def archive_dir() -> Path:
    return paths.project_root() / ".build" / "images"


def inspect_id_command(image: str) -> list[str]:
    return ["docker", "image", "inspect", "--format", "{{.Id}}", image]


def save_command(image_id: str) -> list[str]:
    return ["docker", "save", image_id]


def registry_reference(registry: str, image: str) -> str:
    """Where IMAGE lives in REGISTRY.

    `registry.example:5000` + `ingest:1.4.2` -> `registry.example:5000/ingest:1.4.2`.
    """
    return f"{registry.rstrip('/')}/{image}"


def push_commands(image: str, registry: str) -> list[list[str]]:
    reference = registry_reference(registry, image)
    return [["docker", "tag", image, reference], ["docker", "push", reference]]


def _require_image_id(image_id: str) -> str:
    match = IMAGE_ID.match(image_id)
    if not match:
        raise BuildError(f"image ID {image_id!r} is not of the form sha256:<64 hex digits>")
    return match.group(1)


def archive_path(image_id: str) -> Path:
    return archive_dir() / f"{_require_image_id(image_id)}.tar.gz"


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
        raise BuildError(
            f"image {image} is not in the local Docker engine ({detail}); "
            "build it first (`ingestctl image build`) or check the image name in the inventory data"
        )
    image_id = result.stdout.strip()
    _require_image_id(image_id)
    return image_id


def _read_sidecar(path: Path) -> str | None:
    sidecar = path.with_name(path.name + ".sha256")
    try:
        digest = sidecar.read_text().split()[0]
    except (OSError, IndexError):
        return None
    return digest if re.fullmatch(r"[0-9a-f]{64}", digest) else None


def ensure_archive(image_id: str) -> ImageArchive:
    """The cached archive of IMAGE_ID, saving it first when it is missing. Safe to call from many greenlets."""
    path = archive_path(image_id)
    with _archive_lock:
        digest = _read_sidecar(path)
        if digest is None or not path.exists():
            with _cross_process_lock():
                # Another process may have saved it while we waited.
                digest = _read_sidecar(path)
                if digest is None or not path.exists():
                    digest = _save_archive(image_id, path)
                    prune_archives(keep=local_image_ids() | {image_id})
        return ImageArchive(image_id=image_id, path=path, sha256=digest, size=path.stat().st_size)


@contextmanager
def _cross_process_lock() -> Iterator[None]:
    """Two processes (a deploy and a test, say) must not interleave an archive's sidecar and file."""
    archive_dir().mkdir(parents=True, exist_ok=True)
    with open(archive_dir() / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _save_archive(image_id: str, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    hasher = hashlib.sha256()

    class _HashingWriter:
        """Hash the compressed bytes on their way to disk so the file is read only once."""

        def __init__(self, raw):
            self.raw = raw

        def write(self, data: bytes) -> int:
            hasher.update(data)
            return self.raw.write(data)

        def flush(self) -> None:
            self.raw.flush()

    try:
        process = subprocess.Popen(save_command(image_id), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError as exc:
        raise EnvironmentMissing(
            "docker CLI not found: install Debian's docker.io (apt-get install docker.io)"
        ) from exc
    try:
        with open(partial, "wb") as raw:
            # mtime=0 and no file name in the header: the same image always gives the same bytes.
            with gzip.GzipFile(
                filename="", mode="wb", fileobj=_HashingWriter(raw), compresslevel=COMPRESS_LEVEL, mtime=0
            ) as gz:
                assert process.stdout is not None
                while chunk := process.stdout.read(CHUNK):
                    gz.write(chunk)
            raw.flush()
            os.fsync(raw.fileno())
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
        if process.wait() != 0:
            raise BuildError(f"`docker save {image_id}` failed: {stderr.strip() or 'no output'}")
        digest = hasher.hexdigest()
        # Sidecar first, archive last: a crash in between leaves no archive, so the pair is redone.
        path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")
        os.replace(partial, path)
        return digest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        partial.unlink(missing_ok=True)


def local_image_ids() -> set[str]:
    result = _run_docker(["docker", "image", "ls", "--all", "--quiet", "--no-trunc"])
    if result.returncode != 0:
        raise BuildError(f"listing local images failed: {result.stderr.strip() or 'no output'}")
    return set(result.stdout.split())


def prune_archives(keep: set[str]) -> list[Path]:
    """Remove cached archives of images the local engine no longer has: they can never be shipped again."""
    removed = []
    for archive in sorted(archive_dir().glob("*.tar.gz")):
        if f"sha256:{archive.name.removesuffix('.tar.gz')}" not in keep:
            archive.unlink(missing_ok=True)
            archive.with_name(archive.name + ".sha256").unlink(missing_ok=True)
            removed.append(archive)
    return removed


def push_to_registry(image: str, registry: str) -> str:
    """Push IMAGE to REGISTRY; returns the reference hosts pull."""
    for argv in push_commands(image, registry):
        result = _run_docker(argv)
        if result.returncode != 0:
            raise BuildError(f"`{' '.join(argv)}` failed: {result.stderr.strip() or 'no output'}")
    return registry_reference(registry, image)
