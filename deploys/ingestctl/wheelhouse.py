"""The app image's wheelhouse: the wheels `service/requirements.lock` names, for the image's Python and platform.

Containers here cannot reach PyPI, so the image installs from `service/wheelhouse/`, filled on this machine by
pip for the *image's* interpreter and platform (WheelTarget), never the controller's. Two steps use it:

- locking (`scripts/lock_requirements.py`, `resolve`): pip downloads `service/requirements.txt` and its
  dependencies for the target; the wheels the target's interpreter needs (its markers, not the controller's) are
  kept and hashed into the lock (ingestctl.reqlock).
- every image build (`ensure_wheelhouse`): `pip download --no-deps --require-hashes` of exactly the lock, so the
  same files come every time and a file whose sha256 differs is refused by pip, naming it; the files are checked
  against the lock again before each build, and the Dockerfile installs with `--require-hashes` too.

Command builders are pure functions (tested by exact strings); the rest runs them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ingestctl import paths, reqlock
from ingestctl.errors import BuildError, EnvironmentMissing

STAMP_NAME = ".requirements.sha256"
REQUIREMENTS = "requirements.txt"
LOCK = "requirements.lock"

# The interpreter and platform the wheelhouse is built for: the image's, never the controller's (pip on a Python
# 3.13 controller would otherwise fetch cp313 wheels that the image's Python 3.11 cannot install). Both bases run
# CPython 3.11 on Debian bookworm: the sandbox's debootstrap base (python3 3.11.2, glibc 2.36; see
# baseimages.py) and production's python:3.11-slim(-bookworm). The wheelhouse step checks the base image's
# Python against TARGET_PYTHON and takes the CPU architecture from the base image; change TARGET_PYTHON, the
# base images and the lock together.
TARGET_PYTHON = "3.11"
# The oldest 3.11 the images run (bookworm's python3): the lock resolves environment markers for it, so a
# dependency only older 3.11s need (async-timeout for redis) is locked; newer ones install it unused.
TARGET_PYTHON_FULL = "3.11.2"
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

Progress = Callable[[str], None]


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


def _download_prefix(python: str, wheelhouse: Path, target: WheelTarget) -> list[str]:
    return [python, "-m", "pip", "download", "--quiet", *target.pip_options(), "--dest", str(wheelhouse)]


def wheelhouse_command(python: str, requirements: Path, wheelhouse: Path, target: WheelTarget) -> list[str]:
    """Download the target's wheels of REQUIREMENTS and their dependencies, whatever Python runs pip (locking)."""
    return [*_download_prefix(python, wheelhouse, target), "-r", str(requirements)]


def download_command(python: str, packages: Iterable[str], wheelhouse: Path, target: WheelTarget) -> list[str]:
    """Like wheelhouse_command, for requirement strings (the completeness rounds of locking)."""
    return [*_download_prefix(python, wheelhouse, target), *packages]


def locked_download_command(python: str, lock: Path, wheelhouse: Path, target: WheelTarget) -> list[str]:
    """Download exactly the wheels LOCK names, each checked against its sha256 by pip (every image build).

    --no-deps: the lock already is the image's whole dependency closure, resolved for the image's markers; pip
    resolving again would use the controller's.
    """
    return [*_download_prefix(python, wheelhouse, target), "--no-deps", "--require-hashes", "-r", str(lock)]


# --- pure helpers ------------------------------------------------------------------------------------


def requirements_hash(requirements: bytes, python_tag: str) -> str:
    """Wheels depend on the lock and on the interpreter they are for (the target, never the controller)."""
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


def wheelhouse_target(base_image: Mapping) -> WheelTarget:
    """The wheelhouse target for a base image (its `docker image inspect`): TARGET_PYTHON on its architecture."""
    architecture = base_image.get("Architecture")
    # An image without the field was made by this machine's engine, so it is of this machine's architecture.
    return WheelTarget(machine=wheel_machine(architecture) if architecture else os.uname().machine)


def unavailable_requirement(pip_stderr: str) -> str | None:
    """The requirement pip found no distribution for (`No matching distribution found for X (from Y)`)."""
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

    The others were fetched only because the controller's interpreter needs them; locking drops them, so every
    controller Python makes the same lock.
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


def prune_wheelhouse(wheelhouse: Path, needed: set[str]) -> list[str]:
    """Remove the wheels whose project is not in NEEDED (canonical names); returns their file names."""
    from packaging.utils import canonicalize_name, parse_wheel_filename

    removed = []
    for wheel in sorted(wheelhouse.glob("*.whl")):
        if canonicalize_name(parse_wheel_filename(wheel.name)[0]) not in needed:
            wheel.unlink()
            removed.append(wheel.name)
    return removed


# --- running ------------------------------------------------------------------------------------------


def _attempt(argv: list[str], cwd: Path, what: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise EnvironmentMissing(f"{what} needs `{argv[0]}`, which is not installed") from exc


def _download(cwd: Path, argv: list[str], target: WheelTarget, what: str) -> None:
    """Run a pip download for TARGET; BuildError with pip's own words (which name the wheel) when it fails."""
    result = _attempt(argv, cwd, what)
    if result.returncode == 0:
        return
    unavailable = unavailable_requirement(result.stderr)
    if unavailable is not None:
        # A wheel built here from an sdist would not be byte-reproducible, so it could not be hash-locked.
        raise BuildError(
            f"{what} failed: {unavailable} publishes no wheel for the image ({target.tag}) on the index; the image "
            f"installs hash-locked wheels only: pin a version of it with {target.abi} manylinux or pure-Python wheels"
        )
    raise BuildError(f"{what} failed: `{' '.join(argv)}` exited {result.returncode}: {result.stderr.strip()[-1500:]}")


def _refuse_foreign(wheelhouse: Path, target: WheelTarget) -> list[str]:
    wheels = sorted(wheel.name for wheel in wheelhouse.glob("*.whl"))
    foreign = [name for name in wheels if not target.accepts(name)]
    if foreign:
        raise BuildError(f"wheelhouse {wheelhouse} holds wheels the image cannot install: {', '.join(foreign)}")
    return wheels


def resolve(
    cwd: Path,
    requirements: Path,
    wheelhouse: Path,
    target: WheelTarget,
    progress: Progress,
    python_full_version: str = TARGET_PYTHON_FULL,
    python: str | None = None,
) -> list[str]:
    """Make WHEELHOUSE hold exactly the wheels Python PYTHON_FULL_VERSION on TARGET installs for REQUIREMENTS.

    What a lock is made of. PYTHON runs pip (default: this interpreter); which one it is does not change the
    result: pip picks wheels by the target's tags, dependencies the target's markers need are added, those only
    PYTHON's markers asked for are dropped. Returns the wheel file names.
    """
    python = python or sys.executable
    # Stale wheels of old pins would be kept: start from an empty directory.
    shutil.rmtree(wheelhouse, ignore_errors=True)
    wheelhouse.mkdir(parents=True)
    _download(cwd, wheelhouse_command(python, requirements, wheelhouse, target), target,
              "resolving the wheelhouse (pip download)")
    environment = target_environment(python_full_version, target.machine)
    roots = requirement_lines(requirements)
    for _round in range(5):  # each round adds dependencies of the previous one's additions
        missing = missing_requirements(roots, wheel_requires(wheelhouse), environment)
        if not missing:
            break
        progress(f"adding wheels the image's Python {python_full_version} needs: {', '.join(missing)}")
        _download(cwd, download_command(python, missing, wheelhouse, target), target,
                  "completing the wheelhouse (pip download)")
    else:
        raise BuildError(
            f"wheelhouse {wheelhouse} still lacks {', '.join(missing)} after 5 rounds of pip download"
        )
    prune_wheelhouse(wheelhouse, needed_wheels(roots, wheel_requires(wheelhouse), environment))
    return _refuse_foreign(wheelhouse, target)


def fill_from_lock(cwd: Path, lock: Path, wheelhouse: Path, target: WheelTarget, python: str | None = None
                   ) -> list[str]:
    """Make WHEELHOUSE hold exactly the wheels LOCK names for TARGET, each with a hash the lock lists.

    Returns the wheel file names. pip refuses a download whose sha256 the lock does not list, naming the
    requirement; the files are checked against the lock once more afterwards.
    """
    entries = reqlock.load(lock)
    shutil.rmtree(wheelhouse, ignore_errors=True)
    wheelhouse.mkdir(parents=True)
    _download(cwd, locked_download_command(python or sys.executable, lock, wheelhouse, target), target,
              f"filling the wheelhouse from {lock.name} (pip download --require-hashes)")
    reqlock.verify(wheelhouse, entries, lock.name)
    return _refuse_foreign(wheelhouse, target)


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
    what = f"reading the Python version of base image {base_image}"
    result = _attempt(argv, paths.project_root(), what)
    if result.returncode != 0:
        raise BuildError(f"{what} failed: `{' '.join(argv)}` exited {result.returncode}: "
                         f"{result.stderr.strip()[-800:]}")
    version = result.stdout.strip()
    if not version.count(".") == 2:
        raise BuildError(f"base image {base_image} reported Python version {version!r}, expected X.Y.Z")
    return version


def ensure_wheelhouse(
    root: Path, base_image: str, base_image_id: str, progress: Progress, target: WheelTarget | None = None
) -> str:
    """Fill service/wheelhouse from the lock for the image's Python and platform unless its stamp matches, and
    check its files against the lock either way; returns the stamp (part of the image's source hash).

    Nothing of the controller's interpreter goes in (not its version, not its markers), so controllers on
    Python 3.11, 3.12 or 3.13 fill the wheelhouse with the same files and stamp it alike.
    """
    target = target or WheelTarget()
    service = root / "service"
    lock = service / LOCK
    wheelhouse = service / "wheelhouse"
    entries = reqlock.load(lock)
    wanted = requirements_hash(lock.read_bytes(), f"{target.tag}-{base_image_id}")
    stamp = wheelhouse / STAMP_NAME
    if stamp.is_file() and stamp.read_text().strip() == wanted:
        # The files may have changed since they were downloaded: they go into the image only as the lock says.
        reqlock.verify(wheelhouse, entries, lock.name)
        return wanted
    progress(
        f"filling wheelhouse {wheelhouse.relative_to(root)} for {target.tag} from {LOCK} "
        "(lock or base changed, or first build)"
    )
    base_version = base_python_version(base_image)
    if base_version.split(".")[:2] != target.python.split("."):
        raise BuildError(
            f"base image {base_image} runs Python {base_version}, but the wheelhouse is built for Python "
            f"{target.python} (ingestctl.wheelhouse.TARGET_PYTHON): change the two together"
        )
    fill_from_lock(root, lock, wheelhouse, target)
    stamp.write_text(wanted + "\n")
    return wanted
