"""PPO with a per-token KL penalty to the frozen prior (Ziegler et al. 2019; Schulman et al. 2017).

update(): KL-shaped reward → GAE → whitened advantages → epochs × minibatches of the clipped
surrogate + clipped value loss − entropy bonus, stopping early when the policy moved too far.
"""

from __future__ import annotations

import torch
from pydantic import Field

from rlhf.advantages import gae, masked_mean, whiten
from rlhf.algorithms.common import KLConfig, Rollout, gather_logp, rl_metrics
from rlhf.config import Section
from rlhf.kl import shape_rewards
from rlhf.losses import entropy_from_logits, ppo_policy_loss, value_loss
from rlhf.policy import PolicyWithValue


class PPOConfig(Section):
    epochs: int = Field(4, ge=1, description="Passes over each rollout batch.")
    minibatches: int = Field(4, ge=1, description="Minibatches per pass.")
    clip: float = Field(0.2, gt=0, lt=1, description="Clip range ε of the probability ratio.")
    value_clip: float | None = Field(0.2, gt=0, description="Clip range of the value update; null = unclipped.")
    vf_coef: float = Field(0.5, ge=0, description="Weight of the value loss.")
    ent_coef: float = Field(0.0, ge=0, description="Weight of the entropy bonus.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount γ of GAE.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ.")
    whiten_advantages: bool = Field(True, description="Normalise advantages to zero mean, unit variance per batch.")
    reward_clip: float | None = Field(None, gt=0, description="Clip each shaped per-token reward to ±this; null = off.")
    shared_trunk: bool = Field(False, description="Let the value loss train the policy's trunk (true) or only the value head (false).")
    target_kl: float | None = Field(0.05, gt=0, description="Stop the epochs early when the approximate KL(old‖new) per token exceeds this; null = never.")


class PPO:
    def __init__(self, cfg: PPOConfig, kl: KLConfig, model: PolicyWithValue, allowed: torch.Tensor | None):
        self.cfg, self.kl_cfg, self.model, self.allowed = cfg, kl, model, allowed

    @property
    def sampler(self):
        return self.model.lm

    @torch.no_grad()
    def _values(self, ro: Rollout) -> torch.Tensor:
        if ro.hidden is not None:  # the sampling loop's hidden states: no second forward
            return self.model.value_head(ro.hidden).squeeze(-1)
        return self.model(ro.prompts, ro.prompt_mask, ro.tokens)[1]

    def update(self, loop, ro: Rollout, task_reward: torch.Tensor, beta: float) -> dict[str, float]:
        cfg, mask = self.cfg, ro.mask
        kl = ro.kl(self.kl_cfg.estimator, self.allowed)  # [B, T]
        rewards = shape_rewards(task_reward, kl, mask, beta, self.kl_cfg.c)
        if cfg.reward_clip is not None:
            rewards = rewards.clamp(-cfg.reward_clip, cfg.reward_clip)
        old_values = self._values(ro)  # [B, T]
        adv, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = whiten(adv, mask)
        b = ro.tokens.shape[0]
        size = max(1, b // cfg.minibatches)
        stats: dict[str, list[float]] = {"loss/policy": [], "loss/value": [], "entropy": [], "clip/frac": [], "kl/approx": []}
        stopped = False
        for _ in range(cfg.epochs):
            for idx in torch.randperm(b).split(size):
                logits, values = self.model(ro.prompts[idx], ro.prompt_mask[idx], ro.tokens[idx])
                logp = gather_logp(logits, ro.tokens[idx], self.allowed)
                m = mask[idx]
                pg, st = ppo_policy_loss(logp, ro.logp[idx], adv[idx], m, cfg.clip)
                vl = value_loss(values, old_values[idx], returns[idx], m, cfg.value_clip)
                ent = masked_mean(entropy_from_logits(logits.float(), self.allowed), m)
                loop.optimizer_step(pg + cfg.vf_coef * vl - cfg.ent_coef * ent)
                for k, v in (("loss/policy", pg), ("loss/value", vl), ("entropy", ent), ("clip/frac", st["clip/frac"]), ("kl/approx", st["kl/approx"])):
                    stats[k].append(float(v.detach()))
                if cfg.target_kl is not None and float(st["kl/approx"]) > cfg.target_kl:
                    stopped = True
                    break
            if stopped:
                break
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out.update(rl_metrics(ro, task_reward, kl, rewards))
        out["ppo/early_stop"] = float(stopped)
        return out

