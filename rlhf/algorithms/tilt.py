"""On-policy distillation of the tilted prior. At every state s the policy visits, the target is

    π*(a|s) ∝ p(a|s) · exp(r(s, a) / (βc)),

the policy that maximises E_π[r/c] − β·KL(π‖p) at s (the prior p tilted by the reward of every
action, which the reward must know: ``ActionRewards``). The policy is trained toward it by the
cross-entropy −Σ_a π*(a|s) log π(a|s) on its own samples (Agarwal et al. 2024, "On-Policy
Distillation of Language Models": the student's states, so it learns to recover from its own
mistakes). Where r(s, a) already carries what a step does to the rest of the sequence (the
counterpoint rules with ``task.lookahead``), π* is the KL-regularised optimum of the whole
sequence up to what the reward leaves out, and no sampled return is needed: the update has the
variance of supervised learning. ``kl.prior_temperature`` tilts p^(1/T) instead of p.
``divergence: reverse`` takes KL(π‖π*) instead (mode-seeking), ``symmetric`` the sum of both
(the forward term weighted by ``forward_weight``)."""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from pydantic import Field

from rlhf import distributed
from rlhf.algorithms.common import AlgorithmSettings, BuildContext, KLConfig, OnPolicy, TemperedScoring, rl_metrics
from rlhf.interfaces import Step
from rlhf.kl import masked_log_softmax
from rlhf.losses import distillation_loss, reverse_kl_loss, symmetric_kl_loss, tilted_target


class TiltConfig(AlgorithmSettings):
    k: int = Field(4, ge=1, description="Samples per prompt in one iteration (rewards that compare a prompt's samples, such as novelty, need k ≥ 2).")
    divergence: Literal["forward", "reverse", "symmetric"] = Field(
        "forward",
        description="forward: the cross-entropy −Σ_a π*(a|s)·log π(a|s) (mass-covering: keeps every action π* keeps, and so the variety); "
        "reverse: KL(π‖π*) exact over the action space (mode-seeking: removes the mass of actions π* all but rules out, such as a "
        "broken rule, far harder; rlhf/losses.py reverse_kl_loss, but on its way there it sharpens the policy beyond π*); symmetric: their "
        "sum (Jeffreys' divergence, up to π*'s entropy). All three have π* as their optimum.",
    )
    forward_weight: float = Field(
        1.0, gt=0,
        description="divergence: symmetric only: the loss is forward_weight·forward + reverse. Above 1 the mass-covering term weighs more "
        "(more variety, less sharpening beyond π*); 1 is their plain sum.",
    )
    epochs: int = Field(1, ge=1, description="Gradient steps on each rollout batch. The target does not depend on the policy, so reusing the batch stays sound.")

    @property
    def group(self) -> int:
        return self.k

    @property
    def needs_action_rewards(self) -> bool:
        return True

    def check_tune(self, tune) -> None:
        if self.forward_weight != 1.0 and self.divergence != "symmetric":
            raise ValueError(f"tune.tilt.forward_weight weighs the forward term of divergence: symmetric; with divergence: {self.divergence} "
                             "there is no sum to weigh. Remove it or set tune.tilt.divergence: symmetric")
        if tune.kl.beta <= 0 or tune.kl.adaptive:
            raise ValueError("tune.algorithm=tilt distils p·exp(r/(βc)): it needs a fixed tune.kl.beta > 0 (and tune.kl.adaptive: false)")
        if tune.temperature != 1.0:
            raise ValueError(f"tune.algorithm=tilt trains on the policy's own samples at temperature 1; got tune.temperature={tune.temperature}")


class Tilt(OnPolicy):
    def __init__(self, cfg: TiltConfig, kl: KLConfig, model, allowed: torch.Tensor | None):
        self.cfg, self.kl_cfg, self.model, self.allowed = cfg, kl, model, allowed
        self.scoring = TemperedScoring(kl, allowed, 1.0)
        self.policy = model
        self.group = cfg.k
        self.needs_action_rewards = True

    @classmethod
    def build(cls, ctx: BuildContext) -> tuple["Tilt", torch.nn.Module]:
        return cls(ctx.settings, ctx.kl, ctx.policy, ctx.allowed), ctx.policy

    def update(self, loop, step: Step) -> dict[str, float]:
        """One step of cross-entropy toward the tilted prior at the rollout's states."""
        ro, beta = step.rollout, step.beta
        target = tilted_target(ro.logits_prior, step.action_rewards(), 1.0 / (beta * self.kl_cfg.c), self.allowed)  # [B, T, V]
        kl, shaped, _ = self.scoring.returns(ro, step.task_reward, beta)
        model = distributed.training_forward(loop, self.model)
        scale = distributed.token_share(ro.mask)[0] if distributed.world_size() > 1 else 1.0  # global token mean

        divergence = {"forward": distillation_loss, "reverse": reverse_kl_loss,
                      "symmetric": partial(symmetric_kl_loss, forward_weight=self.cfg.forward_weight)}[self.cfg.divergence]

        def losses():
            logits, _ = self.scoring.fresh_logp(model, ro)
            logp_all = masked_log_softmax(logits.float(), self.allowed)
            yield divergence(logp_all, target, ro.mask) * scale

        out = {"loss/policy": sum(loop.accumulate_step(losses())[0] for _ in range(self.cfg.epochs)) / self.cfg.epochs}
        out.update(rl_metrics(ro, step.task_reward, kl, shaped))
        return out
