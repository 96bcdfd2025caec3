"""testinfra suite: verifies hosts over SSH after a deploy (DESIGN section 1, part 4).

Point it at any hosts the testinfra way:
    pytest tests/infra --hosts=ssh://root@ADDR:22,... --ssh-identity-file=KEY --ssh-config=FILE
With no --hosts it targets the local sandbox that `ingestctl testbed up` started (INGESTCTL_TESTBED selects
which), through the ssh_config that `up` wrote (key login, no host-key pinning).

`--ingest-env ENV` (default local) names the environment whose controller-side secrets file is checked.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--ingest-env", default="local", help="environment whose secrets file (secrets/ENV.env) is checked"
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "after_deploy: checks state a deploy creates; deselect with -m 'not after_deploy' on bare hosts",
    )
    if config.option.hosts:
        return
    from ingestctl.errors import ConfigError
    from ingestctl.testbed import state as testbed_state

    try:
        testbed = testbed_state.load()
    except ConfigError as exc:
        raise pytest.UsageError(f"no --hosts given and no sandbox to default to: {exc}") from exc
    # Names from the generated ssh_config, so results read "ssh://db1" rather than addresses.
    config.option.hosts = ",".join(f"ssh://{host.name}" for host in testbed.hosts)
    config.option.ssh_config = testbed.ssh_config
    config.option.ssh_identity_file = testbed.ssh_key


@pytest.fixture(scope="session")
def ingest_env(request: pytest.FixtureRequest) -> str:
    return request.config.getoption("--ingest-env")


@pytest.fixture(scope="session")
def ssh_identity_file(request: pytest.FixtureRequest) -> str | None:
    return request.config.option.ssh_identity_file
