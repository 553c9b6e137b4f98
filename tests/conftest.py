import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """One real `rlhf run configs/counterpoint.yaml --quick` (data, tiny prior, 10 RLOO steps,
    evaluation, report), shared by the tests that need a trained prior."""
    root = tmp_path_factory.mktemp("quick")
    run_dir = root / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(
        [sys.executable, "-m", "apps.cli", "run", "configs/counterpoint.yaml", "--quick", f"run_dir={run_dir}", f"task.data.cache_dir={root / 'cache'}", "progress=false"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=900,
    )
    assert r.returncode == 0, r.stderr
    return run_dir


INTEGRATION_MODULES = {"test_cli.py", "test_distributed.py", "test_labelling_browser.py", "test_labelling_loop.py", "test_time_to_quality.py"}
"""Whole modules of the integration tier: command-line pipelines, launchers, the browser."""


def pytest_collection_modifyitems(config, items):
    """Tiers: a test is `integration` when its module is one above or it needs a shared
    pipeline run (`quick_run`, `music_vpl`); `make test-fast` runs the rest (math and engine,
    no corpus run)."""
    heavy = {"quick_run", "music_vpl"}
    for item in items:
        if item.path.name in INTEGRATION_MODULES or heavy & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
