"""The app image's wheelhouse is built for the image's Python and platform, never for the controller's.

The image runs CPython 3.11 (bookworm's python3 in the sandbox base, python:3.11-slim in production); a controller
on Python 3.12 or 3.13 must fill the wheelhouse with the same cp311 wheels. The pip command is a pure argv
builder, tested as such; the download itself runs for real against the package index (reachable here and in
CI), into temporary directories, once with this interpreter and once with each other CPython found on the
machine, and the file lists must be equal.
"""

from __future__ import annotations

import glob
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ingestctl import images
from ingestctl.errors import BuildError
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "service" / "requirements.txt"
BOOKWORM_PYTHON = "3.11.2"  # what `ingest-base:bookworm` (debootstrap, baseimages.py) runs
X86 = images.WheelTarget(machine="x86_64")


# --- the target and the pip command --------------------------------------------------------------------------


def test_target_is_the_images_python_not_the_controllers():
    assert images.TARGET_PYTHON == "3.11"
    target = images.WheelTarget()
    assert (target.python, target.abi, target.glibc) == ("3.11", "cp311", "2.36")
    assert X86.tag == "cp311-manylinux_2_36_x86_64"
    assert images.WheelTarget(machine="aarch64").tag == "cp311-manylinux_2_36_aarch64"


def test_manylinux_platforms_list_every_glibc_down_to_manylinux1_with_legacy_aliases():
    platforms = images.manylinux_platforms("2.36", "x86_64")
    assert platforms[0] == "manylinux_2_36_x86_64"
    assert platforms[-2:] == ["manylinux_2_5_x86_64", "manylinux1_x86_64"]
    assert platforms.index("manylinux2014_x86_64") == platforms.index("manylinux_2_17_x86_64") + 1
    assert platforms.index("manylinux2010_x86_64") == platforms.index("manylinux_2_12_x86_64") + 1
    assert len(platforms) == 32 + 3
    assert not any("2_37" in p or "musllinux" in p for p in platforms)


def test_wheelhouse_command_is_exact_and_names_the_target():
    command = images.wheelhouse_command(
        "/venv/bin/python", Path("service/requirements.txt"), Path("service/wheelhouse"), X86
    )
    platforms = " ".join(f"--platform {p}" for p in images.manylinux_platforms("2.36", "x86_64"))
    assert " ".join(command) == (
        "/venv/bin/python -m pip download --quiet --only-binary=:all: --implementation cp --python-version 3.11"
        f" --abi cp311 {platforms} --find-links service/wheelhouse --dest service/wheelhouse"
        " -r service/requirements.txt"
    )


def test_download_command_for_missing_requirements_uses_the_same_target():
    command = images.download_command("py", ["async-timeout>=4", "typing-extensions>=4.6"], Path("wh"), X86)
    prefix = images.wheelhouse_command("py", Path("r.txt"), Path("wh"), X86)[:-2]
    assert command == [*prefix, "async-timeout>=4", "typing-extensions>=4.6"]


@pytest.mark.parametrize("controller", ["/opt/py311/bin/python", "/opt/py312/bin/python", "/opt/py313/bin/python"])
def test_the_controllers_python_changes_only_which_interpreter_runs_pip(controller, monkeypatch):
    monkeypatch.setattr(sys, "version_info", (3, 13, 0, "final", 0))  # nothing may read the controller's version
    command = images.wheelhouse_command(controller, REQUIREMENTS, Path("wh"), X86)
    reference = images.wheelhouse_command("/usr/bin/python3", REQUIREMENTS, Path("wh"), X86)
    assert command[0] == controller and command[1:] == reference[1:]
    assert not any("313" in part or "3.13" in part for part in command[1:])


def test_sdist_wheel_command_builds_one_requirement_without_dependencies():
    assert images.sdist_wheel_command("py", "docopt==0.6.2", Path("/tmp/x")) == [
        "py", "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", "/tmp/x", "docopt==0.6.2"
    ]


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
    assert images.wheelhouse_target({"Architecture": "amd64"}) == X86
    assert images.wheelhouse_target({"Architecture": "arm64"}).machine == "aarch64"
    assert images.wheel_machine("s390x") == "s390x"


def test_unavailable_requirement_is_read_from_pips_error():
    direct = (
        "ERROR: Could not find a version that satisfies the requirement docopt==0.6.2 (from versions: none)\n"
        "ERROR: No matching distribution found for docopt==0.6.2\n"
    )
    assert images.unavailable_requirement(direct) == "docopt==0.6.2"
    transitive = "ERROR: No matching distribution found for docopt==0.6.2 (from needsdocopt)\n"
    assert images.unavailable_requirement(transitive) == "docopt==0.6.2"
    assert images.unavailable_requirement("ERROR: HTTP error 503 while getting https://...\n") is None


# --- the stamp (wheelhouse cache key) --------------------------------------------------------------------------


def _checkout(tmp_path: Path, requirements: str = "redis==8.1.0\n") -> Path:
    (tmp_path / "service").mkdir()
    (tmp_path / "service" / "requirements.txt").write_text(requirements)
    return tmp_path


def test_stamp_names_the_target_and_base_but_not_the_controller(tmp_path, monkeypatch):
    root = _checkout(tmp_path)
    wanted = images.requirements_hash(b"redis==8.1.0\n", "cp311-manylinux_2_36_x86_64-sha256:base")
    (root / "service" / "wheelhouse").mkdir()
    (root / "service" / "wheelhouse" / images.STAMP_NAME).write_text(wanted + "\n")

    def no_rebuild(*_args, **_kwargs):
        raise AssertionError("a wheelhouse with a matching stamp was rebuilt")

    monkeypatch.setattr(images, "fill_wheelhouse", no_rebuild)
    monkeypatch.setattr(images, "base_python_version", no_rebuild)
    for version in ((3, 11, 7, "final", 0), (3, 12, 1, "final", 0), (3, 13, 0, "final", 0)):
        monkeypatch.setattr(sys, "version_info", version)
        assert images.ensure_wheelhouse(root, "base", "sha256:base", print, X86) == wanted
    other_arch = images.WheelTarget(machine="aarch64")
    assert images.requirements_hash(b"redis==8.1.0\n", f"{other_arch.tag}-sha256:base") != wanted
    assert images.requirements_hash(b"redis==8.1.0\n", "cp312-manylinux_2_36_x86_64-sha256:base") != wanted


def test_a_base_image_on_another_python_is_refused(tmp_path, monkeypatch):
    root = _checkout(tmp_path)
    monkeypatch.setattr(images, "base_python_version", lambda _image: "3.13.5")
    with pytest.raises(BuildError, match=r"runs Python 3\.13\.5, but the wheelhouse is built for Python 3\.11"):
        images.ensure_wheelhouse(root, "python:3.13-slim", "sha256:x", print, X86)
    assert not (root / "service" / "wheelhouse" / images.STAMP_NAME).exists()


# --- completeness and pruning --------------------------------------------------------------------------------

REQUIRES = {
    "redis": ['async-timeout>=4.0.3; python_full_version < "3.11.3"'],
    "async-timeout": [],
    "exceptiongroup": [],  # only a Python 3.10 controller's pip would fetch it (anyio: python_version < "3.11")
    "anyio": ['exceptiongroup>=1.0.2; python_version < "3.11"', "idna>=2.8"],
    "idna": [],
}


def test_needed_wheels_are_the_targets_closure():
    needed = images.needed_wheels(["redis==8.1.0", "anyio"], REQUIRES, images.target_environment("3.11.2"))
    assert needed == {"redis", "async-timeout", "anyio", "idna"}
    newer = images.needed_wheels(["redis==8.1.0", "anyio"], REQUIRES, images.target_environment("3.11.7"))
    assert newer == {"redis", "anyio", "idna"}


def test_prune_removes_what_only_the_controller_needed(tmp_path):
    for name in ("anyio-4.16.0-py3-none-any.whl", "exceptiongroup-1.3.0-py3-none-any.whl",
                 "Typing_Extensions-4.16.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    removed = images.prune_wheelhouse(tmp_path, {"anyio", "typing-extensions"})
    assert removed == ["exceptiongroup-1.3.0-py3-none-any.whl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "Typing_Extensions-4.16.0-py3-none-any.whl", "anyio-4.16.0-py3-none-any.whl"
    ]


def test_a_compiled_wheel_built_from_an_sdist_is_refused(tmp_path, monkeypatch):
    def fake_pip_wheel(argv, _cwd, _what):
        output = Path(argv[argv.index("-w") + 1])
        (output / "fastthing-1.0-cp313-cp313-linux_x86_64.whl").write_bytes(b"")
        return ""

    monkeypatch.setattr(images, "_run", fake_pip_wheel)
    with pytest.raises(BuildError, match=r"fastthing==1.0 publishes no wheel for the image \(cp311-manylinux_2_36"):
        images._wheel_from_sdist(tmp_path, "fastthing==1.0", tmp_path, X86, print, "python3.13")
    assert list(tmp_path.glob("*.whl")) == []


def test_download_gives_up_when_building_the_missing_wheel_did_not_help(tmp_path, monkeypatch):
    calls = []
    failure = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for odd==1\n")
    monkeypatch.setattr(images, "_attempt", lambda argv, cwd, what: calls.append(argv) or failure)
    monkeypatch.setattr(images, "_wheel_from_sdist", lambda *args: calls.append("built"))
    with pytest.raises(BuildError, match="No matching distribution found for odd==1"):
        images._download(tmp_path, ["pip", "download"], tmp_path, X86, "building", print, "python3")
    assert calls == [["pip", "download"], "built", ["pip", "download"]]


# --- the real download ---------------------------------------------------------------------------------------


def _tags(filename: str) -> set[tuple[str, str, str]]:
    return {(t.interpreter, t.abi, t.platform) for t in parse_wheel_filename(filename)[3]}


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


@pytest.fixture(scope="module")
def service_wheelhouse(tmp_path_factory) -> list[str]:
    machine = images.os.uname().machine
    wheelhouse = tmp_path_factory.mktemp("wheelhouse") / "wheelhouse"
    return images.fill_wheelhouse(
        ROOT, REQUIREMENTS, wheelhouse, images.WheelTarget(machine=machine), BOOKWORM_PYTHON, print
    )


@pytest.mark.timeout(300)
def test_the_services_wheelhouse_holds_only_cp311_wheels_for_this_platform(service_wheelhouse):
    machine = images.os.uname().machine
    assert service_wheelhouse, "the wheelhouse is empty"
    for name in service_wheelhouse:
        tags = _tags(name)
        assert any(
            interpreter in {"cp311", "py3", "py2.py3"} or (interpreter.startswith("cp3") and abi == "abi3")
            for interpreter, abi, _platform in tags
        ), name
        for _interpreter, abi, platform in tags:
            assert abi in {"cp311", "abi3", "none"}, name
            assert platform == "any" or (platform.startswith("manylinux") and platform.endswith(machine)), name
    names = {parse_wheel_filename(name)[0] for name in service_wheelhouse}
    for line in images.requirement_lines(REQUIREMENTS):
        assert canonicalize_name(Requirement(line).name) in names, f"{line} has no wheel"
    # psycopg[binary] brings its compiled half; bookworm's 3.11.2 needs async-timeout (redis' marker).
    assert {"psycopg-binary", "async-timeout"} <= names


@pytest.mark.timeout(600)
def test_other_controller_pythons_fill_the_same_wheelhouse(service_wheelhouse, tmp_path):
    """pip on 3.12/3.13 (where the machine has them) picks the same files: tags and markers are the image's."""
    machine = images.os.uname().machine
    compared = []
    for python in _other_pythons():
        wheels = images.fill_wheelhouse(
            ROOT, REQUIREMENTS, tmp_path / Path(python).parent.parent.name, images.WheelTarget(machine=machine),
            BOOKWORM_PYTHON, print, python=python,
        )
        assert wheels == service_wheelhouse, f"pip on {python} filled a different wheelhouse"
        compared.append(python)
    print(f"compared with {sys.executable}: {compared or 'no other CPython 3.12/3.13 on this machine'}")


@pytest.mark.timeout(300)
def test_a_pure_python_requirement_without_any_wheel_is_built_here(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("docopt==0.6.2  # publishes only an sdist\nsix==1.16.0\n")
    wheels = images.fill_wheelhouse(tmp_path, requirements, tmp_path / "wheelhouse", X86, BOOKWORM_PYTHON, print)
    assert wheels == ["docopt-0.6.2-py2.py3-none-any.whl", "six-1.16.0-py2.py3-none-any.whl"]
