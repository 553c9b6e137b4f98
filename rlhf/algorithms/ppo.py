"""PPO with a per-token KL penalty to the frozen prior (Ziegler et al. 2019; Schulman et al. 2017).

update(): KL-shaped reward → GAE → whitened advantages → epochs × minibatches of the clipped
surrogate + clipped value loss − entropy bonus, stopping early when the policy moved too far.
"""

from __future__ import annotations

import torch
from pydantic import Field

from rlhf import distributed
from rlhf.advantages import gae, masked_mean
from rlhf.algorithms.common import AlgorithmSettings, BuildContext, KLConfig, OnPolicy, Rollout, gather_logp, rl_metrics
from rlhf.interfaces import Step
from rlhf.kl import kl_pathwise_loss, shape_rewards
from rlhf.losses import entropy_from_logits, ppo_policy_loss, value_loss
from rlhf.policy import PolicyWithValue


class PPOConfig(AlgorithmSettings):
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

    def check_tune(self, tune) -> None:
        if tune.temperature != 1.0:
            raise ValueError(f"temperature={tune.temperature}: PPO's probability ratios and value targets assume samples from the policy "
                             "itself; set tune.temperature: 1, or use tune.algorithm: rloo, which trains the tempered policy")


class PPO(OnPolicy):
    group = 1
    needs_action_rewards = False

    def __init__(self, cfg: PPOConfig, kl: KLConfig, model: PolicyWithValue, allowed: torch.Tensor | None):
        self.cfg, self.kl_cfg, self.model, self.allowed = cfg, kl, model, allowed
        self.policy = model.lm

    @classmethod
    def build(cls, ctx: BuildContext) -> tuple["PPO", PolicyWithValue]:
        model = PolicyWithValue(ctx.policy, shared_trunk=ctx.settings.shared_trunk)
        return cls(ctx.settings, ctx.kl, model, ctx.allowed), model

    def rollout(self, sampling, prompts) -> Rollout:
        return sampling.sample(self.policy, prompts, hidden=True)  # the hidden states feed the value head

    @torch.no_grad()
    def _values(self, ro: Rollout) -> torch.Tensor:
        if ro.hidden is not None:  # the sampling loop's hidden states: no second forward
            return self.model.value_head(ro.hidden).squeeze(-1)
        return self.model(ro.prompts, ro.prompt_mask, ro.tokens)[1]

    def update(self, loop, step: Step) -> dict[str, float]:
        ro, task_reward, beta = step.rollout, step.task_reward, step.beta
        cfg, mask = self.cfg, ro.mask
        kl = ro.kl(self.kl_cfg.estimator, self.allowed)  # [B, T]
        rewards = shape_rewards(task_reward, kl, mask, beta, self.kl_cfg.c)
        if cfg.reward_clip is not None:
            rewards = rewards.clamp(-cfg.reward_clip, cfg.reward_clip)
        old_values = self._values(ro)  # [B, T]
        adv, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        # the pathwise KL term (see kl_pathwise_loss) must keep its weight β relative to the
        # advantages, so it is divided by the same σ the whitening divides them by
        kl_coef = beta
        if cfg.whiten_advantages:
            mu = distributed.global_masked_mean(adv, mask)
            kl_coef = beta / float(distributed.global_masked_mean((adv - mu) ** 2, mask).sqrt().clamp(min=1e-8))
            adv = distributed.global_whiten(adv, mask)  # μ, σ² over the global batch, not this rank's shard
        b = ro.tokens.shape[0]
        world = distributed.world_size()
        # Minibatches are drawn from the *global* batch (same permutation on every rank: the
        # torch RNG is seeded alike); each rank trains on the rows it holds, weighted by its
        # share of the minibatch's tokens, so N processes take the steps one process takes.
        n_global, offset = b * world, distributed.rank() * b
        size = max(1, n_global // cfg.minibatches)
        model = distributed.training_forward(loop, self.model)  # through DDP / DeepSpeed: synchronised gradients
        stats: dict[str, list[float]] = {"loss/policy": [], "loss/value": [], "loss/kl": [], "entropy": [], "clip/frac": [], "kl/approx": []}
        stopped = False
        for _ in range(cfg.epochs):
            minibatches = [_local_rows(gidx, offset, b, mask) for gidx in torch.randperm(n_global).split(size)]
            if world > 1:  # every minibatch's global token count, in one all-reduce per epoch
                totals = distributed.all_sum(torch.stack([m.bool().sum() for _, m in minibatches])).tolist()
            for j, (idx, m) in enumerate(minibatches):
                logits, values = model(ro.prompts[idx], ro.prompt_mask[idx], ro.tokens[idx])
                # Padding after EOS holds a token outside the action space (log π = −inf): exp(−inf − (−inf))
                # is NaN, and the masked mean's zero gradient times NaN is NaN. Real tokens are unchanged.
                logp = _real(gather_logp(logits, ro.tokens[idx], self.allowed), m)
                pg, st = ppo_policy_loss(logp, _real(ro.logp[idx], m), adv[idx], m, cfg.clip)
                vl = value_loss(values, old_values[idx], returns[idx], m, cfg.value_clip)
                pw = kl_pathwise_loss(self.kl_cfg.estimator, logp, _real(ro.logp_prior[idx], m), m, logits.float(), ro.logits_prior[idx], self.allowed)
                ent = masked_mean(entropy_from_logits(logits.float(), self.allowed), m)
                terms = {"loss/policy": pg, "loss/value": vl, "loss/kl": pw, "entropy": ent, "clip/frac": st["clip/frac"], "kl/approx": st["kl/approx"]}
                global_kl = None
                if world > 1:
                    # rank means → global token means once DDP (or loop.log) averages over ranks: n_r·W/N
                    scale = float(m.bool().sum()) * world / max(totals[j], 1.0)
                    terms = {k: v * scale for k, v in terms.items()}
                    if cfg.target_kl is not None:  # the early-stop decision must be the same on every rank
                        global_kl = distributed.all_sum_async(terms["kl/approx"])  # waited for after the step
                loop.optimizer_step(terms["loss/policy"] + kl_coef * terms["loss/kl"] + cfg.vf_coef * terms["loss/value"] - cfg.ent_coef * terms["entropy"])
                if global_kl is not None:
                    terms["kl/approx"] = global_kl() / world
                for k, v in terms.items():
                    stats[k].append(float(v.detach()))
                if cfg.target_kl is not None and float(terms["kl/approx"]) > cfg.target_kl:
                    stopped = True
                    break
            if stopped:
                break
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out.update(rl_metrics(ro, task_reward, kl, rewards))
        out["ppo/early_stop"] = float(stopped)
        return out


def _local_rows(gidx: torch.Tensor, offset: int, b: int, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's row indices, their mask) among the global rows ``gidx`` of a minibatch,
    when the rank holds global rows [offset, offset + b). With one process: ``gidx`` itself.
    A rank that holds none of them still runs a forward and backward (DDP needs every rank's
    gradients) on one row with an all-zero mask, which contributes nothing."""
    mine = gidx[(gidx >= offset) & (gidx < offset + b)] - offset
    if len(mine) == 0:
        return gidx.new_zeros(1), torch.zeros_like(mask[:1])
    return mine, mask[mine]


def _real(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x on real tokens, 0 on padding."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
