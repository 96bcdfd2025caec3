"""images_loaded decides from one listing of the host's tagged images (TaggedImages), and the fact's parsing."""

from __future__ import annotations

import pytest
from ingestctl.facts.docker import TaggedImages, tagged
from ingestctl.operations import images as ops
from pyinfra.api.exceptions import FactProcessError

APP = "sha256:" + "a" * 64
PROXY = "sha256:" + "b" * 64


class Host:
    def __init__(self, tagged_images: dict[str, str], by_reference: dict[str, str] | None = None):
        self.tagged_images, self.by_reference = tagged_images, by_reference or {}
        self.name, self.reads, self.noops = "app2", [], []

    def get_fact(self, fact, **kwargs):
        self.reads.append(fact.__name__)
        if fact is TaggedImages:
            return self.tagged_images
        if fact.__name__ == "DockerImage":
            return self.by_reference.get(kwargs["image"])
        raise AssertionError(f"unexpected fact {fact.__name__}")

    def noop(self, message: str) -> None:
        self.noops.append(message)


def run(monkeypatch, host: Host, images) -> list[str]:
    monkeypatch.setattr(ops, "host", host)
    return [str(command) for command in ops.images_loaded._inner(images=images)]


def test_images_already_tagged_are_a_noop_from_one_listing(monkeypatch) -> None:
    host = Host({"ingest:v2": APP, "ingest-proxy:1": PROXY, "ingest:v1": APP})
    assert run(monkeypatch, host, [("ingest:v2", APP), ("ingest-proxy:1", PROXY)]) == []
    assert host.reads == ["TaggedImages"]  # one docker CLI start, where a DockerImage per image is one each
    assert len(host.noops) == 2


def test_a_re_versioned_image_is_only_tagged(monkeypatch) -> None:
    host = Host({"ingest:v1": APP}, by_reference={APP: APP})
    commands = run(monkeypatch, host, [("ingest:v2", APP)])
    assert any("docker tag" in c and "ingest:v2" in c for c in commands), commands
    assert not host.noops


def test_a_tag_pointing_at_another_image_is_not_taken_for_the_wanted_one(monkeypatch) -> None:
    host = Host({"ingest:v2": PROXY}, by_reference={APP: APP})
    commands = run(monkeypatch, host, [("ingest:v2", APP)])
    assert any("ingest:v2" in c for c in commands) and not host.noops


def test_a_digest_reference_is_looked_up_by_itself(monkeypatch) -> None:
    reference = "registry.example/ingest@sha256:" + "c" * 64
    host = Host({}, by_reference={reference: APP})
    assert run(monkeypatch, host, [(reference, APP)]) == []
    assert host.reads == ["DockerImage"]


@pytest.mark.parametrize(("reference", "listed"), [
    ("ingest:v2", "ingest:v2"),
    ("ingest", "ingest:latest"),
    ("registry.example:5000/team/ingest", "registry.example:5000/team/ingest:latest"),
    ("registry.example:5000/team/ingest:1.4", "registry.example:5000/team/ingest:1.4"),
    ("ingest@sha256:" + "d" * 64, None),
])
def test_tagged_names_a_reference_as_docker_images_lists_it(reference, listed) -> None:
    assert tagged(reference) == listed


def test_the_listing_skips_untagged_images_and_keeps_the_rest() -> None:
    output = [f"ingest:v2 {APP}", f"<none>:<none> {PROXY}", f"ingest-proxy:1 {PROXY}", ""]
    assert TaggedImages().process(output) == {"ingest:v2": APP, "ingest-proxy:1": PROXY}


def test_a_forged_listing_line_fails_the_fact_naming_what_it_found() -> None:
    with pytest.raises(FactProcessError, match="expected 'name:tag sha256"):
        TaggedImages().process(["ingest:v2 sha256:not-hex; rm -rf /"])


def test_the_command_fails_when_the_engine_does_not_answer() -> None:
    # No `|| true`: a dead engine fails the fact (and the host) instead of reading as "no images".
    assert "||" not in TaggedImages().command() and "docker images" in TaggedImages().command()
