"""The console script's entry point.

pyinfra runs hosts concurrently on gevent greenlets, which only overlap when blocking I/O is cooperative, so
(like the pyinfra CLI) the process is monkey-patched before anything imports sockets, ssl or threading.
Without this, every host step would run one host after another.
"""

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from importlib import metadata

from gevent import monkey

# Imported by what every command imports, used by few: loaded at their first use instead of at every start.
# invoke: paramiko's for `Match exec` in an ssh config (42 ms); httpx: the gates' and status's client (31 ms),
# needed after a rollback's switch, not before it; pyinfra's file operations (with the server facts they import,
# 32 ms): `files.put` of a proxy config that changed, which a rollback to the warm standby never needs.
LAZY_MODULES = ("invoke", "httpx", "pyinfra.operations.files")


def look_up_entry_points_once() -> None:
    """`importlib.metadata.entry_points` answered from one scan for the rest of the process.

    Each lookup reads the metadata of every installed distribution (7 ms here), and they add up: gevent looks for
    plugins at each of its 25 patch events (0.13 s of every command's start), pyinfra for its connectors twice in
    every Inventory it builds (three in a rollback, one a step in a deploy). This process installs nothing into
    its own environment, so the installed distributions cannot change while it runs: one scan answers them all.
    Installed before pyinfra is imported, which binds the function when it loads (gevent looks it up at each
    call).
    """
    installed = metadata.entry_points()
    metadata.entry_points = lambda **selection: installed.select(**selection) if selection else installed


class LoadedOnFirstUse(types.ModuleType):
    """A module's stand-in in sys.modules: `import NAME` gets it at no cost, and the first attribute it lacks
    imports the real module (which then replaces it there) and answers from it."""

    def __getattr__(self, attribute: str) -> object:
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        self.__dict__.update(real.__dict__)  # a reference kept to the stand-in now finds everything directly
        return getattr(real, attribute)


def spec_unloaded(name: str) -> importlib.machinery.ModuleSpec | None:
    """NAME's spec, found without importing its parent packages (`importlib.util.find_spec` of a submodule imports
    them: here all of pyinfra, before gevent has patched)."""
    if "." not in name:
        return importlib.util.find_spec(name)
    spec, path = None, None
    for depth in range(1, name.count(".") + 2):
        spec = importlib.machinery.PathFinder.find_spec(".".join(name.split(".")[:depth]), path)
        if spec is None:
            return None
        path = spec.submodule_search_locations
    return spec


def load_lazily(name: str) -> None:
    """NAME's stand-in (LoadedOnFirstUse) in sys.modules, unless NAME is loaded already or not installed."""
    if name in sys.modules:
        return
    spec = spec_unloaded(name)
    if spec is None:
        return  # not installed: an `import NAME` raises as it would have
    module = LoadedOnFirstUse(name)
    module.__spec__, module.__loader__, module.__file__ = spec, spec.loader, spec.origin
    sys.modules[name] = module


look_up_entry_points_once()
monkey.patch_all()
for _name in LAZY_MODULES:
    load_lazily(_name)


def main() -> None:
    from ingestctl.cli import main as cli_main

    cli_main()
