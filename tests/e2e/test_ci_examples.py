"""The CI recipes in docs/examples run as written: their runner-independent steps, against the sandbox.

The GitHub Actions and GitLab CI files are parsed, and their own shell scripts (secrets check, deploy with
--json and its exit-code handling) run under bash with the environment pointed at `local` instead of
`staging`. What is runner-specific (checkout, setup-python, SSH key files, artifact upload) stays out: the
sandbox has its own key, and the install step is covered by tests/e2e/test_install.py. The deploy scripts run
here end in a refusal (exit 2, before any host is touched), which the recipes' own case statements report.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from releases import PROJECT_ROOT, variant

pytestmark = pytest.mark.e2e

EXAMPLES = PROJECT_ROOT / "docs" / "examples"


def github_step(name: str) -> str:
    workflow = yaml.safe_load((EXAMPLES / "github-actions-deploy.yml").read_text())
    return next(step["run"] for step in workflow["jobs"]["deploy"]["steps"] if step.get("name") == name)


def gitlab_deploy_script() -> str:
    pipeline = yaml.safe_load((EXAMPLES / "gitlab-ci.yml").read_text())
    # The job's last script entry is the deploy and its exit-code handling (the first pulls the base image).
    return pipeline["deploy-staging"]["script"][-1]


def run_step(script: str, root: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    outputs = {"GITHUB_OUTPUT": tmp_path / "output", "GITHUB_STEP_SUMMARY": tmp_path / "summary"}
    for path in outputs.values():
        path.write_text("")
    return subprocess.run(
        ["bash", "-e", "-c", script.replace("staging", "local")], cwd=root, capture_output=True, text=True,
        timeout=1500, check=False,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "INGESTCTL_ROOT": str(root),
             **{k: str(v) for k, v in outputs.items()}, **env},
    )


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    return variant(tmp_path_factory.mktemp("ci-examples"), {})


def test_the_github_secrets_check_step_passes(testbed, checkout, tmp_path):
    result = run_step(github_step("Secrets check"), checkout, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_gitlab_deploy_script_turns_a_refusal_into_its_exit_code(testbed, checkout, tmp_path):
    # A too-short JWT_SECRET in the environment wins over the secrets file: refused before any host (exit 2).
    result = run_step(gitlab_deploy_script(), checkout, tmp_path, JWT_SECRET="e2e-too-short")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "deploy refused (exit 2), no host was touched" in result.stdout, result.stdout
    assert "e2e-too-short" not in result.stdout + result.stderr, "the rejected secret was echoed"


def test_the_github_deploy_step_reports_a_refusal_and_records_its_exit_code(testbed, checkout, tmp_path):
    result = run_step(github_step("Deploy"), checkout, tmp_path, API_KEY="changeme")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "exit_code=2" in (tmp_path / "output").read_text()
    assert "::error::deploy refused (exit 2), no host was touched: " in result.stdout, result.stdout
    assert "API_KEY" in result.stdout and "placeholder" in result.stdout, result.stdout
