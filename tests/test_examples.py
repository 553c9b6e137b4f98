"""The worked examples of docs/extending.md run: a counterpoint rule, a task and an algorithm of
one's own, each one file under examples/, used from YAML alone (import paths)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from apps.pipeline import load_run_config, make_task, run_pipeline
from examples.counterpoint_rule import NO_REPEATED_NOTE, repeated_note
from rlhf.errors import UserError
from rlhf.interfaces import Completions
from rlhf.rollout import length_mask
from rlhf.runs import Run, read_metrics
from rlhf.tune import TuneConfig, tune
from tasks.counterpoint.piece import FirstSpeciesBatch, FirstSpeciesPiece

REPO = Path(__file__).resolve().parents[1]
RULE = "examples.counterpoint_rule:NO_REPEATED_NOTE"


def random_pieces(n: int, seed: int = 0) -> list[FirstSpeciesPiece]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(4, 12))
        cf = 60 + rng.integers(-3, 4, size=k).cumsum() % 12
        cp = cf + rng.choice([3, 4, 7, 8, 9, 12], size=k)
        cp[rng.random(k) < 0.3] = cp[0]  # plenty of repeats
        out.append(FirstSpeciesPiece(tuple(int(x) for x in cf), tuple(int(x) for x in cp), "below", int(cf[-1]) % 12, "t"))
    return out


def test_the_rule_matches_a_naive_loop():
    pieces = random_pieces(50)
    got = repeated_note(FirstSpeciesBatch.from_pieces(pieces))
    for b, p in enumerate(pieces):
        expect = [i > 0 and p.counterpoint[i] == p.counterpoint[i - 1] for i in range(len(p.counterpoint))]
        assert got[b, : len(expect)].tolist() == expect
        assert not got[b, len(expect):].any()  # padding never flagged


def test_an_extra_rule_counts_in_reward_action_rewards_and_clean_share():
    # without the default's lookahead, whose dead ends the extra rule would move too: the rule's own term alone
    cfg = load_run_config("configs/counterpoint.yaml", [f"task.extra_rules=[{RULE}]", "task.rule_weights.repeated_note=2.0", "task.lookahead=0"], quick=True)
    task, plain = make_task(cfg), make_task(load_run_config("configs/counterpoint.yaml", ["task.lookahead=0"], quick=True))
    assert [r.name for r in task.rules][-1] == "repeated_note" and NO_REPEATED_NOTE in task.rules
    prompts = task.train_prompts()[:16] * 8
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor(task.codec.completion_token_ids)
    T = max(p.n_new for p in prompts)
    tokens = ids[torch.randint(len(ids), (len(prompts), T), generator=g)]  # random intervals: some notes repeat the one before
    lengths = [p.n_new for p in prompts]
    comps = Completions(prompts, tokens, length_mask(lengths, T), lengths)
    items = task.decode(prompts, [t[: p.n_new] for p, t in zip(prompts, tokens.tolist())])
    scores = task.score(items)
    flagged = repeated_note(FirstSpeciesBatch.from_pieces(items))
    assert flagged.any() and np.array_equal(scores.violations["repeated_note"], flagged)
    # the reward is the built-in one minus 2 per repeated note (clean bonus aside, on pieces clean either way)
    diff = (plain.reward(comps).values - task.reward(comps).values).numpy()[:, : flagged.shape[1]]
    clean_both = scores.clean() == plain.score(items).clean()
    np.testing.assert_allclose(diff[clean_both], 2.0 * flagged[clean_both], atol=1e-6)
    # per-action rewards agree with the reward at the sampled actions
    act = task.action_rewards(comps)
    at_sampled = act.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(at_sampled * comps.mask, task.reward(comps).values * comps.mask)


def test_a_bad_rule_path_is_a_clear_error():
    with pytest.raises(UserError, match="task.extra_rules.*has no attribute 'NOPE'"):
        load_run_config("configs/counterpoint.yaml", ["task.extra_rules=[examples.counterpoint_rule:NOPE]"])
    with pytest.raises(UserError, match="not a tasks.counterpoint.rules.Rule"):
        load_run_config("configs/counterpoint.yaml", ["task.extra_rules=[examples.counterpoint_rule:repeated_note]"])


@pytest.mark.integration
def test_the_extra_rule_reaches_the_report(quick_run, tmp_path):
    from apps.cli import main

    out = tmp_path / "ev"
    assert main(["evaluate", "configs/counterpoint.yaml", "--quick", "--model", str(quick_run / "models" / "prior"), "--out", str(out),
                 f"task.extra_rules=[{RULE}]", "task.eval.samples_per_cantus=2", "progress=false"]) == 0
    assert "repeated_note" in (out / "report.md").read_text()


@pytest.fixture(scope="module")
def counting_run(tmp_path_factory):
    """`rlhf run examples/my_task.yaml`: a task of one's own, by import path, end to end."""
    root = tmp_path_factory.mktemp("counting")
    cfg = load_run_config(REPO / "examples" / "my_task.yaml", [f"run_dir={root}", "progress=false", "tune.steps=40"])
    run_pipeline(cfg)
    return cfg, root


@pytest.mark.integration
def test_a_task_of_ones_own_runs_end_to_end_and_learns(counting_run):
    cfg, root = counting_run
    rows = __import__("json").loads((root / "eval.json").read_text())["rows"]
    assert rows["rloo"]["reward/piece"] > rows["prior"]["reward/piece"] + 2.0, rows
    assert rows["rloo"]["kl/prior"] > 0 and math.isfinite(rows["rloo"]["kl/prior"])
    assert (root / "report.md").is_file() and (root / "models" / "rloo" / "tokenizer.json").is_file()


@pytest.mark.integration
def test_an_algorithm_of_ones_own_tunes_from_an_import_path(counting_run, tmp_path):
    cfg, root = counting_run
    prior = root / "models" / "prior"
    task = make_task(cfg, prior)
    tcfg = TuneConfig.model_validate({"algorithm": "examples.my_algorithm:SPEC", "steps": 40, "batch_size": 40, "lr": 1e-3,
                                      "checkpoint_every": 20, "kl": {"beta": 0.05}, "reinforce": {"decay": 0.2}})
    assert tcfg.model_dump()["reinforce"] == {"decay": 0.2}
    run = Run(tmp_path / "run")
    final = tune(run, tcfg, task, prior, seed=0, progress=False, name="reinforce")
    rows = read_metrics(run.root / "metrics.jsonl", "tune-reinforce")
    first = np.mean([r["reward/task"] for r in rows[:8]])
    last = np.mean([r["reward/task"] for r in rows[-8:]])
    assert last > first + 1.0, (first, last)
    assert all(math.isfinite(r["reinforce/baseline"]) for r in rows)
    assert (final / "model.safetensors").is_file()
    with pytest.raises(UserError, match="tune.rloo: settings of another algorithm, but tune.algorithm is examples.my_algorithm:SPEC"):
        load_run_config(REPO / "examples" / "my_task.yaml", ["tune.algorithm=examples.my_algorithm:SPEC", "tune.ppo.clip=0.1"])


def test_the_text_reward_matches_a_naive_count():
    from examples.text_reward import RepeatedWords, repeats

    samples = ["sun sun owl", "owl cat", "Fox fox FOX", "", "a b a b c"]
    for t in samples:  # the naive count: words equal to an earlier word
        words = t.lower().split()
        assert repeats(t) == sum(words[i] in words[:i] for i in range(len(words)))

    class Decoded(Completions):  # given texts instead of a tokenizer: the reward reads nothing else
        @property
        def texts(self) -> list[str]:
            return samples

    comps = Decoded([None] * 5, torch.zeros(5, 1, dtype=torch.long), torch.ones(5, 1, dtype=torch.bool), [1] * 5)
    r = RepeatedWords(per_word=0.5)(comps)
    assert r.values.tolist() == [-0.5, 0.0, -1.0, 0.0, -1.0] and r.diagnostics["stutter_share"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="per_word"):
        RepeatedWords(per_word=-1)


@pytest.mark.integration
def test_the_text_reward_joins_the_task_reward_from_yaml(tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_run_config(REPO / "configs" / "text.yaml", [f"run_dir={run_dir}", "progress=false", "tune.steps=3", "tune.checkpoint_every=3",
                                                           "rewards=[{fn: task}, {fn: 'examples.text_reward:RepeatedWords', args: {per_word: 0.5}, weight: 0.2}]"],
                          quick=True)
    run_pipeline(cfg)
    rows = read_metrics(run_dir / "metrics.jsonl", "tune-rloo")
    assert len(rows) == 3
    for r in rows:
        assert r["reward/RepeatedWords"] <= 0.0 and 0.0 <= r["reward/RepeatedWords/stutter_share"] <= 1.0
        assert 0.0 <= r["reward/task"] <= 1.0
