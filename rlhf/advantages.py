"""Advantage estimators and the masked reductions every loss uses.

Conventions: per-token tensors are [B, T] over completion tokens; ``mask`` [B, T] (bool or
0/1 float) is 1 on real tokens and 0 on the padding after EOS, so each row is a prefix of
ones.  Padding may hold anything (even NaN): it is selected away with ``torch.where``, never
multiplied by 0, so it cannot leak into a result.
"""

from __future__ import annotations

from typing import Callable

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x over the entries where ``mask`` is set; all of them (``dim=None``) or along ``dim``."""
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the masked entries; 0 where there are none (an all-padding row)."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance of x over all masked entries (population, or Bessel-corrected if ``unbiased``)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.bool().sum().to(x.dtype)
        var = var * n / (n - 1).clamp(min=1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − μ)/√(σ² + ε) with μ, σ² over the real tokens; padding becomes 0.

    ``shift_mean=False`` only rescales (adds μ back), as TRL does for rewards whose sign matters.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros((), dtype=out.dtype, device=out.device))


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous
    Control Using Generalized Advantage Estimation", eq. 16):

        δ_t = r_t + γ V(s_{t+1}) − V(s_t),   A_t = δ_t + γλ A_{t+1},   R_t = A_t + V(s_t),

    with V = 0 after the last real token (the episode ends there).  rewards, values, mask
    [B, T] → (advantages, returns) [B, T], 0 on padding, without gradient (they are targets).
    """
    m = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    r = torch.where(m, rewards, zero)
    v = torch.where(m, values, zero)  # [B, T]
    # V(s_{t+1}) is 0 past the end: the shifted values are already 0 on padding.
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)  # [B, T]
    delta = r + gamma * next_v - v
    adv = torch.zeros_like(v)
    running = torch.zeros_like(v[:, 0])  # [B]
    for t in range(v.shape[1] - 1, -1, -1):
        running = torch.where(m[:, t], delta[:, t] + gamma * lam * running, zero)
        adv[:, t] = running
    return adv, torch.where(m, adv + v, zero)


def self_critical_advantages(rewards: torch.Tensor, baseline: torch.Tensor, k: int) -> torch.Tensor:
    """Self-critical baseline: A_i = r_i − b_g, with b_g the return of the policy's own greedy
    output for sample i's prompt g (Rennie et al. 2017, "Self-critical Sequence Training for
    Image Captioning"): only samples that beat greedy decoding are reinforced, so the update
    aims at what greedy decoding will write.  rewards [n_prompts·k] (a prompt's k samples
    contiguous), baseline [n_prompts] → [n_prompts·k]."""
    if rewards.ndim != 1 or baseline.ndim != 1 or rewards.shape[0] != baseline.shape[0] * k:
        raise ValueError(f"self_critical_advantages needs rewards [n_prompts*k] and baseline [n_prompts] with k={k}, "
                         f"got {tuple(rewards.shape)} and {tuple(baseline.shape)}")
    return (rewards.view(-1, k) - baseline[:, None]).reshape(-1)


@torch.no_grad()
def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reward-to-go G_t = Σ_{k≥t} γ^{k−t} r_k over the real tokens (Williams 1992, REINFORCE
    with per-step rewards).  rewards, mask [B, T] → [B, T], 0 on padding, without gradient."""
    m = mask.bool()
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    r = torch.where(m, rewards, zero)
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])  # [B]
    for t in range(r.shape[1] - 1, -1, -1):
        running = r[:, t] + gamma * running
        out[:, t] = running
    return torch.where(m, out, zero)


@torch.no_grad()
def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out: A_i = r_i − (1/(k−1)) Σ_{j≠i} r_j within each prompt's group
    (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!"; Ahmadian et al.
    2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs").  rewards [B] with B = n_prompts·k, a prompt's k samples contiguous → [B].
    Per token, rewards [B, T] (e.g. each sample's reward-to-go G_t): the baseline of step t is
    the other samples' mean G_t, independent of sample i's actions, so the estimate stays
    unbiased while a step is no longer credited with what happened before it.
    """
    if k < 2:
        raise ValueError(f"rloo_advantages needs k >= 2 samples per prompt for a leave-one-out baseline, got k={k}")
    if rewards.ndim not in (1, 2) or rewards.shape[0] % k:
        raise ValueError(f"rloo_advantages needs rewards of shape [n_prompts*k] or [n_prompts*k, T] with k={k}, got {tuple(rewards.shape)}")
    r = rewards.view(-1, k, *rewards.shape[1:])  # [n_prompts, k(, T)]
    baseline = (r.sum(dim=1, keepdim=True) - r) / (k - 1)
    return (r - baseline).reshape(rewards.shape)


def length_decorrelated(adv: torch.Tensor, lengths: torch.Tensor, k: int, total: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> tuple[torch.Tensor, float]:
    """A'_i = A_i − b·ℓ_i with ℓ_i = L_i − (1/(k−1)) Σ_{j≠i} L_j (the sample's length against its
    group's other samples) and b = Σ A_i ℓ_i / Σ ℓ_i² (least squares over the batch), so that
    Σ A'_i ℓ_i = 0: the advantages carry no linear trend in relative length, and the update no
    longer rewards a sample for being shorter or longer than its siblings as such. A metric that
    pays precision (sentence BLEU) otherwise teaches the policy to drop the words it is least sure
    of (cf. ODIN, Chen et al. 2024, which decorrelates a learned reward from length; here the
    correlation is removed from the advantages of each batch). adv, lengths [B] with B =
    n_prompts·k, a prompt's samples contiguous → ([B], b). ``total`` sums a tensor over every
    process's rows when the batch is sharded (distributed.all_sum), so b is the whole batch's."""
    rel = rloo_advantages(lengths.to(adv.dtype), k)  # [B]: ℓ_i, the leave-one-out relative length
    num, den = total(torch.stack([(adv * rel).sum(), (rel * rel).sum()])).unbind()
    if float(den) == 0.0:  # every group's samples equally long: no trend to remove
        return adv, 0.0
    b = num / den
    return adv - b.to(adv.dtype) * rel, float(b)


@torch.no_grad()
def first_in_group(tokens: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """[B] bool: True unless row i repeats an earlier row of its group of k (same real tokens,
    padding ignored). tokens, mask [B, T] with B = n_prompts·k, a prompt's rows contiguous."""
    if tokens.shape[0] % k:
        raise ValueError(f"first_in_group needs rows [n_prompts*k] with k={k}, got {tokens.shape[0]}")
    t = torch.where(mask.bool(), tokens, torch.full_like(tokens, -1)).view(-1, k, tokens.shape[1])  # [G, k, T]
    same = (t[:, :, None, :] == t[:, None, :, :]).all(-1)  # [G, k, k]: row i equals row j
    earlier = torch.ones(k, k, dtype=torch.bool, device=tokens.device).tril(-1)  # j < i
    return ~(same & earlier).any(-1).reshape(-1)
