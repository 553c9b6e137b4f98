"""The layers of the code (``.importlinter``), checked by import-linter itself: applications on
tasks on reward models on the core, tasks independent of each other, and no import cycle
between the modules of any package. import-linter reads every import statement, including the
ones inside functions, so a function-level import cannot hide an edge."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_hold(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    code = lint_imports(config_filename=str(REPO / ".importlinter"), no_cache=True, no_logo=True)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "0 broken" in out


@pytest.mark.parametrize("layer", ["rlhf", "reward_models", "tasks"])
def test_lower_layers_never_name_the_applications(layer):
    """A lower layer does not even name an application module in a string (e.g. for
    importlib), which import-linter could not see."""
    for path in (REPO / layer).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not node.value.startswith("apps."), f"{path}: names {node.value!r}"
