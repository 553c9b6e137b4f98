"""A full or read-only disk under a real `rlhf tune`: one `error:` line naming the file and the
fix, no traceback, no half-written checkpoint, the last whole checkpoint still loads and
resumes. The faults are real: a small tmpfs that fills up, and the same tmpfs remounted
read-only (mounting needs root, which the CI machines have; elsewhere these tests skip)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhf.runs import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` for the duration (a real ENOSPC when full)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    path.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def tune(run_dir: Path, prior: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "apps.cli", "tune", "configs/counterpoint.yaml", "--quick", "--prior", str(prior), f"run_dir={run_dir}",
           "tune.steps=40", "tune.checkpoint_every=1", "tune.batch_size=8", "tune.tilt.k=4", "progress=false", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def test_a_full_disk_stops_the_run_cleanly_and_keeps_the_last_checkpoint(quick_run, tmp_path):
    prior = quick_run / "models" / "prior"
    weights = (prior / "model.safetensors").stat().st_size
    # a checkpoint (weights + tokenizer + Adam state) takes about 3.3× the weights: room for the
    # config, the log and one checkpoint, so the disk fills in the middle of writing the second
    with small_disk(tmp_path / "disk", f"{int(weights * 5) // 1024}k") as disk:
        run_dir = disk / "run"
        r = tune(run_dir, prior)
        assert r.returncode == 1, r.stderr[-3000:]
        line = one_error_line(r)
        assert "No space left on device" in line and str(run_dir) in line and "--resume" in line, line
        stage = run_dir / "checkpoints" / "tune-tilt"
        assert not [p for p in stage.iterdir() if p.name.startswith(".tmp-")]  # no half-written checkpoint
        last = latest_checkpoint(stage)
        assert last is not None
        load_file(str(last / "model.safetensors"))  # whole
        rows = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert rows and all(row.endswith("}") for row in rows)  # no torn line
        # the fault fixed (a larger disk), the run resumes from that checkpoint and finishes
        subprocess.run(["mount", "-o", f"remount,size={int(weights * 20) // 1024}k", str(disk)], check=True)
        r = tune(run_dir, prior, "--resume", "tune.steps=4")
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"resumed tune-tilt from {last}" in r.stderr


def test_a_read_only_disk_is_a_clear_error(quick_run, tmp_path):
    prior = quick_run / "models" / "prior"
    with small_disk(tmp_path / "disk", "4m") as disk:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        r = tune(disk / "run", prior)
        assert r.returncode == 1, r.stderr[-3000:]
        line = one_error_line(r)
        assert "Read-only file system" in line and str(disk / "run") in line and "run_dir" in line, line
        assert not (disk / "run").exists()
