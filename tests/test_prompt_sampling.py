"""Rank-based prompt prioritisation: probabilities against a naive loop, the running means
against a per-row loop, and the sampler's state round trip."""

import numpy as np
import pytest
import torch

from rlhf.prompt_sampling import PromptSampler, rank_priorities


def naive_priorities(returns, alpha, eps):
    p = len(returns)
    key = [(-np.inf if np.isnan(r) else r, i) for i, r in enumerate(returns)]  # NaN first, ties by index
    w = []
    for i in range(p):
        rank = 1 + sum(1 for k in key if k < key[i])
        w.append(rank ** -alpha)
    total = sum(w)
    return np.array([(1 - eps) * x / total + eps / p for x in w])


@pytest.mark.parametrize("alpha,eps", [(0.5, 0.25), (1.0, 0.0), (2.0, 1.0)])
def test_rank_priorities_equal_a_naive_loop(alpha, eps):
    rng = np.random.default_rng(0)
    returns = rng.normal(size=40).round(1)  # rounding makes ties
    returns[[3, 17]] = np.nan
    got = rank_priorities(returns, alpha, eps)
    np.testing.assert_allclose(got, naive_priorities(returns, alpha, eps), rtol=1e-12)
    assert got.sum() == pytest.approx(1.0)
    assert got.min() >= eps / 40 - 1e-15
    assert got[3] == got.max()  # an unseen prompt ranks first


def test_running_means_follow_each_prompts_batches():
    s = PromptSampler(4, "prioritized", alpha=1.0, uniform_share=0.0, ema=0.5)
    s.update(torch.tensor([0, 0, 2]), torch.tensor([-4.0, -2.0, 1.0]))
    np.testing.assert_allclose(s.returns, [-3.0, np.nan, 1.0, np.nan])  # first visit: the batch mean
    s.update(torch.tensor([0, 1]), torch.tensor([1.0, 5.0]))
    np.testing.assert_allclose(s.returns, [-3.0 + 0.5 * (1.0 + 3.0), 5.0, 1.0, np.nan])
    # the worst prompts are drawn most often: unseen 3 first, then 0 (-1), then 2 (1), then 1 (5)
    counts = np.bincount(s.draw(np.random.default_rng(0), 20_000), minlength=4)
    assert counts[3] > counts[0] > counts[2] > counts[1]
    t = PromptSampler(4, "prioritized", alpha=1.0, uniform_share=0.0, ema=0.5)
    t.load_state_dict(s.state_dict())
    np.testing.assert_array_equal(t.probs(), s.probs())
    with pytest.raises(ValueError, match="3 prompts, this task 4"):
        t.load_state_dict({"returns": [0.0, 1.0, 2.0]})


def test_uniform_sampling_keeps_the_plain_stream():
    s = PromptSampler(7, "uniform", alpha=0.5, uniform_share=0.25, ema=0.1)
    s.update(torch.tensor([1]), torch.tensor([3.0]))  # no state in uniform mode
    assert np.isnan(s.returns).all()
    np.testing.assert_array_equal(s.draw(np.random.default_rng([0, 5]), 9), np.random.default_rng([0, 5]).integers(0, 7, 9))
