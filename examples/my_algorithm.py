"""A new algorithm in one file: REINFORCE with a moving-average baseline (Williams 1992).

    ∇J = E[ Σ_t ∇ log π(a_t|s_t) · (G − b) ],   b ← (1 − α)·b + α·mean(G)

where G is a sequence's KL-shaped return Σ_t (r_t/c − β·KL_t) (``rlhf.kl.shape_rewards``, the
core's one place for the KL term) and b a running mean of past returns: the plainest policy
gradient, with one number of state, which a checkpoint keeps.

Use it from YAML alone::

    tune:
      algorithm: examples.my_algorithm:SPEC
      reinforce: {decay: 0.1}        # its settings: the section SPEC names

or register it by name: ``ALGORITHMS.register("reinforce", SPEC)`` in your code, or an entry
point ``[project.entry-points."rlhf.algorithms"] reinforce = "my_package.my_algorithm:SPEC"``.

What an algorithm is (rlhf/interfaces.py, Algorithm): ``policy``, ``group``,
``needs_action_rewards``, ``rollout(sampling, prompts)``, ``update(loop, step)`` and
``state_dict`` / ``load_state_dict``; the tuner calls them in that order every iteration.
"""

from __future__ import annotations

import torch
from pydantic import Field

from rlhf.advantages import masked_sum
from rlhf.algorithms.common import AlgorithmSettings, AlgorithmSpec, BuildContext, Rollout, gather_logp, rl_metrics
from rlhf.interfaces import Step
from rlhf.kl import shape_rewards
from rlhf.losses import reinforce_loss
from rlhf.rollout import sequence_forward


class ReinforceConfig(AlgorithmSettings):
    decay: float = Field(0.1, gt=0, le=1, description="α: weight of a new batch's mean return in the baseline b.")


class Reinforce:
    group = 1
    needs_action_rewards = False

    def __init__(self, cfg: ReinforceConfig, ctx: BuildContext):
        self.cfg, self.kl_cfg, self.allowed = cfg, ctx.kl, ctx.allowed
        self.policy = ctx.policy
        self.baseline: float | None = None

    @classmethod
    def build(cls, ctx: BuildContext) -> tuple["Reinforce", torch.nn.Module]:
        return cls(ctx.settings, ctx), ctx.policy  # the optimizer trains the policy itself

    def rollout(self, sampling, prompts) -> Rollout:
        return sampling.sample(self.policy, prompts)

    def update(self, loop, step: Step) -> dict[str, float]:
        ro = step.rollout
        kl = ro.kl(self.kl_cfg.estimator, self.allowed)  # [B, T]
        shaped = shape_rewards(step.task_reward, kl, ro.mask, step.beta, self.kl_cfg.c)  # [B, T]
        ret = masked_sum(shaped, ro.mask, dim=-1)  # [B] G
        b = float(ret.mean()) if self.baseline is None else self.baseline
        logits, _ = sequence_forward(self.policy, ro.prompts, ro.prompt_mask, ro.tokens)
        loss = reinforce_loss(gather_logp(logits, ro.tokens, self.allowed), ret - b, ro.mask)
        loop.optimizer_step(loss)
        self.baseline = (1 - self.cfg.decay) * b + self.cfg.decay * float(ret.mean())
        out = {"loss/policy": float(loss.detach()), "reinforce/baseline": self.baseline}
        out.update(rl_metrics(ro, step.task_reward, kl, shaped))
        return out

    def state_dict(self) -> dict:
        return {"baseline": self.baseline}

    def load_state_dict(self, state: dict) -> None:
        self.baseline = state["baseline"]


SPEC = AlgorithmSpec(ReinforceConfig, Reinforce.build, section="reinforce", doc="REINFORCE with a moving-average baseline (Williams 1992)")
