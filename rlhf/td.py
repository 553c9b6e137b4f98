"""KL-control by temporal-difference learning: Sequence Tutor's Q-, Ψ- and G-learning
(Jaques et al. 2017, "Sequence Tutor: Conservative Fine-Tuning of Sequence Generation
Models with KL-control", ICML, sec. 3-4).

The objective is E_π[Σ_t r(s_t, a_t)/c] − KL(π‖p) against a frozen prior p.  The network's
logits over the vocabulary are the values Q(s, ·), Ψ(s, ·) or G(s, ·) of every action;
targets come from a target network θ⁻ at the next state s' (see :func:`next_state`).  An
optional ``allowed`` [V] bool mask restricts the action space: excluded actions are −inf
before every max / logsumexp.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from rlhf.advantages import masked_mean

TDKind = Literal["q", "psi", "g"]
TDLossKind = Literal["huber", "mse"]


def _restrict(values: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    return values if allowed is None else values.masked_fill(~allowed, float("-inf"))


def _bootstrap(reward: torch.Tensor, next_value: torch.Tensor, done: torch.Tensor, gamma: float) -> torch.Tensor:
    """r + γ·(1 − done)·V(s'); selected rather than multiplied so a terminal s' may hold anything."""
    return reward + torch.where(done.bool(), torch.zeros((), dtype=next_value.dtype, device=next_value.device), gamma * next_value)


def kl_control_reward(task_reward: torch.Tensor, logp_prior: torch.Tensor, c: float) -> torch.Tensor:
    """r(s, a) = r_task(s, a)/c + log p(a|s), the reward of Q- and Ψ-learning (Jaques et al. 2017).

    E_π[Σ r] = E_π[Σ r_task/c] − KL(π‖p) − H(π): Q-learning's hard max drops the entropy
    bonus H(π); Ψ-learning's soft backup supplies it, so it optimises the KL objective exactly."""
    return task_reward / c + logp_prior


def td_reward(kind: TDKind, task_reward: torch.Tensor, logp_prior: torch.Tensor, c: float) -> torch.Tensor:
    """Per-step TD reward of each method: r/c + log p(a|s) for "q" and "psi", r/c for "g"
    (G-learning puts the prior in its target instead).  Shapes as the inputs, e.g. [B, T]."""
    if kind in ("q", "psi"):
        return kl_control_reward(task_reward, logp_prior, c)
    if kind == "g":
        return task_reward / c
    raise ValueError(f"unknown TD method {kind!r}; use 'q', 'psi' or 'g'")


def next_state(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values at s_{t+1} for every step t of a sequence, and whether s_{t+1} is terminal.

    values [B, T, ...] (position t scores the actions at s_t), mask [B, T] → (next [B, T, ...],
    done [B, T] bool): next[:, t] = values[:, t+1] (zeros past the end), done[:, t] = the
    token after t is padding or past T, i.e. a_t ended the sequence.
    """
    nxt = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    m = mask.bool()
    done = ~torch.cat([m[:, 1:], torch.zeros_like(m[:, :1])], dim=1)
    return nxt, done


@torch.no_grad()
def q_target(
    reward: torch.Tensor, next_q_target: torch.Tensor, done: torch.Tensor, gamma: float, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """Q-learning target y = r + γ·(1 − done)·max_a' Q⁻(s', a') (Mnih et al. 2015; Jaques et al. 2017, sec. 3).
    reward, done [...]; next_q_target [..., V] ([B, T, V] or [N, V]) → [...]."""
    return _bootstrap(reward, _restrict(next_q_target, allowed).amax(-1), done, gamma)


@torch.no_grad()
def psi_target(
    reward: torch.Tensor, next_psi_target: torch.Tensor, done: torch.Tensor, gamma: float, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """Ψ-learning target y = r + γ·(1 − done)·log Σ_a' exp Ψ⁻(s', a'), with r = r_task/c + log p(a|s)
    (Rawlik et al. 2012; Jaques et al. 2017, sec. 4).  reward, done [...]; next_psi_target [..., V] → [...]."""
    return _bootstrap(reward, torch.logsumexp(_restrict(next_psi_target, allowed), dim=-1), done, gamma)


@torch.no_grad()
def g_target(
    reward: torch.Tensor,
    next_g_target: torch.Tensor,
    next_logp_prior: torch.Tensor,
    done: torch.Tensor,
    gamma: float,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """G-learning target y = r + γ·(1 − done)·log Σ_a' p(a'|s') exp G⁻(s', a'), with r = r_task/c
    (Fox et al. 2016; Jaques et al. 2017, sec. 4).  reward, done [...]; next_g_target and the
    prior's log-probs at s' next_logp_prior [..., V] → [...]."""
    scores = _restrict(next_g_target + next_logp_prior, allowed)  # [..., V]
    return _bootstrap(reward, torch.logsumexp(scores, dim=-1), done, gamma)


def action_values(values: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """The taken actions' values: values [..., V], actions [...] (long) → [...]."""
    return values.gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def td_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: TDLossKind = "huber") -> torch.Tensor:
    """Masked mean TD error: Huber (δ = 1: ½x² for |x| ≤ 1, |x| − ½ beyond; DQN, Mnih et al. 2015)
    or squared error (pred − y)² (Jaques et al. 2017).  pred, target, mask [...] → scalar;
    the target is a constant."""
    target = target.detach()
    if kind == "huber":
        err = F.huber_loss(pred, target, reduction="none", delta=1.0)
    elif kind == "mse":
        err = (pred - target) ** 2
    else:
        raise ValueError(f"unknown TD loss {kind!r}; use 'huber' or 'mse'")
    return masked_mean(err, mask)


def q_policy_probs(q: torch.Tensor, epsilon: float, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """ε-greedy policy of Q-learning: 1 − ε on argmax_a Q(s, a) (first on ties) plus ε spread
    uniformly over the allowed actions.  q [..., V] → probabilities [..., V]."""
    greedy = F.one_hot(_restrict(q, allowed).argmax(-1), q.shape[-1]).to(q.dtype)  # [..., V]
    if allowed is None:
        uniform = torch.full((q.shape[-1],), 1.0 / q.shape[-1], dtype=q.dtype, device=q.device)
    else:
        uniform = allowed.to(q.dtype) / allowed.sum()
    return (1.0 - epsilon) * greedy + epsilon * uniform


def boltzmann_probs(values: torch.Tensor, temperature: float, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Boltzmann policy π(a|s) ∝ exp(values(s, a)/τ) over the allowed actions: [..., V] → [..., V]."""
    if temperature <= 0:
        raise ValueError(f"Boltzmann temperature must be > 0, got {temperature}")
    return torch.softmax(_restrict(values, allowed) / temperature, dim=-1)


def psi_policy_logits(psi: torch.Tensor) -> torch.Tensor:
    """Ψ-learning's policy π(a|s) = exp(Ψ(s, a) − V(s)), V(s) = log Σ_a exp Ψ(s, a) (Jaques et al.
    2017, sec. 4), i.e. softmax(Ψ): the logits are Ψ itself.  [..., V] → [..., V]."""
    return psi


def g_policy_logits(g: torch.Tensor, logp_prior: torch.Tensor) -> torch.Tensor:
    """G-learning's policy π(a|s) ∝ p(a|s) exp G(s, a) (Jaques et al. 2017, sec. 4), i.e.
    softmax(G + log p).  g, logp_prior [..., V] → [..., V]."""
    return g + logp_prior


@torch.no_grad()
def soft_update(target_net: nn.Module, online_net: nn.Module, tau: float) -> None:
    """Polyak averaging θ⁻ ← (1 − τ)·θ⁻ + τ·θ of the parameters, in place (τ = 1 copies).
    Buffers are left alone."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"soft_update needs 0 <= tau <= 1, got {tau}")
    target, online = dict(target_net.named_parameters()), dict(online_net.named_parameters())
    if target.keys() != online.keys():
        raise ValueError("soft_update: target and online networks have different parameters")
    for name, p in target.items():
        p.lerp_(online[name], tau)
