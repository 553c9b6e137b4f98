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
