"""The app image's wheelhouse: exactly the hash-locked wheels of service/requirements.lock, for the image's Python
and platform, never for the controller's.

The image runs CPython 3.11 (bookworm's python3 in the sandbox base, python:3.11-slim in production); a controller
on Python 3.12 or 3.13 must lock and fetch the same cp311 wheels. The pip commands are pure argv builders, tested
as such; downloads and installs run for real against the package index (reachable here and in CI) with pip's own
`--require-hashes`, into temporary directories.
"""

from __future__ import annotations

import glob
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from ingestctl import reqlock, wheelhouse
from ingestctl.errors import BuildError
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "service" / "requirements.txt"
LOCK = ROOT / "service" / "requirements.lock"
BOOKWORM_PYTHON = "3.11.2"  # what `ingest-base:bookworm` (debootstrap, baseimages.py) runs
X86 = wheelhouse.WheelTarget(machine="x86_64")
HEX = "0123456789abcdef" * 4


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock_requirements = _script("lock_requirements")


# --- the target and the pip commands -------------------------------------------------------------------------


def test_target_is_the_images_python_not_the_controllers():
    assert wheelhouse.TARGET_PYTHON == "3.11"
    assert wheelhouse.TARGET_PYTHON_FULL == BOOKWORM_PYTHON
    target = wheelhouse.WheelTarget()
    assert (target.python, target.abi, target.glibc) == ("3.11", "cp311", "2.36")
    assert X86.tag == "cp311-manylinux_2_36_x86_64"
    assert wheelhouse.WheelTarget(machine="aarch64").tag == "cp311-manylinux_2_36_aarch64"


def test_manylinux_platforms_list_every_glibc_down_to_manylinux1_with_legacy_aliases():
    platforms = wheelhouse.manylinux_platforms("2.36", "x86_64")
    assert platforms[0] == "manylinux_2_36_x86_64"
    assert platforms[-2:] == ["manylinux_2_5_x86_64", "manylinux1_x86_64"]
    assert platforms.index("manylinux2014_x86_64") == platforms.index("manylinux_2_17_x86_64") + 1
    assert platforms.index("manylinux2010_x86_64") == platforms.index("manylinux_2_12_x86_64") + 1
    assert len(platforms) == 32 + 3
    assert not any("2_37" in p or "musllinux" in p for p in platforms)


PLATFORMS = " ".join(f"--platform {p}" for p in wheelhouse.manylinux_platforms("2.36", "x86_64"))
PREFIX = ("/venv/bin/python -m pip download --quiet --only-binary=:all: --implementation cp --python-version 3.11"
          f" --abi cp311 {PLATFORMS} --dest service/wheelhouse")


def test_wheelhouse_command_is_exact_and_names_the_target():
    command = wheelhouse.wheelhouse_command(
        "/venv/bin/python", Path("service/requirements.txt"), Path("service/wheelhouse"), X86
    )
    assert " ".join(command) == PREFIX + " -r service/requirements.txt"


def test_the_build_downloads_exactly_the_lock_with_hashes_required():
    command = wheelhouse.locked_download_command(
        "/venv/bin/python", Path("service/requirements.lock"), Path("service/wheelhouse"), X86
    )
    assert " ".join(command) == PREFIX + " --no-deps --require-hashes -r service/requirements.lock"


def test_download_command_for_missing_requirements_uses_the_same_target():
    command = wheelhouse.download_command("py", ["async-timeout>=4", "typing-extensions>=4.6"], Path("wh"), X86)
    prefix = wheelhouse.wheelhouse_command("py", Path("r.txt"), Path("wh"), X86)[:-2]
    assert command == [*prefix, "async-timeout>=4", "typing-extensions>=4.6"]


@pytest.mark.parametrize("controller", ["/opt/py311/bin/python", "/opt/py312/bin/python", "/opt/py313/bin/python"])
def test_the_controllers_python_changes_only_which_interpreter_runs_pip(controller, monkeypatch):
    monkeypatch.setattr(sys, "version_info", (3, 13, 0, "final", 0))  # nothing may read the controller's version
    for build in (wheelhouse.wheelhouse_command, wheelhouse.locked_download_command):
        command = build(controller, REQUIREMENTS, Path("wh"), X86)
        reference = build("/usr/bin/python3", REQUIREMENTS, Path("wh"), X86)
        assert command[0] == controller and command[1:] == reference[1:]
        assert not any("313" in part or "3.13" in part for part in command[1:])


def test_the_dockerfile_installs_the_lock_with_hashes_required_and_no_index():
    dockerfile = (ROOT / "service" / "Dockerfile").read_text()
    install = dockerfile[dockerfile.index("pip install"):].split("&&")[0]
    assert "--require-hashes" in install and "--no-index" in install
    assert "--find-links /tmp/wheelhouse" in install and "-r /tmp/requirements.lock" in install
    assert "COPY requirements.lock /tmp/requirements.lock" in dockerfile
    assert "requirements.txt" not in dockerfile.split("#")[0] and "COPY requirements.txt" not in dockerfile


@pytest.mark.parametrize(
    "filename, accepted",
    [
        ("uvloop-0.23.0-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl", True),
        ("httptools-0.9.0-cp311-cp311-manylinux1_x86_64.manylinux_2_28_x86_64.manylinux_2_5_x86_64.whl", True),
        ("cryptography-46.0.0-cp311-abi3-manylinux_2_34_x86_64.whl", True),
        ("cryptography-46.0.0-cp38-abi3-manylinux_2_28_x86_64.whl", True),
        ("fastapi-0.165.0-py3-none-any.whl", True),
        ("six-1.16.0-py2.py3-none-any.whl", True),
        ("uvloop-0.23.0-cp313-cp313-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", False),  # the wheel
        ("uvloop-0.23.0-cp312-cp312-manylinux_2_17_x86_64.whl", False),
        ("uvloop-0.23.0-cp311-cp311-manylinux_2_17_aarch64.whl", False),
        ("uvloop-0.23.0-cp311-cp311-musllinux_1_2_x86_64.whl", False),
        ("future-1.0-cp311-cp311-manylinux_2_39_x86_64.whl", False),  # newer glibc than bookworm's
        ("uvloop-0.23.0-cp311-cp311-linux_x86_64.whl", False),  # built here, not manylinux
        ("not-a-wheel.tar.gz", False),
    ],
)
def test_target_accepts_only_wheels_the_images_pip_installs(filename, accepted):
    assert X86.accepts(filename) is accepted


def test_wheelhouse_target_follows_the_base_images_architecture():
    assert wheelhouse.wheelhouse_target({"Architecture": "amd64"}) == X86
    assert wheelhouse.wheelhouse_target({"Architecture": "arm64"}).machine == "aarch64"
    assert wheelhouse.wheel_machine("s390x") == "s390x"


def test_unavailable_requirement_is_read_from_pips_error():
    direct = (
        "ERROR: Could not find a version that satisfies the requirement docopt==0.6.2 (from versions: none)\n"
        "ERROR: No matching distribution found for docopt==0.6.2\n"
    )
    assert wheelhouse.unavailable_requirement(direct) == "docopt==0.6.2"
    transitive = "ERROR: No matching distribution found for docopt==0.6.2 (from needsdocopt)\n"
    assert wheelhouse.unavailable_requirement(transitive) == "docopt==0.6.2"
    assert wheelhouse.unavailable_requirement("ERROR: HTTP error 503 while getting https://...\n") is None


def test_requirements_hash_depends_on_interpreter_and_pins():
    base = wheelhouse.requirements_hash(b"redis==8.1.0\n", "cp311-linux-sha256:a")
    assert base != wheelhouse.requirements_hash(b"redis==8.1.1\n", "cp311-linux-sha256:a")
    assert base != wheelhouse.requirements_hash(b"redis==8.1.0\n", "cp312-linux-sha256:a")
    assert base != wheelhouse.requirements_hash(b"redis==8.1.0\n", "cp311-linux-sha256:b")


# --- the lock file format ------------------------------------------------------------------------------------


def test_a_lock_round_trips_and_pins_every_wheel_with_its_hashes():
    entries = [reqlock.LockedWheel("redis", "8.1.0", (HEX,)),
               reqlock.LockedWheel("anyio", "4.16.0", ("f" * 64, "a" * 64))]
    text = reqlock.render(entries, "header line")
    assert text.startswith("# header line\nanyio==4.16.0 \\\n    --hash=sha256:" + "a" * 64 + " \\\n")
    parsed = reqlock.parse(text)
    assert [(e.pin, sorted(e.hashes)) for e in parsed] == [
        ("anyio==4.16.0", ["a" * 64, "f" * 64]), ("redis==8.1.0", [HEX])
    ]


@pytest.mark.parametrize("line, problem", [
    ("starlette>=0.40", "starlette>=0.40"),  # floats
    ("starlette==0.49.1", "starlette==0.49.1"),  # no hash
    ("starlette==0.49.1 --hash=md5:abc", "starlette==0.49.1 --hash=md5:abc"),
    ("starlette==0.49.1 --hash=sha256:" + HEX[:63], "starlette==0.49.1"),  # short hash
    ("--index-url http://evil.example/simple", "--index-url"),
])
def test_a_lock_line_that_floats_or_lacks_a_hash_is_refused_naming_its_line(line, problem):
    text = f"# ok\nredis==8.1.0 --hash=sha256:{HEX}\n{line}\n"
    with pytest.raises(BuildError, match=r"requirements\.lock:3: expected `name==version --hash=sha256") as error:
        reqlock.parse(text)
    assert problem in str(error.value) and "scripts/lock_requirements.py" in str(error.value)


def test_a_project_locked_twice_is_refused():
    text = f"redis==8.1.0 --hash=sha256:{HEX}\nRedis==8.1.1 --hash=sha256:{HEX}\n"
    with pytest.raises(BuildError, match="requirements.lock:2: redis is locked twice"):
        reqlock.parse(text)


def test_uncovered_names_every_requirement_the_lock_does_not_satisfy():
    entries = reqlock.parse(f"redis==8.1.0 --hash=sha256:{HEX}\npsycopg==3.3.9 --hash=sha256:{HEX}\n")
    assert reqlock.uncovered(["redis==8.1.0", "psycopg[binary]>=3.3", "fastapi==0.165.0", "redis<8"], entries) == [
        "fastapi==0.165.0: not in the lock", "redis<8: the lock has redis==8.1.0"
    ]


def test_merging_platform_locks_keeps_every_hash_and_refuses_different_versions():
    x86 = [reqlock.LockedWheel("uvloop", "0.23.0", ("a" * 64,))]
    arm = [reqlock.LockedWheel("uvloop", "0.23.0", ("b" * 64,))]
    assert reqlock.merge([x86, arm]) == [reqlock.LockedWheel("uvloop", "0.23.0", ("a" * 64, "b" * 64))]
    with pytest.raises(BuildError, match=r"uvloop: the platforms resolve to different versions \(0.23.0 and 0.22.1\)"):
        reqlock.merge([x86, [reqlock.LockedWheel("uvloop", "0.22.1", ("b" * 64,))]])


# --- a wheelhouse checked against its lock (hand-made wheels, offline) ---------------------------------------


def _wheel(folder: Path, name: str = "tinypkg", version: str = "1.0", body: str = "VALUE = 1\n") -> Path:
    """A minimal valid pure-Python wheel, enough for pip to install."""
    dist = f"{name}-{version}.dist-info"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    files = {
        f"{name}/__init__.py": body,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{file},,\n" for file in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for file, content in {**files, f"{dist}/RECORD": record}.items():
            archive.writestr(file, content)
    return path


def _tamper(wheel: Path) -> None:
    """Same name, same valid zip, other content: what a poisoned mirror or a changed upload would serve."""
    with zipfile.ZipFile(wheel, "a") as archive:
        archive.writestr("evil.pth", "import os\n")


def test_verify_refuses_a_tampered_wheel_naming_it(tmp_path):
    wheel = _wheel(tmp_path)
    entries = reqlock.entries_of(tmp_path)
    reqlock.verify(tmp_path, entries)
    _tamper(wheel)
    with pytest.raises(BuildError, match=r"wheel tinypkg-1.0-py3-none-any.whl in .* has sha256 [0-9a-f]{64}, "
                                         r"which requirements.lock does not list for tinypkg==1.0; refusing it"):
        reqlock.verify(tmp_path, entries)


def test_verify_refuses_a_wheel_the_lock_does_not_name_and_a_locked_wheel_missing(tmp_path):
    _wheel(tmp_path)
    entries = reqlock.entries_of(tmp_path)
    _wheel(tmp_path, "extra", "2.0")
    with pytest.raises(BuildError, match=r"wheel extra-2.0-py3-none-any.whl .* is not in requirements.lock"):
        reqlock.verify(tmp_path, entries)
    for wheel in tmp_path.glob("*.whl"):
        wheel.unlink()
    with pytest.raises(BuildError, match=r"lacks the wheels of tinypkg==1.0"):
        reqlock.verify(tmp_path, entries)


def _checkout_with_lock(tmp_path: Path) -> tuple[Path, Path]:
    service = tmp_path / "service"
    wheels = service / "wheelhouse"
    wheels.mkdir(parents=True)
    wheel = _wheel(wheels)
    (service / "requirements.lock").write_text(reqlock.render(reqlock.entries_of(wheels), "test lock"))
    return tmp_path, wheel


def test_a_matching_stamp_skips_the_download_for_any_controller_but_still_refuses_a_tampered_wheel(tmp_path,
                                                                                                   monkeypatch):
    root, wheel = _checkout_with_lock(tmp_path)
    lock_bytes = (root / "service" / "requirements.lock").read_bytes()
    wanted = wheelhouse.requirements_hash(lock_bytes, "cp311-manylinux_2_36_x86_64-sha256:base")
    (root / "service" / "wheelhouse" / wheelhouse.STAMP_NAME).write_text(wanted + "\n")

    def no_download(*_args, **_kwargs):
        raise AssertionError("a wheelhouse with a matching stamp was filled again")

    monkeypatch.setattr(wheelhouse, "fill_from_lock", no_download)
    monkeypatch.setattr(wheelhouse, "base_python_version", no_download)
    for version in ((3, 11, 7, "final", 0), (3, 12, 1, "final", 0), (3, 13, 0, "final", 0)):
        monkeypatch.setattr(sys, "version_info", version)
        assert wheelhouse.ensure_wheelhouse(root, "base", "sha256:base", print, X86) == wanted
    other_arch = wheelhouse.WheelTarget(machine="aarch64")
    assert wheelhouse.requirements_hash(lock_bytes, f"{other_arch.tag}-sha256:base") != wanted
    _tamper(wheel)
    with pytest.raises(BuildError, match="wheel tinypkg-1.0-py3-none-any.whl .* refusing it"):
        wheelhouse.ensure_wheelhouse(root, "base", "sha256:base", print, X86)


def test_a_base_image_on_another_python_is_refused(tmp_path, monkeypatch):
    root, _wheel_path = _checkout_with_lock(tmp_path)
    monkeypatch.setattr(wheelhouse, "base_python_version", lambda _image: "3.13.5")
    with pytest.raises(BuildError, match=r"runs Python 3\.13\.5, but the wheelhouse is built for Python 3\.11"):
        wheelhouse.ensure_wheelhouse(root, "python:3.13-slim", "sha256:x", print, X86)
    assert not (root / "service" / "wheelhouse" / wheelhouse.STAMP_NAME).exists()


def test_a_checkout_without_a_lock_is_refused(tmp_path):
    (tmp_path / "service").mkdir()
    with pytest.raises(BuildError, match=r"requirements.lock is missing: .*scripts/lock_requirements.py"):
        wheelhouse.ensure_wheelhouse(tmp_path, "base", "sha256:base", print, X86)


# --- resolving (what a lock is made of) ----------------------------------------------------------------------

REQUIRES = {
    "redis": ['async-timeout>=4.0.3; python_full_version < "3.11.3"', 'hiredis>=3.2.0; extra == "hiredis"'],
    "async-timeout": [],
    "exceptiongroup": [],  # only a Python 3.10 controller's pip would fetch it (anyio: python_version < "3.11")
    "anyio": ['exceptiongroup>=1.0.2; python_version < "3.11"', "idna>=2.8"],
    "idna": [],
    "psycopg": [
        'typing-extensions>=4.6; python_version < "3.13"',
        'psycopg-binary==3.3.9; implementation_name != "pypy" and extra == "binary"',
    ],
    "psycopg-binary": [],
    "typing-extensions": [],
}


def test_needed_wheels_are_the_targets_closure():
    needed = wheelhouse.needed_wheels(["redis==8.1.0", "anyio"], REQUIRES, wheelhouse.target_environment("3.11.2"))
    assert needed == {"redis", "async-timeout", "anyio", "idna"}
    newer = wheelhouse.needed_wheels(["redis==8.1.0", "anyio"], REQUIRES, wheelhouse.target_environment("3.11.7"))
    assert newer == {"redis", "anyio", "idna"}


def test_missing_requirements_follow_the_images_interpreter_not_the_builders():
    requires = {name: deps for name, deps in REQUIRES.items() if name != "async-timeout"}
    roots = ["redis==8.1.0", "psycopg[binary]==3.3.9"]
    # bookworm's python3 is 3.11.2: redis needs async-timeout there, which pip on 3.11.7 skipped.
    assert wheelhouse.missing_requirements(roots, requires, wheelhouse.target_environment("3.11.2")) == [
        "async-timeout>=4.0.3"
    ]
    assert wheelhouse.missing_requirements(roots, requires, wheelhouse.target_environment("3.11.7")) == []


def test_missing_requirements_honours_extras_only_when_requested():
    without_extra = {**REQUIRES, "psycopg-binary": ["never-installed==1"]}
    env = wheelhouse.target_environment("3.11.7")
    assert wheelhouse.missing_requirements(["psycopg==3.3.9"], without_extra, env) == []
    assert wheelhouse.missing_requirements(["psycopg[binary]==3.3.9"], without_extra, env) == ["never-installed==1"]


def test_requirement_lines_skip_comments_and_reject_pip_options(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# pins\nredis==8.1.0  # cache\n\npsycopg[binary]==3.3.9\n")
    assert wheelhouse.requirement_lines(requirements) == ["redis==8.1.0", "psycopg[binary]==3.3.9"]
    requirements.write_text("--index-url http://example\n")
    with pytest.raises(BuildError, match="pip options such as '--index-url http://example' are not supported"):
        wheelhouse.requirement_lines(requirements)


def test_prune_removes_what_only_the_controller_needed(tmp_path):
    for name in ("anyio-4.16.0-py3-none-any.whl", "exceptiongroup-1.3.0-py3-none-any.whl",
                 "Typing_Extensions-4.16.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    removed = wheelhouse.prune_wheelhouse(tmp_path, {"anyio", "typing-extensions"})
    assert removed == ["exceptiongroup-1.3.0-py3-none-any.whl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "Typing_Extensions-4.16.0-py3-none-any.whl", "anyio-4.16.0-py3-none-any.whl"
    ]


# --- the service's lock, for real ----------------------------------------------------------------------------


def test_the_services_lock_pins_and_hashes_every_requirement():
    """Nothing floats: every line of requirements.txt is satisfied by an exact, hashed pin of the lock."""
    entries = reqlock.load(LOCK)  # refuses any line without ==version and a sha256
    assert reqlock.uncovered(wheelhouse.requirement_lines(REQUIREMENTS), entries) == []
    names = {entry.name for entry in entries}
    # The ones the issue found floating, and the compiled halves, are locked too.
    assert {"starlette", "pydantic-core", "h11", "anyio", "psycopg-binary", "async-timeout"} <= names
    assert all(len(entry.hashes) >= 1 for entry in entries)


def _tags(filename: str) -> set[tuple[str, str, str]]:
    return {(t.interpreter, t.abi, t.platform) for t in parse_wheel_filename(filename)[3]}


@pytest.fixture(scope="module")
def locked_wheelhouse(tmp_path_factory) -> Path:
    """The service's wheelhouse as every image build fills it: `pip download --require-hashes` of the lock."""
    folder = tmp_path_factory.mktemp("locked") / "wheelhouse"
    wheelhouse.fill_from_lock(ROOT, LOCK, folder, X86)
    return folder


@pytest.mark.timeout(300)
def test_the_locked_wheelhouse_is_exactly_the_lock_and_closed_under_the_images_dependencies(locked_wheelhouse):
    entries = reqlock.load(LOCK)
    wheels = sorted(wheel.name for wheel in locked_wheelhouse.glob("*.whl"))
    assert len(wheels) == len(entries)
    for name in wheels:
        tags = _tags(name)
        assert any(interpreter in {"cp311", "py3", "py2.py3"} or (interpreter.startswith("cp3") and abi == "abi3")
                   for interpreter, abi, _platform in tags), name
        for _interpreter, abi, platform in tags:
            assert abi in {"cp311", "abi3", "none"}, name
            assert platform == "any" or (platform.startswith("manylinux") and platform.endswith("x86_64")), name
    requires = wheelhouse.wheel_requires(locked_wheelhouse)
    roots = wheelhouse.requirement_lines(REQUIREMENTS)
    environment = wheelhouse.target_environment(BOOKWORM_PYTHON, "x86_64")
    # Every dependency the image's interpreter installs is locked, and nothing else is.
    assert wheelhouse.missing_requirements(roots, requires, environment) == []
    assert wheelhouse.needed_wheels(roots, requires, environment) == {entry.name for entry in entries}


def _pip_install(wheels: Path, target: Path) -> subprocess.CompletedProcess:
    """The Dockerfile's install (--require-hashes --no-index from the wheelhouse), into a directory, for cp311."""
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "--require-hashes", "--no-index", "--no-compile",
            "--find-links", str(wheels), "--target", str(target), *X86.pip_options(), "-r", str(LOCK)]
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=240)


@pytest.mark.timeout(300)
def test_pip_install_require_hashes_takes_the_locked_wheels_and_refuses_a_tampered_one(locked_wheelhouse, tmp_path):
    copy = tmp_path / "wheelhouse"
    shutil.copytree(locked_wheelhouse, copy)
    installed = _pip_install(copy, tmp_path / "ok")
    assert installed.returncode == 0, installed.stderr
    assert (tmp_path / "ok" / "starlette").is_dir() and (tmp_path / "ok" / "h11").is_dir()

    h11 = next(copy.glob("h11-*.whl"))
    _tamper(h11)
    refused = _pip_install(copy, tmp_path / "tampered")
    assert refused.returncode != 0
    assert "THESE PACKAGES DO NOT MATCH THE HASHES" in refused.stderr and "h11==" in refused.stderr, refused.stderr
    assert not (tmp_path / "tampered" / "h11").exists()
    with pytest.raises(BuildError, match=rf"wheel {h11.name} in .* refusing it"):
        reqlock.verify(copy, reqlock.load(LOCK))


def _other_pythons() -> list[str]:
    """CPython 3.12 and 3.13 interpreters on this machine (PATH or pyenv): controllers unlike this one."""
    found = []
    for minor in ("3.12", "3.13"):
        if sys.version.startswith(minor):
            continue
        candidates = [shutil.which(f"python{minor}")] + sorted(glob.glob(f"/root/.pyenv/versions/{minor}.*/bin/python"))
        for candidate in filter(None, candidates):
            check = subprocess.run([candidate, "-m", "pip", "--version"], capture_output=True, check=False)
            if check.returncode == 0:
                found.append(candidate)
                break
    return found


@pytest.mark.timeout(600)
def test_other_controller_pythons_fetch_the_same_locked_files(locked_wheelhouse, tmp_path):
    """pip on 3.12/3.13 (where the machine has them) fetches the same files: tags are the image's, hashes the lock's."""
    expected = sorted(wheel.name for wheel in locked_wheelhouse.glob("*.whl"))
    compared = []
    for python in _other_pythons():
        wheels = wheelhouse.fill_from_lock(ROOT, LOCK, tmp_path / Path(python).parent.parent.name, X86, python=python)
        assert wheels == expected, f"pip on {python} filled a different wheelhouse"
        compared.append(python)
    print(f"compared with {sys.executable}: {compared or 'no other CPython 3.12/3.13 on this machine'}")


@pytest.mark.timeout(300)
def test_the_lock_script_pins_what_it_downloaded_and_check_sees_drift(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("idna==3.7\nsix==1.16.0\n")
    lock = tmp_path / "requirements.lock"
    assert lock_requirements.main(["--requirements", str(requirements), "--lock", str(lock)]) == 0
    entries = reqlock.load(lock)
    assert [entry.pin for entry in entries] == ["idna==3.7", "six==1.16.0"]
    fetched = tmp_path / "fetched"
    wheelhouse.fill_from_lock(tmp_path, lock, fetched, X86)  # pip accepts the hashes the script wrote
    assert {canonicalize_name(parse_wheel_filename(w.name)[0]) for w in fetched.glob("*.whl")} == {"idna", "six"}
    assert lock_requirements.main(["--requirements", str(requirements), "--lock", str(lock), "--check"]) == 0
    requirements.write_text("idna==3.6\nsix==1.16.0\n")
    assert lock_requirements.main(["--requirements", str(requirements), "--lock", str(lock), "--check"]) == 1
    assert "idna==3.7" in lock.read_text()  # --check changes nothing


@pytest.mark.timeout(300)
def test_a_requirement_without_a_wheel_for_the_image_is_refused_naming_it(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("docopt==0.6.2  # publishes only an sdist\nsix==1.16.0\n")
    with pytest.raises(BuildError, match=r"docopt==0.6.2 publishes no wheel for the image "
                                         r"\(cp311-manylinux_2_36_x86_64\).*hash-locked wheels only"):
        wheelhouse.resolve(tmp_path, requirements, tmp_path / "wheelhouse", X86, print)
