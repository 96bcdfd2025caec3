"""Staging: one db host (PostgreSQL, Redis and an app replica) and two app hosts.

Runs under the plain pyinfra CLI (`pyinfra inventories/staging.py deploys/deploy.py --data version=...`)
and under `ingestctl ... staging`. Host names below are placeholders: point them at your own hosts.
Secrets are not here: they come from the environment, `*_FILE` or `secrets/staging.env` (mode 0600).
"""

from ingestctl.inventory import environment

# Host keys are checked against a file you fill once (`ssh-keyscan` compared with the hosts' own fingerprints),
# as production does: a staging host that trusts a new key on first use hands its secrets to whoever answers.
_ssh = {
    "ssh_user": "deploy",
    "ssh_key": "~/.ssh/ingest_staging_ed25519",
    "ssh_known_hosts_file": "~/.ssh/known_hosts_ingest_staging",
    "ssh_strict_host_key_checking": "yes",
    "sudo": True,
}

_env = environment(
    name="staging",
    data={
        "app_port": 8000,
        # Staging mirrors production's official images; the local sandbox builds equivalents instead.
        # Bare tags: ingestctl warns until they are pinned as name:tag@sha256:<digest> of the images you
        # tested (docs/DEPLOYING.md, "Pinning what goes into the images").
        "postgres_image": "postgres:16",
        "redis_image": "redis:7",
        "keep_releases": 5,
        "bench_profile": "staging",
        "bench_fail_threshold_ms": 250,
        "bench_fail_p95_threshold_ms": 400,
        "health_timeout_s": 60,
        "metric_window_s": 15,
        "max_error_ratio": 0.01,
        "max_p95_ms": 400,
        "config": {"INGEST_MAX_BATCH_ITEMS": 1000, "LOG_LEVEL": "INFO"},
    },
    hosts={
        "db1": {"ssh_hostname": "db1.staging.ingest.example.internal", "roles": ["db", "app"], **_ssh},
        "app2": {"ssh_hostname": "app2.staging.ingest.example.internal", "roles": ["app"], **_ssh},
        "app3": {"ssh_hostname": "app3.staging.ingest.example.internal", "roles": ["app"], **_ssh},
    },
)

# pyinfra reads these module-level lists as the `db` and `app` groups; each host's data includes the
# environment data above, so deploy code reads `host.data.app_port` etc.
db = _env.group("db")
app = _env.group("app")
