"""The group-novelty reward (rlhf.rewards.GroupNovelty) against a naive count over pairs, and its
per-action rewards against re-scoring every possible last action."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from rlhf.interfaces import Completions
from rlhf.registry import REWARDS
from rlhf.rewards import GroupNovelty


@dataclass
class P:
    ids: list[int]


class Vocab:
    def __len__(self) -> int:
        return 5


def batch(rng: random.Random) -> Completions:
    prompts = [P([p]) for p in (1, 1, 1, 1, 2, 2, 2, 3)]  # groups of 4, 3 and a lone prompt
    rows = [[rng.randrange(2) for _ in range(3)] for _ in prompts]  # few choices: many duplicates
    return Completions(prompts, torch.tensor(rows), torch.ones(len(rows), 3), [3] * len(rows), None, Vocab())


def naive(c: Completions) -> list[float]:
    out = []
    for b in range(len(c)):
        others = [j for j in range(len(c)) if j != b and c.prompts[j].ids == c.prompts[b].ids]
        same = [j for j in others if c.tokens[j].tolist() == c.tokens[b].tolist()]
        out.append(-len(same) / len(others) if others else 0.0)
    return out


def test_novelty_equals_a_count_over_pairs_and_is_registered():
    assert REWARDS.get("novelty") is GroupNovelty
    rng = random.Random(0)
    for _ in range(20):
        c = batch(rng)
        assert torch.equal(GroupNovelty()(c).values, torch.tensor(naive(c)))


def test_each_last_action_is_priced_as_if_it_had_been_sampled():
    rng = random.Random(1)
    for _ in range(10):
        c = batch(rng)
        act = GroupNovelty().action_rewards(c)  # [B, T, V]
        assert act[:, :-1].abs().sum() == 0  # the reward lands on the last step only
        for b in range(len(c)):
            for v in range(len(c.tokenizer)):
                tokens = c.tokens.clone()
                tokens[b, -1] = v  # row b ends in v; the other rows stay as sampled
                alt = Completions(c.prompts, tokens, c.mask, c.lengths, None, c.tokenizer)
                assert act[b, -1, v] == torch.tensor(naive(alt)[b]), (b, v)


def test_the_task_term_of_a_sum_is_the_reward_model_when_one_is_given():
    from rlhf.rewards import RewardTerm, compose_rewards

    class Task:  # what compose_rewards needs of a task for the term 'task'
        def reward(self, completions):
            raise AssertionError("the task's own reward must not be used when a reward model stands in for it")

    c = batch(random.Random(2))
    learned = lambda comps: torch.full((len(comps),), 0.5)  # noqa: E731  a stand-in trained reward: 0.5 per sequence
    total = compose_rewards([RewardTerm(fn="task"), RewardTerm(fn="novelty", weight=2.0)], Task(), learned)(c)
    expected = 0.5 + 2.0 * torch.tensor(naive(c))
    assert torch.allclose(total.values.sum(-1), expected)


def ragged_batch(rng: random.Random) -> Completions:
    """Like :func:`batch`, with rows of 2 or 3 tokens (padded with 0 after a row's end)."""
    prompts = [P([p]) for p in (1, 1, 1, 1, 2, 2, 2, 3)]
    lengths = [rng.choice([2, 3, 3]) for _ in prompts]
    rows = [[rng.randrange(2) if t < n else 0 for t in range(3)] for n in lengths]
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(3)] for n in lengths])
    return Completions(prompts, torch.tensor(rows), mask, lengths, None, Vocab())


def naive_potential_steps(c: Completions) -> list[list[float]]:
    """Per row, Φ(t+1) − Φ(t) for t < its length, Φ(t) counted over the other rows of its prompt
    token by token (Φ(0) = 0; at its length the novelty itself)."""
    final = GroupNovelty()(c).values.tolist()
    out = []
    for b in range(len(c)):
        others = [j for j in range(len(c)) if j != b and c.prompts[j].ids == c.prompts[b].ids]
        n, T = max(len(others), 1), c.lengths[b]
        row = c.tokens[b].tolist()

        def phi(t: int) -> float:
            if t == 0:
                return 0.0
            if t == T:
                return final[b]
            return -sum(c.lengths[j] >= t and c.tokens[j].tolist()[:t] == row[:t] for j in others) / n

        out.append([phi(t + 1) - phi(t) for t in range(T)])
    return out


def test_shaped_novelty_pays_the_same_return_step_by_step():
    rng = random.Random(3)
    for _ in range(30):
        c = ragged_batch(rng)
        r = GroupNovelty(shaped=True)(c).values  # [B, T]
        torch.testing.assert_close(r.sum(-1), GroupNovelty()(c).values)
        for b, steps in enumerate(naive_potential_steps(c)):
            torch.testing.assert_close(r[b, : len(steps)], torch.tensor(steps, dtype=torch.float32))
            assert r[b, len(steps):].abs().sum() == 0
    # a row that follows the others early and leaves them late is charged early, credited late
    c = Completions([P([1])] * 2, torch.tensor([[0, 0, 1], [0, 0, 0]]), torch.ones(2, 3), [3, 3], None, Vocab())
    assert GroupNovelty(shaped=True)(c).values[0].tolist() == [-1.0, 0.0, 1.0]


def test_each_shaped_action_is_priced_as_if_it_had_been_sampled():
    rng = random.Random(4)
    for _ in range(10):
        c = ragged_batch(rng)
        act = GroupNovelty(shaped=True).action_rewards(c)  # [B, T, V]
        for b in range(len(c)):
            assert act[b, c.lengths[b]:].abs().sum() == 0
            for t in range(c.lengths[b]):
                for v in range(len(c.tokenizer)):
                    tokens = c.tokens.clone()
                    tokens[b, t] = v  # row b takes v at step t (its later tokens no longer matter to step t)
                    alt = Completions(c.prompts, tokens, c.mask, c.lengths, None, c.tokenizer)
                    assert torch.isclose(act[b, t, v], GroupNovelty(shaped=True)(alt).values[b, t]), (b, t, v)
