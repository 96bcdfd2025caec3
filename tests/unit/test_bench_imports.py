"""Every name a benchmark imports from the project exists, including imports inside functions.

Benchmarks run by hand, not in CI, so a refactor that removes a name they import late (inside `main`) breaks
them silently: `bench.blast_radius` imported `must` from `bench.zero_downtime` for a stop after it was gone.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ("bench", "ingestctl", "ingest", "tests")


def project_imports() -> list[tuple[str, str, str]]:
    """(benchmark file, module, name) for every `from <project module> import name` in bench/*.py."""
    found = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.split(".")[0] in PROJECT_PACKAGES:
                found += [(path.name, node.module, alias.name) for alias in node.names]
    return found


@pytest.mark.parametrize(("bench_file", "module", "name"), project_imports())
def test_the_imported_name_exists(bench_file: str, module: str, name: str) -> None:
    imported = importlib.import_module(module)
    assert hasattr(imported, name) or importlib.util.find_spec(f"{module}.{name}") is not None, (
        f"bench/{bench_file} imports {name} from {module}, which has no such name"
    )
