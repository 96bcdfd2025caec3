"""service/requirements.lock: every wheel the app image installs, pinned to one version and its sha256.

`service/requirements.txt` is what a person edits (the service's direct dependencies); the lock is generated from
it by `scripts/lock_requirements.py` for the image's Python and platform and is what the image installs, with pip's
`--require-hashes` both here (the wheelhouse download) and in the Dockerfile. It is a plain pip requirements file:

    anyio==4.12.0 \\
        --hash=sha256:<64 hex>

Each project appears once, unconditionally (markers were resolved for the image's interpreter when it was made),
with at least one hash. This module parses and writes that format, checks it against requirements.txt, and checks
a wheelhouse's files against it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ingestctl.errors import BuildError

HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")
PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9][A-Za-z0-9.+!_-]*)")


@dataclass(frozen=True)
class LockedWheel:
    """One locked project: canonical name, exact version, the sha256 of each wheel file pip may take for it."""

    name: str
    version: str
    hashes: tuple[str, ...]

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.version}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _logical_lines(text: str) -> Iterable[tuple[int, str]]:
    """(first line number, line) with `\\` continuations joined and comments dropped, as pip reads them."""
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        pending.append(line)
        joined = " ".join(part.strip() for part in pending).strip()
        pending = []
        if joined:
            yield start, joined
    if pending and " ".join(pending).strip():
        yield start, " ".join(part.strip() for part in pending).strip()


def parse(text: str, source: str = "requirements.lock") -> list[LockedWheel]:
    """The lock's entries; BuildError naming the line for anything but `name==version --hash=sha256:...`."""
    from packaging.utils import canonicalize_name

    entries: dict[str, LockedWheel] = {}
    for number, line in _logical_lines(text):
        requirement, _, options = line.partition(" ")
        pin = PIN.fullmatch(requirement)
        hashes = HASH.findall(options)
        leftover = HASH.sub("", options).strip()
        if pin is None or not hashes or leftover:
            raise BuildError(
                f"{source}:{number}: expected `name==version --hash=sha256:<64 hex>` (every wheel pinned and "
                f"hashed), found {line[:120]!r}; regenerate it with scripts/lock_requirements.py"
            )
        name = canonicalize_name(pin.group(1))
        if name in entries:
            raise BuildError(f"{source}:{number}: {name} is locked twice; "
                             "regenerate it with scripts/lock_requirements.py")
        entries[name] = LockedWheel(name, pin.group(2), tuple(dict.fromkeys(hashes)))
    if not entries:
        raise BuildError(f"{source}: locks no wheel; regenerate it with scripts/lock_requirements.py")
    return list(entries.values())


def load(path: Path) -> list[LockedWheel]:
    if not path.is_file():
        raise BuildError(f"{path} is missing: the image installs exactly the wheels it locks; "
                         "make it with scripts/lock_requirements.py")
    return parse(path.read_text(), str(path))


def render(entries: Iterable[LockedWheel], header: str) -> str:
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for entry in sorted(entries, key=lambda e: e.name):
        lines.append(f"{entry.pin} \\")
        lines += [f"    --hash=sha256:{digest}" + (" \\" if i < len(entry.hashes) - 1 else "")
                  for i, digest in enumerate(sorted(entry.hashes))]
    return "\n".join(lines) + "\n"


def entries_of(wheelhouse: Path) -> list[LockedWheel]:
    """One entry per wheel file in WHEELHOUSE, hashed: what a lock of exactly these files says."""
    from packaging.utils import canonicalize_name, parse_wheel_filename

    entries: dict[str, LockedWheel] = {}
    for wheel in sorted(wheelhouse.glob("*.whl")):
        name, version, _build, _tags = parse_wheel_filename(wheel.name)
        key = canonicalize_name(name)
        if key in entries:
            raise BuildError(f"{wheelhouse} holds two wheels of {key}: {entries[key].pin} and {wheel.name}")
        entries[key] = LockedWheel(key, str(version), (file_sha256(wheel),))
    return list(entries.values())


def merge(locks: Iterable[list[LockedWheel]]) -> list[LockedWheel]:
    """Locks of the same requirements for several platforms: one entry per project with every platform's hash.

    The versions must agree (one image, one set of versions), else BuildError naming the project."""
    merged: dict[str, LockedWheel] = {}
    for lock in locks:
        for entry in lock:
            seen = merged.get(entry.name)
            if seen is None:
                merged[entry.name] = entry
            elif seen.version != entry.version:
                raise BuildError(f"{entry.name}: the platforms resolve to different versions ({seen.version} and "
                                 f"{entry.version}); pin it in requirements.txt")
            else:
                merged[entry.name] = LockedWheel(seen.name, seen.version,
                                                 tuple(dict.fromkeys(seen.hashes + entry.hashes)))
    return list(merged.values())


def uncovered(requirements: Iterable[str], entries: Iterable[LockedWheel]) -> list[str]:
    """Requirements (lines of requirements.txt) the lock does not satisfy: absent, or at a version outside the
    requirement's specifier. Empty when the lock covers them all."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    locked = {entry.name: entry for entry in entries}
    problems = []
    for line in requirements:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        entry = locked.get(name)
        if entry is None:
            problems.append(f"{line}: not in the lock")
        elif not requirement.specifier.contains(entry.version, prereleases=True):
            problems.append(f"{line}: the lock has {entry.pin}")
    return problems


def verify(wheelhouse: Path, entries: Iterable[LockedWheel], lock_name: str = "requirements.lock") -> None:
    """Every wheel file in WHEELHOUSE is one the lock names, with a hash it lists, and every entry has its wheel.

    BuildError naming the first wheel that fails: a wheel changed after the download is refused here, before
    `docker build` (whose `pip install --require-hashes` would refuse it too)."""
    from packaging.utils import canonicalize_name, parse_wheel_filename

    by_name: Mapping[str, LockedWheel] = {entry.name: entry for entry in entries}
    found: set[str] = set()
    for wheel in sorted(wheelhouse.glob("*.whl")):
        name, version, _build, _tags = parse_wheel_filename(wheel.name)
        entry = by_name.get(canonicalize_name(name))
        if entry is None or entry.version != str(version):
            raise BuildError(f"wheel {wheel.name} in {wheelhouse} is not in {lock_name} "
                             f"({entry.pin if entry else 'no entry for ' + canonicalize_name(name)}); "
                             "refusing it: remove the wheelhouse and build again")
        digest = file_sha256(wheel)
        if digest not in entry.hashes:
            raise BuildError(f"wheel {wheel.name} in {wheelhouse} has sha256 {digest}, which {lock_name} does not "
                             f"list for {entry.pin}; refusing it: remove the wheelhouse and build again, or "
                             "regenerate the lock if the new wheel is meant")
        found.add(entry.name)
    absent = [entry.pin for entry in by_name.values() if entry.name not in found]
    if absent:
        raise BuildError(f"wheelhouse {wheelhouse} lacks the wheels of {', '.join(absent)} that {lock_name} locks")
