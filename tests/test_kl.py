"""KL estimators, controllers and reward shaping against naive loops and Monte Carlo."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf.kl import (
    AdaptiveKLController,
    FixedKLController,
    kl_exact,
    kl_k1,
    kl_k2,
    kl_k3,
    per_token_kl,
    sequence_kl,
    shape_rewards,
    terminal_to_steps,
)

B, T, V = 5, 7, 6


def _mask(b: int, t: int, g: torch.Generator) -> torch.Tensor:
    """Prefix masks of random lengths 1..t (the first row full)."""
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t
    return torch.arange(t)[None, :] < lengths[:, None]


def _logprobs(g: torch.Generator, *shape: int) -> torch.Tensor:
    return -torch.rand(*shape, generator=g, dtype=torch.float64) * 6


def _softmax_loop(row: list[float], allowed: list[bool]) -> list[float]:
    z = sum(math.exp(x) for x, ok in zip(row, allowed) if ok)
    return [math.exp(x) / z if ok else 0.0 for x, ok in zip(row, allowed)]


def test_k1_k2_k3_match_scalar_formulas():
    g = torch.Generator().manual_seed(0)
    logp, ref = _logprobs(g, B, T), _logprobs(g, B, T)
    k1, k2, k3 = kl_k1(logp, ref), kl_k2(logp, ref), kl_k3(logp, ref)
    for b in range(B):
        for t in range(T):
            lp, lr = logp[b, t].item(), ref[b, t].item()
            assert k1[b, t].item() == pytest.approx(lp - lr, abs=1e-12)
            assert k2[b, t].item() == pytest.approx(0.5 * (lp - lr) ** 2, abs=1e-12)
            assert k3[b, t].item() == pytest.approx(math.exp(lr - lp) - 1 - (lr - lp), abs=1e-9)


def test_k2_k3_nonnegative_and_zero_only_at_equality():
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(100_000, generator=g) * 40
    ref = -torch.rand(100_000, generator=g) * 40
    assert (kl_k3(logp, ref) >= 0).all() and (kl_k2(logp, ref) >= 0).all()
    assert (kl_k3(logp, logp) == 0).all()
    close = torch.tensor([-1e-4, 1e-4])
    assert (kl_k3(torch.zeros(2), close) > 0).all()
    assert (kl_k1(logp, ref) < 0).any()  # k1 alone is not a pointwise bound


@pytest.mark.parametrize("with_mask", [False, True])
def test_kl_exact_matches_vocabulary_loop(with_mask: bool):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    logits_ref = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    allowed = torch.tensor([True, False, True, True, False, True]) if with_mask else None
    ok = allowed.tolist() if with_mask else [True] * V
    got = kl_exact(logits, logits_ref, allowed)
    assert got.shape == (B, T)
    for b in range(B):
        for t in range(T):
            p = _softmax_loop(logits[b, t].tolist(), ok)
            q = _softmax_loop(logits_ref[b, t].tolist(), ok)
            want = sum(p[a] * math.log(p[a] / q[a]) for a in range(V) if ok[a])
            assert got[b, t].item() == pytest.approx(want, abs=1e-10)


def test_kl_exact_zero_at_equality_and_finite_gradients_with_excluded_actions():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    logits[..., 2] = float("-inf")  # e.g. removed by top-k: π(a) = 0 for both models
    logits.requires_grad_(True)
    ref = logits.detach() + torch.randn(B, T, V, generator=g, dtype=torch.float64)
    allowed = torch.tensor([True, True, True, False, True, True])
    kl = kl_exact(logits, ref, allowed)
    assert torch.isfinite(kl).all() and (kl >= 0).all()
    kl.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.allclose(kl_exact(logits.detach(), logits.detach(), allowed), torch.zeros(B, T, dtype=torch.float64))


@pytest.mark.parametrize("with_mask", [False, True])
def test_k1_and_k3_are_unbiased_monte_carlo(with_mask: bool):
    """With a ~ π, the sample means of k1 and k3 converge to KL(π‖π_ref) (Schulman 2020)."""
    g = torch.Generator().manual_seed(4)
    allowed = torch.tensor([True, True, False, True, True, True]) if with_mask else None
    n = 200_000
    for _ in range(3):
        logits = torch.randn(V, generator=g, dtype=torch.float64) * 1.5
        logits_ref = torch.randn(V, generator=g, dtype=torch.float64) * 1.5
        exact = kl_exact(logits, logits_ref, allowed).item()
        masked = logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))
        masked_ref = logits_ref if allowed is None else logits_ref.masked_fill(~allowed, float("-inf"))
        logp_all, logq_all = torch.log_softmax(masked, -1), torch.log_softmax(masked_ref, -1)
        actions = torch.multinomial(logp_all.exp(), n, replacement=True, generator=g)
        logp, logq = logp_all[actions], logq_all[actions]
        for estimator in (kl_k1, kl_k3):
            samples = estimator(logp, logq)
            stderr = samples.std().item() / math.sqrt(n)
            assert abs(samples.mean().item() - exact) < 5 * stderr + 1e-9, estimator.__name__
        # k2 is biased: its mean is ½E[(log r)²], not the KL, unless the models are close.
        assert kl_k2(logp, logq).mean().item() != pytest.approx(exact, rel=1e-3)


def test_per_token_kl_dispatches_and_validates():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(B, T, V, generator=g)
    logits_ref = torch.randn(B, T, V, generator=g)
    actions = torch.randint(0, V, (B, T), generator=g)
    logp = torch.log_softmax(logits, -1).gather(-1, actions[..., None])[..., 0]
    logq = torch.log_softmax(logits_ref, -1).gather(-1, actions[..., None])[..., 0]
    assert torch.equal(per_token_kl("k1", logp, logq), kl_k1(logp, logq))
    assert torch.equal(per_token_kl("k2", logp, logq), kl_k2(logp, logq))
    assert torch.equal(per_token_kl("k3", logp, logq), kl_k3(logp, logq))
    assert torch.equal(per_token_kl("exact", logp, logq, logits, logits_ref), kl_exact(logits, logits_ref))
    with pytest.raises(ValueError, match="needs logits"):
        per_token_kl("exact", logp, logq)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        per_token_kl("k4", logp, logq)  # type: ignore[arg-type]


def test_sequence_kl_matches_loop():
    g = torch.Generator().manual_seed(6)
    kl = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = _mask(B, T, g)
    kl[~mask] = float("nan")  # padding holds garbage
    got = sequence_kl(kl, mask)
    for b in range(B):
        assert got[b].item() == pytest.approx(sum(kl[b, t].item() for t in range(T) if mask[b, t]), abs=1e-12)


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 512) == 0.05 and ctl.update(0.0, 512) == 0.05 and ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_controller_hand_computation():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    # KL 7.5: error 0.25 is clipped to 0.2.
    assert ctl.update(7.5, 512) == pytest.approx(0.2 * (1 + 0.2 * 512 / 10_000), rel=1e-12)
    beta = ctl.value
    # KL 5.4: error −0.1, inside the clip.
    assert ctl.update(5.4, 512) == pytest.approx(beta * (1 - 0.1 * 512 / 10_000), rel=1e-12)
    beta = ctl.value
    # KL 0: error −1 is clipped to −0.2.
    assert ctl.update(0.0, 256) == pytest.approx(beta * (1 - 0.2 * 256 / 10_000), rel=1e-12)
    slow = AdaptiveKLController(0.2, target=6.0, horizon=10_000, k_beta=0.1)
    assert slow.update(7.5, 512) == pytest.approx(0.2 * (1 + 0.1 * 0.2 * 512 / 10_000), rel=1e-12)


def test_adaptive_controller_direction():
    for kl in (6.3, 9.0, 100.0):
        ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
        assert ctl.update(kl, 64) > 0.1
    for kl in (5.7, 2.0, 0.0):
        ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
        assert ctl.update(kl, 64) < 0.1
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    assert ctl.update(6.0, 64) == 0.1
    # Saturation: any KL beyond ±20 % of the target moves β by the same factor.
    a, b = AdaptiveKLController(0.1, 6.0, 1000), AdaptiveKLController(0.1, 6.0, 1000)
    assert a.update(7.3, 64) == b.update(1e6, 64)


def test_adaptive_controller_state_round_trip():
    ctl = AdaptiveKLController(0.1, target=4.0, horizon=500)
    for kl in (8.0, 3.0, 5.0):
        ctl.update(kl, 32)
    resumed = AdaptiveKLController(0.1, target=4.0, horizon=500)
    resumed.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert resumed.value == ctl.value
    assert resumed.update(2.0, 32) == ctl.update(2.0, 32)


def test_controllers_reject_bad_arguments():
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=100)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=1.0, horizon=0)
    with pytest.raises(ValueError):
        FixedKLController(-1.0)


def test_terminal_to_steps_matches_loop_and_skips_empty_rows():
    g = torch.Generator().manual_seed(7)
    mask = _mask(B, T, g)
    mask[-1] = False
    reward = torch.randn(B, generator=g, dtype=torch.float64)
    got = terminal_to_steps(reward, mask)
    for b in range(B):
        n = int(mask[b].sum())
        for t in range(T):
            want = reward[b].item() if n and t == n - 1 else 0.0
            assert got[b, t].item() == want


def test_shape_rewards_matches_loop_and_ignores_padding():
    g = torch.Generator().manual_seed(8)
    mask = _mask(B, T, g)
    task = torch.randn(B, T, generator=g, dtype=torch.float64)
    kl = torch.randn(B, T, generator=g, dtype=torch.float64).requires_grad_(True)
    with torch.no_grad():
        kl[~mask] = float("inf")  # e.g. log-probs of padding tokens
    beta, c = 0.05, 2.0
    got = shape_rewards(task, kl, mask, beta, c)
    assert not got.requires_grad
    for b in range(B):
        for t in range(T):
            want = task[b, t].item() / c - beta * kl[b, t].item() if mask[b, t] else 0.0
            assert got[b, t].item() == pytest.approx(want, abs=1e-12)


def test_terminal_reward_shaped_sums_to_sequence_objective():
    """Σ_t r_t = R/c − β·KL(sequence) when the task reward is terminal."""
    g = torch.Generator().manual_seed(9)
    mask = _mask(B, T, g)
    reward = torch.randn(B, generator=g, dtype=torch.float64)
    kl = torch.rand(B, T, generator=g, dtype=torch.float64)
    shaped = shape_rewards(terminal_to_steps(reward, mask), kl, mask, beta=0.3, c=4.0)
    assert torch.allclose(shaped.sum(-1), reward / 4.0 - 0.3 * sequence_kl(kl, mask), atol=1e-12)


def test_pathwise_kl_gradients_match_the_exact_kl_gradient():
    """Monte-Carlo oracle: over actions a ~ π at one state, the mean gradient of the k2 pathwise
    loss equals ∇_θ KL(π‖p) computed over the vocabulary; the exact form equals it per sample;
    k1's pathwise term is identically 0 (its gradient has zero mean and is left to the reward)."""
    from rlhf.kl import kl_pathwise_loss

    g = torch.Generator().manual_seed(0)
    theta = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(6, generator=g, dtype=torch.float64)
    exact_grad, = torch.autograd.grad(kl_exact(theta, ref), theta)
    n = 200_000
    a = torch.multinomial(torch.softmax(theta.detach(), -1), n, replacement=True, generator=g)
    logp = torch.log_softmax(theta, -1)[a][None]  # [1, n]: n samples of one state
    logp_ref = torch.log_softmax(ref, -1)[a][None]
    mask = torch.ones(1, n)
    k2_grad, = torch.autograd.grad(kl_pathwise_loss("k2", logp, logp_ref, mask), theta)
    torch.testing.assert_close(k2_grad, exact_grad, atol=0.02 * exact_grad.abs().max().item(), rtol=0)
    logits = theta[None, None].expand(1, 3, 6)
    ex_grad, = torch.autograd.grad(kl_pathwise_loss("exact", logp[:, :3], logp_ref[:, :3], torch.ones(1, 3), logits, ref[None, None].expand(1, 3, 6)), theta)
    torch.testing.assert_close(ex_grad, exact_grad)
    assert kl_pathwise_loss("k1", logp, logp_ref, mask).item() == 0.0
