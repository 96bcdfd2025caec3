"""Image references pinned by digest: parsed once, resolved on the controller, named by tag on hosts; and the
warning a staging or production inventory gets for an image named by bare tag."""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest
from ingestctl import inventory, local_images, runcontext
from ingestctl import secrets as secrets_mod
from ingestctl.errors import BuildError, ConfigError
from ingestctl.imageref import ImageRef, host_name
from ingestctl.operations import images as ops
from ingestctl.operations.release import dotenv
from ingestctl.operations.shipping import _host_names
from ingestctl.output import Reporter

DIGEST = "sha256:" + "0f" * 32
PINNED = f"postgres:16@{DIGEST}"
IMAGE_ID = "sha256:" + "ab" * 32
HOSTS = {"db1": {"ssh_hostname": "10.0.0.1", "roles": ["db", "app"]}}


@pytest.mark.parametrize("text, repository, tag, digest", [
    ("postgres:16", "postgres", "16", None),
    (PINNED, "postgres", "16", DIGEST),
    (f"registry.example:5000/lib/nginx:1.27@{DIGEST}", "registry.example:5000/lib/nginx", "1.27", DIGEST),
    ("registry.example:5000/ingest:1.4.2", "registry.example:5000/ingest", "1.4.2", None),
])
def test_references_parse_into_name_tag_and_digest(text, repository, tag, digest):
    ref = ImageRef.parse(text)
    assert (ref.repository, ref.tag, ref.digest, ref.pinned) == (repository, tag, digest, digest is not None)
    assert str(ref) == text
    # Hosts know it by name:tag, which `docker tag` can create (it refuses a digest reference as its target).
    assert ref.host_name == f"{repository}:{tag}" and "@" not in ref.host_name


@pytest.mark.parametrize("text, why", [
    ("postgres", "expected an image reference"),  # no tag: `latest`, whatever that is today
    (f"postgres@{DIGEST}", "a digest needs the tag it was taken from"),
    ("postgres:16@sha256:abc", "expected an image reference"),
    (f"postgres:16@sha512:{'0f' * 64}", "expected an image reference"),
    ("Postgres:16", "expected an image reference"),
    ("postgres:16;reboot", "expected an image reference"),
    ("", "expected an image reference"),
])
def test_malformed_references_are_refused(text, why):
    with pytest.raises(ValueError, match=why):
        ImageRef.parse(text)


def test_inventory_accepts_digest_pins_and_names_a_bad_reference_with_its_path():
    env = inventory.environment(name="production", data={"postgres_image": PINNED}, hosts=HOSTS,
                                source="inventories/production.py")
    assert env.data.postgres_image == PINNED
    with pytest.raises(ConfigError) as error:
        inventory.environment(name="production", data={"redis_image": "redis@" + DIGEST, "proxy_image": "nginx"},
                              hosts=HOSTS, source="inventories/production.py")
    lines = str(error.value).splitlines()
    assert lines[0].startswith("inventories/production.py: data.redis_image: expected an image reference name:tag or "
                               "name:tag@sha256:<64 hex>")
    assert lines[0].endswith(f"found 'redis@{DIGEST}'")
    assert lines[1].startswith("inventories/production.py: data.proxy_image: expected an image reference")


def test_only_non_sandbox_inventories_are_told_about_bare_tags():
    pinned_all = {"postgres_image": PINNED, "redis_image": f"redis:7@{DIGEST}", "proxy_image": f"nginx:1.27@{DIGEST}"}
    production = inventory.environment(name="production", data={"postgres_image": PINNED}, hosts=HOSTS, source="p.py")
    # proxy_image is not set: its default (nginx:1.27) is a bare tag too.
    assert [(u.key, u.image) for u in production.unpinned_images()] == [
        ("redis_image", "redis:7"), ("proxy_image", "nginx:1.27")
    ]
    assert inventory.environment(name="staging", data=pinned_all, hosts=HOSTS).unpinned_images() == []
    assert inventory.environment(name="local", data={}, hosts=HOSTS).unpinned_images() == []


PRODUCTION = """
    from ingestctl.inventory import environment

    _env = environment(
        name="production",
        data={{"postgres_image": "{pinned}", "secrets_file": "secrets/production.env"}},
        hosts={{"db1": {{"ssh_hostname": "10.0.0.1", "roles": ["db", "app"]}}}},
    )
    db = _env.group("db")
    app = _env.group("app")
"""


@pytest.fixture
def production(tmp_path, monkeypatch):
    (tmp_path / "inventories").mkdir()
    (tmp_path / "service").mkdir()
    (tmp_path / "secrets").mkdir()
    (tmp_path / "inventories" / "production.py").write_text(textwrap.dedent(PRODUCTION.format(pinned=PINNED)))
    secrets_mod.generate_file(tmp_path / "secrets" / "production.env")
    monkeypatch.setenv("INGESTCTL_ROOT", str(tmp_path))
    return tmp_path


def test_preflight_warns_in_json_for_each_bare_tag_and_goes_on(production, capsys):
    ctx = runcontext.prepare("production", Reporter(json_mode=True))
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    warnings = [event for event in events if event["type"] == "warning"]
    assert [(w["key"], w["image"], w["env"]) for w in warnings] == [
        ("redis_image", "redis:7", "production"), ("proxy_image", "nginx:1.27", "production")
    ]
    assert "docker buildx imagetools inspect redis:7" in warnings[0]["message"]
    assert "'redis:7@sha256:<digest>'" in warnings[0]["message"]
    assert not any(event["type"] == "error" for event in events)
    # The run goes on with the pinned reference for shipping, and the tag for what hosts name.
    assert ctx.infra_references["POSTGRES_IMAGE"] == PINNED
    assert ctx.infra_images == {"POSTGRES_IMAGE": "postgres:16", "REDIS_IMAGE": "redis:7", "PROXY_IMAGE": "nginx:1.27"}


def test_preflight_warning_is_one_readable_line_in_text_mode(production, capsys):
    runcontext.prepare("production", Reporter())
    lines = [line for line in capsys.readouterr().out.splitlines() if "warning:" in line]
    assert len(lines) == 2 and "data.redis_image is 'redis:7', a bare tag" in lines[0]
    assert "data.proxy_image is 'nginx:1.27'" in lines[1]


def test_hosts_compose_env_names_the_tag_never_the_digest(production):
    ctx = runcontext.prepare("production", Reporter(json_mode=True))
    env_file = dotenv(ctx.infra_images, {"green": {"API_GREEN_IMAGE": "ingest:1.4.2"}})
    assert "POSTGRES_IMAGE=postgres:16\n" in env_file and "@sha256" not in env_file


def test_shipping_resolves_the_pin_here_and_names_it_by_tag_on_hosts():
    names = _host_names(["ingest:1.4.2", PINNED, f"registry.example:5000/redis:7@{DIGEST}"])
    assert names == {"ingest:1.4.2": "ingest:1.4.2", "postgres:16": PINNED,
                     "registry.example:5000/redis:7": f"registry.example:5000/redis:7@{DIGEST}"}
    # What the host then runs: tag the shipped ID with the plain name, check the name resolves to that ID.
    assert ops.tag_command(IMAGE_ID, host_name(PINNED)) == f"docker tag {IMAGE_ID} postgres:16"
    assert host_name(PINNED) in ops.verify_image_id_command("db1", host_name(PINNED), IMAGE_ID)
    assert local_images.registry_reference("registry.example:5000", host_name(PINNED)) == (
        "registry.example:5000/postgres:16"
    )


def test_shipping_refuses_two_references_that_would_share_a_host_name_and_malformed_ones():
    with pytest.raises(ConfigError, match=r"'postgres:16' and 'postgres:16@sha256:0f0f.*' would both be postgres:16"):
        _host_names(["postgres:16", PINNED])
    with pytest.raises(ConfigError, match=r"image 'postgres@sha256:0f0f.*': expected an image reference"):
        _host_names([f"postgres@{DIGEST}"])


def test_a_pinned_image_missing_here_says_to_pull_it_by_digest(monkeypatch):
    def docker(argv):  # the engine's real answer for a digest it never pulled
        return subprocess.CompletedProcess(argv, 1, "", f"Error: No such image: {PINNED}")

    monkeypatch.setattr(local_images, "_run_docker", docker)
    with pytest.raises(BuildError, match=rf"image {PINNED} is not in the local Docker engine .*"
                                         rf"pull it by its digest first \(`docker pull {PINNED}`\)"):
        local_images.local_image_id(PINNED)
