"""Masked reductions, GAE, reward-to-go, whitening and RLOO against naive loops."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.advantages import (
    discounted_returns,
    first_in_group,
    gae,
    length_decorrelated,
    masked_mean,
    masked_sum,
    masked_var,
    rloo_advantages,
    self_critical_advantages,
    whiten,
)

B, T = 6, 9


def _mask(b: int, t: int, g: torch.Generator) -> torch.Tensor:
    """Prefix masks of random lengths 1..t (the first row full, the second length 1)."""
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0], lengths[1] = t, 1
    return torch.arange(t)[None, :] < lengths[:, None]


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = _mask(B, T, g)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    return rewards, values, mask


def _real(x: torch.Tensor, mask: torch.Tensor) -> list[float]:
    return [x[b, t].item() for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]


def _gae_loop(rewards, values, mask, gamma, lam):
    """A_t = Σ_{l=0}^{L−1−t} (γλ)^l δ_{t+l}, δ_t = r_t + γV_{t+1} − V_t, V_L = 0 (GAE eq. 16)."""
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = int(mask[b].sum())
        v = [values[b, t].item() for t in range(n)] + [0.0]
        delta = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            adv[b][t] = sum((gamma * lam) ** k * delta[t + k] for k in range(n - t))
    return adv


def _returns_loop(rewards, mask, gamma):
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = int(mask[b].sum())
        for t in range(n):
            out[b][t] = sum(gamma ** (k - t) * rewards[b, k].item() for k in range(t, n))
    return out


def test_masked_sum_mean_var_match_loops():
    rewards, _, mask = _data(0)
    x = rewards.clone()
    x[~mask] = float("nan")
    real = _real(x, mask)
    mean = sum(real) / len(real)
    assert masked_sum(x, mask).item() == pytest.approx(sum(real), abs=1e-12)
    assert masked_mean(x, mask).item() == pytest.approx(mean, abs=1e-12)
    assert masked_var(x, mask).item() == pytest.approx(sum((r - mean) ** 2 for r in real) / len(real), abs=1e-12)
    unbiased = sum((r - mean) ** 2 for r in real) / (len(real) - 1)
    assert masked_var(x, mask, unbiased=True).item() == pytest.approx(unbiased, abs=1e-12)
    rows = masked_mean(x, mask, dim=-1)
    for b in range(B):
        vals = [x[b, t].item() for t in range(T) if mask[b, t]]
        assert rows[b].item() == pytest.approx(sum(vals) / len(vals), abs=1e-12)
        assert masked_sum(x, mask, dim=-1)[b].item() == pytest.approx(sum(vals), abs=1e-12)


def test_masked_mean_of_nothing_is_zero():
    x = torch.randn(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert masked_mean(x, mask, dim=-1)[1].item() == 0.0
    assert masked_mean(x, torch.zeros(2, 3)).item() == 0.0


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.0), (0.99, 1.0), (0.8, 0.5)])
def test_gae_matches_definition(gamma: float, lam: float):
    rewards, values, mask = _data(1)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    want = _gae_loop(rewards, values, mask, gamma, lam)
    for b in range(B):
        for t in range(T):
            expected = want[b][t] if mask[b, t] else 0.0
            assert adv[b, t].item() == pytest.approx(expected, abs=1e-10)
            assert ret[b, t].item() == pytest.approx(expected + values[b, t].item() if mask[b, t] else 0.0, abs=1e-10)


def test_gae_lambda_one_is_return_minus_value():
    rewards, values, mask = _data(2)
    adv, _ = gae(rewards, values, mask, gamma=0.95, lam=1.0)
    want = torch.where(mask, discounted_returns(rewards, mask, 0.95) - values, 0.0)
    assert torch.allclose(adv, want, atol=1e-12)


def test_gae_lambda_zero_is_one_step_td_error():
    rewards, values, mask = _data(3)
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    for b in range(B):
        n = int(mask[b].sum())
        for t in range(n):
            v_next = values[b, t + 1].item() if t + 1 < n else 0.0
            assert adv[b, t].item() == pytest.approx(rewards[b, t].item() + 0.9 * v_next - values[b, t].item(), abs=1e-12)


def test_masked_tails_contribute_nothing():
    rewards, values, mask = _data(4)
    dirty_r, dirty_v = rewards.clone(), values.clone()
    dirty_r[~mask] = float("nan")
    dirty_v[~mask] = 1e6
    clean = gae(torch.where(mask, rewards, 0.0), torch.where(mask, values, 0.0), mask, 0.97, 0.9)
    dirty = gae(dirty_r, dirty_v, mask, 0.97, 0.9)
    for c, d in zip(clean, dirty):
        assert torch.equal(c, d)
        assert (d[~mask] == 0).all()
    assert torch.equal(discounted_returns(dirty_r, mask, 0.9), discounted_returns(torch.where(mask, rewards, 0.0), mask, 0.9))


def test_gae_outputs_are_constants():
    rewards, values, mask = _data(5)
    adv, ret = gae(rewards, values.requires_grad_(True), mask, 0.99, 0.95)
    assert not adv.requires_grad and not ret.requires_grad


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns_match_loop(gamma: float):
    rewards, _, mask = _data(6)
    got = discounted_returns(rewards, mask, gamma)
    want = _returns_loop(rewards, mask, gamma)
    for b in range(B):
        for t in range(T):
            assert got[b, t].item() == pytest.approx(want[b][t], abs=1e-12)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_loop(shift_mean: bool):
    rewards, _, mask = _data(7)
    x = rewards * 3 + 2
    got = whiten(x, mask, shift_mean=shift_mean)
    real = _real(x, mask)
    mean = sum(real) / len(real)
    std = math.sqrt(sum((r - mean) ** 2 for r in real) / len(real) + 1e-8)
    for b in range(B):
        for t in range(T):
            want = ((x[b, t].item() - mean) / std + (0.0 if shift_mean else mean)) if mask[b, t] else 0.0
            assert got[b, t].item() == pytest.approx(want, abs=1e-10)
    assert masked_mean(got, mask).item() == pytest.approx(0.0 if shift_mean else mean, abs=1e-10)
    assert masked_var(got, mask).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_rloo_matches_leave_one_out_loop(k: int):
    g = torch.Generator().manual_seed(8)
    rewards = torch.randn(5 * k, generator=g, dtype=torch.float64)
    got = rloo_advantages(rewards, k)
    for i in range(5 * k):
        group = range(i - i % k, i - i % k + k)
        others = [rewards[j].item() for j in group if j != i]
        assert got[i].item() == pytest.approx(rewards[i].item() - sum(others) / len(others), abs=1e-12)
    assert torch.allclose(got.view(-1, k).sum(1), torch.zeros(5, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("k", [2, 4])
def test_length_decorrelated_matches_least_squares_loop(k: int):
    """A' = A − b·ℓ with ℓ_i = L_i − mean of the other lengths in i's group and b the
    least-squares slope Σ Aℓ / Σ ℓ² (naive loops); A' has no trend in ℓ, and an advantage that
    is a pure length trend plus noise orthogonal to it keeps only the noise."""
    g = torch.Generator().manual_seed(11)
    B = 6 * k
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.randint(3, 30, (B,), generator=g)
    rel = []
    for i in range(B):
        others = [lengths[j].item() for j in range(i - i % k, i - i % k + k) if j != i]
        rel.append(lengths[i].item() - sum(others) / len(others))
    slope = sum(a * l for a, l in zip(adv.tolist(), rel)) / sum(l * l for l in rel)
    got, b = length_decorrelated(adv, lengths, k)
    assert b == pytest.approx(slope, abs=1e-12)
    for i in range(B):
        assert got[i].item() == pytest.approx(adv[i].item() - slope * rel[i], abs=1e-12)
    assert sum(a * l for a, l in zip(got.tolist(), rel)) == pytest.approx(0.0, abs=1e-9)
    # a pure length trend (shorter = better) is removed entirely; added to advantages with no
    # trend (got), only those are left
    trend = -0.3 * torch.tensor(rel, dtype=torch.float64)
    assert torch.allclose(length_decorrelated(trend, lengths, k)[0], torch.zeros(B, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(length_decorrelated(trend + got, lengths, k)[0], got, atol=1e-12)
    # equal lengths in every group: nothing to fit, advantages unchanged
    same = torch.full((B,), 7)
    kept, b0 = length_decorrelated(adv, same, k)
    assert torch.equal(kept, adv) and b0 == 0.0
    # sums over a sharded batch: the two halves with the whole batch's totals equal the whole
    half = 3 * k  # whole groups in each shard
    parts = [(adv[:half], lengths[:half]), (adv[half:], lengths[half:])]
    totals = sum(torch.stack([(a * rloo_advantages(l.double(), k)).sum(), (rloo_advantages(l.double(), k) ** 2).sum()]) for a, l in parts)
    joined = torch.cat([length_decorrelated(a, l, k, total=lambda _x: totals)[0] for a, l in parts])
    assert torch.allclose(joined, got, atol=1e-12)


def test_rloo_rejects_bad_group_sizes():
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="n_prompts"):
        rloo_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="n_prompts"):
        rloo_advantages(torch.zeros(2, 2, 2), 2)
    with pytest.raises(ValueError, match="n_prompts"):
        rloo_advantages(torch.zeros(3, 4), 2)


@pytest.mark.parametrize("k", [2, 4])
def test_token_rloo_matches_reward_to_go_loop(k: int):
    """Per-token RLOO on reward-to-go: A[i, t] = G[i, t] - mean_{j != i in i's group} G[j, t],
    with G the undiscounted sum of the rewards from t to the sample's end (naive loops)."""
    g = torch.Generator().manual_seed(3)
    B, T = 3 * k, 6
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    got = rloo_advantages(discounted_returns(rewards, mask, 1.0), k) * mask
    togo = [[sum(rewards[i, s].item() for s in range(t, int(lengths[i]))) if t < lengths[i] else 0.0 for t in range(T)] for i in range(B)]
    for i in range(B):
        others = [j for j in range(i - i % k, i - i % k + k) if j != i]
        for t in range(T):
            want = togo[i][t] - sum(togo[j][t] for j in others) / len(others) if t < lengths[i] else 0.0
            assert got[i, t].item() == pytest.approx(want, abs=1e-10)


@pytest.mark.parametrize("k", [1, 3])
def test_self_critical_matches_loop(k: int):
    g = torch.Generator().manual_seed(9)
    rewards = torch.randn(4 * k, generator=g, dtype=torch.float64)
    greedy = torch.randn(4, generator=g, dtype=torch.float64)
    got = self_critical_advantages(rewards, greedy, k)
    for i in range(4 * k):
        assert got[i].item() == pytest.approx(rewards[i].item() - greedy[i // k].item(), abs=1e-12)
    with pytest.raises(ValueError, match="baseline"):
        self_critical_advantages(rewards, greedy[:3], k)


def test_first_in_group_marks_repeats_within_a_group_only():
    eos, pad = 9, 0
    rows = [[1, 2, eos, pad], [1, 2, eos, 7], [1, 3, eos, pad], [1, 2, eos, pad],  # group 0: row 1 equals row 0 up to its length
            [1, 2, eos, pad], [4, eos, pad, pad], [4, eos, 5, 5], [4, 6, eos, pad]]  # group 1: its first row is new here
    lengths = [3, 3, 3, 3, 3, 2, 2, 3]
    tokens = torch.tensor(rows)
    mask = torch.arange(4)[None, :] < torch.tensor(lengths)[:, None]
    want = []
    for g in range(2):  # naive: a row is kept unless an earlier row of its group has the same real tokens
        seen = []
        for i in range(4 * g, 4 * g + 4):
            real = tuple(rows[i][: lengths[i]])
            want.append(real not in seen)
            seen.append(real)
    assert first_in_group(tokens, mask, 4).tolist() == want == [True, False, True, False, True, True, False, True]
    with pytest.raises(ValueError, match="k=3"):
        first_in_group(tokens, mask, 3)
