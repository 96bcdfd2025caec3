"""The compose files are valid for both Compose CLIs: `docker-compose` (v1, Debian bookworm on this machine)
and `docker compose` (v2, on the sandbox hosts, Debian trixie). DESIGN section 4 promises both."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from ingestctl import hostlayout

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PROD = ROOT / "docker-compose.prod.yml"
SECRETS = ("postgres_password", "api_key", "jwt_secret", "redis_password")


def v1_config(compose_file: Path, project_dir: Path, env: dict[str, str] | None = None):
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip(reason="docker-compose (v1) is not installed: `apt-get install docker-compose` (scripts/setup.sh does)")
    return subprocess.run([binary, "-f", str(compose_file), "--project-directory", str(project_dir), "config", "-q"],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **(env or {})}, check=False)


def test_prod_compose_is_valid_for_compose_v1(tmp_path):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name in SECRETS:
        (secrets / name).write_text("x" * 40)
    # The checkout is the project directory: the api's build context (./service) is relative to it.
    result = v1_config(PROD, ROOT, {"SECRETS_DIR": str(secrets)})
    assert result.returncode == 0, f"docker-compose v1 rejects {PROD.name}: {result.stderr}"


def test_prod_compose_is_valid_for_compose_v2(testbed, ssh):
    for name in SECRETS:
        code, _, err = ssh("app2", f"mkdir -p /tmp/composecheck/secrets && printf x > /tmp/composecheck/secrets/{name}")
        assert code == 0, err
    code, _, err = ssh("app2", f"cat > /tmp/composecheck/docker-compose.prod.yml <<'EOF'\n{PROD.read_text()}\nEOF")
    assert code == 0, err
    code, out, err = ssh("app2", "cd /tmp/composecheck && SECRETS_DIR=./secrets docker compose "
                                 "-f docker-compose.prod.yml config -q; status=$?; rm -rf /tmp/composecheck; exit $status")
    assert code == 0, f"docker compose v2 rejects {PROD.name}: {err or out}"


@pytest.mark.parametrize("roles", [("db", "app"), ("app",)])
def test_rendered_host_compose_is_valid_for_compose_v1(tmp_path, roles):
    text = hostlayout.render_compose("h", roles, "10.0.0.2", 10001, hostlayout.Ports())
    compose = tmp_path / "compose.yml"
    compose.write_text(text)
    (tmp_path / "config" / "none" / "secrets").mkdir(parents=True)
    (tmp_path / "config" / "none" / "app.env").write_text("")
    env = {"POSTGRES_IMAGE": "p", "REDIS_IMAGE": "r", "PROXY_IMAGE": "x"}
    result = v1_config(compose, tmp_path, env)
    assert result.returncode == 0, f"docker-compose v1 rejects the host compose for {roles}: {result.stderr}"


def test_rendered_host_compose_is_valid_for_compose_v2(testbed, ssh):
    text = hostlayout.render_compose("app3", ("app",), "10.0.0.2", 10001, hostlayout.Ports())
    script = (f"mkdir -p /tmp/hostcheck/config/none/secrets && : > /tmp/hostcheck/config/none/app.env && "
              f"cat > /tmp/hostcheck/compose.yml <<'EOF'\n{text}\nEOF\n"
              "cd /tmp/hostcheck && PROXY_IMAGE=x docker compose -f compose.yml config -q; s=$?; "
              "rm -rf /tmp/hostcheck; exit $s")
    code, out, err = ssh("app3", f"bash -c {shlex.quote(script)}")
    assert code == 0, f"docker compose v2 rejects the host compose: {err or out}"
