"""Planning: batches, rollback targets from the ledger, masked config diffs and the --dry plan."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ingestctl import config, inventory, migrations, plan
from ingestctl.errors import ConfigError
from ingestctl.ledger import LedgerEntry
from ingestctl.secrets import MASK

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
FIXTURES = Path(__file__).parent / "fixtures" / "alembic_versions"
HOSTS = ["app1", "app2", "app3", "app4", "app5"]


def entry(n, kind="deploy", release="v1", outcome="success", config_version="c1", **more):
    return LedgerEntry(id=f"e{n:03d}", kind=kind, env="local", release=release, image_id=f"sha256:{release}",
                       config_version=config_version, who="ana@laptop", started=T0 + timedelta(minutes=n),
                       outcome=outcome, **more)


@pytest.mark.parametrize(
    ("spec", "n", "sizes"),
    [
        (None, 3, [1, 2]), (None, 1, [1]), (None, 5, [1, 4]),
        ("1", 3, [1, 1, 1]), ("2", 3, [2, 1]), ("2", 4, [2, 2]), (" 3 ", 3, [3]), ("10", 3, [3]), (2, 5, [2, 2, 1]),
        ("50%", 3, [2, 1]), ("50%", 4, [2, 2]), ("34%", 3, [2, 1]), ("33%", 3, [1, 1, 1]), ("100%", 5, [5]),
        ("1%", 5, [1, 1, 1, 1, 1]), ("12.5%", 8, [1] * 8), ("25 %", 5, [2, 2, 1]),
    ],
)
def test_batch_sizes(spec, n, sizes):
    assert plan.batch_sizes(spec, n) == sizes
    assert sum(sizes) == n


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0", ("--batch: expected a number of hosts per batch (e.g. 2) or a percentage of the hosts (e.g. 50%), "
               "at least 1 host; found '0'")),
        ("-2", "at least 1 host; found '-2'"),
        ("0%", "--batch: expected a percentage above 0% and at most 100%, found '0%'"),
        ("-10%", "expected a percentage above 0% and at most 100%, found '-10%'"),
        ("150%", "expected a percentage above 0% and at most 100%, found '150%'"),
        ("half", ("--batch: expected a number of hosts per batch (e.g. 2) or a percentage of the hosts (e.g. 50%), "
                  "found 'half'")),
        ("2.5", "found '2.5'"), ("", "found ''"), ("50%%", "found '50%%'"),
    ],
)
def test_batch_spec_errors(spec, message):
    with pytest.raises(ConfigError) as err:
        plan.batch_sizes(spec, 3)
    assert message in str(err.value)


def test_no_hosts_is_an_error():
    with pytest.raises(ConfigError, match="expected at least one app host"):
        plan.parse_batch_spec(None, [])


def test_parse_batch_spec_splits_hosts_in_order():
    assert plan.parse_batch_spec(None, HOSTS) == [["app1"], ["app2", "app3", "app4", "app5"]]
    assert plan.parse_batch_spec("40%", HOSTS) == [["app1", "app2"], ["app3", "app4"], ["app5"]]


def test_rollout_order_puts_the_db_host_last():
    env = inventory.environment(name="local", source="", hosts={
        "db1": {"ssh_hostname": "a", "roles": ["db", "app"]},
        "app2": {"ssh_hostname": "b", "roles": ["app"]},
        "app3": {"ssh_hostname": "c", "roles": ["app"]},
    })
    assert plan.rollout_order(env) == ["app2", "app3", "db1"]
    assert plan.parse_batch_spec(None, plan.rollout_order(env)) == [["app2"], ["app3", "db1"]]


# --- rollback targets ---------------------------------------------------------------------------------

HISTORY = [
    entry(1, release="v1", schema_head_after="0001"),
    entry(2, release="v2", schema_head_after="0002"),
    entry(3, release="v3", outcome="rolled-back", schema_head_after="0003"),
    entry(4, kind="config-set", release="v2", config_version="c2"),
]


def test_previous_release_skips_failed_releases_and_config_changes():
    target = plan.previous_release(HISTORY)
    assert target.release == "v1" and target.id == "e001" and target.code_schema_head() == "0001"


def test_previous_release_walks_back_after_a_rollback():
    history = [*HISTORY, entry(5, release="v4"), entry(6, kind="rollback-app", release="v2",
                                                        release_schema_head="0002")]
    assert plan.previous_release(history).release == "v1"
    history.append(entry(7, kind="rollback-app", release="v1"))
    assert plan.previous_release(history) is None


def test_previous_release_prefers_what_the_hosts_report():
    history = [entry(1, release="v1"), entry(2, release="v2"), entry(3, release="v3")]
    # The v3 run died before it went live everywhere: the hosts say v2 is live.
    assert plan.previous_release(history, current="v2").release == "v1"


def test_previous_release_returns_the_deploy_entry_with_the_schema_head():
    history = [entry(1, release="v1", schema_head_after="0001"), entry(2, release="v2", schema_head_after="0002"),
               entry(3, kind="rollback-app", release="v1", schema_head_after="0002"), entry(4, release="v2"),
               entry(5, release="v3")]
    target = plan.rollback_target(history)
    assert target.release == "v2" and target.kind == "deploy"


def test_rollback_target_named_release():
    target = plan.rollback_target(HISTORY, to="v1")
    assert target.release == "v1" and target.image_id == "sha256:v1"


@pytest.mark.parametrize(
    ("history", "to", "message"),
    [
        ([], None, "nothing to roll back to: the ledger records no successful deploy yet"),
        ([entry(1, release="v1")], None, "nothing to roll back to: v1 is the only known-good release left"),
        (HISTORY, "v9", "--to v9: unknown release (the ledger has no such release); known-good releases: v2, v1"),
        (HISTORY, "v3", "--to v3: unknown release (it never went live successfully)"),
        (HISTORY, "v2", "--to v2: that release is already live; nothing to roll back"),
    ],
)
def test_rollback_target_errors(history, to, message):
    with pytest.raises(ConfigError) as err:
        plan.rollback_target(history, to=to)
    assert message in str(err.value)


def test_config_rollback_target():
    history = [entry(1, config_version="aaaa11112222"), entry(2, kind="config-set", config_version="bbbb11112222"),
               entry(3, kind="config-set", config_version="cccc11112222", outcome="rolled-back")]
    assert plan.config_rollback_target(history) == "aaaa11112222"
    assert plan.config_rollback_target(history, to="aaaa") == "aaaa11112222"
    with pytest.raises(ConfigError, match="--to cccc: config version is unknown; known versions, newest first: "
                                          "bbbb11112222, aaaa11112222"):
        plan.config_rollback_target(history, to="cccc")
    with pytest.raises(ConfigError, match="config version bbbb11112222 is already live"):
        plan.config_rollback_target(history, to="bbbb")
    history.append(entry(4, kind="rollback-config", config_version="aaaa11112222"))
    with pytest.raises(ConfigError, match="nothing to roll back to: no config version before aaaa11112222"):
        plan.config_rollback_target(history)
    ambiguous = [entry(1, config_version="ab01"), entry(2, config_version="ab02"), entry(3, config_version="ff")]
    with pytest.raises(ConfigError, match="--to ab: config version is ambiguous"):
        plan.config_rollback_target(ambiguous, to="ab")


# --- config diff and the plan -------------------------------------------------------------------------

SECRETS = {"POSTGRES_PASSWORD": "pg-0123456789abcdef", "API_KEY": "key-0123456789abcdef01",
           "JWT_SECRET": "jwt-" + "q" * 40}


def test_config_diff_masks_secrets():
    old = config.ServiceConfig.build({}, SECRETS)
    new = old.with_changes({"INGEST_MAX_BATCH_ITEMS": "100", "API_KEY": "rotated-key-0123456789"})
    changes = plan.config_diff({**old.tunables, **old.secrets}, {**new.tunables, **new.secrets})
    assert [str(c) for c in changes] == [
        f"~ API_KEY: {MASK} -> {MASK} (rotated)",
        "~ INGEST_MAX_BATCH_ITEMS: 1000 -> 100",
    ]
    first = plan.config_diff(None, {"LOG_LEVEL": "INFO", "JWT_SECRET": SECRETS["JWT_SECRET"]})
    assert [str(c) for c in first] == [f"+ JWT_SECRET={MASK}", "+ LOG_LEVEL=INFO"]
    assert [str(c) for c in plan.config_diff({"X": "1"}, {})] == ["- X=1"]
    assert plan.config_diff({"A": "1"}, {"A": "1"}) == []


def test_deploy_plan_renders_everything_and_no_secret():
    env = inventory.environment(name="local", source="", data={"max_p95_ms": 300}, hosts={
        "db1": {"ssh_hostname": "a", "roles": ["db", "app"]},
        "app2": {"ssh_hostname": "b", "roles": ["app"]},
        "app3": {"ssh_hostname": "c", "roles": ["app"]},
    })
    old = config.ServiceConfig.build({}, SECRETS)
    new = old.with_changes({"JWT_SECRET": "n" * 40, "LOG_LEVEL": "DEBUG"})
    revisions = migrations.load_revisions(FIXTURES)
    deploy = plan.build_deploy_plan(
        env=env, release="v2", image="ingest:v2", batch_spec=None,
        old_config={**old.tunables, **old.secrets}, new_config={**new.tunables, **new.secrets},
        config_version=new.version, previous_config_version=old.version, revisions=revisions,
        db_head="0002_add_tags", previous_release="v1", allow_incompatible=True,
    )
    # --allow-incompatible: one batch after the migration, no host left on v1 against the new schema.
    assert deploy.batches == [["app2", "app3", "db1"]]
    assert [m.name for m in deploy.migrations] == ["0003_index_source", "0004_rename_payload"]
    lines = deploy.render()
    assert lines[:4] == [
        "deploy v2 to local (live now: v1)",
        "  image: ingest:v2",
        "  hosts: db1, app2, app3 (db: db1)",
        "  batch 1 of 1: app2, app3, db1",
    ]
    assert f"  config: {new.version} (was {old.version})" in lines
    assert f"    ~ JWT_SECRET: {MASK} -> {MASK} (rotated)" in lines
    assert "  migrations: 0002_add_tags -> 0004_rename_payload" in lines
    assert "    0004_rename_payload (not backward-compatible: app rollback past it is refused)" in lines
    assert "  benchmark gate: profile staging" in lines
    event = deploy.as_event()
    assert event["batches"] == [["app2", "app3", "db1"]] and event["gates"]["max_p95_ms"] == 300
    assert event["allow_incompatible"] is True
    text = "\n".join(lines) + repr(event)
    for secret in (*SECRETS.values(), "n" * 40):
        assert secret not in text


def test_first_deploy_plan_with_skipped_bench():
    env = inventory.environment(name="local", source="", hosts={"db1": {"ssh_hostname": "a", "roles": ["db", "app"]}})
    cfg = config.ServiceConfig.build({}, SECRETS)
    deploy = plan.build_deploy_plan(env=env, release="v1", image="ingest:v1", batch_spec="100%", old_config=None,
                                    new_config=dict(cfg.tunables), config_version=cfg.version,
                                    previous_config_version=None, revisions=migrations.load_revisions(FIXTURES),
                                    db_head=None, skip_bench=True)
    lines = deploy.render()
    assert lines[0] == "deploy v1 to local (first deploy)"
    assert "  benchmark gate: skipped (--skip-bench)" in lines
    assert len(deploy.migrations) == 4 and deploy.schema_head_before is None


@given(n=st.integers(1, 300), count=st.integers(1, 400))
def test_batches_by_count_cover_every_host_once(n, count):
    hosts = list(range(n))
    batches = plan.parse_batch_spec(str(count), hosts)
    assert [h for batch in batches for h in batch] == hosts
    assert all(len(b) == min(count, n) for b in batches[:-1]) and 0 < len(batches[-1]) <= min(count, n)


@given(n=st.integers(1, 300), percent=st.integers(1, 100))
def test_batches_by_percent_never_exceed_the_share(n, percent):
    sizes = plan.batch_sizes(f"{percent}%", n)
    assert sum(sizes) == n and min(sizes) >= 1
    # Rounded up, never more than one host above the exact share.
    assert sizes[0] < n * percent / 100 + 1


def three_hosts():
    return inventory.environment(name="local", source="", hosts={
        "db1": {"ssh_hostname": "a", "roles": ["db", "app"]},
        "app2": {"ssh_hostname": "b", "roles": ["app"]},
        "app3": {"ssh_hostname": "c", "roles": ["app"]},
    })


def plan_from(db_head, previous_release, **more):
    cfg = config.ServiceConfig.build({}, SECRETS)
    return plan.build_deploy_plan(env=three_hosts(), release="v2", image="ingest:v2", batch_spec=None,
                                  old_config=None, new_config=dict(cfg.tunables), config_version=cfg.version,
                                  previous_config_version=None, revisions=migrations.load_revisions(FIXTURES),
                                  db_head=db_head, previous_release=previous_release, **more)


def test_a_rolling_deploy_refuses_a_non_backward_compatible_migration():
    with pytest.raises(ConfigError) as refused:
        plan_from("0002_add_tags", "v1")
    message = str(refused.value)
    assert message.startswith("0004_rename_payload: declares backward_compatible = False")
    assert "expand/contract" in message and "--allow-incompatible" in message and "v1" in message


def test_compatible_migrations_roll_in_batches():
    revisions = migrations.load_revisions(FIXTURES)[:-1]  # up to 0003_index_source, backward-compatible
    cfg = config.ServiceConfig.build({}, SECRETS)
    deploy = plan.build_deploy_plan(env=three_hosts(), release="v2", image="ingest:v2", batch_spec=None,
                                    old_config=None, new_config=dict(cfg.tunables), config_version=cfg.version,
                                    previous_config_version=None, revisions=revisions,
                                    db_head="0002_add_tags", previous_release="v1")
    assert [m.name for m in deploy.migrations] == ["0003_index_source"] and not deploy.incompatible
    assert deploy.batches == [["app2"], ["app3", "db1"]]


def test_a_first_deploy_may_apply_any_migration():
    deploy = plan_from(None, None)
    assert deploy.incompatible and deploy.batches == [["app2"], ["app3", "db1"]]
