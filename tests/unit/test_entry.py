"""The console script's start: gevent's monkey-patching, every entry-point lookup of the process (gevent's
plugins, pyinfra's connectors) answered by one scan, and the modules every command imports but few use, loaded
at their first use."""

from __future__ import annotations

import subprocess
import sys

# Counts the scans of the installed distributions (every uncached `importlib.metadata.entry_points` call makes
# one) while the entry point patches and pyinfra then builds three inventories (as a rollback does), and compares
# the lookup's answers with the standard one's. In a child: patching cannot be undone in this process.
PROBE = """
import importlib.metadata as metadata
scans = []
scan = metadata.distributions
metadata.distributions = lambda **kw: (scans.append(1), scan(**kw))[1]
lookup = metadata.entry_points
import ingestctl.entry
from gevent import monkey
from pyinfra.api.inventory import Inventory
for _ in range(3):
    Inventory((["db1", "app2"], {}))
print(monkey.is_module_patched("socket"), monkey.is_module_patched("threading"), monkey.is_module_patched("ssl"),
      len(scans))
names = lambda found: sorted(entry.value for entry in found)
print(names(metadata.entry_points(group="pyinfra.connectors")) == names(lookup(group="pyinfra.connectors")),
      names(metadata.entry_points(group="pyinfra.connectors")) != [],
      len(metadata.entry_points()) == len(lookup()))
"""


def probe() -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_the_entry_point_patches_sockets_threads_and_ssl_for_pyinfras_greenlets():
    assert probe()[:3] == ["True", "True", "True"]


def test_gevents_plugins_and_pyinfras_connectors_are_looked_up_in_one_scan_of_the_installed_distributions():
    # Unshared: 25 scans while patching (0.13 s of every command's start), then 2 for each pyinfra Inventory.
    assert probe()[3] == "1"


def test_the_shared_lookup_answers_as_the_standard_one_does():
    assert probe()[4:7] == ["True", "True", "True"]


# What `rollback app` imports before its switch, then a first use of each module the entry point defers.
LAZY_PROBE = """
import sys
import ingestctl.entry, ingestctl.cli, ingestctl.rollbacks
print('httpx._client' in sys.modules, 'invoke.tasks' in sys.modules, 'pyinfra.facts.server' in sys.modules)
import httpx
print(httpx.Client.__name__, 'httpx._client' in sys.modules, type(sys.modules['httpx']).__name__)
import paramiko.config
print(paramiko.config.invoke.__name__)
from ingestctl.operations import release
print(release.files.put.__name__, type(sys.modules['pyinfra.operations.files']).__name__)
"""


def lazy_probe() -> list[str]:
    done = subprocess.run([sys.executable, "-c", LAZY_PROBE], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_the_emergency_path_does_not_load_httpx_invoke_or_pyinfras_file_operations_before_its_switch():
    assert lazy_probe()[:3] == ["False", "False", "False"]


def test_a_deferred_module_loads_at_its_first_use_and_replaces_its_stand_in():
    assert lazy_probe()[3:6] == ["Client", "True", "module"]


def test_paramiko_still_sees_pyinfras_stand_in_for_invoke():
    # pyinfra replaces paramiko.config.invoke (its `Match exec` runner) with its own: invoke itself is never run.
    assert lazy_probe()[6] == "FakeInvoke"


def test_a_deferred_submodule_imported_from_its_package_loads_at_its_first_use():
    # `from pyinfra.operations import files` binds the stand-in; `files.put` loads pyinfra's real module.
    assert lazy_probe()[7:9] == ["put", "module"]
