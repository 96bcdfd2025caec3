"""Facts about a host's Docker engine."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from pyinfra.api import FactBase
from pyinfra.api.exceptions import FactProcessError

from ingestctl import hostvalues, image_layers


class DockerImage(FactBase[str | None]):
    """The image ID (`sha256:...`, the registry-less digest) that IMAGE (a name:tag or an ID) resolves to.

    None when the host has no such image. When the engine does not answer, the fact's command fails
    (and pyinfra fails the host) instead of reporting the image as absent, because an absent image
    would trigger an upload that cannot succeed.
    """

    def command(self, image: str) -> str:
        quoted = shlex.quote(image)
        # `inspect` exits 1 both for "no such image" and "daemon down"; `docker version` tells them apart.
        return (
            f"docker image inspect --format '{{{{.Id}}}}' {quoted} 2>/dev/null"
            " || docker version --format '{{.Server.Version}}' >/dev/null"
        )

    def process(self, output: list[str]) -> str | None:
        lines = [line.strip() for line in output if line.strip()]
        if not lines:
            return None
        if len(lines) != 1 or not hostvalues.IMAGE_ID.matches(lines[0]):
            raise FactProcessError(f"expected one image ID like sha256:<64 hex>, found "
                                   f"{hostvalues.shown(chr(10).join(lines))}")
        return lines[0]


class TaggedImages(FactBase[dict[str, str]]):
    """Every tagged image on the host, {name:tag: image ID}, from one `docker images` (one CLI start a host, where
    a DockerImage per image costs one each). The command fails when the engine does not answer, as DockerImage's
    does, so an unanswering engine never reads as a host without images."""

    @staticmethod
    def default() -> dict[str, str]:
        return {}

    def command(self) -> str:
        return "docker images --no-trunc --format '{{.Repository}}:{{.Tag}} {{.ID}}'"

    def process(self, output: list[str]) -> dict[str, str]:
        images: dict[str, str] = {}
        for line in (line.strip() for line in output if line.strip()):
            reference, _, image_id = line.partition(" ")
            if "<none>" in reference:
                continue  # dangling, or a digest-only pull: no tag to compare with
            if not hostvalues.IMAGE_ID.matches(image_id):
                raise FactProcessError(f"docker images: expected 'name:tag sha256:<64 hex>', found "
                                       f"{hostvalues.shown(line)}")
            images[reference] = image_id
        return images


def tagged(reference: str) -> str | None:
    """REFERENCE as `docker images` lists it (name:tag, `latest` when untagged); None for a digest reference."""
    if "@" in reference:
        return None
    name = reference.rsplit("/", 1)[-1]
    return reference if ":" in name else f"{reference}:latest"


@dataclass(frozen=True)
class HostLayers:
    """What a host's engine holds, for layer-aware shipping: the chain ID of every layer of every image."""

    chains: frozenset[str]
    # `docker load` skips a layer whose chain is present only in the classic image store; the containerd
    # store wants every layer in the archive.
    skips_present_layers: bool
    has_zstd: bool


class ImageLayers(FactBase[HostLayers]):
    """The layers of every image on the host, whether it decodes zstd, and which image store it runs.

    The engine must answer (`docker info` fails the command otherwise): an engine that is down is not an
    engine without layers. An image removed between listing and inspecting is simply not counted.
    """

    def command(self) -> str:
        return (
            "docker info --format 'store {{json .DriverStatus}}' && "
            "{ command -v zstd >/dev/null 2>&1 && echo 'zstd yes' || echo 'zstd no'; } && "
            "{ docker image ls --quiet --no-trunc | sort -u"
            " | xargs -r docker image inspect --format 'layers {{json .RootFS.Layers}}' 2>/dev/null || true; }"
        )

    def process(self, output: list[str]) -> HostLayers:
        chains: set[str] = set()
        store = zstd = None
        for line in output:
            kind, _, value = line.strip().partition(" ")
            if kind == "store":
                store = value
            elif kind == "zstd":
                zstd = value == "yes"
            elif kind == "layers":
                chains.update(image_layers.chain_ids(_diff_ids(value)))
            elif line.strip():
                raise FactProcessError(f"image layers: unexpected line {hostvalues.shown(line)}")
        if store is None or zstd is None:
            raise FactProcessError("image layers: the engine's storage driver and the zstd check must be reported")
        return HostLayers(chains=frozenset(chains), skips_present_layers="io.containerd.snapshotter" not in store,
                          has_zstd=zstd)


def _diff_ids(value: str) -> list[str]:
    try:
        layers = json.loads(value)
    except ValueError as exc:
        raise FactProcessError(f"image layers: expected a JSON list, found {hostvalues.shown(value)}") from exc
    if layers is None:
        return []
    if not isinstance(layers, list) or not all(hostvalues.IMAGE_ID.matches(layer) for layer in layers):
        raise FactProcessError(f"image layers: expected a list of sha256:<64 hex>, found {hostvalues.shown(value)}")
    return layers
