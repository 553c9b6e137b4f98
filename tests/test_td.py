"""Sequence Tutor's TD math: targets and policies against loops, and Q/Ψ/G backups on a tiny
MDP against the closed-form KL-control optimum (Jaques et al. 2017; Rawlik et al. 2012; Fox et al. 2016)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from rlhf.td import (
    action_values,
    boltzmann_probs,
    g_policy_logits,
    g_target,
    kl_control_reward,
    next_state,
    psi_policy_logits,
    psi_target,
    q_policy_probs,
    q_target,
    soft_update,
    td_loss,
    td_reward,
)

B, T, V = 4, 6, 5
ALLOWED = torch.tensor([True, False, True, True, False])


def _mask(b: int, t: int, g: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t
    return torch.arange(t)[None, :] < lengths[:, None]


def _ok(allowed: torch.Tensor | None) -> list[bool]:
    return [True] * V if allowed is None else allowed.tolist()


def _logsumexp(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


# --- rewards, shifting, targets ------------------------------------------------------------


def test_td_reward_per_method():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(B, T, generator=g, dtype=torch.float64)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            want = r[b, t].item() / 0.5 + logp[b, t].item()
            assert kl_control_reward(r, logp, 0.5)[b, t].item() == pytest.approx(want, abs=1e-12)
    assert torch.equal(td_reward("q", r, logp, 0.5), kl_control_reward(r, logp, 0.5))
    assert torch.equal(td_reward("psi", r, logp, 0.5), kl_control_reward(r, logp, 0.5))
    assert torch.equal(td_reward("g", r, logp, 0.5), r / 0.5)
    with pytest.raises(ValueError, match="unknown TD method"):
        td_reward("sarsa", r, logp, 0.5)  # type: ignore[arg-type]


def test_next_state_matches_loop():
    g = torch.Generator().manual_seed(1)
    mask = _mask(B, T, g)
    values = torch.randn(B, T, V, generator=g)
    nxt, done = next_state(values, mask)
    for b in range(B):
        n = int(mask[b].sum())
        for t in range(T):
            assert torch.equal(nxt[b, t], values[b, t + 1] if t + 1 < T else torch.zeros(V))
            assert bool(done[b, t]) == (t + 1 >= n)


@pytest.mark.parametrize("allowed", [None, ALLOWED])
@pytest.mark.parametrize("shape", [(B, T), (11,)])
def test_targets_match_loops(allowed: torch.Tensor | None, shape: tuple[int, ...]):
    g = torch.Generator().manual_seed(2)
    reward = torch.randn(*shape, generator=g, dtype=torch.float64)
    nxt = torch.randn(*shape, V, generator=g, dtype=torch.float64) * 3
    prior = torch.log_softmax(torch.randn(*shape, V, generator=g, dtype=torch.float64), -1)
    done = torch.rand(*shape, generator=g) < 0.3
    nxt[done] = float("nan")  # a terminal s' may hold anything
    gamma = 0.9
    q = q_target(reward, nxt, done, gamma, allowed)
    psi = psi_target(reward, nxt, done, gamma, allowed)
    gg = g_target(reward, nxt, prior, done, gamma, allowed)
    ok = _ok(allowed)
    for i in itertools.product(*[range(s) for s in shape]):
        r = reward[i].item()
        if done[i]:
            want_q = want_psi = want_g = r
        else:
            row, lp = nxt[i].tolist(), prior[i].tolist()
            want_q = r + gamma * max(row[a] for a in range(V) if ok[a])
            want_psi = r + gamma * _logsumexp([row[a] for a in range(V) if ok[a]])
            want_g = r + gamma * _logsumexp([row[a] + lp[a] for a in range(V) if ok[a]])
        assert q[i].item() == pytest.approx(want_q, abs=1e-10)
        assert psi[i].item() == pytest.approx(want_psi, abs=1e-10)
        assert gg[i].item() == pytest.approx(want_g, abs=1e-10)


def test_targets_carry_no_gradient():
    nxt = torch.randn(3, V, requires_grad=True)
    assert not q_target(torch.zeros(3), nxt, torch.zeros(3), 0.9).requires_grad
    assert not psi_target(torch.zeros(3), nxt, torch.zeros(3), 0.9).requires_grad


def test_action_values_matches_loop():
    g = torch.Generator().manual_seed(3)
    values = torch.randn(B, T, V, generator=g)
    actions = torch.randint(0, V, (B, T), generator=g)
    got = action_values(values, actions)
    for b in range(B):
        for t in range(T):
            assert got[b, t].item() == values[b, t, actions[b, t]].item()


@pytest.mark.parametrize("kind", ["huber", "mse"])
def test_td_loss_matches_loop(kind: str):
    g = torch.Generator().manual_seed(4)
    mask = _mask(B, T, g)
    pred = torch.randn(B, T, generator=g, dtype=torch.float64) * 2
    target = torch.randn(B, T, generator=g, dtype=torch.float64) * 2
    target[~mask] = float("nan")
    got = td_loss(pred, target, mask, kind)  # type: ignore[arg-type]
    total, n = 0.0, 0
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                x = abs(pred[b, t].item() - target[b, t].item())
                total += (0.5 * x * x if x <= 1 else x - 0.5) if kind == "huber" else x * x
                n += 1
    assert got.item() == pytest.approx(total / n, abs=1e-12)
    with pytest.raises(ValueError, match="unknown TD loss"):
        td_loss(pred, target, mask, "l1")  # type: ignore[arg-type]


# --- policies ------------------------------------------------------------------------------


@pytest.mark.parametrize("allowed", [None, ALLOWED])
def test_q_policy_probs_matches_loop(allowed: torch.Tensor | None):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    q[0, 0, 1] = 100.0  # the best raw value is disallowed under ALLOWED
    eps = 0.1
    got = q_policy_probs(q, eps, allowed)
    ok = _ok(allowed)
    for b in range(B):
        for t in range(T):
            best = max((a for a in range(V) if ok[a]), key=lambda a: q[b, t, a].item())
            for a in range(V):
                want = (1 - eps) * (a == best) + (eps / sum(ok) if ok[a] else 0.0)
                assert got[b, t, a].item() == pytest.approx(want, abs=1e-12)
    assert torch.allclose(got.sum(-1), torch.ones(B, T, dtype=torch.float64))


@pytest.mark.parametrize("allowed", [None, ALLOWED])
def test_boltzmann_probs_matches_loop(allowed: torch.Tensor | None):
    g = torch.Generator().manual_seed(6)
    values = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    got = boltzmann_probs(values, 0.7, allowed)
    ok = _ok(allowed)
    for b in range(B):
        for t in range(T):
            z = sum(math.exp(values[b, t, a].item() / 0.7) for a in range(V) if ok[a])
            for a in range(V):
                want = math.exp(values[b, t, a].item() / 0.7) / z if ok[a] else 0.0
                assert got[b, t, a].item() == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        boltzmann_probs(values, 0.0)


def test_psi_and_g_policy_logits():
    g = torch.Generator().manual_seed(7)
    psi = torch.randn(B, V, generator=g)
    prior = torch.log_softmax(torch.randn(B, V, generator=g), -1)
    assert torch.equal(psi_policy_logits(psi), psi)
    assert torch.equal(g_policy_logits(psi, prior), psi + prior)


# --- the tiny MDP ---------------------------------------------------------------------------
# States (t, x), x ∈ {0, 1, 2}, t < H; action a moves x → (x + a) mod 3 deterministically;
# the episode ends after H steps.  Per-step rewards r(t, x, a) and a fixed prior p(a | t, x).

H, X, A = 4, 3, 3
C = 0.5
MDP_ALLOWED = torch.tensor([True, False, True])


def _mdp(allowed: torch.Tensor | None, seed: int = 11):
    g = torch.Generator().manual_seed(seed)
    reward = torch.randn(H, X, A, generator=g, dtype=torch.float64)
    logits = torch.randn(H, X, A, generator=g, dtype=torch.float64)
    logp_full = torch.log_softmax(logits, -1)
    if allowed is None:
        logp = logp_full
    else:
        # Disallowed entries keep the unrenormalised (finite) log-probs: only the mask may exclude them.
        logp = torch.where(allowed, torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), -1), logp_full)
    nxt = (torch.arange(X)[:, None] + torch.arange(A)[None, :]) % X  # [X, A]
    return reward, logp, nxt


def _next_rows(table: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    """table [H, X, A] → values of s' for every (t, x, a): [H, X, A, A]; the row after the
    horizon is NaN, which ``done`` must keep out."""
    padded = torch.cat([table, torch.full((1, X, A), float("nan"), dtype=table.dtype)])
    return padded[1:][:, nxt]


def _iterate(backup, init: torch.Tensor, ok: list[bool]) -> tuple[torch.Tensor, int]:
    """Apply the backup until a fixed point on the allowed entries; a finite horizon needs ≤ H+1 sweeps."""
    table = init
    for sweep in range(1, 50):
        new = backup(table)
        keep = torch.tensor(ok)
        if torch.equal(new[..., keep], table[..., keep]):
            return new, sweep
        table = new
    raise AssertionError("backup did not converge")


def _soft_optimum(reward, logp, nxt, gamma, ok):
    """V*(t, x) = log Σ_a p(a|s) exp(r/c + γ V*(s')) by backward induction, V*(H, ·) = 0."""
    v = [[0.0] * X for _ in range(H + 1)]
    for t in range(H - 1, -1, -1):
        for x in range(X):
            v[t][x] = _logsumexp(
                [logp[t, x, a].item() + reward[t, x, a].item() / C + gamma * v[t + 1][nxt[x, a].item()] for a in range(A) if ok[a]]
            )
    return v


def _kl_objective(policy, reward, logp, nxt, gamma, ok):
    """J(s) = Σ_a π(a|s) [r/c − log(π(a|s)/p(a|s)) + γ J(s')], the KL-regularised return."""
    j = [[0.0] * X for _ in range(H + 1)]
    for t in range(H - 1, -1, -1):
        for x in range(X):
            total = 0.0
            for a in range(A):
                pi = policy[t][x][a]
                if ok[a] and pi > 0:
                    total += pi * (reward[t, x, a].item() / C - math.log(pi) + logp[t, x, a].item() + gamma * j[t + 1][nxt[x, a].item()])
            j[t][x] = total
    return j


def _done() -> torch.Tensor:
    return (torch.arange(H) == H - 1)[:, None, None].expand(H, X, A)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("allowed", [None, MDP_ALLOWED])
def test_psi_and_g_backups_reach_the_kl_control_optimum(gamma: float, allowed: torch.Tensor | None):
    reward, logp, nxt = _mdp(allowed)
    ok = [True] * A if allowed is None else allowed.tolist()
    done = _done()
    init = torch.randn(H, X, A, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    psi, sweeps_psi = _iterate(
        lambda tab: psi_target(td_reward("psi", reward, logp, C), _next_rows(tab, nxt), done, gamma, allowed), init, ok
    )
    g, sweeps_g = _iterate(
        lambda tab: g_target(td_reward("g", reward, logp, C), _next_rows(tab, nxt), _next_rows(logp, nxt), done, gamma, allowed),
        init,
        ok,
    )
    assert sweeps_psi <= H + 1 and sweeps_g <= H + 1

    v = _soft_optimum(reward, logp, nxt, gamma, ok)
    pi_psi = torch.softmax(psi_policy_logits(psi).masked_fill(~torch.tensor(ok), float("-inf")), -1)
    pi_g = torch.softmax(g_policy_logits(g, logp).masked_fill(~torch.tensor(ok), float("-inf")), -1)
    optimal = [[[0.0] * A for _ in range(X)] for _ in range(H)]
    for t in range(H):
        for x in range(X):
            for a in range(A):
                if not ok[a]:
                    assert pi_psi[t, x, a].item() == 0.0 and pi_g[t, x, a].item() == 0.0
                    continue
                soft_next = reward[t, x, a].item() / C + gamma * v[t + 1][nxt[x, a].item()]
                assert psi[t, x, a].item() == pytest.approx(soft_next + logp[t, x, a].item(), abs=1e-10)
                assert g[t, x, a].item() == pytest.approx(soft_next, abs=1e-10)
                optimal[t][x][a] = math.exp(logp[t, x, a].item() + soft_next - v[t][x])
                assert pi_psi[t, x, a].item() == pytest.approx(optimal[t][x][a], abs=1e-10)
                assert pi_g[t, x, a].item() == pytest.approx(optimal[t][x][a], abs=1e-10)
            assert sum(optimal[t][x]) == pytest.approx(1.0, abs=1e-12)

    # V* is the value of the KL-regularised objective at π*, and no other policy beats it.
    j_opt = _kl_objective(optimal, reward, logp, nxt, gamma, ok)
    for x in range(X):
        assert j_opt[0][x] == pytest.approx(v[0][x], abs=1e-10)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        logits = torch.log(torch.tensor(optimal, dtype=torch.float64)) + torch.randn(H, X, A, generator=gen, dtype=torch.float64) * 0.5
        other = torch.softmax(logits.masked_fill(~torch.tensor(ok), float("-inf")), -1)
        j = _kl_objective(other.tolist(), reward, logp, nxt, gamma, ok)
        assert all(j[0][x] < v[0][x] for x in range(X))


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("allowed", [None, MDP_ALLOWED])
def test_q_backup_reaches_the_hard_max_optimum(gamma: float, allowed: torch.Tensor | None):
    reward, logp, nxt = _mdp(allowed)
    ok = [True] * A if allowed is None else allowed.tolist()
    init = torch.randn(H, X, A, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q, sweeps = _iterate(lambda tab: q_target(td_reward("q", reward, logp, C), _next_rows(tab, nxt), _done(), gamma, allowed), init, ok)
    assert sweeps <= H + 1
    best = [[0.0] * X for _ in range(H + 1)]
    q_star = [[[0.0] * A for _ in range(X)] for _ in range(H)]
    for t in range(H - 1, -1, -1):
        for x in range(X):
            for a in range(A):
                q_star[t][x][a] = reward[t, x, a].item() / C + logp[t, x, a].item() + gamma * best[t + 1][nxt[x, a].item()]
            best[t][x] = max(q_star[t][x][a] for a in range(A) if ok[a])
    for t in range(H):
        for x in range(X):
            for a in range(A):
                if ok[a]:
                    assert q[t, x, a].item() == pytest.approx(q_star[t][x][a], abs=1e-10)
    # The hard max and the soft optimum differ on this MDP, so the two tests are not the same test.
    v = _soft_optimum(reward, logp, nxt, gamma, ok)
    assert abs(best[0][0] - v[0][0]) > 1e-3


# --- target network -------------------------------------------------------------------------


def _nets() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize("tau", [0.0, 0.3, 1.0])
def test_soft_update_is_the_convex_combination(tau: float):
    target, online = _nets()
    before = [p.detach().clone() for p in target.parameters()]
    soft_update(target, online, tau)
    for p_new, p_old, p_online in zip(target.parameters(), before, online.parameters()):
        if tau == 1.0:
            assert torch.equal(p_new, p_online)
        elif tau == 0.0:
            assert torch.equal(p_new, p_old)
        else:
            assert torch.allclose(p_new, (1 - tau) * p_old + tau * p_online, atol=1e-7)
        assert not p_new.grad_fn


def test_soft_update_rejects_mismatched_networks_and_bad_tau():
    target, online = _nets()
    with pytest.raises(ValueError, match="tau"):
        soft_update(target, online, 1.5)
    with pytest.raises(ValueError, match="different parameters"):
        soft_update(target, nn.Linear(3, 2), 0.5)
