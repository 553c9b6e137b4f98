"""Policy-gradient losses: PPO's clipped surrogate and value loss, REINFORCE, entropy.

Per-token tensors are [B, T] over completion tokens, ``mask`` [B, T] is 1 on real tokens;
every loss is the masked mean over all real tokens of the batch.  None of them adds a KL
term: the KL penalty is in the reward (:func:`rlhf.kl.shape_rewards`).
"""

from __future__ import annotations

import torch

from rlhf.advantages import masked_mean
from rlhf.kl import kl_k3, masked_log_softmax


def ppo_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization
    Algorithms", eq. 7), as a loss to minimise:

        L = mean_t −min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t),   ρ_t = π(a_t|s_t)/π_old(a_t|s_t).

    logp, old_logp, advantages, mask [B, T] → (loss, stats).  stats (detached):
    "clip/frac", the fraction of real tokens where the clipped term is the active one (their
    gradient is 0), and "kl/approx", the k3 estimate of KL(π_old‖π) on the sampled tokens.
    """
    old_logp, advantages = old_logp.detach(), advantages.detach()  # constants of the surrogate
    ratio = torch.exp(logp - old_logp)  # [B, T]
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {
        "clip/frac": masked_mean((clipped > unclipped).to(logp.dtype), mask).detach(),
        "kl/approx": masked_mean(kl_k3(old_logp, logp.detach()), mask),
    }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_eps: float | None
) -> torch.Tensor:
    """Clipped value loss ½·mean_t max((V − R)², (V_clip − R)²), V_clip = V_old + clip(V − V_old, −ε, ε)
    (OpenAI baselines ppo2, TRL); ``clip_eps=None`` gives the plain ½·mean_t (V − R)².
    values, old_values, returns, mask [B, T] → scalar."""
    returns = returns.detach()
    err = (values - returns) ** 2  # [B, T]
    if clip_eps is not None:
        old_values = old_values.detach()
        v_clip = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        err = torch.maximum(err, (v_clip - returns) ** 2)
    return 0.5 * masked_mean(err, mask)


def reinforce_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """REINFORCE (Williams 1992): mean_t −A·log π(a_t|s_t).  logp, mask [B, T]; advantages
    [B, T] per token (e.g. reward-to-go) or [B] per sequence (e.g. RLOO), broadcast over T."""
    advantages = advantages.detach()
    if advantages.ndim == 1:
        advantages = advantages[:, None]  # [B, 1]
    return masked_mean(-advantages * logp, mask)


def expected_reward_loss(logp_all: torch.Tensor, action_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """−mean_t Σ_a π(a|s_t)·r_t(a): each step's immediate reward averaged exactly over the actions
    instead of sampled (the all-action / expected policy gradient, Sutton et al. 2000; Ciosek &
    Whiteson 2018, "Expected Policy Gradients"). Its gradient Σ_a ∇π(a|s_t)·r_t(a) is the
    score-function estimate of that reward's share of the return with zero variance, and it is 0
    among actions of equal reward, so it sharpens the policy only where the reward tells actions
    apart.  logp_all [B, T, V] log π over the action space (−inf outside it), action_rewards
    [B, T, V], mask [B, T]."""
    expected = (logp_all.exp() * action_rewards.detach()).sum(-1)  # [B, T]
    return -masked_mean(expected, mask)


def tilted_target(logits_prior: torch.Tensor, action_rewards: torch.Tensor, scale: float, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """log π*(a|s) ∝ log p(a|s) + scale·r(a|s): the maximiser of E_π[scale·r] − KL(π‖p) at one
    state (the KL-regularised optimum, Todorov 2007; Jaques et al. 2017, "Sequence Tutor", eq. 8,
    with scale = 1/(βc)).  logits_prior, action_rewards [B, T, V] → log-probs [B, T, V] (−inf
    outside the action space)."""
    return masked_log_softmax(masked_log_softmax(logits_prior.float(), allowed) + scale * action_rewards.float(), allowed)


def distillation_loss(logp_all: torch.Tensor, target_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_t −Σ_a π*(a|s_t)·log π(a|s_t): the cross-entropy from a target distribution at every
    state (its gradient is that of KL(π*‖π), the forward KL; Hinton et al. 2015; on the student's
    own states, Agarwal et al. 2024, "On-Policy Distillation of Language Models").  logp_all,
    target_logp [B, T, V] (−inf outside the action space), mask [B, T]."""
    p = target_logp.detach().exp()
    return masked_mean(-(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1), mask)


def reverse_kl_loss(logp_all: torch.Tensor, target_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_t Σ_a π(a|s_t)·(log π(a|s_t) − log π*(a|s_t)): the reverse KL(π‖π*) to a target
    distribution at every state, exact over the action space. Mode-seeking: an action π* all but
    rules out (a rule broken, log π* far below) costs π(a)·|log π*(a)|, so its mass is removed
    much harder than by the cross-entropy (whose gradient there is only π(a) − π*(a)). With π* the
    tilted prior it is −E_π[r/(βc)] + KL(π‖p) at the state, up to a constant (Jaques et al. 2017,
    eq. 8).  logp_all, target_logp [B, T, V] (−inf outside the action space), mask [B, T]."""
    out = ~torch.isfinite(target_logp)
    lp = logp_all.masked_fill(out, 0.0)
    kl = (lp.exp() * (lp - target_logp.detach().masked_fill(out, 0.0))).masked_fill(out, 0.0).sum(-1)  # [B, T]
    return masked_mean(kl, mask)


def symmetric_kl_loss(logp_all: torch.Tensor, target_logp: torch.Tensor, mask: torch.Tensor, forward_weight: float = 1.0) -> torch.Tensor:
    """w·CE(π*, π) + KL(π‖π*) at every state: the forward term (``distillation_loss``) keeps every
    action π* keeps, the reverse term (``reverse_kl_loss``) removes the mass π* rules out; at w = 1
    Jeffreys' divergence up to π*'s entropy. Both terms, and so the sum, have π = π* as their
    optimum.  logp_all, target_logp [B, T, V] (−inf outside the action space), mask [B, T]."""
    return forward_weight * distillation_loss(logp_all, target_logp, mask) + reverse_kl_loss(logp_all, target_logp, mask)


def risk_loss(seq_logp: torch.Tensor, returns: torch.Tensor, keep: torch.Tensor, alpha: float) -> torch.Tensor:
    """Minimum risk training (Shen et al. 2016, "Minimum Risk Training for Neural Machine
    Translation", eq. 11–13), as a loss: the expected return under the model's distribution
    renormalised over each source's candidate set S(x),

        Q(y|x) = π(y|x)^α / Σ_{y'∈S(x)} π(y'|x)^α,   L = −mean_x Σ_{y∈S(x)} Q(y|x)·R(y),

    whose gradient α·Σ_y Q(y)(R(y) − E_Q[R])·∇log π(y) weights each candidate by its
    renormalised probability: the update moves mass among the likely candidates, the ones
    greedy and beam search pick from. α < 1 flattens Q. seq_logp [G, K] log π(y|x) of K
    candidates of G sources (with gradient), returns [G, K] (constants), keep [G, K] bool:
    False for a repeat of an earlier candidate (S(x) is a set) → scalar."""
    scores = (alpha * seq_logp).masked_fill(~keep, float("-inf"))  # [G, K]
    return -(torch.softmax(scores, dim=-1) * returns.detach()).sum(-1).mean()


def entropy_from_logits(logits: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy H = −Σ_a π(a) log π(a) of softmax(logits) renormalised over ``allowed`` [V]:
    logits [B, T, V] → [B, T]; excluded actions contribute 0 (0·log 0 = 0)."""
    logp = masked_log_softmax(logits, allowed)  # [B, T, V]
    # Select before multiplying: 0·(−inf) would be NaN in the value and in the gradient.
    safe = torch.where(torch.isfinite(logp), logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    return -(logp.exp() * safe).sum(-1)
