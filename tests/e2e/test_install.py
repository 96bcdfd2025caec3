"""`pip install '.[deploy]'` alone, as the CI recipes in docs/examples do, runs every `ingestctl` command.

A clean virtualenv gets only the `deploy` extra, installed from this checkout (not editable, so nothing of the
checkout's own .venv or source tree can stand in for a missing package). Then, with that venv's interpreter:
every ingestctl module imports, every third-party module that ingestctl and deploys/*.py import anywhere (also
inside functions, e.g. `jwt` in the metric gate) is installed, every command's `--help` works (commands are
listed from the click group itself, so new ones are covered), and `ingestctl deploy local --dry` plans a
release on the session's sandbox.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

PROJECT_ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = {"ingestctl", "ingest"}
# The service's modules ingestctl itself imports (the gates mint read tokens with the service's own helper).
SERVICE_MODULES_USED = ("tools/credentials.py",)

# Run by the clean venv's interpreter: every command path of the installed CLI, as JSON lists of words.
LIST_COMMANDS = """
import json, click
from ingestctl.cli import main

def walk(command, path):
    yield path
    if isinstance(command, click.Group):
        # list_commands/get_command, not .commands: the top group loads most subcommand groups only when named.
        context = click.Context(command)
        for name in command.list_commands(context):
            yield from walk(command.get_command(context, name), [*path, name])

print(json.dumps(list(walk(main, []))))
"""

# Run by the clean venv's interpreter: import every ingestctl module, look up every third-party module.
IMPORT_EVERYTHING = """
import importlib, importlib.util, json, pkgutil, sys
import ingestctl

failures = {}
for module in pkgutil.walk_packages(ingestctl.__path__, "ingestctl."):
    if module.name == "ingestctl.entry":
        continue  # monkey-patches the process; imported by the console script, which the --help runs exercise
    try:
        importlib.import_module(module.name)
    except Exception as exc:
        failures[module.name] = repr(exc)
for module in ("ingest.tools.credentials",):
    try:
        importlib.import_module(module)
    except Exception as exc:
        failures[module] = repr(exc)
for name in json.loads(sys.argv[1]):
    if importlib.util.find_spec(name) is None:
        failures[name] = "not installed"
print(json.dumps({"ingestctl": ingestctl.__file__, "failures": failures}))
"""


def third_party_imports() -> list[str]:
    """Top-level names of every non-stdlib, non-first-party module imported by ingestctl and deploys/*.py."""
    sources = [*(PROJECT_ROOT / "deploys" / "ingestctl").rglob("*.py"), *(PROJECT_ROOT / "deploys").glob("*.py"),
               *(PROJECT_ROOT / "service" / "ingest" / name for name in SERVICE_MODULES_USED)]
    names: set[str] = set()
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return sorted(names - set(sys.stdlib_module_names) - FIRST_PARTY - {"__future__"})


def clean_env() -> dict[str, str]:
    """This process's environment without anything that would put the checkout or its venv on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    return env


@pytest.fixture(scope="module")
def deploy_venv(tmp_path_factory) -> Path:
    """A fresh virtualenv holding `ingest-release[deploy]` from this checkout and nothing else."""
    venv = tmp_path_factory.mktemp("deploy-only") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", f"{PROJECT_ROOT}[deploy]"],
        capture_output=True, text=True, timeout=900, env=clean_env(), check=False,
    )
    assert install.returncode == 0, f"pip install '.[deploy]' failed:\n{install.stdout}\n{install.stderr}"
    return venv


def run_in(venv: Path, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # From the checkout (ingestctl finds its project root from the working directory), but importing only
    # what the venv installed: the checkout's root holds no `ingestctl` package, deploys/ and service/ do.
    return subprocess.run(argv, cwd=PROJECT_ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_every_module_and_every_import_is_installed(deploy_venv):
    wanted = third_party_imports()
    assert {"pyinfra", "click", "prometheus_client", "jwt", "docker"} <= set(wanted), wanted
    result = run_in(deploy_venv, str(deploy_venv / "bin" / "python"), "-c", IMPORT_EVERYTHING, json.dumps(wanted))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ingestctl"].startswith(str(deploy_venv)), f"imported ingestctl from {report['ingestctl']}"
    assert report["failures"] == {}, f"with only .[deploy] installed: {report['failures']}"


def test_every_command_has_working_help(deploy_venv):
    listed = run_in(deploy_venv, str(deploy_venv / "bin" / "python"), "-c", LIST_COMMANDS)
    assert listed.returncode == 0, listed.stderr
    paths = json.loads(listed.stdout.strip().splitlines()[-1])
    assert ["deploy"] in paths and ["image", "build"] in paths and ["testbed", "up"] in paths, paths
    failed = []
    for path in paths:
        result = run_in(deploy_venv, str(deploy_venv / "bin" / "ingestctl"), *path, "--help")
        if result.returncode != 0 or "Usage:" not in result.stdout:
            failed.append(f"ingestctl {' '.join(path)} --help -> {result.returncode}\n{result.stdout}{result.stderr}")
    assert not failed, "\n\n".join(failed)


def test_deploy_local_dry_plans_a_release(deploy_venv, testbed):
    result = run_in(deploy_venv, str(deploy_venv / "bin" / "ingestctl"), "deploy", "local", "--dry", timeout=900)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    for expected in ("hosts:", "nothing was changed"):
        assert expected in result.stdout, f"--dry output lacks {expected!r}:\n{result.stdout}"
