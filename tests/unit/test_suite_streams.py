"""How the suite is spread over two pytest-xdist workers (tests/suite_streams.py)."""

from __future__ import annotations

# tests/ is on sys.path: pytest puts the directory of tests/conftest.py there (no __init__.py above it).
from suite_streams import SANDBOX_STREAM, SECOND_STREAM, rank, stream_of

NODEIDS = [
    "tests/e2e/test_bad_releases.py::test_a",
    "tests/e2e/test_bare_hosts.py::test_b",
    "tests/e2e/test_deploy.py::test_c[x]",
    "tests/service/test_api.py::test_d",
    "tests/unit/test_plan.py::TestX::test_e",
    "tests/e2e/test_zero_downtime.py::test_f",
    "tests/e2e/test_slo.py::test_g",
    "tests/e2e/test_security.py::test_h",
]


def test_every_sandbox_sharing_e2e_file_is_in_one_of_two_units():
    assert {stream_of(n) for n in NODEIDS[:6] if "bare" not in n and "/e2e/" in n} == {SANDBOX_STREAM}
    assert {stream_of(n) for n in NODEIDS[6:]} == {SECOND_STREAM}


def test_a_file_with_a_sandbox_of_its_own_and_every_other_file_is_its_own_unit():
    assert stream_of(NODEIDS[1]) == "tests/e2e/test_bare_hosts.py"
    assert stream_of(NODEIDS[4]) == "tests/unit/test_plan.py"


def test_the_main_stream_comes_first_in_file_order_then_the_rest_then_own_sandboxes_then_the_second_stream():
    ordered = sorted(NODEIDS, key=rank)
    assert ordered == [NODEIDS[0], NODEIDS[2], NODEIDS[5], NODEIDS[3], NODEIDS[4], NODEIDS[1], NODEIDS[6],
                       NODEIDS[7]]
