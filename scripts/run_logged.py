"""One command of a harness script, its output appended to a log file (shared by the scripts here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RLHF = [sys.executable, "-m", "apps.cli"]


def run_logged(cmd: list[str], log: Path, threads: int | None = None) -> None:
    """Run ``cmd`` in the repository root with stdout and stderr appended to ``log`` (after a
    ``$ cmd`` line); ``threads`` sets OMP/MKL threads (None: inherited). SystemExit naming the
    log when it fails."""
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc:
        raise SystemExit(f"error: {' '.join(cmd)} exited {rc}; see {log}")
