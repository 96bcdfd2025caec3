"""The per-host proxy's config: its body limit follows the live config version, its per-client limits come from
the inventory, and every refusal it makes itself answers in the api's JSON error shape.

The rendering is checked here as text and as the JSON clients parse; tests/service/test_proxy_limits.py runs
the same rendering in a real nginx.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from ingestctl import config as config_mod
from ingestctl import hostlayout as layout
from ingestctl import hostvalues
from ingestctl.facts.proxy import ConfigBodyLimit, body_limit, default_body_limit
from pyinfra.api.exceptions import FactProcessError

PORTS = layout.Ports(public=8000)
CLIENTS = layout.ClientLimits(connections=64, requests_per_s=200, burst=400)


def error_body(conf: str, status: int, request_id: str = "req-1") -> dict:
    """The JSON nginx answers with STATUS (its `return STATUS '...'` line), with the request id filled in."""
    found = re.search(rf"return {status} '(.*)';$", conf, re.MULTILINE)
    assert found, f"no `return {status}` in the proxy config"
    return json.loads(found.group(1).replace("$ingest_request_id", request_id))


def test_the_body_limit_is_the_one_given_and_named_in_the_413():
    conf = layout.render_proxy(PORTS, 65536, CLIENTS)
    assert re.findall(r"client_max_body_size (\d+);", conf) == ["65536"]
    error = error_body(conf, 413)["error"]
    assert error["code"] == "PAYLOAD_TOO_LARGE" and error["request_id"] == "req-1"
    assert "at most 65536 bytes (MAX_REQUEST_BODY_BYTES" in error["message"]


def test_client_limits_key_on_the_client_address_and_answer_429_json_with_retry_after():
    conf = layout.render_proxy(PORTS, 65536, layout.ClientLimits(10, 30, 5))
    assert "limit_conn_zone $binary_remote_addr zone=ingest_conn:10m;" in conf
    assert "limit_req_zone $binary_remote_addr zone=ingest_req:10m rate=30r/s;" in conf
    assert "limit_conn ingest_conn 10;" in conf
    assert "limit_req zone=ingest_req burst=5 nodelay;" in conf
    assert "limit_conn_status 429;" in conf and "limit_req_status 429;" in conf
    assert "error_page 429 = @too_many_requests;" in conf
    location = conf[conf.index("location @too_many_requests"):]
    location = location[:location.index("\n        }\n")]
    assert "add_header Retry-After 1 always;" in location
    assert "default_type application/json;" in location
    body = error_body(conf, 429)
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "request_id"}
    assert body["error"]["code"] == "RATE_LIMITED"  # the api's own rate limiter's code


def test_the_limits_apply_to_client_requests_not_to_the_proxys_own_error_answers():
    """In `location /` only: the named locations answering 413 and 429 are never throttled themselves."""
    conf = layout.render_proxy(PORTS, 65536, CLIENTS)
    main = conf[conf.index("location / {"):]
    assert main.index("limit_conn ingest_conn 64;") < main.index("proxy_pass")
    assert conf.count("limit_conn ingest_conn") == 1 and conf.count("limit_req zone=") == 1


@pytest.mark.parametrize(("clients", "off", "on"), [
    (layout.ClientLimits(0, 200, 400), "limit_conn", "limit_req"),
    (layout.ClientLimits(64, 0, 400), "limit_req", "limit_conn"),
])
def test_zero_turns_a_limit_off(clients, off, on):
    directives = set(re.findall(r"^\s*(limit_\w+)", layout.render_proxy(PORTS, 65536, clients),
                                re.MULTILINE))
    assert directives == {on, f"{on}_zone", f"{on}_status", f"{on}_log_level"}, off


@pytest.mark.parametrize(("max_body", "clients", "message"), [
    (0, CLIENTS, "max_body_bytes: expected an integer >= 1, found 0"),
    ("65536; include /etc/passwd", CLIENTS, "max_body_bytes: expected an integer >= 1"),
    (65536, layout.ClientLimits(-1, 200, 400), "connections: expected an integer >= 0, found -1"),
    (65536, layout.ClientLimits(64, True, 400), "requests_per_s: expected an integer >= 0, found True"),
    (65536, layout.ClientLimits(64, 200, "4r"), "burst: expected an integer >= 0, found '4r'"),
])
def test_only_plain_integers_reach_the_nginx_config(max_body, clients, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        layout.render_proxy(PORTS, max_body, clients)


# ----- the config version's body limit, read back from the host ----------------------------------------------

def test_the_body_limit_is_read_from_the_config_versions_app_env(tmp_path):
    """The fact's real command on a rendered app.env: the value `config set` wrote is what the proxy gets."""
    cfg = config_mod.ServiceConfig.build({"MAX_REQUEST_BODY_BYTES": 4096})
    folder = tmp_path / "config" / cfg.version
    folder.mkdir(parents=True)
    (folder / "app.env").write_text(config_mod.render_env_file(cfg, secrets_dir="/run/secrets"))
    command = ConfigBodyLimit().command(cfg.version).replace(layout.BASE, str(tmp_path))
    output = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout.splitlines()
    assert ConfigBodyLimit().process(output) == 4096

    absent = ConfigBodyLimit().command("0123456789ab").replace(layout.BASE, str(tmp_path))
    output = subprocess.run(["sh", "-c", absent], capture_output=True, text=True, check=True).stdout.splitlines()
    assert output == [], "a version not on the host reads as nothing (pyinfra then gives the fact's default)"


def test_every_versions_body_limit_is_read_in_one_command_and_judged_as_one_version_would_be(tmp_path):
    """ConfigBodyLimits' real command over several config versions: each version's limit, through `limit_of`, is
    what ConfigBodyLimit of that version gives, and a value out of the tunable's rule fails the same way."""
    from ingestctl.facts.proxy import ConfigBodyLimits, limit_of

    versions = {}
    for limit in (4096, None):
        cfg = config_mod.ServiceConfig.build({"MAX_REQUEST_BODY_BYTES": limit} if limit else {})
        folder = tmp_path / "config" / cfg.version
        folder.mkdir(parents=True)
        (folder / "app.env").write_text(config_mod.render_env_file(cfg, secrets_dir="/run/secrets"))
        versions[cfg.version] = limit or 1048576
    forged = tmp_path / "config" / "cccccccccccc"
    forged.mkdir()
    (forged / "app.env").write_text("MAX_REQUEST_BODY_BYTES=-1\n")
    command = ConfigBodyLimits().command().replace(layout.BASE, str(tmp_path))
    output = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout.splitlines()
    limits = ConfigBodyLimits().process(output)
    assert {version: limit_of(limits, version) for version in versions} == versions
    assert limit_of(limits, "0123456789ab") == 1048576, "a version not on the host: the default, as ConfigBodyLimit"
    with pytest.raises(FactProcessError, match="MAX_REQUEST_BODY_BYTES"):
        limit_of(limits, "cccccccccccc")


def test_a_version_without_the_key_gets_the_service_default():
    assert default_body_limit() == 1048576 == int(config_mod.TUNABLES["MAX_REQUEST_BODY_BYTES"].default)
    assert body_limit([]) == 1048576
    assert ConfigBodyLimit.default() == 1048576
    assert ConfigBodyLimit().command(layout.EMPTY_CONFIG).endswith("/config/none/app.env 2>/dev/null || true")


@pytest.mark.parametrize("forged", ["0", "12", "104857601", "65536; include /etc/shadow", "-1", "1e6", ""])
def test_a_value_outside_the_tunables_rule_fails_the_host_naming_it(forged):
    with pytest.raises(hostvalues.HostValueError, match="MAX_REQUEST_BODY_BYTES: expected an integer from 1024"):
        body_limit([f"MAX_REQUEST_BODY_BYTES={forged}"])
    with pytest.raises(FactProcessError, match="config app.env MAX_REQUEST_BODY_BYTES: expected an integer"):
        ConfigBodyLimit().process([f"MAX_REQUEST_BODY_BYTES={forged}"])


def test_a_line_that_is_not_key_equals_value_fails_the_host_naming_it():
    with pytest.raises(hostvalues.HostValueError, match="MAX_REQUEST_BODY_BYTES: expected MAX_REQUEST_BODY_BYTES=<bytes>"):
        body_limit(["MAX_REQUEST_BODY_BYTES 65536"])


def test_a_forged_config_version_never_reaches_the_command():
    with pytest.raises(hostvalues.HostValueError, match="config version: expected a config version"):
        ConfigBodyLimit().command("../../etc; rm -rf /")
