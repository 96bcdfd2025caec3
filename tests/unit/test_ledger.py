"""The ledger: entries, the secret guard, parsing torn files, merging hosts, history, pruning, shell commands."""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from ingestctl import ledger
from ingestctl.errors import ConfigError
from ingestctl.hostvalues import HostValueError
from ingestctl.ledger import GateResult, LedgerEntry, Step

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
SECRETS = {"API_KEY": "key-0123456789abcdef0123", "JWT_SECRET": "jwt-" + "z9" * 20}
CFG1, CFG2 = "c0ffee000001", "c0ffee000002"


def eid(n: int) -> str:
    """Entry N's id, in the shape runs write it (pipeline.new_run_id, ledger.new_entry_id)."""
    return f"20240501T1200{n:02d}Z-00{n:04x}"


def image(release: str) -> str:
    """A stand-in image ID per release, in the shape docker reports it."""
    return "sha256:" + hashlib.sha256(release.encode()).hexdigest()


def entry(n: int, kind="deploy", release="v1", outcome="success", config=CFG1, **more) -> LedgerEntry:
    started = T0 + timedelta(minutes=10 * n)
    fields = {"image_id": image(release), "finished": started + timedelta(seconds=42), "duration_s": 42.0,
              **more}
    return LedgerEntry(id=eid(n), kind=kind, env="local", release=release, config_version=config,
                       who="ana@laptop", started=started, outcome=outcome, **fields)


def test_serialise_round_trip_is_one_compact_line():
    e = entry(1, steps=[Step(name="migrate", started=T0, duration_s=3.5)],
              gates=[GateResult(name="metrics", passed=False, numbers={"error_ratio": 0.2, "max": 0.01}, host="app2")],
              schema_head_before="0001", schema_head_after="0002", time_to_healthy_s=None)
    line = ledger.serialise(e, SECRETS)
    assert "\n" not in line and ": " not in line
    record = json.loads(line)
    assert record["gates"][0] == {"name": "metrics", "passed": False, "numbers": {"error_ratio": 0.2, "max": 0.01},
                                  "host": "app2"}
    assert "time_to_healthy_s" not in record  # None fields are left out
    assert ledger.parse(line + "\n").entries == [e]


@pytest.mark.parametrize("where", ["message", "step", "gate_number", "gate_key"])
def test_serialise_refuses_any_secret(where):
    secret = SECRETS["JWT_SECRET"]
    fields = {
        "message": {"message": f"jwt was {secret}"},
        "step": {"steps": [Step(name=secret, started=T0, duration_s=1)]},
        "gate_number": {"gates": [GateResult(name="bench", passed=True, numbers={"token": secret})]},
        "gate_key": {"gates": [GateResult(name="bench", passed=True, numbers={secret: 1})]},
    }[where]
    with pytest.raises(ConfigError) as err:
        ledger.serialise(entry(1, **fields), SECRETS)
    assert "contains the value of JWT_SECRET; refusing to write it" in str(err.value)
    assert secret not in str(err.value)


def test_secret_guard_ignores_empty_and_matches_short_values_exactly():
    ledger.assert_no_secret({"a": "x-value"}, {"EMPTY": "", "SHORT": "x"})
    with pytest.raises(ConfigError, match="field a contains the value of SHORT"):
        ledger.assert_no_secret({"a": "x"}, {"SHORT": "x"})


def test_parse_tolerates_a_torn_last_line_and_reports_bad_middle_lines():
    good1, good2 = (ledger.serialise(entry(n), {}) for n in (1, 2))
    parsed = ledger.parse(f"{good1}\n{{broken\n{good2}\n{good1[:40]}", source="app2")
    assert [e.id for e in parsed.entries] == [eid(1), eid(2)]
    assert [str(s) for s in parsed.skipped] == [
        "app2 line 2: not a ledger entry (Expecting property name enclosed in double quotes), ignored",
        "app2 line 4: torn last line (an interrupted write), ignored",
    ]
    assert [(s.source, s.line) for s in parsed.skipped] == [("app2", 2), ("app2", 4)]
    assert ledger.parse("").entries == [] and ledger.parse("\n\n").skipped == []


def test_later_line_with_same_id_supersedes():
    provisional = entry(1, outcome="aborted")
    final = entry(1, outcome="success")
    parsed = ledger.parse(ledger.serialise(provisional, {}) + "\n" + ledger.serialise(final, {}) + "\n")
    assert [(e.id, e.outcome) for e in parsed.entries] == [(eid(1), "success")]


def test_unknown_fields_from_newer_writers_are_ignored():
    record = json.loads(ledger.serialise(entry(1), {}))
    record["added_in_v9"] = {"x": 1}
    assert ledger.parse(json.dumps(record) + "\n").entries[0].id == eid(1)


# --- forged lines ------------------------------------------------------------------------------------

SOURCE = "app3:/var/lib/ingest/ledger.jsonl"
# What an attacker who can write one host's ledger would put in a field that reaches a shell.
FORGED = {
    "command substitution": "sha256:x$(touch /tmp/pwned)",
    "backticks": "v1`touch /tmp/pwned`",
    "semicolon": "v1; touch /tmp/pwned",
    "newline": "v1\ntouch /tmp/pwned",
    "single quote": "v1' ; touch /tmp/pwned; '",
    "double quote": 'v1" && touch /tmp/pwned "',
    "option": "-rf",
    "rich markup": "v1[/x]",
    "overlong": "a" * 5000,
}
FIELDS = [*ledger.HOST_VALUE_FIELDS, "hosts"]


def forged_line(field: str, value: str, n: int = 3) -> str:
    """Entry N, as a failed deploy, with FIELD set to VALUE: one line as an attacker would append it."""
    record = json.loads(ledger.serialise(entry(n, outcome="failed", previous_release="v0", previous_config_version=CFG2,
                                               schema_head_before="0001", schema_head_after="0001",
                                               release_schema_head="0002", hosts=["app2", "app3"],
                                               restore_point="/opt/ingest/backups/x-0001.dump"), {}))
    record[field] = [value] if field == "hosts" else value
    return json.dumps(record)


def test_forged_line_fixture_is_otherwise_valid():
    record = json.loads(forged_line("message", "ok"))
    assert set(FIELDS) <= set(record), "every checked field is present, so each test changes exactly one"
    assert ledger.parse(json.dumps(record) + "\n").skipped == []


@pytest.mark.parametrize("payload", FORGED.values(), ids=FORGED.keys())
@pytest.mark.parametrize("field", FIELDS)
def test_a_forged_value_in_any_field_skips_the_line_naming_host_and_line(field, payload):
    good1, good2 = (ledger.serialise(entry(n), {}) for n in (1, 2))
    parsed = ledger.parse(f"{good1}\n{forged_line(field, payload)}\n{good2}\n", source=SOURCE)
    assert [e.id for e in parsed.entries] == [eid(1), eid(2)]
    [skipped] = parsed.skipped
    assert (skipped.source, skipped.line) == (SOURCE, 2)
    text = str(skipped)
    assert text.startswith(f"{SOURCE} line 2: rejected ({field}") and text.endswith("), ignored")
    assert "expected" in text and "found" in text
    assert len(text) < 400, "a forged value is never echoed whole"
    assert "\n" not in text and "[/x]" not in text


@pytest.mark.parametrize("field", ["kind", "outcome", "started"])
def test_a_forged_value_in_a_typed_field_is_skipped_too(field):
    parsed = ledger.parse(forged_line(field, "$(touch /tmp/pwned)") + "\n", source=SOURCE)
    assert parsed.entries == []
    assert [str(s) for s in parsed.skipped] == [f"{SOURCE} line 1: not a ledger entry (1 invalid field(s)), ignored"]


def test_a_forged_line_cannot_supersede_a_genuine_entry_with_its_id():
    genuine = entry(1)
    forged = json.loads(ledger.serialise(entry(1, outcome="failed"), {}))
    forged["image_id"] = "sha256:x$(touch /tmp/pwned)"
    parsed = ledger.parse(ledger.serialise(genuine, {}) + "\n" + json.dumps(forged) + "\n", source=SOURCE)
    assert parsed.entries == [genuine]
    assert len(parsed.skipped) == 1


def test_serialise_refuses_a_value_not_in_its_shape():
    """A value that slipped in some other way is never written to any host's ledger."""
    with pytest.raises(HostValueError) as err:
        ledger.serialise(entry(1, image_id="sha256:x$(touch /tmp/pwned)"), {})
    assert str(err.value) == ("image_id: expected an image ID sha256:<64 lower-case hex>, "
                              "found 'sha256:x$(touch /tmp/pwned)'")
    assert isinstance(err.value, ConfigError)
    with pytest.raises(HostValueError, match=r"^hosts\[1\]: expected a host name"):
        ledger.serialise(entry(1, hosts=["app2", "app3;id"]), {})


def test_prune_lists_only_checked_image_ids_from_a_ledger_with_forged_lines():
    lines = [ledger.serialise(entry(n, release=f"v{n}"), {}) for n in range(1, 5)]
    lines.insert(2, forged_line("image_id", "sha256:x$(touch /tmp/pwned)", n=9))
    lines.insert(3, forged_line("release", "v1`id`", n=10))
    parsed = ledger.parse("\n".join(lines) + "\n", source=SOURCE)
    assert [s.line for s in parsed.skipped] == [3, 4]
    ids = [i for item in ledger.releases_to_prune(parsed.entries, keep=2) for i in item.image_ids]
    assert ids == [image("v1"), image("v2")]
    assert all(shlex.quote(i) == i for i in ids)


def test_merge_deduplicates_and_prefers_the_finished_copy():
    unfinished = entry(2).model_copy(update={"finished": None})
    merged = ledger.merge({"db1": [entry(1), entry(2)], "app2": [unfinished, entry(3)], "app3": []})
    assert [e.id for e in merged] == [eid(1), eid(2), eid(3)]
    assert merged[1].finished is not None


def test_history_rows_newest_first_with_durations():
    rows = ledger.history_rows([
        entry(1, release="v1", schema_head_before=None, schema_head_after="0001"),
        entry(2, release="v2", previous_release="v1", schema_head_before="0001", schema_head_after="0002",
              bench_skipped=True),
        entry(3, kind="rollback-app", release="v1", previous_release="v2", schema_head_before="0002",
              schema_head_after="0002", time_to_healthy_s=7.25, duration_s=300.0),
    ])
    assert rows[0] == ["2024-05-01 12:30:00Z", "rollback-app", "v2 -> v1", CFG1, "0002", "success",
                       "5.0m", "7.2s", "ana@laptop", eid(3)]
    assert rows[1][2] == "v1 -> v2" and rows[1][4] == "0001 -> 0002" and rows[1][5] == "success (bench skipped)"
    assert rows[2][4] == "empty -> 0001"
    assert len(rows[0]) == len(ledger.HISTORY_COLUMNS)


def test_release_stack_walks_back_through_rollbacks():
    entries = [entry(1, release="v1"), entry(2, release="v2"), entry(3, release="v3", outcome="rolled-back"),
               entry(4, release="v3"), entry(5, release="v3"),  # a no-op re-deploy pushes nothing
               entry(6, kind="rollback-app", release="v2")]
    assert [e.release for e in ledger.release_stack(entries)] == ["v1", "v2"]
    entries.append(entry(7, kind="rollback-app", release="v1"))
    assert [e.release for e in ledger.release_stack(entries)] == ["v1"]
    # Config changes do not move releases.
    entries.append(entry(8, kind="config-set", release="v1", config=CFG2))
    assert [e.release for e in ledger.release_stack(entries)] == ["v1"]
    assert [e.config_version for e in ledger.config_stack(entries)] == [CFG1, CFG2]


def test_releases_to_prune_keeps_the_most_recently_live():
    entries = [entry(n, release=f"v{n}") for n in range(1, 7)]
    entries.append(entry(7, release="v7", outcome="rolled-back"))  # never live: pruned
    prune = ledger.releases_to_prune(entries, keep=3)
    assert [p.release for p in prune] == ["v7", "v1", "v2", "v3"]
    assert prune[1].image_ids == (image("v1"),)
    # Rolling back to v2 makes it live again, so it is kept over v4.
    entries.append(entry(8, kind="rollback-app", release="v2"))
    assert [p.release for p in ledger.releases_to_prune(entries, keep=3)] == ["v7", "v1", "v3", "v4"]


def test_prune_never_lists_an_image_a_kept_release_uses():
    entries = [entry(1, release="v1"), entry(2, release="v1-retag").model_copy(update={"image_id": image("v1")}),
               entry(3, release="v2")]
    prune = ledger.releases_to_prune(entries, keep=2)
    assert [(p.release, p.image_ids) for p in prune] == [("v1", ())]
    with pytest.raises(ConfigError, match="keep_releases: expected an integer of at least 1, found 0"):
        ledger.releases_to_prune(entries, keep=0)


def test_new_entry_id_sorts_by_time():
    a, b = ledger.new_entry_id(T0), ledger.new_entry_id(T0 + timedelta(seconds=1))
    assert a.startswith("20240501T120000Z-") and a < b
    assert "@" in ledger.who_am_i()


def test_append_and_read_commands_exact():
    line = '{"id":"e1","message":"it\'s $HOME `x`"}'
    command = ledger.append_command(line, path="/var/lib/ingest/ledger.jsonl", wait_s=5)
    assert command == (
        "sh -c " + shlex.quote(ledger._APPEND_SCRIPT) + " ledger-append /var/lib/ingest/ledger.jsonl "
        + shlex.quote(line) + " 5"
    )
    assert ledger.read_command("/var/lib/ingest/ledger.jsonl") == (
        "if [ -f /var/lib/ingest/ledger.jsonl ]; then cat /var/lib/ingest/ledger.jsonl; fi"
    )
    with pytest.raises(ConfigError, match="single line"):
        ledger.append_command("a\nb")


def run(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=30, check=True)


def test_commands_work_in_a_real_shell(tmp_path):
    """The built strings run under /bin/sh as they will on a host, against a temporary path."""
    path = str(tmp_path / "var lib" / "ledger.jsonl")
    assert run(ledger.read_command(path)).stdout == ""
    lines = [ledger.serialise(entry(n, message=f"quote ' \" $PATH `id` {n}"), {}) for n in (1, 2)]
    for line in lines:
        run(ledger.append_command(line, path))
    assert run(ledger.read_command(path)).stdout == lines[0] + "\n" + lines[1] + "\n"
    # A torn write (no final newline) stays on its own line; the next entry is readable.
    with open(path, "a") as handle:
        handle.write(lines[0][:30])
    third = ledger.serialise(entry(3), {})
    run(ledger.append_command(third, path))
    parsed = ledger.parse(run(ledger.read_command(path)).stdout)
    assert [e.id for e in parsed.entries] == [eid(1), eid(2), eid(3)]
    assert len(parsed.skipped) == 1 and str(parsed.skipped[0]).startswith("ledger line 3: not a ledger entry")


def test_a_journal_line_is_replaced_by_the_runs_final_line():
    running = entry(1, outcome="running").model_copy(update={"finished": None})
    final = entry(1, outcome="success")
    assert ledger.merge({"db1": [running], "app2": [final]}) == [final]
    parsed = ledger.parse(ledger.serialise(running, {}) + "\n" + ledger.serialise(final, {}) + "\n")
    assert [e.outcome for e in parsed.entries] == ["success"]


def test_a_run_that_never_finished_and_holds_no_lock_is_interrupted_with_the_hosts_on_its_release():
    running = entry(2, release="v2", outcome="running").model_copy(update={"finished": None})
    still = entry(3, release="v3", outcome="running").model_copy(update={"finished": None})
    marked = ledger.mark_interrupted([entry(1), running, still], live_run_ids={still.id},
                                     live_on={"v2": ["app2"], "v1": ["app3", "db1"]})
    assert [e.outcome for e in marked] == ["success", "interrupted", "running"]
    assert marked[1].hosts == ["app2"] and "app2" in marked[1].message
    row = ledger.history_rows(marked)[1]
    assert row[5] == "interrupted on app2"


def cfg(n: int) -> str:
    return f"c0ffee{n:06d}"


def test_configs_to_prune_keeps_the_most_recently_live_and_drops_never_live_ones():
    entries = [entry(n, release="v1", config=cfg(n)) for n in range(1, 6)]
    entries.append(entry(6, kind="config-set", release="v1", config=cfg(6), outcome="rolled-back"))  # never live
    assert ledger.configs_to_prune(entries, keep=2) == [cfg(1), cfg(2), cfg(3), cfg(6)]
    # `rollback config` to cfg(2) makes it live again: kept, and cfg(4) goes instead.
    entries.append(entry(7, kind="rollback-config", release="v1", config=cfg(2)))
    assert ledger.configs_to_prune(entries, keep=2) == [cfg(1), cfg(3), cfg(4), cfg(6)]
    with pytest.raises(ConfigError, match="keep_releases: expected an integer of at least 1, found 0"):
        ledger.configs_to_prune(entries, keep=0)


def test_a_live_rotation_is_one_config_set_has_made_since_the_last_deploy():
    deploy = entry(1, config=cfg(1))
    rotate = entry(2, kind="config-set", config=cfg(2), rotated_secrets=["API_KEY"])
    tune = entry(3, kind="config-set", config=cfg(3))
    assert ledger.live_rotations([deploy, rotate, tune]) == {"API_KEY": rotate}
    # Undone by `rollback config` back past it: nothing rotated is live any more.
    assert ledger.live_rotations([deploy, rotate, tune, entry(4, kind="rollback-config", config=cfg(1))]) == {}
    # A deploy with a new config after it made its config from the secrets it was given.
    assert ledger.live_rotations([deploy, rotate, entry(5, config=cfg(5))]) == {}
    # A rotation that failed never went live.
    failed = entry(6, kind="config-set", config=cfg(6), outcome="rolled-back", rotated_secrets=["JWT_SECRET"])
    assert ledger.live_rotations([deploy, failed]) == {}


def test_a_forged_rotated_secret_name_skips_the_line():
    record = json.loads(forged_line("message", "ok"))
    record["rotated_secrets"] = ["API_KEY; touch /tmp/pwned"]
    parsed = ledger.parse(json.dumps(record) + "\n", source=SOURCE)
    assert parsed.entries == [] and len(parsed.skipped) == 1


def test_the_same_line_on_every_host_is_validated_once_and_a_forged_one_is_still_set_aside_everywhere():
    from ingestctl.ledger import read_line

    line = ledger.serialise(entry(41, release="v1"), {})
    forged = forged_line("release", "v1; rm -rf /", n=42)
    before = read_line.cache_info()
    parsed = [ledger.parse(f"{line}\n{forged}\n", source=f"app{n}") for n in range(3)]
    after = read_line.cache_info()
    assert [p.entries[0].release for p in parsed] == ["v1"] * 3
    assert after.misses - before.misses <= 2 and after.hits - before.hits >= 4, (before, after)
    assert [[s.reason.startswith("rejected") for s in p.skipped] for p in parsed] == [[True]] * 3
