"""What every RL algorithm shares: the rollout batch, the KL config, and the scoring of a batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from rlhf.config import Section
from rlhf.advantages import masked_mean, masked_sum
from rlhf.kl import KLEstimator, masked_log_softmax, per_token_kl, sequence_kl
from rlhf.rollout import left_pad, length_mask, sample_padded, sequence_forward


class KLConfig(Section):
    estimator: KLEstimator = Field("exact", description="Per-token KL estimator: k1, k2, k3 (Schulman) or exact over the action space.")
    beta: float = Field(0.1, ge=0, description="KL coefficient β (initial value when adaptive); 0 switches the KL term off.")
    adaptive: bool = Field(False, description="Adapt β toward target_kl (Ziegler et al. 2019).")
    target_kl: float = Field(2.0, gt=0, description="Adaptive β: target KL per sequence (nats).")
    horizon: float = Field(2000.0, gt=0, description="Adaptive β: controller horizon in sequences.")
    c: float = Field(1.0, gt=0, description="Reward scale: the task reward enters as r / c (Sequence Tutor's c).")


@dataclass
class Rollout:
    """One batch of sampled completions with everything the updates need. Shapes: B rows, P
    prompt tokens (left-padded), T completion tokens (right-padded), V vocabulary."""

    prompts: torch.Tensor  # [B, P]
    prompt_mask: torch.Tensor  # [B, P]
    tokens: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] float
    logits: torch.Tensor  # [B, T, V] policy logits at sampling time
    logits_prior: torch.Tensor  # [B, T, V]
    logp: torch.Tensor  # [B, T] log π(a_t|s_t), masked to the action space
    logp_prior: torch.Tensor  # [B, T] log p(a_t|s_t)
    lengths: list[int]

    def kl(self, estimator: KLEstimator, allowed: torch.Tensor | None) -> torch.Tensor:
        """[B, T] per-token KL(π‖p) estimate, 0 on padding."""
        kl = per_token_kl(estimator, self.logp, self.logp_prior, self.logits, self.logits_prior, allowed)
        return kl * self.mask


def gather_logp(logits: torch.Tensor, tokens: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """log π(a_t|s_t) [B, T] from logits [B, T, V] over the masked action space."""
    return masked_log_softmax(logits.float(), allowed).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def make_rollout(
    policy, prior, prompts: list[list[int]], n_new: list[int], *, pad_id: int, allowed: torch.Tensor | None,
    generator: torch.Generator | None, probs_fn=None, temperature: float = 1.0,
) -> Rollout:
    """Sample from ``policy`` (a causal LM) and score under it and the frozen ``prior``."""
    device = next(policy.parameters()).device
    ids, pmask = left_pad(prompts, pad_id, device)
    t = max(n_new)
    # The sampling loop's own logits score the sample: no second policy forward.
    tokens, logits = sample_padded(policy, ids, pmask, t, probs_fn=probs_fn, allowed=allowed, temperature=temperature,
                                   generator=generator, return_logits=True)
    mask = length_mask(n_new, t, device)
    logits_prior, _ = sequence_forward(prior, ids, pmask, tokens)
    return Rollout(ids, pmask, tokens, mask, logits.float(), logits_prior.float(),
                   gather_logp(logits, tokens, allowed), gather_logp(logits_prior, tokens, allowed), list(n_new))


def rl_metrics(ro: Rollout, task_reward: torch.Tensor, kl: torch.Tensor, shaped: torch.Tensor) -> dict[str, float]:
    """The metrics every algorithm logs about its rollout batch (see docs/metrics.md)."""
    m = ro.mask
    return {
        "reward/task": float(masked_sum(task_reward, m, dim=-1).mean()),
        "reward/shaped": float(masked_sum(shaped, m, dim=-1).mean()),
        "kl/mean": float(masked_mean(kl, m)),
        "kl/seq": float(sequence_kl(kl, m).mean()),
        "logp/prior": float(masked_mean(ro.logp_prior, m)),
        "logp/policy": float(masked_mean(ro.logp, m)),
    }


Algorithm = Literal["ppo", "rloo", "q", "psi", "g"]
