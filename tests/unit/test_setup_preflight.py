"""Deploy's preflight names every host that is not set up, and the command that fixes it (exit 2)."""

from types import SimpleNamespace

import pytest
from ingestctl import runlock
from ingestctl.errors import ConfigError
from ingestctl.facts.host import Readiness

READY = "init=systemd\nos=debian 12 bookworm\ndocker_cli=yes\nengine=24.0.7\ncompose=docker-compose\nmissing_tools=\n"
BARE = "init=systemd\nos=debian 13 trixie\ndocker_cli=no\nengine=\ncompose=\nmissing_tools=\n"


def test_hosts_not_set_up_are_named_with_the_fix():
    outputs = {"db1": READY, "app2": BARE, "app3": BARE}
    ctx = SimpleNamespace(name="staging")
    with pytest.raises(ConfigError) as refused:
        runlock.require_set_up(ctx, {h: Readiness().process(out.splitlines()) for h, out in outputs.items()})
    message = str(refused.value)
    assert "app2: Docker is not installed" in message and "app3:" in message and "db1" not in message
    assert "ingestctl setup staging" in message


def test_set_up_hosts_pass():
    ready = Readiness().process(READY.splitlines())
    runlock.require_set_up(SimpleNamespace(name="staging"), {"db1": ready, "app2": ready})


def test_a_host_whose_readiness_check_failed_is_named_not_taken_for_bare():
    with pytest.raises(ConfigError, match=r"app2: the readiness check failed on the host") as refused:
        runlock.require_set_up(SimpleNamespace(name="staging"), {"db1": Readiness().process(READY.splitlines()),
                                                                 "app2": None})
    assert "Docker is not installed" not in str(refused.value)
