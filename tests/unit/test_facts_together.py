"""Several facts in one round trip (facts.together), run by a real shell: each fact's own command and process,
the nonce fence against host output, and the fall back to reading a fact on its own when its part fails."""

from __future__ import annotations

import subprocess

import pytest
from ingestctl.facts import together
from ingestctl.facts.release import FileDigests, IngestState
from ingestctl.facts.together import HostFacts, fact_key, split_parts, together_command
from pyinfra.api import FactBase
from pyinfra.api.exceptions import FactProcessError


class Printed(FactBase):
    """Prints TEXT (to stand for a host's file) and keeps its lines."""

    def command(self, text: str) -> str:
        return f"printf '%s\\n' '{text}'"

    def process(self, output):
        return list(output)


class Fails(FactBase):
    def command(self) -> str:
        return "echo partial; exit 3"

    def process(self, output):
        return output


class ShellHost:
    """Runs a raw command in a real `sh`, as the host's shell would; counts the round trips; a fact read on its
    own comes from ALONE (what pyinfra would have read)."""

    def __init__(self, alone=None, name="app2"):
        self.rounds = 0
        self.alone = alone or {}
        self.name = name

    def get_fact(self, cls, **kwargs):
        self.rounds += 1
        if cls.__name__ == "_RawLines":
            out = subprocess.run(["sh", "-c", kwargs["command"]], capture_output=True, text=True, check=False).stdout
            return out.splitlines() or None
        return self.alone[cls.__name__]


def test_facts_read_together_take_one_round_and_each_is_its_own_facts_processing(tmp_path):
    present = tmp_path / "present"
    present.write_text("x")
    host = ShellHost()
    facts = HostFacts(host).read_together((FileDigests, {"paths": [str(present), str(tmp_path / "absent")]}),
                                          (Printed, {"text": "a b"}))
    assert host.rounds == 1
    digests = facts.get(FileDigests, paths=[str(present), str(tmp_path / "absent")])
    assert digests[str(tmp_path / "absent")] is None
    assert digests[str(present)] == "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
    assert facts.get(Printed, text="a b") == ["a b"]
    assert host.rounds == 1


def test_an_empty_part_gives_the_facts_default():
    facts = HostFacts(ShellHost()).read_together((Printed, {"text": ""}), IngestState)
    # printf of '' prints one empty line; state.json absent prints nothing: IngestState's default, None.
    assert facts.get(IngestState) is None


def test_a_fact_not_read_together_is_read_on_its_own():
    host = ShellHost(alone={"IngestState": {"release": "v1"}})
    facts = HostFacts(host).read_together((Printed, {"text": "x"}))
    assert facts.get(IngestState) == {"release": "v1"}
    assert host.rounds == 2


def test_a_failed_part_makes_every_fact_read_on_its_own_with_its_own_error():
    host = ShellHost(alone={"Printed": ["alone"], "Fails": "its own error"})
    facts = HostFacts(host).read_together((Printed, {"text": "x"}), Fails)
    assert facts.get(Printed, text="x") == ["alone"]
    assert facts.get(Fails) == "its own error"


def test_a_host_file_that_prints_a_marker_cannot_end_a_part_early():
    """A state.json (or any file a host returns) holding a line like the fence of another read: the nonce of
    this read is new, so the line is only content."""
    nonce = "--ingestctl-0123456789abcdef--"
    forged = "--ingestctl-aaaaaaaaaaaaaaaa-- 0 0"
    lines = subprocess.run(["sh", "-c", together_command([(Printed, (("text", forged),))], nonce)],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert split_parts(lines, 1, nonce) == [[forged]]


@pytest.mark.parametrize("lines, why", [
    (["stray"], "output outside any part"),
    (["N 0", "a"], "expected 1 parts, found 0"),
    (["N 0", "a", "N 0 1"], "part 0 exited 1"),
    (["N 1", "a", "N 1 0"], "unexpected marker"),
    (["N 0", "N 0 0", "N 0", "N 0 0"], "unexpected marker"),
])
def test_malformed_output_is_refused_naming_what_is_wrong(lines, why):
    with pytest.raises(FactProcessError, match=why):
        split_parts(lines, 1, "N")


def test_a_part_that_does_not_process_is_read_on_its_own():
    class Unprocessable(Printed):
        def process(self, output):
            raise FactProcessError("not in the shape ingestctl writes")

    host = ShellHost(alone={"Unprocessable": "pyinfra's answer after reporting it"})
    facts = HostFacts(host).read_together((Unprocessable, {"text": "x"}), (Printed, {"text": "y"}))
    assert facts.get(Printed, text="y") == ["y"]
    assert facts.get(Unprocessable, text="x") == "pyinfra's answer after reporting it"


def test_facts_handed_over_are_taken_once_instead_of_read_and_the_rest_read_together():
    """A warm rollback hands its switch the facts the lock's round read: the switch's read takes them (no round
    when it wants nothing else), once; the next read on that host reads afresh."""
    host = ShellHost()
    together.hand_over("app2", {fact_key(Printed, {"text": "a"}): ["handed"]})
    try:
        facts = HostFacts(host).read_together((Printed, {"text": "a"}), (Printed, {"text": "b"}))
        assert facts.get(Printed, text="a") == ["handed"] and facts.get(Printed, text="b") == ["b"]
        assert host.rounds == 1
        again = HostFacts(host).read_together((Printed, {"text": "a"}))
        assert again.get(Printed, text="a") == ["a"], "taken once: the next read reads the host"
        together.hand_over("app2", {fact_key(Printed, {"text": "a"}): ["handed"]})
        HostFacts(host).read_together((Printed, {"text": "a"}))
        assert host.rounds == 2, "every fact wanted was handed over: no round trip"
        together.hand_over("app2", {fact_key(Printed, {"text": "a"}): ["handed"]})
        together.forget_handed()
        assert HostFacts(host).read_together((Printed, {"text": "a"})).get(Printed, text="a") == ["a"]
    finally:
        together.forget_handed()


def test_facts_handed_to_one_host_are_not_taken_by_another():
    together.hand_over("db1", {fact_key(Printed, {"text": "a"}): ["handed"]})
    try:
        assert HostFacts(ShellHost(name="app3")).read_together((Printed, {"text": "a"})).get(Printed, text="a") == ["a"]
    finally:
        together.forget_handed()


class Meets(FactBase):
    """Runs long: leaves its own mark in DIR, then waits up to 2 s for OTHER's; prints whether it saw it."""

    runs_long = True

    def command(self, folder: str, mine: str, other: str) -> str:
        return (f"touch {folder}/{mine}; for i in $(seq 1 100); do [ -e {folder}/{other} ] && echo met && exit 0; "
                "sleep 0.02; done; echo alone")

    def process(self, output):
        return output[0]


def test_long_parts_run_in_the_background_beside_each_other_and_the_rest(tmp_path):
    """Two parts that run long can see each other's mark only if they run at once; the others print in between,
    every part in its own fence, whatever order they were asked in."""
    host = ShellHost()
    a = (Meets, {"folder": str(tmp_path), "mine": "a", "other": "b"})
    b = (Meets, {"folder": str(tmp_path), "mine": "b", "other": "a"})
    facts = HostFacts(host).read_together(a, (Printed, {"text": "quick"}), b)
    assert host.rounds == 1
    assert facts.get(Meets, **a[1]) == facts.get(Meets, **b[1]) == "met"
    assert facts.get(Printed, text="quick") == ["quick"]


def test_a_long_part_that_fails_is_read_on_its_own_like_any_other():
    class FailsLong(Fails):
        runs_long = True

    host = ShellHost(alone={"FailsLong": "read alone"})
    facts = HostFacts(host).read_together(FailsLong, (Printed, {"text": "x"}))
    assert facts.get(FailsLong) == "read alone"
    assert host.rounds == 2


def test_a_fact_wanted_twice_is_read_once():
    host = ShellHost()
    read = together.TogetherRead.of((Printed, {"text": "a"}), IngestState, (Printed, {"text": "a"}))
    assert read.keys == (fact_key(Printed, {"text": "a"}), fact_key(IngestState, {}))
    facts = HostFacts(host).read_together((Printed, {"text": "a"}), (Printed, {"text": "a"}))
    assert facts.get(Printed, text="a") == ["a"]
    assert host.rounds == 1
