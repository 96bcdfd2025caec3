"""Facts about a host's Docker engine."""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase
from pyinfra.api.exceptions import FactProcessError

from ingestctl import hostvalues


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
