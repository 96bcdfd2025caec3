"""Image references in inventories: `name:tag`, or pinned by digest, `name:tag@sha256:<64 hex>`.

A tag is a name the registry can point at other content tomorrow; a digest names the content itself. An
inventory may pin `postgres_image`, `redis_image` and `proxy_image` by digest. The digest is checked on the machine
running ingestctl, whose engine resolves `name:tag@sha256:...` only to an image pulled with exactly that manifest
digest; the image ID found there is what every host is then checked against (see operations/images.py).

Hosts name the image by its tag alone (`host_name`): `docker tag` cannot create a digest reference, and an image
that reached a host by `docker load` or through the site's own registry carries no record of the upstream digest.
The compose files and `.env` rendered for hosts therefore name `name:tag`, which ingestctl made point at the
pinned image ID.
"""

from __future__ import annotations

from dataclasses import dataclass

from ingestctl import hostvalues

EXPECTED = "an image reference name:tag or name:tag@sha256:<64 hex> (e.g. postgres:16@sha256:...)"


@dataclass(frozen=True)
class ImageRef:
    repository: str  # [registry[:port]/]path
    tag: str
    digest: str | None = None  # sha256:<64 hex>

    @classmethod
    def parse(cls, text: object) -> ImageRef:
        """TEXT as a reference; ValueError saying what is expected otherwise (a tag is required)."""
        if not hostvalues.IMAGE_REF.matches(text):
            raise ValueError(f"expected {EXPECTED}")
        assert isinstance(text, str)
        name, _, digest = text.partition("@")
        last = name.rsplit("/", 1)[-1]
        if ":" not in last:
            raise ValueError(f"expected {EXPECTED}: a digest needs the tag it was taken from beside it, which "
                             "hosts name the image by")
        repository, _, tag = name.rpartition(":")
        return cls(repository, tag, digest or None)

    @property
    def pinned(self) -> bool:
        return self.digest is not None

    @property
    def host_name(self) -> str:
        """What hosts call the image (compose files, `docker tag`): name:tag, never the digest."""
        return f"{self.repository}:{self.tag}"

    def __str__(self) -> str:
        return self.host_name + (f"@{self.digest}" if self.digest else "")


def host_name(reference: str) -> str:
    """The name hosts know REFERENCE by (see ImageRef.host_name)."""
    return ImageRef.parse(reference).host_name


def pin_hint(reference: str) -> str:
    """How to pin a bare tag by digest, for warnings and docs."""
    return (f"find its digest with `docker buildx imagetools inspect {reference}` (the Digest line) or, after "
            f"`docker pull {reference}`, `docker inspect --format '{{{{index .RepoDigests 0}}}}' {reference}`, and "
            f"set it to '{reference}@sha256:<digest>' (docs/DEPLOYING.md, Pinning what goes into the images)")
