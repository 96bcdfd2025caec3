"""A built image as content-addressed layers cached on the controller, so a host receives only what it lacks.

`docker save` writes an image as a tar: `manifest.json`, the image config (whose sha256 is the image ID) and
one uncompressed tar per layer, whose sha256 is that layer's diffID in the config's `rootfs`. Each layer is
cached here once, by diffID, as one compressed frame holding a whole tar member (header, bytes, padding).
Compressed frames concatenate into one valid stream (zstd and gzip both decode concatenated frames), so a
layer is compressed once and sent to any number of hosts as is.

A host's stream carries every image it lacks at once: the frames of the layers it lacks (each once, however
many images share it), then one small frame with the configs, a `manifest.json` that names every image's
layers, and the tar trailer. `docker load` (the classic image store) takes
a layer from its own store when the layer's chain ID is there already, without opening the absent file, and
checks every layer it does load against its diffID; the host then checks the image ID. What arrives is
verified by content, whatever path it took.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from pathlib import Path, PurePosixPath

from ingestctl import paths
from ingestctl.errors import BuildError, EnvironmentMissing
from ingestctl.local_images import IMAGE_ID, local_image_ids, save_command

CHUNK = 1 << 20
BLOCK = 512
# Level 3 keeps most of the ratio of higher levels on image layers at a fraction of the CPU time.
LEVEL = 3

class Codec(StrEnum):
    """How frames are compressed on the wire. zstd where both ends have it, else gzip (always on Debian)."""

    ZSTD = "zstd"
    GZIP = "gzip"

    @property
    def suffix(self) -> str:
        return {Codec.ZSTD: "zst", Codec.GZIP: "gz"}[self]

    def decompress_command(self) -> str:
        """The host-side decoder, reading stdin and writing the tar to stdout."""
        return {Codec.ZSTD: "zstd -dcq", Codec.GZIP: "gzip -dc"}[self]


@dataclass(frozen=True)
class LayeredImage:
    """An image as cached here: its config (sha256 = ID) and its layers in order, by diffID."""

    image_id: str
    config: bytes
    diff_ids: tuple[str, ...]

    @property
    def config_name(self) -> str:
        return f"{_hex(self.image_id)}.json"


def _hex(digest: str) -> str:
    match = IMAGE_ID.match(digest)
    if not match:
        raise BuildError(f"digest {digest!r} is not of the form sha256:<64 hex digits>")
    return match.group(1)


def layer_member_name(diff_id: str) -> str:
    return f"{_hex(diff_id)}.tar"


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The chain ID of each layer position: the identity Docker's layer store keeps a layer under.

    A layer is only the same layer when everything beneath it is the same, so the chain folds in every
    diffID below (OCI image spec, "ChainID").
    """
    chains: list[str] = []
    for diff_id in diff_ids:
        if not chains:
            chains.append(diff_id)
        else:
            chains.append("sha256:" + hashlib.sha256(f"{chains[-1]} {diff_id}".encode()).hexdigest())
    return chains


def layers_to_send(images: Sequence[Sequence[str]], present_chains: Iterable[str]) -> tuple[str, ...]:
    """The diffIDs a host lacks for IMAGES (each a list of diffIDs), given the chain IDs of every image it
    holds: each at most once, in order. A layer sent for an earlier image counts as present for later ones."""
    present = set(present_chains)
    needed: list[str] = []
    for diff_ids in images:
        chains = chain_ids(diff_ids)
        for diff_id, chain in zip(diff_ids, chains, strict=True):
            if chain not in present and diff_id not in needed:
                needed.append(diff_id)
        present.update(chains)
    return tuple(needed)


def tar_header(name: str, size: int) -> bytes:
    """A deterministic ustar header: the same member always gives the same bytes."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def manifest_json(images: Sequence[LayeredImage]) -> bytes:
    """`docker load`'s manifest: no tags (the host tags each loaded ID itself), every layer by member name."""
    entries = [{"Config": image.config_name, "RepoTags": None,
                "Layers": [layer_member_name(d) for d in image.diff_ids]} for image in images]
    return json.dumps(entries).encode()


def closing_member_bytes(images: Sequence[LayeredImage]) -> bytes:
    """The configs, the manifest and the tar trailer: what ends every stream, uncompressed."""
    members = [(image.config_name, image.config) for image in dict.fromkeys(images)]
    parts = []
    for name, body in (*members, ("manifest.json", manifest_json(images))):
        parts += [tar_header(name, len(body)), body, padding(len(body))]
    parts.append(b"\0" * (2 * BLOCK))
    return b"".join(parts)


def compress(data: bytes, codec: Codec) -> bytes:
    if codec is Codec.GZIP:
        return gzip.compress(data, compresslevel=LEVEL, mtime=0)
    return _zstd(["-q", f"-{LEVEL}", "-c"], data)


def _zstd(args: list[str], data: bytes) -> bytes:
    try:
        result = subprocess.run(["zstd", *args], input=data, capture_output=True, check=False)
    except FileNotFoundError as exc:
        raise EnvironmentMissing("zstd not found on the controller: apt-get install zstd") from exc
    if result.returncode != 0:
        raise BuildError(f"zstd {' '.join(args)} failed: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout


def controller_codecs() -> tuple[Codec, ...]:
    """The codecs this controller can write, best first."""
    return (Codec.ZSTD, Codec.GZIP) if shutil.which("zstd") else (Codec.GZIP,)


# -- the cache ---------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    return paths.project_root() / ".build" / "layers"


def frame_path(diff_id: str, codec: Codec) -> Path:
    return cache_dir() / f"{_hex(diff_id)}.{codec.suffix}"


def config_path(image_id: str) -> Path:
    return cache_dir() / f"{_hex(image_id)}.config.json"


def _parse_config(image_id: str, config: bytes) -> LayeredImage:
    found = hashlib.sha256(config).hexdigest()
    if found != _hex(image_id):
        raise BuildError(f"config of image {image_id}: expected sha256 {_hex(image_id)}, found {found}")
    try:
        diff_ids = tuple(json.loads(config)["rootfs"]["diff_ids"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BuildError(f"config of image {image_id} has no rootfs.diff_ids: {exc}") from exc
    for diff_id in diff_ids:
        _hex(diff_id)
    return LayeredImage(image_id=image_id, config=config, diff_ids=diff_ids)


def cached_image(image_id: str, codec: Codec) -> LayeredImage | None:
    """The image from the cache when its config and every layer's frame in CODEC are there."""
    try:
        image = _parse_config(image_id, config_path(image_id).read_bytes())
    except (OSError, BuildError):
        return None
    if all(frame_path(diff_id, codec).is_file() for diff_id in image.diff_ids):
        return image
    return None


def ensure_layers(image_id: str, codecs: Sequence[Codec]) -> LayeredImage:
    """IMAGE_ID's layers cached in every one of CODECS, saving the image from the local engine when needed."""
    # pyinfra runs a deploy once per host in parallel greenlets: the first caller saves the image, the others
    # wait for it (file_lock excludes greenlets of this process too).
    with paths.file_lock(cache_dir() / ".lock"):
        cached = [cached_image(image_id, codec) for codec in codecs]
        if all(cached):
            return cached[0]
        image = _save(image_id, codecs)
        # Images the engine no longer has can never be shipped again: their frames only take space.
        prune(keep_images=local_image_ids() | {image_id})
        return image


def _save(image_id: str, codecs: Sequence[Codec]) -> LayeredImage:
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".save-") as scratch:
        members = _extract(image_id, Path(scratch))
        manifest = _only_manifest(image_id, members)
        config = members.read(manifest["Config"])
        image = _parse_config(image_id, config)
        layers = manifest.get("Layers") or []
        if len(layers) != len(image.diff_ids):
            raise BuildError(
                f"`docker save {image_id}`: expected {len(image.diff_ids)} layers, the manifest names {len(layers)}"
            )
        for position, (name, diff_id) in enumerate(zip(layers, image.diff_ids, strict=True)):
            path, digest = members.file(name)
            if f"sha256:{digest}" != diff_id:
                raise BuildError(
                    f"layer {position} of image {image_id}: expected diffID {diff_id}, found sha256:{digest}"
                )
            for codec in codecs:
                if not frame_path(diff_id, codec).is_file():
                    _write_frame(path, diff_id, codec)
        # The config last: its presence says the image's frames are complete (see cached_image).
        _atomic_write(config_path(image_id), config)
        return image


def _write_frame(layer: Path, diff_id: str, codec: Codec) -> None:
    size = layer.stat().st_size
    target = frame_path(diff_id, codec)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as out:
            if codec is Codec.GZIP:
                with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=LEVEL, mtime=0) as gz:
                    for chunk in _member_chunks(layer, diff_id, size):
                        gz.write(chunk)
            else:
                _zstd_stream(_member_chunks(layer, diff_id, size), out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _member_chunks(layer: Path, diff_id: str, size: int) -> Iterator[bytes]:
    yield tar_header(layer_member_name(diff_id), size)
    with open(layer, "rb") as handle:
        while chunk := handle.read(CHUNK):
            yield chunk
    yield padding(size)


def _zstd_stream(chunks: Iterator[bytes], out) -> None:
    """Compress CHUNKS into OUT with the zstd CLI (multi-threaded), fed from a thread so neither side stalls."""
    try:
        process = subprocess.Popen(
            ["zstd", "-q", f"-{LEVEL}", "-T0", "-c"], stdin=subprocess.PIPE, stdout=out, stderr=subprocess.PIPE
        )
    except FileNotFoundError as exc:
        raise EnvironmentMissing("zstd not found on the controller: apt-get install zstd") from exc
    assert process.stdin is not None
    try:
        for chunk in chunks:
            process.stdin.write(chunk)
    finally:
        process.stdin.close()
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if process.wait() != 0:
        raise BuildError(f"zstd failed while caching a layer: {stderr.strip() or 'no output'}")


def _atomic_write(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


class _Members:
    """Regular files of a `docker save` stream, written to SCRATCH and hashed on the way; links resolved."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.files: dict[str, tuple[Path, str]] = {}
        self.links: dict[str, str] = {}

    def file(self, name: str) -> tuple[Path, str]:
        seen: set[str] = set()
        while name in self.links and name not in seen:
            seen.add(name)
            name = self.links[name]
        if name not in self.files:
            raise BuildError(f"`docker save` output has no member {name!r}")
        return self.files[name]

    def read(self, name: str) -> bytes:
        return self.file(name)[0].read_bytes()


def _normal(name: str) -> str:
    return str(PurePosixPath(os.path.normpath(name))).lstrip("/")


def _extract(image_id: str, scratch: Path) -> _Members:
    members = _Members(scratch)
    try:
        process = subprocess.Popen(save_command(image_id), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError as exc:
        raise EnvironmentMissing(
            "docker CLI not found: install Debian's docker.io (apt-get install docker.io)"
        ) from exc
    assert process.stdout is not None
    try:
        with tarfile.open(fileobj=process.stdout, mode="r|") as archive:
            for index, member in enumerate(archive):
                name = _normal(member.name)
                if member.issym():
                    members.links[name] = _normal(str(PurePosixPath(name).parent / member.linkname))
                elif member.islnk():
                    members.links[name] = _normal(member.linkname)
                elif member.isfile():
                    source = archive.extractfile(member)
                    assert source is not None
                    target = scratch / f"{index}.member"
                    hasher = hashlib.sha256()
                    with open(target, "wb") as out:
                        while chunk := source.read(CHUNK):
                            hasher.update(chunk)
                            out.write(chunk)
                    members.files[name] = (target, hasher.hexdigest())
    except tarfile.TarError as exc:
        raise BuildError(f"`docker save {image_id}` wrote an unreadable tar: {exc}") from exc
    finally:
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
        status = process.wait()
    if status != 0:
        raise BuildError(f"`docker save {image_id}` failed: {stderr.strip() or 'no output'}")
    return members


def _only_manifest(image_id: str, members: _Members) -> dict:
    try:
        manifest = json.loads(members.read("manifest.json"))
    except ValueError as exc:
        raise BuildError(f"`docker save {image_id}` wrote an unreadable manifest.json: {exc}") from exc
    if not isinstance(manifest, list) or len(manifest) != 1 or not isinstance(manifest[0], dict):
        raise BuildError(f"`docker save {image_id}`: expected one image in manifest.json, found {manifest!r:.200}")
    return manifest[0]


# -- what one host is sent ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shipment:
    """What one host receives in one stream: cached frames of the layers it lacks, then the closing frame."""

    images: tuple[LayeredImage, ...]
    layers: tuple[str, ...]
    codec: Codec

    @property
    def frames(self) -> tuple[Path, ...]:
        return tuple(frame_path(diff_id, self.codec) for diff_id in self.layers)

    @cached_property
    def closing_frame(self) -> bytes:
        """Compressed once: both the size reported to progress and the stream itself need it."""
        return compress(closing_member_bytes(self.images), self.codec)

    def size(self) -> int:
        return sum(path.stat().st_size for path in self.frames) + len(self.closing_frame)

    def chunks(self) -> Iterator[bytes]:
        for path in self.frames:
            with open(path, "rb") as handle:
                while chunk := handle.read(CHUNK):
                    yield chunk
        yield self.closing_frame


def prune(keep_images: set[str]) -> list[Path]:
    """Drop cached images the local engine no longer has, and frames no kept image uses."""
    removed: list[Path] = []
    keep_layers: set[str] = set()
    for config in sorted(cache_dir().glob("*.config.json")):
        image_id = f"sha256:{config.name.removesuffix('.config.json')}"
        if image_id not in keep_images:
            config.unlink(missing_ok=True)
            removed.append(config)
            continue
        try:
            keep_layers.update(_hex(d) for d in json.loads(config.read_bytes())["rootfs"]["diff_ids"])
        except (OSError, ValueError, KeyError, TypeError, BuildError):
            config.unlink(missing_ok=True)
            removed.append(config)
    for frame in sorted([*cache_dir().glob("*.zst"), *cache_dir().glob("*.gz")]):
        if frame.name.split(".")[0] not in keep_layers:
            frame.unlink(missing_ok=True)
            removed.append(frame)
    return removed
