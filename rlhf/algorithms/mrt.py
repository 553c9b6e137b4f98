"""Minimum risk training (Shen et al. 2016) on the KL-shaped return: k candidates per source,
the loss −E_Q[R] under the policy renormalised over the distinct candidates (rlhf/losses.py:
risk_loss). Against RLOO's equal weights, Q puts the update where the policy's mass is."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from rlhf import distributed
from rlhf.advantages import first_in_group, masked_sum
from rlhf.algorithms.common import Rollout, gather_logp, rl_metrics
from rlhf.algorithms.rloo import RLOO
from rlhf.config import Section
from rlhf.kl import kl_pathwise_loss
from rlhf.losses import risk_loss
from rlhf.rollout import sequence_forward


class MRTConfig(Section):
    k: int = Field(4, ge=2, description="Candidates sampled per source; repeats count once. batch_size must be a multiple.")
    alpha: float = Field(
        0.2, gt=0,
        description="Sharpness α of Q(y) ∝ π(y)^α over a source's candidates. 1: Q is the policy itself renormalised, so nearly all "
        "weight falls on the likeliest candidate when sequences differ by several nats; small α spreads it (Shen et al. 2016 use 5e-3 "
        "over 100 samples).",
    )


    candidates: Literal["sample", "beam"] = Field(
        "sample",
        description="sample: k samples of the policy at tune.temperature (Shen et al. 2016); beam: the k best hypotheses of a width-k "
        "beam search of the policy (Edunov et al. 2018), the candidates beam decoding chooses among. beam needs tune.temperature: 1.",
    )


class MRT(RLOO):
    """Shares RLOO's sampling, tempering and KL-shaped returns; only the loss differs."""

    def __init__(self, cfg: MRTConfig, kl, model, allowed, temperature: float = 1.0):
        super().__init__(None, kl, model, allowed, temperature)
        self.mrt = cfg

    def update(self, loop, ro: Rollout, task_reward, beta: float, greedy=None) -> dict[str, float]:
        k = self.mrt.k
        ro = ro.tempered(self.temperature, self.allowed)
        kl, shaped, ret = self.returns(ro, task_reward, beta)  # ret [B]
        keep = first_in_group(ro.tokens, ro.mask, k)  # [B]
        model = distributed.training_forward(loop, self.model)
        logits, _ = sequence_forward(model, ro.prompts, ro.prompt_mask, ro.tokens)
        if self.temperature != 1.0:
            logits = logits / self.temperature  # [B, T, V] of π_τ
        logp = gather_logp(logits, ro.tokens, self.allowed)  # [B, T]
        seq_logp = masked_sum(logp, ro.mask, dim=-1)  # [B] log π_τ(y|x)
        loss = risk_loss(seq_logp.view(-1, k), ret.view(-1, k), keep.view(-1, k), self.mrt.alpha) + beta * kl_pathwise_loss(
            self.kl_cfg.estimator, logp, ro.logp_prior, ro.mask, logits.float(), ro.logits_prior, self.allowed)
        loop.optimizer_step(loss)
        with torch.no_grad():  # E_Q[task return] per prompt, the objective without its KL term
            q = torch.softmax((self.mrt.alpha * seq_logp.detach()).view(-1, k).masked_fill(~keep.view(-1, k), float("-inf")), dim=-1)
            expected = (q * masked_sum(task_reward, ro.mask, dim=-1).view(-1, k)).sum(-1)  # [G]
        out = {"loss/policy": float(loss.detach()), "mrt/distinct": float(distributed.global_row_mean(keep.float())),
               "reward/expected": float(distributed.global_row_mean(expected))}
        out.update(rl_metrics(ro, task_reward, kl, shaped))
        return out
