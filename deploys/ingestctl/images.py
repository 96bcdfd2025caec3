"""Build the app image `ingest:<version>` from the checkout, without network access inside the build.

Steps: a wheelhouse on this machine (pip reaches PyPI here, containers cannot) holding wheels for the *image's*
Python and platform (see WheelTarget), then `docker build` of `service/` on a local debootstrap base image.
The image is labelled with the git revision and build time of its first build, the Alembic head it ships and
a hash of everything that went into it. The version is only the tag (the service reads APP_VERSION from the
host's compose file), so a new version of unchanged inputs is a new tag of the same image ID: a build whose
hash matches a local image is skipped, and hosts that have that ID only re-tag it (0 bytes shipped).

Command builders are pure functions (tested by exact strings); `build_app_image` runs them.
"""

from __future__ import annotations

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
from ingestctl.errors import BuildError, ConfigError, EnvironmentMissing

IMAGE_REPOSITORY = "ingest"
BASE_RECIPE = "bookworm-python"
BASE_IMAGE_ENV = "INGEST_BASE_IMAGE"
STAMP_NAME = ".requirements.sha256"

# The interpreter and platform the wheelhouse is built for: the image's, never the controller's (pip on a Python
# 3.13 controller would otherwise fetch cp313 wheels that the image's Python 3.11 cannot install). Both bases run
# CPython 3.11 on Debian bookworm: the sandbox's debootstrap base (python3 3.11.2, glibc 2.36; see
# baseimages.py) and production's python:3.11-slim(-bookworm). The wheelhouse step checks the base image's
# Python against TARGET_PYTHON and takes the CPU architecture from the base image; change TARGET_PYTHON and the
# base images together.
TARGET_PYTHON = "3.11"
# The newest glibc a wheel may be built against (manylinux_2_<N>): bookworm's 2.36. Newer bases (trixie, 2.41)
# run these wheels too.
TARGET_GLIBC = "2.36"
# Docker's architecture names (an image's "Architecture") -> wheel platform tag suffixes.
WHEEL_MACHINES = {
    "amd64": "x86_64",
    "arm64": "aarch64",
    "386": "i686",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "arm": "armv7l",
}
# At most this many requirements without a wheel for the target are built here from their sdists (and only a
# pure-Python result is accepted).
MAX_SDIST_BUILDS = 10

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


@dataclass(frozen=True)
class WheelTarget:
    """The Python and platform the image runs: what every wheel in the wheelhouse must be installable on."""

    python: str = TARGET_PYTHON  # "X.Y"
    machine: str = "x86_64"  # wheel tag spelling (x86_64, aarch64), see wheel_machine()
    glibc: str = TARGET_GLIBC

    @property
    def abi(self) -> str:
        return "cp" + self.python.replace(".", "")

    @property
    def platforms(self) -> list[str]:
        return manylinux_platforms(self.glibc, self.machine)

    @property
    def tag(self) -> str:
        """One string naming the target, for cache keys and messages: cp311-manylinux_2_36_x86_64."""
        return f"{self.abi}-manylinux_{self.glibc.replace('.', '_')}_{self.machine}"

    def pip_options(self) -> list[str]:
        """pip download options selecting this target's wheels (pip requires --only-binary with --platform)."""
        options = [
            "--only-binary=:all:",
            "--implementation",
            "cp",
            "--python-version",
            self.python,
            "--abi",
            self.abi,  # pip adds abi3 and none by itself
        ]
        for platform_tag in self.platforms:
            options += ["--platform", platform_tag]
        return options

    def accepts(self, wheel_filename: str) -> bool:
        """Whether the image's pip would install this wheel: cp3Y, abi3 or pure-Python, on this platform."""
        from packaging.tags import compatible_tags, cpython_tags
        from packaging.utils import InvalidWheelFilename, parse_wheel_filename

        try:
            _name, _version, _build, tags = parse_wheel_filename(wheel_filename)
        except InvalidWheelFilename:
            return False
        version = tuple(int(part) for part in self.python.split("."))
        supported = {
            *cpython_tags(version, [self.abi], self.platforms),
            *compatible_tags(version, self.abi, self.platforms),
        }
        return not supported.isdisjoint(tags)


# --- pure command builders ---------------------------------------------------------------------------


def describe_command() -> list[str]:
    return ["git", "describe", "--tags", "--always", "--dirty"]


def revision_command() -> list[str]:
    return ["git", "rev-parse", "HEAD"]


def source_files_command() -> list[str]:
    """Files docker's build context would carry that git knows about: tracked, plus untracked-not-ignored."""
    return ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "service"]


def _download_prefix(python: str, wheelhouse: Path, target: WheelTarget) -> list[str]:
    # --find-links on the wheelhouse itself: wheels built here from sdists (see sdist_wheel_command) count.
    return [
        python,
        "-m",
        "pip",
        "download",
        "--quiet",
        *target.pip_options(),
        "--find-links",
        str(wheelhouse),
        "--dest",
        str(wheelhouse),
    ]


def wheelhouse_command(python: str, requirements: Path, wheelhouse: Path, target: WheelTarget) -> list[str]:
    """Download the target's wheels of REQUIREMENTS and their dependencies, whatever Python runs pip."""
    return [*_download_prefix(python, wheelhouse, target), "-r", str(requirements)]


def download_command(python: str, packages: Iterable[str], wheelhouse: Path, target: WheelTarget) -> list[str]:
    """Like wheelhouse_command, for requirement strings (the wheelhouse completeness rounds)."""
    return [*_download_prefix(python, wheelhouse, target), *packages]


def sdist_wheel_command(python: str, requirement: str, output: Path) -> list[str]:
    """A wheel of one requirement that publishes none for the target, built here from its sdist.

    Only a pure-Python result (py3-none-any) is usable in the image; the caller checks that.
    """
    return [python, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(output), requirement]


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


def requirements_hash(requirements: bytes, python_tag: str) -> str:
    """Wheels depend on the requirements and on the interpreter they are for (the target, never the controller)."""
    return hashlib.sha256(python_tag.encode() + b"\0" + requirements).hexdigest()


def manylinux_platforms(glibc: str, machine: str) -> list[str]:
    """Platform tags a glibc-GLIBC MACHINE runs, newest first, with the legacy aliases (manylinux2014 = 2_17...).

    pip does not expand `--platform manylinux_2_36_x86_64` to older glibc versions itself, so all are listed.
    """
    major, minor = (int(part) for part in glibc.split(".")[:2])
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    platforms = []
    for glibc_minor in range(minor, 4, -1):
        platforms.append(f"manylinux_{major}_{glibc_minor}_{machine}")
        if major == 2 and glibc_minor in legacy:
            platforms.append(f"{legacy[glibc_minor]}_{machine}")
    return platforms


def wheel_machine(docker_architecture: str) -> str:
    """The wheel tag spelling of a Docker image architecture (amd64 -> x86_64)."""
    return WHEEL_MACHINES.get(docker_architecture, docker_architecture)


def unavailable_requirement(pip_stderr: str) -> str | None:
    """The requirement pip found no distribution for (`No matching distribution found for X (from Y)`)."""
    import re

    for line in reversed(pip_stderr.splitlines()):
        match = re.search(r"No matching distribution found for (\S+)", line)
        if match:
            return match.group(1)
    return None


def target_environment(python_full_version: str, machine: str | None = None) -> dict[str, str]:
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
        "platform_machine": machine or os.uname().machine,
    }


def missing_requirements(
    roots: Iterable[str], requires: Mapping[str, list[str]], environment: Mapping[str, str]
) -> list[str]:
    """Requirements the image's interpreter needs that the wheelhouse lacks.

    pip resolves environment markers for the interpreter *running* pip, even with --python-version (3.11.7
    skips `async-timeout; python_full_version < "3.11.3"`, 3.13 skips `typing-extensions; python_version <
    "3.13"`), while the image's interpreter differs (bookworm has 3.11.2). ROOTS are requirement strings,
    REQUIRES maps each wheel's canonical name to its Requires-Dist.
    """
    return sorted(_closure(roots, requires, environment)[1].values())


def needed_wheels(
    roots: Iterable[str], requires: Mapping[str, list[str]], environment: Mapping[str, str]
) -> set[str]:
    """Canonical names of the wheels in REQUIRES that the image's interpreter installs for ROOTS.

    The others were fetched only because the controller's interpreter needs them; the wheelhouse drops them,
    so every controller Python leaves the same files.
    """
    return _closure(roots, requires, environment)[0]


def _closure(
    roots: Iterable[str], requires: Mapping[str, list[str]], environment: Mapping[str, str]
) -> tuple[set[str], dict[str, str]]:
    """(names present in REQUIRES, {name: requirement} absent from it) reachable from ROOTS in ENVIRONMENT."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    def applies(requirement: Requirement, extras: frozenset[str]) -> bool:
        if requirement.marker is None:
            return True
        return any(requirement.marker.evaluate({**environment, "extra": extra}) for extra in (extras or {""}))

    present: set[str] = set()
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
        present.add(name)
        queue += [(Requirement(dep), extras) for dep in requires[name]]
    return present, missing


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


def _attempt(argv: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise EnvironmentMissing(f"{what} needs `{argv[0]}`, which is not installed") from exc


def _wheel_from_sdist(
    root: Path, requirement: str, wheelhouse: Path, target: WheelTarget, progress: Progress, python: str
) -> None:
    """Build REQUIREMENT's wheel here and add it to WHEELHOUSE if the image can install it (pure Python)."""
    import tempfile

    progress(f"{requirement} has no {target.tag} wheel on the index: building a wheel from its sdist")
    with tempfile.TemporaryDirectory(prefix="ingestctl-sdist-") as scratch:
        _run(
            sdist_wheel_command(python, requirement, Path(scratch)),
            root,
            f"building a wheel of {requirement}",
        )
        built = sorted(Path(scratch).glob("*.whl"))
        if not built:
            raise BuildError(f"pip wheel made no wheel of {requirement}")
        for wheel in built:
            if not target.accepts(wheel.name):
                raise BuildError(
                    f"{requirement} publishes no wheel for the image ({target.tag}) and pip here made {wheel.name}, "
                    f"which the image's Python cannot install: pin a version of it with {target.abi} manylinux "
                    "wheels, or one without compiled code"
                )
            shutil.move(str(wheel), wheelhouse / wheel.name)


def _download(
    root: Path, argv: list[str], wheelhouse: Path, target: WheelTarget, what: str, progress: Progress, python: str
) -> None:
    """Run a pip download for TARGET; requirements that only publish an sdist are built here, if pure Python."""
    built: set[str] = set()
    for _attempt_number in range(MAX_SDIST_BUILDS + 1):
        result = _attempt(argv, root, what)
        if result.returncode == 0:
            return
        requirement = unavailable_requirement(result.stderr)
        if requirement is None or requirement in built or len(built) >= MAX_SDIST_BUILDS:
            raise BuildError(
                f"{what} failed: `{' '.join(argv)}` exited {result.returncode}: {result.stderr.strip()[-800:]}"
            )
        _wheel_from_sdist(root, requirement, wheelhouse, target, progress, python)
        built.add(requirement)


def wheelhouse_target(base_image: Mapping) -> WheelTarget:
    """The wheelhouse target for a base image (its `docker image inspect`): TARGET_PYTHON on its architecture."""
    architecture = base_image.get("Architecture")
    # An image without the field was made by this machine's engine, so it is of this machine's architecture.
    return WheelTarget(machine=wheel_machine(architecture) if architecture else os.uname().machine)


def ensure_wheelhouse(
    root: Path, base_image: str, base_image_id: str, progress: Progress, target: WheelTarget | None = None
) -> str:
    """Build service/wheelhouse for the image's Python and platform unless its stamp matches; returns the stamp.

    Nothing of the controller's interpreter goes in (not its version, not its markers), so controllers on
    Python 3.11, 3.12 or 3.13 fill the wheelhouse with the same files and stamp it alike.
    """
    target = target or WheelTarget()
    service = root / "service"
    requirements = service / "requirements.txt"
    wheelhouse = service / "wheelhouse"
    if not requirements.is_file():
        raise BuildError(f"{requirements} is missing: the image installs exactly the packages it lists")
    wanted = requirements_hash(requirements.read_bytes(), f"{target.tag}-{base_image_id}")
    stamp = wheelhouse / STAMP_NAME
    if stamp.is_file() and stamp.read_text().strip() == wanted:
        return wanted
    progress(
        f"building wheelhouse {wheelhouse.relative_to(root)} for {target.tag} "
        "(requirements or base changed, or first build)"
    )
    base_version = base_python_version(base_image)
    if base_version.split(".")[:2] != target.python.split("."):
        raise BuildError(
            f"base image {base_image} runs Python {base_version}, but the wheelhouse is built for Python "
            f"{target.python} (ingestctl.images.TARGET_PYTHON): change the two together"
        )
    fill_wheelhouse(root, requirements, wheelhouse, target, base_version, progress)
    stamp.write_text(wanted + "\n")
    return wanted


def fill_wheelhouse(
    cwd: Path,
    requirements: Path,
    wheelhouse: Path,
    target: WheelTarget,
    python_full_version: str,
    progress: Progress,
    python: str | None = None,
) -> list[str]:
    """Make WHEELHOUSE hold exactly the wheels Python PYTHON_FULL_VERSION on TARGET installs for REQUIREMENTS.

    PYTHON runs pip (default: this interpreter); which one it is does not change the result: pip picks wheels
    by the target's tags, dependencies the target's markers need are added, those only PYTHON's markers asked
    for are dropped. Returns the wheel file names.
    """
    python = python or sys.executable
    # Stale wheels of old pins would still satisfy `--find-links` lookups: start from an empty directory.
    shutil.rmtree(wheelhouse, ignore_errors=True)
    wheelhouse.mkdir(parents=True)
    _download(
        cwd,
        wheelhouse_command(python, requirements, wheelhouse, target),
        wheelhouse,
        target,
        "building the wheelhouse (pip download)",
        progress,
        python,
    )
    environment = target_environment(python_full_version, target.machine)
    roots = requirement_lines(requirements)
    for _round in range(5):  # each round adds dependencies of the previous one's additions
        missing = missing_requirements(roots, wheel_requires(wheelhouse), environment)
        if not missing:
            break
        progress(f"adding wheels the image's Python {python_full_version} needs: {', '.join(missing)}")
        _download(
            cwd,
            download_command(python, missing, wheelhouse, target),
            wheelhouse,
            target,
            "completing the wheelhouse (pip download)",
            progress,
            python,
        )
    else:
        raise BuildError(
            f"wheelhouse {wheelhouse} still lacks {', '.join(missing)} after 5 rounds of pip download"
        )
    prune_wheelhouse(wheelhouse, needed_wheels(roots, wheel_requires(wheelhouse), environment))
    wheels = sorted(wheel.name for wheel in wheelhouse.glob("*.whl"))
    foreign = [name for name in wheels if not target.accepts(name)]
    if foreign:
        raise BuildError(f"wheelhouse {wheelhouse} holds wheels the image cannot install: {', '.join(foreign)}")
    return wheels


def prune_wheelhouse(wheelhouse: Path, needed: set[str]) -> list[str]:
    """Remove the wheels whose project is not in NEEDED (canonical names); returns their file names."""
    from packaging.utils import canonicalize_name, parse_wheel_filename

    removed = []
    for wheel in sorted(wheelhouse.glob("*.whl")):
        if canonicalize_name(parse_wheel_filename(wheel.name)[0]) not in needed:
            wheel.unlink()
            removed.append(wheel.name)
    return removed


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
    with paths.file_lock(paths.state_dir() / "locks" / "app-build.lock"):
        return _build_locked(root, service, version, image, say, no_cache, started)


def _build_locked(root: Path, service: Path, version: str, image: str, say: Progress, no_cache: bool,
                  started: float) -> BuiltImage:
    base_image = resolve_base_image(say)
    base = _inspect(base_image)
    if base is None:
        raise BuildError(
            f"base image {base_image} is not in the local engine; unset {BASE_IMAGE_ENV} or build it"
        )
    stamp = ensure_wheelhouse(root, base_image, base["Id"], say, wheelhouse_target(base))
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
