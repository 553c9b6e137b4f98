"""PPO, value, REINFORCE losses and entropy against naive loops and hand-made gradients."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.losses import entropy_from_logits, ppo_policy_loss, reinforce_loss, risk_loss, value_loss

B, T, V = 5, 8, 6


def _mask(b: int, t: int, g: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t
    return torch.arange(t)[None, :] < lengths[:, None]


def _real(mask: torch.Tensor) -> list[tuple[int, int]]:
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]


def test_ppo_policy_loss_matches_loop():
    g = torch.Generator().manual_seed(0)
    mask = _mask(B, T, g)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    eps = 0.2
    loss, stats = ppo_policy_loss(logp, old, adv, mask, eps)
    real = _real(mask)
    total, clipped, kl = 0.0, 0, 0.0
    for b, t in real:
        ratio, a = math.exp(logp[b, t].item() - old[b, t].item()), adv[b, t].item()
        total += -min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
        clipped += (a > 0 and ratio > 1 + eps) or (a < 0 and ratio < 1 - eps)
        kl += ratio - 1 - math.log(ratio)
    assert 0 < clipped < len(real)
    assert loss.item() == pytest.approx(total / len(real), abs=1e-12)
    assert stats["clip/frac"].item() == pytest.approx(clipped / len(real), abs=1e-12)
    assert stats["kl/approx"].item() == pytest.approx(kl / len(real), abs=1e-12)


def test_ppo_gradient_is_zero_exactly_where_clipping_binds():
    eps = 0.2
    ratios = [1.5, 1.5, 0.5, 0.5, 1.1, 0.9, 1.0]
    advs = [2.0, -2.0, -1.0, 1.0, 3.0, -0.5, 0.0]
    # clipped?  yes   no    yes   no   no   no   (A = 0: no gradient, not clipped)
    old = torch.full((1, 8), -1.0, dtype=torch.float64)
    logp = (old + torch.log(torch.tensor([ratios + [1.7]], dtype=torch.float64))).requires_grad_(True)
    adv = torch.tensor([advs + [5.0]], dtype=torch.float64)
    mask = torch.tensor([[True] * 7 + [False]])
    loss, stats = ppo_policy_loss(logp, old, adv, mask, eps)
    loss.backward()
    n = 7
    # d/dlogp of −Aρ is −Aρ on unclipped tokens.
    want = [0.0, 2.0 * 1.5 / n, 0.0, -1.0 * 0.5 / n, -3.0 * 1.1 / n, 0.5 * 0.9 / n, 0.0, 0.0]
    assert logp.grad[0].tolist() == pytest.approx(want, abs=1e-12)
    assert stats["clip/frac"].item() == pytest.approx(2 / 7, abs=1e-12)
    assert stats["kl/approx"].requires_grad is False and stats["clip/frac"].requires_grad is False


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_value_loss_matches_loop(clip_eps: float | None):
    g = torch.Generator().manual_seed(1)
    mask = _mask(B, T, g)
    old = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    returns = torch.randn(B, T, generator=g, dtype=torch.float64)
    returns[~mask] = float("nan")
    got = value_loss(values, old, returns, mask, clip_eps)
    total = 0.0
    real = _real(mask)
    for b, t in real:
        v, vo, r = values[b, t].item(), old[b, t].item(), returns[b, t].item()
        err = (v - r) ** 2
        if clip_eps is not None:
            v_clip = vo + min(max(v - vo, -clip_eps), clip_eps)
            err = max(err, (v_clip - r) ** 2)
        total += 0.5 * err
    assert got.item() == pytest.approx(total / len(real), abs=1e-12)


def test_value_loss_clipping_cuts_the_gradient():
    old = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[1.0, 0.1]], dtype=torch.float64, requires_grad=True)
    returns = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)
    value_loss(values, old, returns, torch.ones(1, 2), clip_eps=0.2).backward()
    # Token 0 moved away from R: (V − R)² = 4 > (V_clip − R)² = 1.44, the unclipped term is active
    # and pulls V back.  Token 1 is inside the clip: the ordinary gradient (V − R)/N.
    assert values.grad[0].tolist() == pytest.approx([0.5 * 2 * 2.0 / 2, 0.5 * 2 * (0.1 - 1.0) / 2], abs=1e-12)
    values2 = torch.tensor([[1.0]], dtype=torch.float64, requires_grad=True)
    value_loss(values2, torch.zeros(1, 1), torch.tensor([[3.0]]), torch.ones(1, 1), clip_eps=0.2).backward()
    # V moved towards R but past the clip: the clipped error (0.2 − 3)² > (1 − 3)² is active, gradient 0.
    assert values2.grad.item() == 0.0


def test_reinforce_loss_matches_loop_for_token_and_sequence_advantages():
    g = torch.Generator().manual_seed(2)
    mask = _mask(B, T, g)
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    adv_tok = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv_seq = torch.randn(B, generator=g, dtype=torch.float64)
    real = _real(mask)
    got = reinforce_loss(logp, adv_tok, mask)
    assert got.item() == pytest.approx(sum(-adv_tok[b, t].item() * logp[b, t].item() for b, t in real) / len(real), abs=1e-12)
    got_seq = reinforce_loss(logp, adv_seq, mask)
    assert got_seq.item() == pytest.approx(sum(-adv_seq[b].item() * logp[b, t].item() for b, t in real) / len(real), abs=1e-12)
    got_seq.backward()
    want = torch.where(mask, -adv_seq[:, None].expand(B, T) / len(real), 0.0)
    assert torch.allclose(logp.grad, want, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_risk_loss_matches_loop_and_its_gradient_is_the_q_weighted_advantage(alpha: float):
    g = torch.Generator().manual_seed(5)
    G, K = 3, 4
    seq_logp = (-torch.rand(G, K, generator=g, dtype=torch.float64) * 20).requires_grad_(True)
    returns = torch.rand(G, K, generator=g, dtype=torch.float64)
    keep = torch.tensor([[True] * 4, [True, False, True, False], [True, True, True, False]])
    total, want_grad = 0.0, torch.zeros(G, K, dtype=torch.float64)
    for x in range(G):  # naive: Q over the kept candidates, L = −mean_x Σ Q R
        kept = [i for i in range(K) if keep[x, i]]
        w = [math.exp(alpha * seq_logp[x, i].item()) for i in kept]
        q = [wi / sum(w) for wi in w]
        expected = sum(qi * returns[x, i].item() for qi, i in zip(q, kept))
        total += -expected / G
        for qi, i in zip(q, kept):  # dL/dlog π(y_i) = −α·Q_i·(R_i − E_Q[R]) / G
            want_grad[x, i] = -alpha * qi * (returns[x, i].item() - expected) / G
    loss = risk_loss(seq_logp, returns, keep, alpha)
    assert loss.item() == pytest.approx(total, abs=1e-12)
    loss.backward()
    assert torch.allclose(seq_logp.grad, want_grad, atol=1e-12)
    assert (seq_logp.grad[~keep] == 0).all()


@pytest.mark.parametrize("with_mask", [False, True])
def test_entropy_matches_loop(with_mask: bool):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    allowed = torch.tensor([True, True, False, True, False, True]) if with_mask else None
    ok = allowed.tolist() if with_mask else [True] * V
    got = entropy_from_logits(logits, allowed)
    assert got.shape == (B, T)
    for b in range(B):
        for t in range(T):
            z = sum(math.exp(logits[b, t, a].item()) for a in range(V) if ok[a])
            p = [math.exp(logits[b, t, a].item()) / z for a in range(V) if ok[a]]
            assert got[b, t].item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-10)


def test_entropy_of_uniform_and_finite_gradients_with_excluded_actions():
    allowed = torch.tensor([True, False, True, True, False, False])
    assert entropy_from_logits(torch.zeros(2, 3, V), allowed).allclose(torch.full((2, 3), math.log(3)))
    assert entropy_from_logits(torch.zeros(2, 3, V)).allclose(torch.full((2, 3), math.log(V)))
    logits = torch.randn(2, 3, V)
    logits[..., 0] = float("-inf")
    logits.requires_grad_(True)
    entropy_from_logits(logits, allowed).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_expected_reward_loss_matches_loop_and_its_gradient_is_sum_of_grad_pi_times_reward():
    """Value: −mean over real steps of Σ_a π(a|s)·r(a) (loop); gradient w.r.t. the logits:
    −(1/n) π(a)(r(a) − Σ_b π(b) r(b)) at each real step, the softmax Jacobian applied to r;
    0 where every allowed action has the same reward (no sharpening among equals)."""
    from rlhf.kl import masked_log_softmax
    from rlhf.losses import expected_reward_loss

    g = torch.Generator().manual_seed(5)
    B, T, V = 3, 4, 6
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    allowed = torch.tensor([True, True, False, True, True, False])
    rewards = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    rewards[0, 1, allowed] = -2.0  # equal rewards at one step
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float64)
    loss = expected_reward_loss(masked_log_softmax(logits, allowed), rewards, mask)
    loss.backward()
    n = int(mask.sum())
    want, grad = 0.0, torch.zeros(B, T, V, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            z = sum(math.exp(logits[b, t, a].item()) for a in range(V) if allowed[a])
            pi = [math.exp(logits[b, t, a].item()) / z if allowed[a] else 0.0 for a in range(V)]
            mean_r = sum(pi[a] * rewards[b, t, a].item() for a in range(V))
            want -= mean_r / n
            for a in range(V):
                grad[b, t, a] = -pi[a] * (rewards[b, t, a].item() - mean_r) / n
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert torch.allclose(logits.grad, grad, atol=1e-12)
    assert logits.grad[0, 1].abs().max() < 1e-15 and logits.grad[2, 1:].abs().max() == 0.0


def test_tilted_target_is_the_loop_softmax_and_maximises_reward_minus_kl():
    """π*(a) = p(a)·exp(s·r(a)) / Σ_b p(b)·exp(s·r(b)) over the allowed actions (loop), and no
    other distribution at that state has a larger E_π[s·r] − KL(π‖p)."""
    from rlhf.kl import masked_log_softmax
    from rlhf.losses import tilted_target

    g = torch.Generator().manual_seed(2)
    B, T, V = 2, 3, 5
    prior_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    rewards = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    allowed = torch.tensor([True, False, True, True, True])
    got = tilted_target(prior_logits, rewards, 2.5, allowed).double()
    logp = masked_log_softmax(prior_logits, allowed)
    for b in range(B):
        for t in range(T):
            w = [math.exp(logp[b, t, a].item() + 2.5 * rewards[b, t, a].item()) if allowed[a] else 0.0 for a in range(V)]
            for a in range(V):
                want = math.log(w[a] / sum(w)) if allowed[a] else -math.inf
                assert got[b, t, a].item() == pytest.approx(want, abs=1e-5)

            def objective(q):
                return sum(q[a] * (2.5 * rewards[b, t, a].item() - math.log(q[a]) + logp[b, t, a].item()) for a in range(V) if allowed[a] and q[a] > 0)

            best = objective(got[b, t].exp().tolist())
            for _ in range(20):
                q = torch.softmax(got[b, t].masked_fill(~allowed, -math.inf) + 0.3 * torch.randn(V, generator=g, dtype=torch.float64), -1).tolist()
                assert objective(q) <= best + 1e-9


def _loop_softmax(logits: torch.Tensor, allowed: torch.Tensor, b: int, t: int) -> dict[int, float]:
    """π(a) at step (b, t) over the allowed actions, by an explicit sum."""
    z = sum(math.exp(logits[b, t, a].item()) for a in range(len(allowed)) if allowed[a])
    return {a: math.exp(logits[b, t, a].item()) / z for a in range(len(allowed)) if allowed[a]}


def test_distillation_loss_matches_loop_and_its_gradient_is_pi_minus_target():
    """Value: mean over real steps of −Σ_a π*(a) log π(a); gradient w.r.t. the logits at a real
    step: (π(a) − π*(a)) / n, zero where π = π*."""
    from rlhf.kl import masked_log_softmax
    from rlhf.losses import distillation_loss

    g = torch.Generator().manual_seed(4)
    B, T, V = 3, 4, 6
    allowed = torch.tensor([True, True, False, True, True, True])
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    target = masked_log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), allowed)
    target[1, 2] = masked_log_softmax(logits[1, 2].detach(), allowed)  # the policy already equals the target here
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.float64)
    loss = distillation_loss(masked_log_softmax(logits, allowed), target, mask)
    loss.backward()
    n = int(mask.sum())
    want, grad = 0.0, torch.zeros(B, T, V, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            for a, pi in _loop_softmax(logits, allowed, b, t).items():
                tgt = math.exp(target[b, t, a].item())
                want -= tgt * math.log(pi) / n
                grad[b, t, a] = (pi - tgt) / n
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert torch.allclose(logits.grad, grad, atol=1e-12)
    assert logits.grad[1, 2].abs().max() < 1e-15 and logits.grad[0, 2:].abs().max() == 0.0


def test_reverse_kl_loss_matches_loop_and_its_gradient():
    """Value: mean over real steps of Σ_a π(a)(log π(a) − log π*(a)); gradient w.r.t. the logits
    at a real step: π(a)·(log π(a) − log π*(a) − KL) / n, zero where π = π*."""
    from rlhf.kl import masked_log_softmax
    from rlhf.losses import reverse_kl_loss

    g = torch.Generator().manual_seed(5)
    B, T, V = 3, 4, 6
    allowed = torch.tensor([True, False, True, True, True, True])
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    target = masked_log_softmax(3 * torch.randn(B, T, V, generator=g, dtype=torch.float64), allowed)
    target[2, 1] = masked_log_softmax(logits[2, 1].detach(), allowed)  # the policy already equals the target here
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    loss = reverse_kl_loss(masked_log_softmax(logits, allowed), target, mask)
    loss.backward()
    n = int(mask.sum())
    want, grad = 0.0, torch.zeros(B, T, V, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            pi = _loop_softmax(logits, allowed, b, t)
            kl = sum(pi[a] * (math.log(pi[a]) - target[b, t, a].item()) for a in pi)
            want += kl / n
            for a in pi:
                grad[b, t, a] = pi[a] * (math.log(pi[a]) - target[b, t, a].item() - kl) / n
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert torch.allclose(logits.grad, grad, atol=1e-12)
    assert logits.grad[2, 1].abs().max() < 1e-15 and logits.grad[1, 1:].abs().max() == 0.0 and logits.grad[:, :, 1].abs().max() == 0.0


@pytest.mark.parametrize("w", [1.0, 2.5])
def test_symmetric_kl_loss_matches_loop_and_its_gradient(w):
    """Value: mean over real steps of w·(−Σ_a π*(a) log π(a)) + Σ_a π(a)(log π(a) − log π*(a));
    gradient w.r.t. the logits at a real step: (w·(π(a) − π*(a)) + π(a)(log π(a) − log π*(a) − KL)) / n,
    zero where π = π* whatever w."""
    from rlhf.kl import masked_log_softmax
    from rlhf.losses import symmetric_kl_loss

    g = torch.Generator().manual_seed(6)
    B, T, V = 2, 5, 5
    allowed = torch.tensor([True, True, True, False, True])
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    target = masked_log_softmax(2 * torch.randn(B, T, V, generator=g, dtype=torch.float64), allowed)
    target[0, 3] = masked_log_softmax(logits[0, 3].detach(), allowed)  # the policy already equals the target here
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.float64)
    loss = symmetric_kl_loss(masked_log_softmax(logits, allowed), target, mask, forward_weight=w)
    loss.backward()
    n = int(mask.sum())
    want, grad = 0.0, torch.zeros(B, T, V, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            pi = _loop_softmax(logits, allowed, b, t)
            tgt = {a: target[b, t, a].item() for a in pi}
            kl = sum(pi[a] * (math.log(pi[a]) - tgt[a]) for a in pi)
            ce = -sum(math.exp(tgt[a]) * math.log(pi[a]) for a in pi)
            want += (w * ce + kl) / n
            for a in pi:
                grad[b, t, a] = (w * (pi[a] - math.exp(tgt[a])) + pi[a] * (math.log(pi[a]) - tgt[a] - kl)) / n
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert torch.allclose(logits.grad, grad, atol=1e-12)
    assert logits.grad[0, 3].abs().max() < 1e-15 and logits.grad[1, 2:].abs().max() == 0.0 and logits.grad[:, :, 3].abs().max() == 0.0
