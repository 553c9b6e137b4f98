"""Crash safety of every training stage: a run killed with SIGKILL and resumed with
``resume=True`` (``--resume``) in a new process ends with the weights of a run that was never
interrupted.

Stages: MLE pre-training (GPT-2 and Marian), tuning with ppo, rloo, mrt, q, psi and g on the
causal (GPT-2) and on the encoder–decoder (Marian) toy prior, Bradley–Terry and VPL reward
training; 6 training steps each, a checkpoint every 2. Per stage and seed,
``tests/dist_scripts/crash_child.py`` runs three times: uninterrupted (the reference); killed by
its own SIGKILL at a point drawn from the seed, either right after optimizer step k (weights
moved in memory, not on disk) or inside a checkpoint write after the weights and trainer state
are written and before the rename (a half-written ``.tmp-*`` folder stays behind); resumed on
the killed run's folder. Proved for every stage:

* the child died by SIGKILL (returncode -9: no ``finally``/``atexit`` code ran);
* the resumed run's final model folder holds bitwise the reference's weights (``torch.equal``
  on every tensor of every ``*.safetensors``; both runs compute on one thread in a process of
  their own, so even float summation orders agree);
* ``metrics.jsonl`` has each step exactly once, with the reference's values.

The three runs are ``fork``s of one server process that imported torch and transformers once
(start-up is ~4 s a process here, the training ~1 s); see crash_child.py for why a forked
child is as fresh as a new interpreter for this purpose.

Measured (``nice -n 5 pytest -q tests/test_crash_resume.py --durations=0``, 2 CPU cores):
23 s on an idle machine; 85 s wall (33 s CPU) while other jobs held the load average at ~8.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_scripts.crash_child import STAGES, STEPS, final_name, stage_name
from rlhf.runs import latest_checkpoint, read_metrics

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
CHILD = REPO / "tests" / "dist_scripts" / "crash_child.py"
CALL_TIMEOUT = 300  # s: a hung child fails its test instead of the suite (a guard, not a measurement)
# Each algorithm dies once after an optimizer step and once in a checkpoint write (across the two architectures).
KILL = {"pretrain": "checkpoint", "pretrain-s2s": "step", "bt": "step", "vpl": "checkpoint"}
for _i, _a in enumerate(("ppo", "rloo", "mrt", "q", "psi", "g")):
    KILL[_a], KILL[f"{_a}-s2s"] = ("step", "checkpoint") if _i % 2 == 0 else ("checkpoint", "step")


class Server:
    """crash_child.py serve: one process that imports once and forks a child per run."""

    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
        # own session: on a hang, its process group (the server and its forked children) is killed
        self.proc = subprocess.Popen(["nice", "-n", "5", sys.executable, str(CHILD), "serve"], cwd=REPO, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)

    def call(self, argv: list, log: Path) -> int:
        """The returncode of one run (-9: killed by SIGKILL); its output goes to ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        self.proc.stdin.write(json.dumps({"argv": [str(a) for a in argv], "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], CALL_TIMEOUT)
        if not ready:
            os.killpg(self.proc.pid, signal.SIGKILL)
            pytest.fail(f"crash_child did not answer within {CALL_TIMEOUT} s: {argv}\n{tail(log)}")
        line = self.proc.stdout.readline()
        if not line:
            pytest.fail(f"crash_child server ended (returncode {self.proc.wait()})")
        return json.loads(line)["returncode"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log.is_file() else f"(no {log})"


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def priors(server, tmp_path_factory):
    """The toy's random tiny GPT-2 and Marian priors (prior/, prior-s2s/), written by a child."""
    folder = tmp_path_factory.mktemp("priors")
    assert server.call(["priors", folder], folder / "priors.log") == 0, tail(folder / "priors.log")
    return folder


def weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every safetensors file of a model folder (PPO adds value_head.safetensors)."""
    return {f.name: load_file(str(f)) for f in sorted(folder.glob("*.safetensors"))}


def metric_rows(run: Path, stage: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(run / "metrics.jsonl", stage)]


@pytest.mark.parametrize("stage", STAGES)
def test_a_run_killed_by_sigkill_resumes_to_the_uninterrupted_weights(stage, server, priors, tmp_path):
    seed = zlib.crc32(stage.encode()) % 1000  # the test's seed: the training seed and the kill point
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    argv = lambda run, *extra: ["run", stage, run, priors, "--seed", seed, *extra]  # noqa: E731

    rc = server.call(argv(ref / "run"), ref / "run.log")
    assert rc == 0, tail(ref / "run.log")

    rc = server.call(argv(crashed / "run", "--kill", KILL[stage]), crashed / "killed.log")
    assert rc == -signal.SIGKILL, f"the child was not killed (returncode {rc}): the kill point was never reached\n{tail(crashed / 'killed.log')}"
    kill = json.loads((crashed / "kill.json").read_text())
    run, final = crashed / "run", crashed / "run" / "models" / final_name(stage)
    assert not (final / "model.safetensors").is_file(), f"the run finished before its kill ({kill})"
    ckpts = run / "checkpoints" / stage_name(stage)
    if kill["mode"] == "checkpoint":  # the torn write is there, for resume to ignore
        assert list(ckpts.glob(".tmp-step-*")), f"no half-written .tmp-* folder after {kill}"
    last = latest_checkpoint(ckpts)  # resume restores state (not a fresh start) and has steps to redo
    assert last is not None and int(last.name.removeprefix("step-")) < STEPS, (last, kill)

    rc = server.call(argv(run, "--resume"), crashed / "resumed.log")
    assert rc == 0, tail(crashed / "resumed.log")

    want, got = weights(ref / "run" / "models" / final_name(stage)), weights(final)
    assert want and got.keys() == want.keys(), (sorted(want), sorted(got))
    for name in want:
        assert got[name].keys() == want[name].keys(), name
        differ = [k for k in want[name] if not torch.equal(want[name][k], got[name][k])]
        assert not differ, f"{stage} killed {kill['where']}: {name} differs from the uninterrupted run in {differ[:5]}"

    rows = metric_rows(run, stage_name(stage))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), f"steps logged after the resume ({kill['where']})"
    assert rows == metric_rows(ref / "run", stage_name(stage))
