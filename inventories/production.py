"""Production: a dedicated db host and four app hosts behind the load balancer.

Host names are placeholders. Images come from the official `postgres:16` / `redis:7` and the release
image is pushed to `registry`; air-gapped sites drop `registry` and ingestctl ships images with
`docker save` / `docker load` over SSH instead. Secrets live in the file named by `secrets_file`
(mode 0600, outside the checkout) or in the environment; never in this file.
"""

from ingestctl.inventory import environment

_ssh = {
    "ssh_user": "deploy",
    "ssh_key": "~/.ssh/ingest_production_ed25519",
    "ssh_known_hosts_file": "~/.ssh/known_hosts_ingest_production",
    "ssh_strict_host_key_checking": "yes",
    "sudo": True,
}

_env = environment(
    name="production",
    data={
        "app_port": 8000,
        # Bare tags: ingestctl warns until they are pinned as name:tag@sha256:<digest> of the images you
        # tested (docs/DEPLOYING.md, "Pinning what goes into the images").
        "postgres_image": "postgres:16",
        "redis_image": "redis:7",
        "registry": "registry.ingest.example.internal:5000",
        "keep_releases": 5,
        "bench_profile": "production",
        "bench_fail_threshold_ms": 200,
        "bench_fail_p95_threshold_ms": 350,
        "health_timeout_s": 90,
        "metric_window_s": 30,
        "max_error_ratio": 0.005,
        "max_p95_ms": 300,
        "config": {
            "INGEST_MAX_BATCH_ITEMS": 1000,
            "MAX_REQUEST_BODY_BYTES": 1048576,
            "RATE_LIMIT_BACKEND": "redis",
            "RATE_LIMIT_PER_MINUTE": 12000,
            "LOG_LEVEL": "WARNING",
            "SHUTDOWN_GRACE_SECONDS": 30,
        },
        "secrets_file": "/etc/ingestctl/production.env",
    },
    hosts={
        "db1": {"ssh_hostname": "10.20.0.11", "roles": ["db"], **_ssh},
        "app1": {"ssh_hostname": "10.20.1.21", "roles": ["app"], **_ssh},
        "app2": {"ssh_hostname": "10.20.1.22", "roles": ["app"], **_ssh},
        "app3": {"ssh_hostname": "10.20.1.23", "roles": ["app"], **_ssh},
        "app4": {"ssh_hostname": "10.20.1.24", "roles": ["app"], **_ssh},
    },
)

db = _env.group("db")
app = _env.group("app")
