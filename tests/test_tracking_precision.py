"""Run-wide settings shared by every command (rlhf.config.RunSettings): TensorBoard receives
exactly the rows of metrics.jsonl, a resumed stage included; a bf16 tune runs its training
forwards in bf16, stays finite and learns."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from rlhf.config import RunSettings
from rlhf.errors import UserError
from rlhf.runs import Run, read_metrics
from rlhf.tune import TuneConfig, Tuner, tune

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
from toy import ToyTask, save_prior  # noqa: E402


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    return save_prior(tmp_path_factory.mktemp("toy") / "prior")


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} as TensorBoard itself reads the event files of ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={SCALARS: 0})  # 0: keep every event
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice {steps}"
        out[tag] = {e.step: e.value for e in events}
    return out


def test_tensorboard_receives_the_rows_of_metrics_jsonl_also_after_a_resume(prior, tmp_path):
    cfg = TuneConfig.model_validate({"algorithm": "rloo", "steps": 5, "batch_size": 16, "checkpoint_every": 3, "lr": 3e-3, "rloo": {"k": 4}})
    run = Run(tmp_path / "run")
    run.configure(RunSettings(log_with=["tensorboard"]))
    tune(run, cfg, ToyTask(), prior, seed=0, progress=False)
    # a crash after step 5 was logged but before its checkpoint: resume from step 3, redo 4 and 5, go on to 6
    shutil.rmtree(run.checkpoint_dir("tune-rloo", 5))
    shutil.rmtree(run.final_model_dir("rloo"))
    run.metrics.close()
    again = Run(tmp_path / "run")
    again.configure(RunSettings(log_with=["tensorboard"]))
    tune(again, cfg.model_copy(update={"steps": 6}), ToyTask(), prior, seed=0, progress=False, resume=True)
    again.metrics.close()

    rows = read_metrics(tmp_path / "run" / "metrics.jsonl", "tune-rloo")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    board = tensorboard_scalars(tmp_path / "run" / "tracking" / "tune-rloo")
    keys = {k for r in rows for k, v in r.items() if k not in ("stage", "step", "time") and isinstance(v, float)}
    assert keys and set(board) == keys
    for key in keys:
        expected = {r["step"]: r[key] for r in rows if key in r}
        assert board[key].keys() == expected.keys(), key
        for step, value in expected.items():
            got = board[key][step]
            # TensorBoard stores float32
            assert (math.isnan(got) and math.isnan(value)) or got == pytest.approx(value, rel=1e-6, abs=1e-30), (key, step)


def test_a_tracker_that_is_not_installed_is_refused_at_load():
    import importlib.util

    missing = next((t for t in ("wandb", "mlflow") if importlib.util.find_spec(t) is None), None)
    if missing is None:
        pytest.skip("wandb and mlflow are both installed here")
    with pytest.raises(ValueError, match=f"tracker {missing} is not installed; pip install {missing}"):
        RunSettings(log_with=[missing])


def test_fp16_on_a_cpu_is_refused_with_the_fix(prior, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on a GPU")
    run = Run(tmp_path)
    run.configure(RunSettings(mixed_precision="fp16"))
    cfg = TuneConfig.model_validate({"algorithm": "rloo", "steps": 2, "batch_size": 8, "rloo": {"k": 4}})
    with pytest.raises(UserError, match="fp16 needs a GPU.*use bf16"):
        Tuner(run, cfg, ToyTask(), prior, seed=0, progress=False)


def test_a_bf16_tune_runs_in_bf16_stays_finite_and_learns(prior, tmp_path):
    from rlhf.rollout import sequence_forward

    run = Run(tmp_path)
    run.configure(RunSettings(mixed_precision="bf16"))
    cfg = TuneConfig.model_validate({"algorithm": "rloo", "steps": 30, "batch_size": 32, "checkpoint_every": 100, "lr": 3e-3,
                                     "kl": {"beta": 0.01}, "rloo": {"k": 4}})
    tuner = Tuner(run, cfg, ToyTask(), prior, seed=0, progress=False)
    assert tuner.loop.accelerator.mixed_precision == "bf16"
    ids = torch.tensor([[1, 2, 3]])
    with tuner.loop.autocast():  # what the algorithms' training forwards run under
        logits, _ = sequence_forward(tuner.loop.model, ids, torch.ones_like(ids), ids)
    assert logits.dtype == torch.bfloat16
    rows = []
    for step in tuner.loop.steps():
        rows.append(tuner.iteration(step))
        tuner.loop.advance()
    assert all(math.isfinite(v) for r in rows for v in r.values())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in tuner.loop.model.parameters())  # master weights stay float32
    first = sum(r["reward/task"] for r in rows[:6]) / 6
    last = sum(r["reward/task"] for r in rows[-6:]) / 6
    assert last > first + 0.5, (first, last)  # the float32 run of tests/test_engine.py clears the same bar
    # the next run of this process without mixed precision is float32 again (accelerate's state is reset)
    plain = Tuner(Run(tmp_path / "plain"), cfg, ToyTask(), prior, seed=0, progress=False)
    assert plain.loop.accelerator.mixed_precision == "no"
