import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def simulate_and_train_rewards(config: str, over: list[str]) -> Path:
    """`rlhf simulate-preferences` + `rlhf train-reward` with ``over`` (which must set data.path
    and run_dir); the run folder. Training runs on one thread: VPL's use of z appears as a phase
    change a few hundred steps in, and its timing depends on float summation order, which the
    thread count changes. Pinned so the result is the same on every machine."""
    import torch

    from apps.reward_cli import simulate_main, train_reward_main

    simulate_main(config, over)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_reward_main(config, over)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """One real `rlhf run configs/counterpoint.yaml --quick` (data, tiny prior, 10 tilt steps,
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
