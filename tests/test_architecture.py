"""The layers of the code (``.importlinter``), checked by import-linter itself: applications on
tasks on reward models on the core, tasks independent of each other, and no import cycle
between the modules of any package. import-linter reads every import statement, including the
ones inside functions, so a function-level import cannot hide an edge."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    # In a child process: import-linter's command configures logging (dictConfig), which would
    # disable the loggers of the tests that run after it in this process.
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename='.importlinter', no_cache=True, no_logo=True))"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


@pytest.mark.parametrize("layer", ["rlhf", "reward_models", "tasks"])
def test_lower_layers_never_name_the_applications(layer):
    """A lower layer does not even name an application module in a string (e.g. for
    importlib), which import-linter could not see."""
    for path in (REPO / layer).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not node.value.startswith("apps."), f"{path}: names {node.value!r}"


def test_no_module_imports_itself_through_a_chain():
    """No cycle in the whole module graph (function-level imports included, which grimp reads
    like any other): for every edge a -> b, b never reaches a. Stricter than the siblings
    contract, which looks inside one package at a time."""
    graph = grimp.build_graph("apps", "tasks", "reward_models", "rlhf", cache_dir=None)
    cycles = [(a, b, graph.find_shortest_chain(importer=b, imported=a))
              for a in sorted(graph.modules) for b in graph.find_modules_directly_imported_by(a)
              if graph.find_shortest_chain(importer=b, imported=a)]
    assert not cycles, cycles[:3]
