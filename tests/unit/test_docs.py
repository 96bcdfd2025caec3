"""The operator docs cannot rot: RUNBOOK.md keeps the seed runbook's structure and Korean text, every
`ingestctl` command in the docs and the example CI pipelines parses against the real click CLI, and the
example pipelines are valid YAML that branch on the contract's exit codes.

Commands are read from fenced ```sh blocks (one command per line, `\\` continuations joined) and from the
`run:`/`script:` strings of the example pipelines. They are resolved through the click group and parsed
with `make_context`, strictly, so an unknown subcommand, option or a missing argument fails the test with
the command's text. The end-to-end test that *runs* the runbook on the sandbox lives in tests/e2e.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import click
import pytest
import yaml
from ingestctl import cli
from ingestctl import config as config_mod

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = ROOT / "docs" / "RUNBOOK.md"
DEPLOYING = ROOT / "docs" / "DEPLOYING.md"
EXAMPLES = ROOT / "docs" / "examples"
PIPELINES = (EXAMPLES / "github-actions-deploy.yml", EXAMPLES / "gitlab-ci.yml")

# The seed runbook the project was created from (DESIGN.md: ../shared/seed/ beside the checkout). Its text is
# kept here too, so the check runs where the seed is not checked out (CI); when the file is there, its lines
# are required as well, so a newer seed is caught.
SEED_CANDIDATES = (
    os.environ.get("INGEST_SEED_RUNBOOK", ""),
    str(ROOT.parent / "shared" / "seed" / "operations-runbook.md"),
)
SEED_TEXT = """\
# Operations Runbook
## Objectives
- Reduce mean time to detect (MTTD)
- Reduce mean time to recover (MTTR)
- Keep production changes within SLO/error budget policy
## Severity Levels
- SEV-1: complete outage or critical data integrity risk
- SEV-2: major degradation affecting key workflows
- SEV-3: partial degradation with workaround
## Incident Response Checklist
1. Triage
- Confirm impact scope (`/api/*`, specific endpoints, auth, DB, Redis)
- Capture start time and affected versions
2. Stabilize
- If active rollout: pause or rollback deploy
- If dependency issue: switch to degrade mode as documented
- Protect database from overload (throttle or temporarily reduce write pressure)
- For ingest surge: temporarily lower `INGEST_MAX_BATCH_ITEMS` and `MAX_REQUEST_BODY_BYTES` via config rollout
3. Diagnose
- Check health endpoints (`/health/live`, `/health/ready`)
- Check metrics (request error ratio, p95 latency, request volume)
- Check logs using `X-Request-Id`
4. Recover
- Apply fix or rollback
- Verify readiness/liveness and key API paths
- Confirm alerts resolved and traffic normalized
5. Post-Incident
- Write incident report (timeline, root cause, preventive actions)
- Update SLO/error budget status and backlog priorities
- If incident is release-impacting, summarize externally visible changes in `docs/CHANGELOG.md` `Unreleased` section.
## Incident Scenario Templates
모든 시나리오는 아래 공통 필수 항목을 같은 순서로 기록합니다.
- 영향 (Impact): 사용자/엔드포인트/시간대 영향 범위
- 원인 (Cause): 추정 원인과 확정 원인 구분
- 임시조치 (Mitigation): 즉시 완화 조치 및 리스크
- 복구검증 (Recovery Validation): 복구 확인 지표와 확인 시각
### DB 장애 템플릿
- 영향:
- 원인:
- 임시조치:
- 복구검증:
- 후속조치:
### Redis/rate_limit_backend 장애 템플릿
- 영향:
- 원인:
- 임시조치:
- 복구검증:
- 후속조치:
### 배포/릴리스 장애 템플릿
- 영향:
- 원인:
- 임시조치:
- 복구검증:
- 롤백/재배포 기록:
### 과부하(트래픽 급증) 템플릿
- 영향:
- 원인:
- 임시조치:
- 복구검증:
- 용량/성능 후속조치:
## SEV Report Format
- SEV-1 보고:
  - 현재 영향 범위, 고객 영향, 우회 불가 여부
  - 15분 간격 업데이트, 임시조치 ETA, 최종 복구 ETA
- SEV-2 보고:
  - 주요 기능 영향 범위, 우회 가능 여부
  - 30분 간격 업데이트, 완화/복구 ETA
- SEV-3 보고:
  - 부분 영향 범위, 임시 우회 경로
  - 60분 간격 업데이트, 영구 조치 일정
## Rollback Strategy
- Application rollback:
  - Redeploy previous known-good image/tag
- Schema rollback:
  - Only if migration is explicitly reversible and data-safe
  - `python -m alembic downgrade -1`
- Configuration rollback:
  - Revert environment variable changes first when issue is config-induced
## Operational Checks
공통 품질/정책 검증은 `docs/QUALITY_GATES.md`를 기준으로 실행합니다.
Runtime checks:
- `python scripts/check_runtime_health.py --base-url http://localhost:8000`
- 장애/강등 모드 점검 시 readiness 503 허용:
  - `python scripts/check_runtime_health.py --base-url http://localhost:8000 --allow-ready-degraded`
- Verify oversized payload guard:
  - confirm `413 PAYLOAD_TOO_LARGE` is returned for request size violations
  - confirm batch ingest limit blocks oversized list payloads
Production compose baseline:
- `docker compose -f docker-compose.prod.yml up -d --build`
- required secrets/env:
  - `POSTGRES_PASSWORD`
  - `API_KEY`
  - `JWT_SECRET` (minimum 32 bytes)
Performance regression:
- `BENCH_PROFILE=staging BENCH_FAIL_THRESHOLD_MS=250 BENCH_FAIL_P95_THRESHOLD_MS=400 python scripts/benchmark_queries.py`
"""

HANGUL = re.compile(r"[\uac00-\ud7a3]")


# --- reading markdown -------------------------------------------------------------------------------------


def seed_texts() -> list[str]:
    texts = [SEED_TEXT]
    for candidate in SEED_CANDIDATES:
        if candidate and Path(candidate).is_file():
            texts.append(Path(candidate).read_text(encoding="utf-8"))
    return texts


def normalised(line: str) -> str:
    """A line without indentation or heading markers: `### 1. Triage` and `1. Triage` are the same text."""
    return re.sub(r"^#+\s+", "", line.strip())


def headings(text: str) -> list[tuple[int, str]]:
    found, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"^(#+)\s+(.*\S)\s*$", line)):
            found.append((len(match.group(1)), match.group(2)))
    return found


def section(text: str, title: str) -> str:
    """The body under heading TITLE, up to the next heading of the same or a higher level."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        match = re.match(r"^(#+)\s+(.*\S)\s*$", line)
        if match and match.group(2) == title:
            level = len(match.group(1))
            body = []
            for following in lines[index + 1:]:
                nxt = re.match(r"^(#+)\s", following)
                if nxt and len(nxt.group(1)) <= level:
                    break
                body.append(following)
            return "\n".join(body)
    raise AssertionError(f"{RUNBOOK.name}: expected a heading {title!r}, found none")


def sh_blocks(text: str) -> Iterator[str]:
    for match in re.finditer(r"^```sh\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        yield match.group(1)


def command_lines(block: str) -> Iterator[str]:
    """Each command line of a block: continuations joined, blank lines and comments left out."""
    pending = ""
    for raw in block.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line and not line.startswith("#"):
            yield line


# --- finding ingestctl invocations in shell text ---------------------------------------------------------

OPERATORS = {"|", "||", "&&", ";", "&", "(", ")", "|&"}
REDIRECTS = re.compile(r"^[<>&]+$")


def simple_commands(line: str) -> Iterator[list[str]]:
    """The simple commands of one shell line (pipelines, lists and `$( ... )` split apart, redirections
    and leading VAR=value assignments dropped), each as its words."""
    # `2>&1`, `2> file`: the descriptor number glued to a redirection is part of it, not an argument.
    line = re.sub(r"(?<=\s)\d+(?=[<>])", " ", line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words: list[str] = []
    skip_next = False
    for token in lexer:
        if skip_next:
            skip_next = False
            continue
        if token in OPERATORS:
            if words:
                yield words
            words = []
        elif REDIRECTS.match(token):
            skip_next = True  # the target (a file, or the `1` of `>&1`) is not an argument
        else:
            words.append(token)
    if words:
        yield words


def without_assignments(words: list[str]) -> list[str]:
    index = 0
    while index < len(words) and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[index]):
        index += 1
    if index < len(words) and words[index] == "export":
        return []
    return words[index:]


@dataclass(frozen=True)
class Invocation:
    source: str
    line: str
    args: tuple[str, ...]  # after `ingestctl`

    @property
    def text(self) -> str:
        return "ingestctl " + " ".join(self.args)


def invocations_in(line: str, source: str) -> Iterator[Invocation]:
    for words in simple_commands(line):
        words = without_assignments(words)
        if words and (words[0] == "ingestctl" or words[0].endswith("/ingestctl")):
            yield Invocation(source, line, tuple(words[1:]))


def doc_invocations(path: Path) -> list[Invocation]:
    found = []
    for block in sh_blocks(path.read_text(encoding="utf-8")):
        for line in command_lines(block):
            found += invocations_in(line, path.name)
    return found


def pipeline_scripts(node) -> Iterator[str]:
    """Every `run:` (GitHub) and `script:`/`before_script:` (GitLab) string of a pipeline file."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "run" and isinstance(value, str):
                yield value
            elif key in ("script", "before_script", "after_script"):
                yield from (value if isinstance(value, list) else [value])
            else:
                yield from pipeline_scripts(value)
    elif isinstance(node, list):
        for item in node:
            yield from pipeline_scripts(item)


def pipeline_invocations(path: Path) -> list[Invocation]:
    found = []
    for script in pipeline_scripts(yaml.safe_load(path.read_text(encoding="utf-8"))):
        for line in command_lines(script):
            found += invocations_in(line, path.name)
    return found


def unique(invocations: list[Invocation]) -> list[Invocation]:
    """One test per distinct command per file: a command the runbook repeats is checked once."""
    return list({(inv.source, inv.args): inv for inv in invocations}.values())


ALL_INVOCATIONS = unique(doc_invocations(RUNBOOK) + doc_invocations(DEPLOYING) + [
    invocation for path in PIPELINES for invocation in pipeline_invocations(path)
])


# --- resolving a command against the click CLI ------------------------------------------------------------


def parse_with_cli(args: tuple[str, ...]) -> click.Context:
    """The leaf command's context, parsed strictly. AssertionError naming the command when it does not parse."""
    text = "ingestctl " + " ".join(args)
    group: click.Command = cli.main
    parent = click.Context(cli.main, info_name="ingestctl")
    rest = list(args)
    path = ["ingestctl"]
    while isinstance(group, click.Group):
        if not rest or rest[0].startswith("-"):
            raise AssertionError(f"`{text}`: `{' '.join(path)}` needs a subcommand; it has: "
                                 f"{', '.join(group.list_commands(parent))}")
        name = rest.pop(0)
        sub = group.get_command(parent, name)
        if sub is None:
            raise AssertionError(f"`{text}`: the CLI has no command `{' '.join([*path, name])}`; "
                                 f"`{' '.join(path)}` has: {', '.join(group.list_commands(parent))}")
        path.append(name)
        if isinstance(sub, click.Group):
            parent = click.Context(sub, info_name=name, parent=parent)
        group = sub
    try:
        return group.make_context(path[-1], rest, parent=parent)
    except click.ClickException as exc:
        raise AssertionError(f"`{text}`: does not parse as `{' '.join(path)}`: {exc.format_message()}") from None


# --- 1. the runbook keeps the seed ------------------------------------------------------------------------


def test_runbook_contains_every_line_of_the_seed():
    runbook_lines = {normalised(line) for line in RUNBOOK.read_text(encoding="utf-8").splitlines()}
    missing = sorted({normalised(line) for text in seed_texts() for line in text.splitlines()
                      if line.strip() and normalised(line) not in runbook_lines})
    assert not missing, "docs/RUNBOOK.md lost these lines of the seed runbook:\n  " + "\n  ".join(missing)


def test_runbook_keeps_the_seed_sections_in_order():
    runbook = [title for _level, title in headings(RUNBOOK.read_text(encoding="utf-8"))]
    for text in seed_texts():
        wanted = [title for level, title in headings(text) if level > 1]
        positions = []
        for title in wanted:
            assert title in runbook, f"docs/RUNBOOK.md: expected the seed's section heading {title!r}, found none"
            positions.append(runbook.index(title))
        assert positions == sorted(positions), (
            f"docs/RUNBOOK.md: expected the seed's sections in the seed's order {wanted}, "
            f"found them in the order {[runbook[p] for p in sorted(positions)]}"
        )


def test_runbook_keeps_every_korean_heading_and_label():
    runbook = RUNBOOK.read_text(encoding="utf-8")
    korean = {normalised(line) for text in seed_texts() for line in text.splitlines() if HANGUL.search(line)}
    assert len(korean) >= 20, f"expected the seed's Korean lines, found only {len(korean)}: the seed text is broken"
    runbook_lines = {normalised(line) for line in runbook.splitlines()}
    assert not sorted(korean - runbook_lines), f"missing Korean text: {sorted(korean - runbook_lines)}"
    for title in [t for level, t in headings(SEED_TEXT) if level == 3]:
        labels = [line.strip() for line in section(SEED_TEXT, title).splitlines() if line.strip()]
        body = [line.strip() for line in section(runbook, title).splitlines()]
        found = [line for line in body if line in labels]
        assert found == labels, f"{title}: expected the template items {labels} in this order, found {found}"


def test_every_scenario_template_and_checklist_step_has_commands():
    runbook = RUNBOOK.read_text(encoding="utf-8")
    titles = [t for level, t in headings(SEED_TEXT) if level == 3]
    titles += [f"{n}. {step}" for n, step in enumerate(["Triage", "Stabilize", "Diagnose", "Recover",
                                                         "Post-Incident"], start=1)]
    for title in titles:
        commands = [line for block in sh_blocks(section(runbook, title)) for line in command_lines(block)]
        assert commands, f"docs/RUNBOOK.md section {title!r}: expected a ```sh block with its commands, found none"


REQUIRED_RUNBOOK_COMMANDS = {
    "status": ("status", "local"),
    "abort": ("abort", "local"),
    "history": ("history", "local"),
    "verify": ("verify", "local"),
    "rollback app": ("rollback", "app", "local"),
    "rollback app --to": ("rollback", "app", "local", "--to"),
    "rollback schema --steps": ("rollback", "schema", "local", "--steps"),
    "rollback config": ("rollback", "config", "local"),
    "rollback config --to": ("rollback", "config", "local", "--to"),
    "config set (surge)": ("config", "set", "local", "INGEST_MAX_BATCH_ITEMS=", "MAX_REQUEST_BODY_BYTES="),
    "config set (degrade mode)": ("config", "set", "local", "RATE_LIMIT_BACKEND=memory"),
    "lock break": ("lock", "break", "local"),
}


@pytest.mark.parametrize("what", sorted(REQUIRED_RUNBOOK_COMMANDS))
def test_runbook_names_the_real_command_for(what):
    wanted = REQUIRED_RUNBOOK_COMMANDS[what]
    runbook = [inv for inv in ALL_INVOCATIONS if inv.source == RUNBOOK.name]

    path = tuple(w for w in wanted if not w.startswith("-") and "=" not in w)
    extras = [w for w in wanted if w not in path]

    def matches(args: tuple[str, ...]) -> bool:
        # The command path first, then each option or KEY= anywhere after it.
        return args[: len(path)] == path and all(
            any(arg == w or (w.endswith("=") and arg.startswith(w)) for arg in args[len(path):]) for w in extras)

    assert any(matches(inv.args) for inv in runbook), (
        f"docs/RUNBOOK.md: expected a ```sh command `ingestctl {' '.join(wanted)}...`, found none among "
        f"{sorted({inv.text for inv in runbook})}"
    )


def test_runbook_names_the_operational_check_commands():
    lines = [line for block in sh_blocks(RUNBOOK.read_text(encoding="utf-8")) for line in command_lines(block)]
    for wanted in (
        "python scripts/check_runtime_health.py --base-url http://localhost:8000",
        "docker compose -f docker-compose.prod.yml up -d --build",
        ("BENCH_PROFILE=staging BENCH_FAIL_THRESHOLD_MS=250 BENCH_FAIL_P95_THRESHOLD_MS=400 "
         "python scripts/benchmark_queries.py"),
    ):
        assert wanted in lines, f"docs/RUNBOOK.md: expected the command line `{wanted}` in a ```sh block"
    assert any("--allow-ready-degraded" in line for line in lines)
    assert sum("PAYLOAD_TOO_LARGE" in line and "curl" in line for line in lines) >= 2, (
        "docs/RUNBOOK.md: expected two 413 checks (oversized body, oversized batch) that grep PAYLOAD_TOO_LARGE")
    assert any("docker compose" in line and "logs" in line and "grep" in line for line in lines), (
        "docs/RUNBOOK.md: expected a log search by X-Request-Id (`docker compose ... logs | grep`)")
    assert any(line.startswith("curl") and "/metrics" in line for line in lines)


# --- 2. every ingestctl command in the docs parses against the CLI ---------------------------------------


def test_the_docs_hold_commands_to_check():
    # Guards the extraction itself: a broken regex must not make the parse test below vacuous.
    by_source = {source: [i for i in ALL_INVOCATIONS if i.source == source]
                 for source in (RUNBOOK.name, DEPLOYING.name, *(p.name for p in PIPELINES))}
    for source, found in by_source.items():
        assert found, f"{source}: expected ingestctl commands, found none (is the extraction broken?)"
    assert len(by_source[RUNBOOK.name]) >= 20


@pytest.mark.parametrize("invocation", ALL_INVOCATIONS, ids=lambda inv: f"{inv.source}: {inv.text}")
def test_documented_command_parses_against_the_cli(invocation):
    ctx = parse_with_cli(invocation.args)
    env = ctx.params.get("env")
    if env is not None and not env.startswith("$"):
        inventories = sorted(p.stem for p in (ROOT / "inventories").glob("*.py") if not p.stem.startswith("_"))
        assert env in inventories, f"`{invocation.text}`: no inventory inventories/{env}.py; have {inventories}"
        if invocation.source == RUNBOOK.name:
            assert env == "local", (f"`{invocation.text}`: the runbook's commands target the sandbox `local` "
                                    f"(on-call replaces it), found {env!r}")


@pytest.mark.parametrize(
    "invocation",
    [inv for inv in ALL_INVOCATIONS if inv.args[:2] == ("config", "set")],
    ids=lambda inv: f"{inv.source}: {inv.text}",
)
def test_documented_config_changes_are_valid(invocation):
    # Values given literally must pass the same validation `config set` applies before touching any host.
    literal = [arg for arg in invocation.args[3:] if "=" in arg and "$" not in arg]
    if literal:
        config_mod.parse_assignments(literal)


def test_the_parser_check_fails_for_commands_the_cli_does_not_have():
    with pytest.raises(AssertionError, match="no command `ingestctl frobnicate`"):
        parse_with_cli(("frobnicate", "local"))
    with pytest.raises(AssertionError, match="(?i)no such option"):
        parse_with_cli(("deploy", "local", "--no-such-flag"))
    with pytest.raises(AssertionError, match="needs a subcommand"):
        parse_with_cli(("secrets",))
    assert parse_with_cli(("deploy", "local", "--batch", "50%")).params["batch"] == "50%"


def test_command_extraction_reads_pipelines_substitutions_and_redirections():
    line = ('export URL=$(ingestctl testbed status --json | python3 -c \'print("|")\') && '
            'ingestctl deploy staging --json > deploy.jsonl 2>&1')
    assert [inv.args for inv in invocations_in(line, "t")] == [
        ("testbed", "status", "--json"), ("deploy", "staging", "--json")]


# --- other commands the runbook names exist too -----------------------------------------------------------


@cache
def script_help(script: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / script), "--help"], check=False,
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, f"`python {script} --help` failed: {result.stderr[-500:]}"
    return result.stdout


def doc_words() -> Iterator[tuple[str, list[str]]]:
    for path in (RUNBOOK, DEPLOYING):
        for block in sh_blocks(path.read_text(encoding="utf-8")):
            for line in command_lines(block):
                for words in simple_commands(line):
                    yield path.name, without_assignments(words)


def test_scripts_and_their_options_exist():
    checked = 0
    for source, words in doc_words():
        if len(words) >= 2 and words[0] in ("python", "python3") and words[1].startswith("scripts/"):
            assert (ROOT / words[1]).is_file(), f"{source}: `{' '.join(words)}`: no file {words[1]}"
            help_text = script_help(words[1])
            for option in (w for w in words[2:] if w.startswith("--")):
                assert option in help_text, f"{source}: `{' '.join(words)}`: {words[1]} has no option {option}"
            checked += 1
    assert checked >= 5


def test_files_the_commands_name_exist():
    for source, words in doc_words():
        for word in words:
            if re.match(r"^(inventories/[\w-]+\.py|docker-compose[\w.-]*\.ya?ml)$", word):
                assert (ROOT / word).is_file(), f"{source}: `{' '.join(words)}` names {word}, which does not exist"


# --- 3. the example pipelines -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_example_pipeline_is_valid_yaml_that_checks_secrets_deploys_and_branches(path):
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(document, dict), f"{path.name}: expected a YAML mapping at the top, found {type(document)}"
    texts = [inv.args for inv in pipeline_invocations(path)]
    assert ("secrets", "check", "staging") in texts, f"{path.name}: expected `ingestctl secrets check staging`"
    deploys = [args for args in texts if args[:2] == ("deploy", "staging")]
    assert deploys and all("--json" in args for args in deploys), f"{path.name}: expected `ingestctl deploy staging --json`"
    scripts = "\n".join(pipeline_scripts(document))
    assert '"summary"' in scripts, f"{path.name}: expected the summary event to be parsed"
    for code in (3, 4, 5):
        assert re.search(rf"^\s*{code}\)", scripts, re.MULTILINE), f"{path.name}: expected a branch for exit code {code}"
