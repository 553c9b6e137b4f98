"""benchmarks/time_to_quality.py: the time-to-target arithmetic, the eval schedule and the
length processor TRL samples with (no training; a few seconds)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from tasks.counterpoint.tokens import build_codec

_spec = importlib.util.spec_from_file_location("time_to_quality", Path(__file__).parents[1] / "benchmarks" / "time_to_quality.py")
ttq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ttq)


def test_time_to_target():
    ours = [[0.0, 0.0], [1.5, 0.2], [3.0, 0.5], [4.5, 0.4]]  # final 0.4, first reached at 3.0
    r = ttq.time_to_target(ours, [[0.0, 0.0], [1.5, 0.1], [3.0, 0.3], [4.5, 0.45]], 4.5)
    assert r["target_clean_share"] == 0.4 and r["ours_minutes_to_target"] == 3.0
    assert r["trl_reached_target"] and r["trl_minutes_to_target"] == 4.5 and r["ratio_time_to_target_vs_trl"] == 1.5
    never = ttq.time_to_target(ours, [[0.0, 0.0], [6.0, 0.1]], 6.0)
    assert not never["trl_reached_target"] and never["trl_minutes_to_target"] == 6.0 and never["ratio_time_to_target_vs_trl"] == 2.0
    flat = ttq.time_to_target([[0.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [1.0, 0.0]], 1.0)
    assert flat["ours_minutes_to_target"] == 0.0 and flat["ratio_time_to_target_vs_trl"] is None
    assert ttq.time_to_target(ours, ours, 4.5, trl_ok=False)["ratio_time_to_target_vs_trl"] is None


class _ScriptedClock:
    """Reads the given minutes, one per call."""

    def __init__(self, minutes: list[float]):
        self._minutes = iter(minutes)

    @property
    def minutes(self) -> float:
        return next(self._minutes)


def test_curve_evaluates_at_points_and_budget():
    curve = ttq.Curve("x", lambda model: (0.5, 0.1), every=1.0, budget=2.5)
    curve.clock = _ScriptedClock([0.0, 0.4, 1.2, 1.3, 2.6])  # 2.6: past the budget (the point at 2.0 folds into the final one)
    assert [curve.check(None) for _ in range(5)] == [False, False, False, False, True]
    assert [m for m, _ in curve.points] == [0.0, 1.2, 2.6] and curve.violations[0] == [0.0, 0.1]


def test_curve_ends_at_its_configured_steps_with_a_final_evaluation():
    """Ours runs its tune.steps (the lr schedule decays over them) when they end inside the budget."""
    curve = ttq.Curve("ours", lambda model: (0.5, 0.1), every=1.0, budget=15.0, max_steps=3)
    curve.clock = _ScriptedClock([0.0, 0.3, 0.6, 0.9])
    done = []
    for _ in range(4):
        done.append(curve.check(None))
        curve.steps += 1
    assert done == [False, False, False, True] and [m for m, _ in curve.points] == [0.0, 0.9]


def test_cantus_length_processor_allows_notes_then_eos():
    codec = build_codec("first_species")
    tok = codec.tokenizer
    prompt = codec.encode_prompt(([62, 65, 64, 62], "below"))
    short = codec.encode_prompt(([62, 65, 64], "above"))  # the same length: cantus padded to 16 slots
    note = codec.completion_token_ids[24]  # iv_+0
    proc = ttq.CantusLength(tok, torch.tensor(codec.completion_token_ids), tok.eos_token_id)
    ids = torch.tensor([prompt + [note] * 3, short + [note] * 3])  # row 0: one note left; row 1: done
    out = proc(ids, torch.zeros(2, len(tok)))
    finite = torch.isfinite(out)
    assert finite[0].nonzero().flatten().tolist() == codec.completion_token_ids
    assert finite[1].nonzero().flatten().tolist() == [tok.eos_token_id]
    assert tok(text=tok.decode(prompt))["input_ids"] == prompt  # the text prompt TRL gets re-encodes exactly


def test_trl_reward_is_our_summed_step_reward_over_c():
    from tasks.counterpoint.config import CounterpointConfig
    from tasks.counterpoint.task import CounterpointTask, Prompt

    task = CounterpointTask(CounterpointConfig(clean_bonus=1.0))
    cantus = [[62, 65, 64, 62, 67, 65, 69, 67, 65, 64, 62], [60, 62, 64, 65, 64, 62, 60, 59, 60]]
    prompts = [Prompt(f"c{i}", task.codec.encode_prompt((c, pos)), len(c), c[-1] % 12)
               for i, c in enumerate(cantus) for pos in ("below", "above")]
    gen = torch.Generator().manual_seed(0)
    notes = torch.tensor(task.codec.completion_token_ids)
    consonant = notes[[24 - 12, 24 - 9, 24 + 7, 24 + 9, 24]]  # mostly consonant intervals, so some pieces are clean
    tokens = consonant[torch.randint(len(consonant), (len(prompts), 11), generator=gen)]  # [B, T]: T = the longest cantus
    ours = task.step_rewards(prompts, tokens).sum(-1) / 0.2
    eos = task.tokenizer.eos_token_id
    trl = ttq.piece_rewards(task, prompts, [t[: p.n_new] + [eos] for p, t in zip(prompts, tokens.tolist())], 0.2)
    assert torch.allclose(ours, torch.tensor(trl), atol=1e-4)
