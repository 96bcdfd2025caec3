"""Every command ends with an exit code from the contract and, in --json mode, a final line CI can parse."""

import json

import click
from click.testing import CliRunner
from ingestctl.clikit import json_option, reporting
from ingestctl.errors import GateFailed


def command_raising(exc: BaseException) -> click.Command:
    @click.command()
    @json_option
    @reporting
    def cmd(reporter):
        raise exc

    return cmd


def last_json_line(output: str) -> dict:
    return json.loads([line for line in output.splitlines() if line.startswith("{")][-1])


def test_an_unexpected_exception_exits_1_with_a_final_error_line():
    result = CliRunner().invoke(command_raising(KeyError("slot")), ["--json"])
    assert result.exit_code == 1
    last = last_json_line(result.stdout)
    assert last["type"] == "error" and last["exit_code"] == 1 and "KeyError" in last["message"]


def test_a_known_error_keeps_its_exit_code_and_ends_with_a_summary():
    result = CliRunner().invoke(command_raising(GateFailed("health gate failed")), ["--json"])
    assert result.exit_code == 3
    assert last_json_line(result.stdout) == {**last_json_line(result.stdout), "type": "summary",
                                              "outcome": "rolled-back", "exit_code": 3}


def test_usage_errors_stay_click_usage_errors():
    result = CliRunner().invoke(command_raising(click.BadParameter("expected seconds")), [])
    assert result.exit_code == 2 and "expected seconds" in result.output
