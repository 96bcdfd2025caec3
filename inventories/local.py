"""The local sandbox: the hosts `ingestctl testbed up` started (state in .testbed/NAME/state.json).

A bare testbed (`ingestctl testbed up --bare`) is reached as its `deploy` user, root through sudo: the
testbed's state says which (`ssh_user`, `sudo`), exactly as `ingestctl testbed status --json` reports it.

INGESTCTL_TESTBED selects the testbed (default ingest-tb), as it does for `ingestctl testbed`.
Usage: `pyinfra -y inventories/local.py exec -- docker info`, or `ingestctl deploy local`.
"""

from ingestctl.inventory import environment
from ingestctl.testbed import state as testbed_state
from ingestctl.testbed.images import POSTGRES_IMAGE, PROXY_IMAGE, REDIS_IMAGE

_testbed = testbed_state.load()  # a clear "run `ingestctl testbed up`" error when the sandbox is not up

_env = environment(
    name="local",
    data={
        # The official postgres/redis images cannot be pulled here; the sandbox builds equivalents.
        "postgres_image": POSTGRES_IMAGE,
        "redis_image": REDIS_IMAGE,
        "proxy_image": PROXY_IMAGE,
        # Sized for a 2-core machine running three sandbox hosts: short windows, local benchmark profile. 2 s
        # holds because the sandbox's Prometheus scrapes twice a second and the gate paces its 20 probes per host
        # over the whole window: it counted 17-21 of 20 per host, the gate's minimum being 10, with the machine
        # also running three busy loops (docs/PERFORMANCE.md). Probes sent in a burst at the start counted under 10.
        "bench_profile": "local",
        "metric_window_s": 2,
        # A release that never turns ready fails after this long; a good one is ready in about 1.5 s here.
        "health_timeout_s": 30,
        "drain_grace_s": 15,
        # One machine drives every sandbox client from one address: allow it the load tests' rate.
        "config": {"RATE_LIMIT_PER_MINUTE": 120000},
        # The benchmarks count acknowledged events in PostgreSQL from this machine (the sandbox's gateway).
        "db_clients": [_testbed.gateway] if _testbed.gateway else [],
        # The same at the proxy. The loads run at most about a dozen requests at once against one host (load
        # workers, the benchmark's 4, the gates' probes) and a few hundred per second: the default 64 at once
        # holds, the default 200/s does not (a 2,000/s bucket matches RATE_LIMIT_PER_MINUTE above).
        "proxy_limit_req_per_s": 2000,
        "proxy_limit_req_burst": 2000,
        # The sandbox's Prometheus (`ingestctl testbed status --json`): the metric gate and `ingestctl slo` query it.
        "prometheus_url": _testbed.prometheus_url or None,
        # Shown by `ingestctl slo local`; not enforced here, because the end-to-end bad releases burn the budget
        # on purpose and the next test must still deploy (tests/e2e/test_slo.py enforces it in a copy).
        "slos": {
            "availability": {"target": 0.99, "window": "1h", "burn_window": "5m"},
            "latency": {"p95_ms": 500, "window": "1h", "burn_window": "5m"},
        } if _testbed.prometheus_url else None,
        "error_budget_policy": "report",
    },
    hosts={
        host.name: {
            "ssh_hostname": host.address,
            "ssh_port": host.ssh_port,
            "ssh_user": _testbed.ssh_user,
            "sudo": _testbed.sudo,
            "ssh_key": _testbed.ssh_key,
            # Sandbox hosts get new host keys on every `testbed up`: there is nothing to pin.
            "ssh_known_hosts_file": "/dev/null",
            "ssh_strict_host_key_checking": "no",
            "ssh_allow_agent": False,
            "ssh_look_for_keys": False,
            "roles": list(host.roles),
        }
        for host in _testbed.hosts
    },
)

# pyinfra reads these module-level lists as the `db` and `app` groups (environment data merged in).
db = _env.group("db")
app = _env.group("app")
