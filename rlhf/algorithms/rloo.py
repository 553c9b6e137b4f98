"""REINFORCE with a leave-one-out baseline (RLOO; Kool et al. 2019, Ahmadian et al. 2024),
on the same KL-shaped reward as PPO: k samples per prompt, A_i = R_i − mean_{j≠i} R_j; or with
the self-critical baseline A_i = R_i − R(greedy) (Rennie et al. 2017)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from rlhf import distributed
from rlhf.advantages import discounted_returns, length_decorrelated, masked_sum, rloo_advantages, self_critical_advantages
from rlhf.algorithms.common import AlgorithmSettings, BuildContext, KLConfig, OnPolicy, TemperedScoring, rl_metrics, row_chunks
from rlhf.interfaces import Step
from rlhf.kl import masked_log_softmax
from rlhf.losses import distillation_loss, expected_reward_loss, reinforce_loss, tilted_target


class RLOOConfig(AlgorithmSettings):
    k: int = Field(4, ge=2, description="Samples per prompt (the leave-one-out group); batch_size must be a multiple.")
    epochs: int = Field(1, ge=1, description="Gradient steps per rollout batch (1 = on-policy REINFORCE).")
    baseline: Literal["leave_one_out", "greedy"] = Field(
        "leave_one_out",
        description="leave_one_out: the mean return of the prompt's other k-1 samples; greedy: the return of the policy's own greedy "
        "output for the prompt (self-critical, Rennie et al. 2017; one more greedy rollout per prompt), which reinforces only samples "
        "that beat greedy decoding.",
    )
    credit: Literal["sequence", "token", "all_actions"] = Field(
        "sequence",
        description="sequence: every token of a sample gets its sequence's advantage; token: token t gets its reward-to-go minus the "
        "other samples' mean reward-to-go at t (rlhf/advantages.py: rloo_advantages on discounted_returns), so a per-step reward such as "
        "a rule broken at one note is not credited to the notes before it; all_actions: as token, but each step's own task reward is "
        "averaged exactly over every action (rlhf/losses.py: expected_reward_loss) from the task's per-action rewards "
        "(task.action_rewards, e.g. the counterpoint rules), so what decides a note's rule reward is learned at every step without "
        "sampling noise and equally good notes keep their prior odds. Both need the leave-one-out baseline.",
    )
    gamma: float = Field(
        1.0, ge=0, le=1,
        description="Discount of the reward-to-go with credit token or all_actions: γ < 1 weighs a step's later consequences less "
        "(biased toward near-term rewards, with less variance); 1 = the undiscounted return.",
    )
    micro_batch: int | None = Field(
        None, ge=1,
        description="Rows per forward/backward pass of the update, sorted by length so each pass is padded only to its own longest "
        "sample; the gradients of the passes add up to the one-pass gradient (up to float rounding) and the optimizer steps once. "
        "Saves time and memory when a few long samples pad a large batch (translation); null = the whole batch in one pass.",
    )
    positive_only: bool = Field(
        False,
        description="Use only samples with a positive advantage (A <- max(A, 0)). With the greedy baseline the update then imitates the "
        "samples that beat greedy decoding and nothing else (filtered self-imitation, cf. ReST, Gulcehre et al. 2023): a biased "
        "policy gradient with far less variance, since most samples of a weak model are worse than its greedy output.",
    )

    length_decorrelate: bool = Field(
        False,
        description="Remove from the advantages their least-squares trend in each sample's length against its group's other samples "
        "(rlhf/advantages.py: length_decorrelated), so the update does not pay a sample for being shorter or longer than its siblings "
        "as such. For metrics that pay precision (sentence BLEU), which otherwise teach the policy to drop its least certain words. "
        "Needs credit: sequence.",
    )
    distill: float = Field(
        0.0, ge=0,
        description="Weight of tune.algorithm tilt's loss added to RLOO's: the cross-entropy from the prior tilted by every action's "
        "reward, π*(a|s) ∝ p(a|s)·exp(r(s,a)/(βc)), at each state of the rollout (rlhf/algorithms/tilt.py). RLOO's own terms are "
        "mode-seeking (reverse KL); this forward-KL term keeps the actions π* keeps. Needs credit: all_actions. 0 = off.",
    )

    @property
    def group(self) -> int:
        return self.k

    @property
    def needs_action_rewards(self) -> bool:
        return self.credit == "all_actions"

    @model_validator(mode="after")
    def _credit(self) -> "RLOOConfig":
        if self.credit != "sequence" and self.baseline == "greedy":
            raise ValueError(f"credit={self.credit} needs baseline=leave_one_out (the greedy baseline is one return per prompt, not one per step); "
                             "set rloo.credit: sequence or rloo.baseline: leave_one_out")
        if self.distill and self.credit != "all_actions":
            raise ValueError(f"distill={self.distill} needs every action's reward at every step: set rloo.credit: all_actions, or rloo.distill: 0")
        if self.credit == "sequence" and self.gamma != 1.0:
            raise ValueError(f"gamma={self.gamma} discounts the reward-to-go of credit=token or all_actions; credit=sequence has one "
                             "return per sample: set rloo.credit: token (or all_actions), or leave rloo.gamma at 1")
        if self.length_decorrelate and self.credit != "sequence":
            raise ValueError(f"length_decorrelate fits one advantage per sample; credit={self.credit} has one per step: "
                             "set rloo.credit: sequence, or rloo.length_decorrelate: false")
        return self


class RLOO(OnPolicy):
    def __init__(self, cfg: RLOOConfig, kl: KLConfig, model, allowed: torch.Tensor | None, temperature: float = 1.0):
        self.cfg, self.kl_cfg, self.model, self.allowed = cfg, kl, model, allowed
        self.scoring = TemperedScoring(kl, allowed, temperature)
        self.policy = model
        self.group = cfg.k
        self.needs_action_rewards = cfg.needs_action_rewards

    @classmethod
    def build(cls, ctx: BuildContext) -> tuple["RLOO", torch.nn.Module]:
        return cls(ctx.settings, ctx.kl, ctx.policy, ctx.allowed, temperature=ctx.temperature), ctx.policy

    def update(self, loop, step: Step) -> dict[str, float]:
        """One REINFORCE step on the KL-shaped return. The self-critical baseline samples the
        policy's greedy output of each prompt; ``credit: all_actions`` takes the expectation of
        each step's task reward over every action (the reward's action_rewards)."""
        task_reward, beta, sc = step.task_reward, step.beta, self.scoring
        greedy = None
        if self.cfg.baseline == "greedy":  # the policy's greedy output for each prompt: greedy decoding draws no random numbers
            prompts = step.completions.prompts[:: self.cfg.k]
            with distributed.generation(loop.model):
                g = step.sampling.sample(self.model, prompts, temperature=0.0)
            greedy = (g, step.score(prompts, g))
        action_rewards = step.action_rewards() if self.cfg.credit == "all_actions" else None  # [B, T, V]
        ro = sc.tempered(step.rollout)
        kl, shaped, ret = sc.returns(ro, task_reward, beta)
        target = tilted_target(ro.logits_prior, action_rewards, 1.0 / (beta * self.kl_cfg.c), self.allowed) if self.cfg.distill else None
        if greedy is not None:
            adv = self_critical_advantages(ret, sc.returns(sc.tempered(greedy[0]), greedy[1], beta)[2], self.cfg.k)  # [B]
        elif self.cfg.credit == "token":
            adv = rloo_advantages(discounted_returns(shaped, ro.mask, self.cfg.gamma), self.cfg.k) * ro.mask  # [B, T]
        elif self.cfg.credit == "all_actions":  # the sampled step's own task reward leaves the return; expected_reward_loss takes its expectation
            rest = discounted_returns(shaped, ro.mask, self.cfg.gamma) - task_reward / self.kl_cfg.c  # [B, T]: −β·KL_t + γ·G_{t+1}
            adv = rloo_advantages(rest, self.cfg.k) * ro.mask
        else:
            adv = rloo_advantages(ret, self.cfg.k)  # [B]
        slope = None
        if self.cfg.length_decorrelate:  # [B]: no linear trend in the sample's length against its siblings'
            adv, slope = length_decorrelated(adv, torch.tensor(ro.lengths, dtype=adv.dtype), self.cfg.k, distributed.all_sum)
        if self.cfg.positive_only:
            adv = adv.clamp(min=0.0)
        losses = []
        model = distributed.training_forward(loop, self.model)  # through DDP / DeepSpeed: synchronised gradients
        scale = distributed.token_share(ro.mask)[0] if distributed.world_size() > 1 else 1.0  # global token mean
        chunks = row_chunks(ro.lengths, self.cfg.micro_batch) if self.cfg.micro_batch else [torch.arange(len(ro.lengths))]
        tokens = ro.mask.sum()

        def chunk_losses():  # each micro-batch's share of the token-mean loss (its tokens / the batch's)
            for rows in chunks:
                c = ro.take(rows) if len(chunks) > 1 else ro  # [b, t] with t its longest sample
                t = c.tokens.shape[1]
                logits, logp = sc.fresh_logp(model, c)
                loss = reinforce_loss(logp, adv[rows] if adv.ndim == 1 else adv[rows, :t], c.mask) + beta * sc.kl_loss(logits, logp, c)
                if action_rewards is not None:
                    logp_all = masked_log_softmax(logits.float(), self.allowed)
                    loss = loss + expected_reward_loss(logp_all, action_rewards[rows, :t] / self.kl_cfg.c, c.mask)
                    if target is not None:
                        loss = loss + self.cfg.distill * distillation_loss(logp_all, target[rows, :t], c.mask)
                yield loss * (c.mask.sum() / tokens) * scale

        for _ in range(self.cfg.epochs):
            losses.append(loop.accumulate_step(chunk_losses())[0])
        out = {"loss/policy": sum(losses) / len(losses)}
        out.update(rl_metrics(ro, task_reward, kl, shaped))
        if slope is not None:
            out["adv/length_slope"] = slope
        if greedy is not None:
            out["reward/greedy"] = float(distributed.global_row_mean(masked_sum(greedy[1], greedy[0].mask, dim=-1)))
        return out
