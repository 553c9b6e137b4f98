"""Per-token KL estimators, KL-coefficient controllers, and KL-shaped rewards.

With a completion y ~ π sampled token by token, KL(π‖π_ref) of the sequence is the sum over
tokens of the per-state KL, and each term can be estimated from the sampled token alone
(Schulman 2020, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html), with
r = π_ref(a)/π(a):

    k1 = −log r               unbiased, can be negative
    k2 = ½ (log r)²           biased, ≥ 0, low variance
    k3 = (r − 1) − log r      unbiased, ≥ 0, low variance

or computed exactly from the two models' logits over the vocabulary.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from rlhf.advantages import masked_sum

KLEstimator = Literal["k1", "k2", "k3", "exact"]


def masked_log_softmax(logits: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """log_softmax over the last dim, renormalised over ``allowed`` [V] bool (others −inf)."""
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return F.log_softmax(logits, dim=-1)


def kl_k1(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k1 = log π(a) − log π_ref(a), an unbiased estimate of KL(π‖π_ref) for a ~ π (Schulman 2020)."""
    return logp - logp_ref


def kl_k2(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log π(a) − log π_ref(a))², biased but ≥ 0 (Schulman 2020)."""
    return 0.5 * (logp - logp_ref) ** 2


def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k3 = exp(log π_ref(a) − log π(a)) − 1 − (log π_ref(a) − log π(a)), unbiased for a ~ π
    and ≥ 0 because eˣ ≥ 1 + x (Schulman 2020)."""
    log_ratio = logp_ref - logp
    # expm1 keeps the ≈ x²/2 value exact when the two models agree closely.
    return torch.expm1(log_ratio) - log_ratio


def kl_exact(logits: torch.Tensor, logits_ref: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """KL(π‖π_ref) = Σ_a π(a) (log π(a) − log π_ref(a)) over the vocabulary.

    logits, logits_ref [..., V] → [...].  ``allowed`` [V] bool excludes actions from both
    distributions, which are renormalised over the rest; terms with π(a) = 0 are 0.
    """
    logp = masked_log_softmax(logits, allowed)  # [..., V]
    logq = masked_log_softmax(logits_ref, allowed)
    support = torch.isfinite(logp)
    # Select before multiplying: 0·(−inf − −inf) would be NaN in the value and in the gradient.
    diff = torch.where(support, logp - logq, torch.zeros((), dtype=logp.dtype, device=logp.device))
    return (logp.exp() * diff).sum(-1)


def per_token_kl(
    name: KLEstimator,
    logp: torch.Tensor,
    logp_ref: torch.Tensor,
    logits: torch.Tensor | None = None,
    logits_ref: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token KL [B, T] by estimator ``name``: k1/k2/k3 from the sampled tokens' log-probs
    logp, logp_ref [B, T]; "exact" from the full logits [B, T, V] (and ``allowed``)."""
    if name == "k1":
        return kl_k1(logp, logp_ref)
    if name == "k2":
        return kl_k2(logp, logp_ref)
    if name == "k3":
        return kl_k3(logp, logp_ref)
    if name == "exact":
        if logits is None or logits_ref is None:
            raise ValueError("per_token_kl('exact', ...) needs logits and logits_ref [B, T, V]")
        return kl_exact(logits, logits_ref, allowed)
    raise ValueError(f"unknown KL estimator {name!r}; use one of 'k1', 'k2', 'k3', 'exact'")


def kl_pathwise_loss(
    name: KLEstimator,
    logp: torch.Tensor,
    logp_ref: torch.Tensor,
    mask: torch.Tensor,
    logits: torch.Tensor | None = None,
    logits_ref: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The part of ∇_θ E_π[Σ_t KL_t] that a KL-shaped *reward* cannot carry; add β × this to the
    policy loss. With KL_t = f_θ(s_t, a_t) the gradient has two parts,

        ∇ E_τ[Σ_t f_θ] = E_τ[Σ_t f_θ · ∇ log P_θ(τ)]  +  E_τ[Σ_t ∇_θ f_θ(s_t, a_t)],
                          score function: the shaped       pathwise: this loss
                          reward r_t − β·KL_t carries it

    k1 = log π(a) − log p(a) has E_{a~π}[∇ log π(a)] = 0: no pathwise term (returns 0), which is
    why Ziegler et al. (2019) can put it in the reward alone. The exact per-state KL depends on θ
    at every visited state; in the reward alone, nothing pulls π back toward p where it already
    is (only toward states where the KL happens to be small, e.g. shorter outputs). For k2,
    ∇½(log π − log p)² = (log π − log p)·∇ log π, unbiased for ∇KL at the state; k3 is the loss
    form of GRPO (Shao et al. 2024). Fresh log-probs/logits [B, T](, V) with gradient → scalar
    mean over real tokens (the scale of the per-token policy losses)."""
    if name == "k1":
        return torch.zeros((), dtype=logp.dtype, device=logp.device)
    m = mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # padding holds tokens outside the action space (log π = −inf): zero them *before* the
    # estimator, or the masked-out branch's gradient would be 0·inf = NaN
    logp, logp_ref = torch.where(m, logp, zero), torch.where(m, logp_ref, zero)
    kl = per_token_kl(name, logp, logp_ref, logits, logits_ref, allowed)
    return torch.where(m, kl, torch.zeros((), dtype=kl.dtype, device=kl.device)).sum() / m.sum().clamp(min=1)


def sequence_kl(kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence KL = Σ_t KL_t over real tokens: kl, mask [B, T] → [B]."""
    return masked_sum(kl, mask, dim=-1)


class FixedKLController:
    """A constant KL coefficient β."""

    def __init__(self, beta: float) -> None:
        if beta < 0:
            raise ValueError(f"KL coefficient beta must be >= 0, got {beta}")
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Same interface as :class:`AdaptiveKLController`; β does not move."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional control of β towards a target KL (Ziegler et al. 2019, "Fine-Tuning
    Language Models from Human Preferences"):

        e_t = clip((KL_t − target)/target, −0.2, 0.2),   β ← β·(1 + K_β·e_t·n_steps/horizon).

    The paper writes β ← β(1 + K_β e_t) per batch with K_β = 0.1; its code
    (lm-human-preferences, followed by TRL) uses K_β = 1 and sets the rate through
    ``horizon`` (10 000 episodes) and ``n_steps`` (episodes in the batch), hence k_beta = 1.
    """

    def __init__(self, init_beta: float, target: float, horizon: float, k_beta: float = 1.0) -> None:
        if init_beta < 0 or target <= 0 or horizon <= 0 or k_beta < 0:
            raise ValueError(
                f"AdaptiveKLController needs init_beta >= 0, target > 0, horizon > 0, k_beta >= 0; "
                f"got init_beta={init_beta}, target={target}, horizon={horizon}, k_beta={k_beta}"
            )
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)
        self.k_beta = float(k_beta)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move β after a batch of ``n_steps`` episodes whose mean sequence KL was ``current_kl``."""
        error = min(max((current_kl - self.target) / self.target, -0.2), 0.2)
        self.value *= 1.0 + self.k_beta * error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        # β is the only state; target, horizon and K_β are configuration.
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


def terminal_to_steps(reward: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place a sequence reward [B] on the last real token of each row: → [B, T], 0 elsewhere
    (and an all-padding row gets nothing)."""
    m = mask.bool()
    positions = torch.arange(m.shape[1], device=m.device)
    last = torch.where(m, positions, -1).amax(dim=1)  # [B], −1 for an empty row
    out = torch.zeros(m.shape, dtype=reward.dtype, device=reward.device)
    out = out.scatter(1, last.clamp(min=0)[:, None], reward[:, None])  # [B, T]
    return torch.where((last >= 0)[:, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


@torch.no_grad()
def shape_rewards(
    task_reward: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float, c: float = 1.0
) -> torch.Tensor:
    """KL-shaped per-token reward r_t = task_reward_t / c − β·KL_t on real tokens, 0 on padding.

    This is THE one place the KL penalty enters the reward (Ziegler et al. 2019;
    Jaques et al. 2017 use c for the same trade-off): no other function adds it again.
    task_reward, kl, mask [B, T] → [B, T], without gradient (rewards are constants of the
    policy gradient).  A sequence-level reward goes in through :func:`terminal_to_steps`.
    """
    r = task_reward / c - beta * kl
    return torch.where(mask.bool(), r, torch.zeros((), dtype=r.dtype, device=r.device))
