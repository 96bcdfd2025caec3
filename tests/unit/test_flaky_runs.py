"""The flakiness report: failures read from real pytest JUnit reports, merged across runs."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("flaky_runs", ROOT / "scripts" / "flaky_runs.py")
flaky_runs = importlib.util.module_from_spec(spec)
sys.modules["flaky_runs"] = flaky_runs  # dataclasses look their module up there
spec.loader.exec_module(flaky_runs)


def junit_of(tmp_path: Path, body: str) -> Path:
    """Run a real pytest on a tiny test file and return its JUnit report."""
    (tmp_path / "test_sample.py").write_text(body)
    report = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                    str(tmp_path / "test_sample.py")], cwd=tmp_path, capture_output=True, check=False)
    return report


def test_failures_and_errors_are_read_with_their_first_line(tmp_path):
    report = junit_of(tmp_path, "import pytest\n\n"
                      "def test_ok():\n    pass\n\n"
                      "def test_bad():\n    assert 1 == 2, 'one is not two'\n\n"
                      "@pytest.fixture\ndef broken():\n    raise RuntimeError('fixture broke')\n\n"
                      "def test_error(broken):\n    pass\n")
    tests, failures = flaky_runs.failures_from_junit(report)
    assert tests == 3
    assert set(failures) == {"test_sample::test_bad", "test_sample::test_error"}
    assert "one is not two" in failures["test_sample::test_bad"]


def test_a_test_that_failed_once_is_reported_with_the_run_it_failed_in():
    outcomes = [flaky_runs.RunOutcome(1, 0, 10.0, 5, {}),
                flaky_runs.RunOutcome(2, 1, 11.0, 5, {"m::test_x": "AssertionError: boom"})]
    text = flaky_runs.render(outcomes)
    assert "FAILED in 1 of 2 run(s): m::test_x" in text
    assert "run 2: AssertionError: boom" in text


def test_no_failure_says_so():
    assert "no test failed in 2 run(s)" in flaky_runs.render([flaky_runs.RunOutcome(1, 0, 1.0, 1),
                                                               flaky_runs.RunOutcome(2, 0, 1.0, 1)])
