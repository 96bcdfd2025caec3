"""Build the app image `ingest:<version>` from the checkout, without network access inside the build.

Steps: a wheelhouse on this machine (pip reaches PyPI here, containers cannot), then `docker build` of
`service/` on a local debootstrap base image. The image is labelled with its version, git revision, build
time, the Alembic head it ships and a hash of everything that went into it; a build whose inputs carry the
same hash as the existing `ingest:<version>` is skipped.

Command builders are pure functions (tested by exact strings); `build_app_image` runs them.
"""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ingestctl import paths
from ingestctl.errors import BuildError, EnvironmentMissing

IMAGE_REPOSITORY = "ingest"
BASE_RECIPE = "bookworm-python"
BASE_IMAGE_ENV = "INGEST_BASE_IMAGE"
STAMP_NAME = ".requirements.sha256"

LABEL_VERSION = "org.opencontainers.image.version"
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


def wheelhouse_command(python: str, requirements: Path, wheelhouse: Path) -> list[str]:
    return [python, "-m", "pip", "wheel", "--quiet", "-r", str(requirements), "-w", str(wheelhouse)]


def build_command(
    context: Path,
    image: str,
    base_image: str,
    version: str,
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
        "--build-arg",
        f"APP_VERSION={version}",
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


def requirements_hash(requirements: bytes, python_tag: str) -> str:
    """Wheels depend on the requirements and on the interpreter that builds them."""
    return hashlib.sha256(python_tag.encode() + b"\0" + requirements).hexdigest()


def target_environment(python_full_version: str) -> dict[str, str]:
    """PEP 508 marker values of the image's interpreter (Linux, CPython) for wheelhouse completeness checks."""
    major, minor = python_full_version.split(".")[:2]
    return {
        "python_full_version": python_full_version,
        "python_version": f"{major}.{minor}",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "implementation_version": python_full_version,
        "sys_platform": "linux",
        "os_name": "posix",
        "platform_system": "Linux",
        "platform_machine": os.uname().machine,
    }


def missing_requirements(
    roots: Iterable[str], requires: Mapping[str, list[str]], environment: Mapping[str, str]
) -> list[str]:
    """Requirements the image's interpreter needs that the wheelhouse lacks.

    `pip wheel` on the build machine resolves environment markers for *its* interpreter (3.11.7 skips
    `async-timeout; python_full_version < "3.11.3"`), while the image's interpreter may differ (bookworm has
    3.11.2). ROOTS are requirement strings, REQUIRES maps each wheel's canonical name to its Requires-Dist.
    """
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    def applies(requirement: Requirement, extras: frozenset[str]) -> bool:
        if requirement.marker is None:
            return True
        return any(requirement.marker.evaluate({**environment, "extra": extra}) for extra in (extras or {""}))

    missing: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    queue = [(Requirement(root), frozenset()) for root in roots]
    while queue:
        requirement, parent_extras = queue.pop()
        if not applies(requirement, parent_extras):
            continue
        name = canonicalize_name(requirement.name)
        extras = frozenset(requirement.extras)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        if name not in requires:
            requirement.marker = None
            missing.setdefault(name, str(requirement))
            continue
        queue += [(Requirement(dep), extras) for dep in requires[name]]
    return sorted(missing.values())


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


def _literal(node: ast.AST | None):
    if node is None:
        return None
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def parse_migration(source: str, filename: str = "<migration>") -> tuple[str, tuple[str, ...]] | None:
    """(revision, down_revisions) from a migration module's source, read statically; None if it has no revision."""
    tree = ast.parse(source, filename=filename)
    values: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign):
            targets, value = [node.target], node.value
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name) and target.id in ("revision", "down_revision"):
                values[target.id] = _literal(value)
    revision = values.get("revision")
    if not isinstance(revision, str) or not revision:
        return None
    down = values.get("down_revision")
    if down is None:
        downs: tuple[str, ...] = ()
    elif isinstance(down, str):
        downs = (down,)
    elif isinstance(down, (tuple, list)) and all(isinstance(item, str) for item in down):
        downs = tuple(down)
    else:
        raise BuildError(
            f"{filename}: down_revision must be a string, a tuple of strings or None, found {down!r}"
        )
    return revision, downs


def schema_head(versions_dir: Path) -> str | None:
    """The single Alembic head of the migrations in VERSIONS_DIR; None when there are no migrations."""
    revisions: dict[str, tuple[str, ...]] = {}
    for path in sorted(versions_dir.glob("*.py")):
        parsed = parse_migration(path.read_text(), str(path))
        if parsed is None:
            continue
        revision, downs = parsed
        if revision in revisions:
            raise BuildError(f"{path}: revision {revision!r} is declared by more than one migration")
        revisions[revision] = downs
    if not revisions:
        return None
    referenced = {down for downs in revisions.values() for down in downs}
    missing = sorted(referenced - revisions.keys())
    if missing:
        raise BuildError(f"{versions_dir}: down_revision {', '.join(missing)} has no migration file")
    heads = sorted(revisions.keys() - referenced)
    if len(heads) != 1:
        raise BuildError(
            f"{versions_dir}: expected exactly one Alembic head, found {len(heads)} ({', '.join(heads) or 'a cycle'}); "
            "merge the heads with `alembic merge` before building"
        )
    return heads[0]


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


def requirement_lines(requirements: Path) -> list[str]:
    lines = []
    for raw in requirements.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            if line.startswith("-"):
                raise BuildError(
                    f"{requirements}: pip options such as {line!r} are not supported; list packages only"
                )
            lines.append(line)
    return lines


def wheel_requires(wheelhouse: Path) -> dict[str, list[str]]:
    """Canonical project name -> Requires-Dist of every wheel in WHEELHOUSE."""
    import zipfile
    from email.parser import HeaderParser

    from packaging.utils import canonicalize_name

    requires: dict[str, list[str]] = {}
    for wheel in sorted(wheelhouse.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            metadata_name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            metadata = HeaderParser().parsestr(archive.read(metadata_name).decode())
        requires[canonicalize_name(metadata["Name"])] = metadata.get_all("Requires-Dist") or []
    return requires


def base_python_version(base_image: str) -> str:
    argv = [
        "docker",
        "run",
        "--rm",
        "--network",
        "none",
        base_image,
        "python3",
        "-c",
        "import platform; print(platform.python_version())",
    ]
    version = _run(
        argv, paths.project_root(), f"reading the Python version of base image {base_image}"
    ).strip()
    if not version.count(".") == 2:
        raise BuildError(f"base image {base_image} reported Python version {version!r}, expected X.Y.Z")
    return version


def ensure_wheelhouse(root: Path, base_image: str, base_image_id: str, progress: Progress) -> str:
    """Build service/wheelhouse for the base image's Python unless its stamp matches; returns the stamp."""
    service = root / "service"
    requirements = service / "requirements.txt"
    wheelhouse = service / "wheelhouse"
    if not requirements.is_file():
        raise BuildError(f"{requirements} is missing: the image installs exactly the packages it lists")
    python_tag = f"cp{sys.version_info.major}{sys.version_info.minor}-{sys.platform}-{base_image_id}"
    wanted = requirements_hash(requirements.read_bytes(), python_tag)
    stamp = wheelhouse / STAMP_NAME
    if stamp.is_file() and stamp.read_text().strip() == wanted:
        return wanted
    progress(
        f"building wheelhouse {wheelhouse.relative_to(root)} (requirements or base changed, or first build)"
    )
    # Stale wheels of old pins would still satisfy `--find-links` lookups: start from an empty directory.
    shutil.rmtree(wheelhouse, ignore_errors=True)
    wheelhouse.mkdir(parents=True)
    _run(
        wheelhouse_command(sys.executable, requirements, wheelhouse),
        root,
        "building the wheelhouse (pip wheel)",
    )
    environment = target_environment(base_python_version(base_image))
    roots = requirement_lines(requirements)
    for _round in range(5):  # each round adds dependencies of the previous one's additions
        missing = missing_requirements(roots, wheel_requires(wheelhouse), environment)
        if not missing:
            break
        progress(
            f"adding wheels the image's Python {environment['python_full_version']} needs: {', '.join(missing)}"
        )
        _run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "-w", str(wheelhouse), *missing],
            root,
            "completing the wheelhouse (pip wheel)",
        )
    else:
        raise BuildError(
            f"wheelhouse {wheelhouse} still lacks {', '.join(missing)} after 5 rounds of pip wheel"
        )
    stamp.write_text(wanted + "\n")
    return wanted


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

    base_image = resolve_base_image(say)
    base = _inspect(base_image)
    if base is None:
        raise BuildError(
            f"base image {base_image} is not in the local engine; unset {BASE_IMAGE_ENV} or build it"
        )
    stamp = ensure_wheelhouse(root, base_image, base["Id"], say)
    digest = compute_source_hash(root, stamp, base["Id"])

    existing = _inspect(image)
    labels_now = (existing or {}).get("Config", {}).get("Labels") or {}
    if not no_cache and existing is not None and labels_now.get(LABEL_SOURCE_HASH) == digest:
        say(f"{image} is up to date (source hash {digest[:12]})")
        return BuiltImage(
            image,
            existing["Id"],
            version,
            existing["Config"]["Labels"],
            cached=True,
            seconds=time.monotonic() - started,
        )

    labels = {
        LABEL_VERSION: version,
        LABEL_REVISION: _run(revision_command(), root, "reading the git revision").strip(),
        LABEL_CREATED: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        LABEL_SCHEMA_HEAD: schema_head(service / "alembic" / "versions") or NO_SCHEMA_HEAD,
        LABEL_SOURCE_HASH: digest,
    }
    say(f"building {image} on {base_image}")
    _stream_build(build_command(Path("service"), image, base_image, version, labels, no_cache), root, say)
    built = _inspect(image)
    if built is None:
        raise BuildError(f"docker build reported success but {image} is not in the local engine")
    seconds = time.monotonic() - started
    say(f"built {image} as {built['Id']} in {seconds:.1f}s")
    return BuiltImage(image, built["Id"], version, built["Config"]["Labels"], cached=False, seconds=seconds)
