"""Minimum risk training (Shen et al. 2016) on the KL-shaped return: k candidates per source,
the loss −E_Q[R] under the policy renormalised over the distinct candidates (rlhf/losses.py:
risk_loss). Against RLOO's equal weights, Q puts the update where the policy's mass is."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlhf import distributed
from rlhf.advantages import first_in_group, masked_sum
import torch

from rlhf.algorithms.common import AlgorithmSettings, BuildContext, KLConfig, OnPolicy, Rollout, TemperedScoring, rl_metrics
from rlhf.interfaces import Step
from rlhf.losses import risk_loss


class MRTConfig(AlgorithmSettings):
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

    @property
    def group(self) -> int:
        return self.k

    def check_tune(self, tune) -> None:
        if self.candidates == "beam" and tune.temperature != 1.0:
            raise ValueError(f"temperature={tune.temperature} with mrt.candidates=beam: beam candidates are not samples, so there is no "
                             "sampling temperature; set tune.temperature: 1 (mrt.alpha sets how sharply the loss weighs them)")


class MRT(OnPolicy):
    """Samples and scores like RLOO (the tempered policy, the KL-shaped return:
    ``TemperedScoring``); only the loss differs."""

    needs_action_rewards = False

    def __init__(self, cfg: MRTConfig, kl: KLConfig, model, allowed: torch.Tensor | None, temperature: float = 1.0):
        self.cfg, self.model, self.allowed = cfg, model, allowed
        self.scoring = TemperedScoring(kl, allowed, temperature)
        self.policy = model
        self.group = cfg.k

    @classmethod
    def build(cls, ctx: BuildContext) -> tuple["MRT", torch.nn.Module]:
        return cls(ctx.settings, ctx.kl, ctx.policy, ctx.allowed, temperature=ctx.temperature), ctx.policy

    def rollout(self, sampling, prompts) -> Rollout:
        if self.cfg.candidates == "beam":  # the k best beams of each prompt (rows k·g … k·g + k − 1)
            return sampling.beam(self.model, prompts[:: self.cfg.k], self.cfg.k)
        return sampling.sample(self.model, prompts)

    def update(self, loop, step: Step) -> dict[str, float]:
        k, alpha, sc = self.cfg.k, self.cfg.alpha, self.scoring
        task_reward, beta = step.task_reward, step.beta
        ro = sc.tempered(step.rollout)
        kl, shaped, ret = sc.returns(ro, task_reward, beta)  # ret [B]
        keep = first_in_group(ro.tokens, ro.mask, k).view(-1, k)  # [G, k]
        logits, logp = sc.fresh_logp(distributed.training_forward(loop, self.model), ro)  # [B, T, V], [B, T]
        seq_logp = masked_sum(logp, ro.mask, dim=-1).view(-1, k)  # [G, k] log π_τ(y|x)
        loss = risk_loss(seq_logp, ret.view(-1, k), keep, alpha) + beta * sc.kl_loss(logits, logp, ro)
        loop.optimizer_step(loss)
        # E_Q[task return], the objective without its KL term (every rank holds as many prompts)
        expected = -risk_loss(seq_logp.detach(), masked_sum(task_reward, ro.mask, dim=-1).view(-1, k), keep, alpha)
        out = {"loss/policy": float(loss.detach()), "mrt/distinct": float(distributed.global_row_mean(keep.float().flatten())),
               "reward/expected": float(distributed.global_row_mean(expected.reshape(1)))}
        out.update(rl_metrics(ro, task_reward, kl, shaped))
        return out
