"""Fine-tuning against the frozen prior: ``rlhf tune`` and the tuning stage of ``rlhf run``.

One iteration reads top to bottom: rollout → score → (KL-shaped reward and update, inside
the algorithm) → adapt β → log. The KL term enters through ``kl.shape_rewards`` (PPO, RLOO)
or ``td.td_reward`` (Q, Ψ, G) and nowhere else.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, model_validator

from rlhf.algorithms.common import Algorithm, KLConfig, make_rollout
from rlhf.algorithms.kl_control import KLControl, KLControlConfig
from rlhf.algorithms.ppo import PPO, PPOConfig
from rlhf.algorithms.rloo import RLOO, RLOOConfig
from rlhf.config import Section
from rlhf.kl import AdaptiveKLController, FixedKLController
from rlhf.models import load_causal_lm
from rlhf.policy import PolicyWithValue, frozen
from rlhf.runs import Run
from rlhf.trainer import TrainLoop, seed_everything

log = logging.getLogger("rlhf")


class TuneConfig(Section):
    algorithm: Algorithm = Field("ppo", description="ppo, rloo (REINFORCE with leave-one-out baseline), or Sequence Tutor's q, psi, g.")
    steps: int = Field(150, ge=1, description="Iterations (rollout + update).")
    batch_size: int = Field(64, ge=2, description="Sequences sampled per iteration.")
    lr: float = Field(3e-4, gt=0, le=1, description="Adam learning rate.")
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of rollouts (PPO/RLOO assume 1).")
    checkpoint_every: int = Field(50, ge=1, description="Write a resumable checkpoint every this many iterations.")
    kl: KLConfig = Field(default_factory=KLConfig, description="The KL term and reward scale.")
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="PPO settings.")
    rloo: RLOOConfig = Field(default_factory=RLOOConfig, description="RLOO settings.")
    kl_control: KLControlConfig = Field(default_factory=KLControlConfig, description="Q/Ψ/G-learning settings.")

    @model_validator(mode="after")
    def _groups(self) -> "TuneConfig":
        if self.algorithm == "rloo" and self.batch_size % self.rloo.k:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of rloo.k ({self.rloo.k})")
        return self


def build_algorithm(cfg: TuneConfig, prior_dir: Path, allowed: torch.Tensor):
    """(algorithm, trainable module) for ``cfg.algorithm``; the policy starts as the prior."""
    prior = frozen(load_causal_lm(prior_dir))
    policy = load_causal_lm(prior_dir).eval()  # eval: no dropout noise in ratios and TD targets
    if cfg.algorithm == "ppo":
        model = PolicyWithValue(policy)
        return PPO(cfg.ppo, cfg.kl, model, allowed), model, prior
    if cfg.algorithm == "rloo":
        return RLOO(cfg.rloo, cfg.kl, policy, allowed), policy, prior
    return KLControl(cfg.algorithm, cfg.kl_control, cfg.kl, policy, prior, allowed), policy, prior


def tune(run: Run, cfg: TuneConfig, task, prior_dir: Path, *, seed: int, resume: bool = False, progress: bool = True) -> Path:
    """Fine-tune a copy of the prior on the task's reward; returns ``run/models/<algorithm>``."""
    stage = f"tune-{cfg.algorithm}"
    seed_everything(seed)  # minibatch order, replay sampling: reproducible from the seed alone
    allowed = task.allowed
    algo, model, prior = build_algorithm(cfg, prior_dir, allowed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    loop = TrainLoop(run, stage, model, optimizer, total_steps=cfg.steps, checkpoint_every=cfg.checkpoint_every,
                     grad_clip=cfg.grad_clip, tokenizer=task.tokenizer, progress=progress)
    ctl = AdaptiveKLController(cfg.kl.beta, cfg.kl.target_kl, cfg.kl.horizon) if cfg.kl.adaptive else FixedKLController(cfg.kl.beta)
    if resume and loop.resume():
        ctl.load_state_dict(loop.extra_state["kl_ctl"])
        if hasattr(algo, "load_state_dict"):
            algo.load_state_dict(loop.extra_state["algo"])
    prompts = task.train_prompts()
    group = cfg.rloo.k if cfg.algorithm == "rloo" else 1
    gen = torch.Generator()
    for step in loop.steps():
        rng = np.random.default_rng([seed, step])
        picked = [prompts[i] for i in rng.integers(0, len(prompts), cfg.batch_size // group) for _ in range(group)]
        gen.manual_seed(int(rng.integers(2**62)))
        probs_fn = algo.probs_fn() if hasattr(algo, "probs_fn") else None
        ro = make_rollout(algo.sampler, prior, [p.ids for p in picked], [p.n_new for p in picked], pad_id=task.tokenizer.pad_token_id,
                          allowed=allowed, generator=gen, probs_fn=probs_fn, temperature=cfg.temperature)
        task_reward = task.step_rewards(picked, ro.tokens)  # [B, T]
        metrics = algo.update(loop, ro, task_reward, ctl.value)
        metrics["kl/coef"] = ctl.value
        ctl.update(metrics["kl/seq"], cfg.batch_size)
        loop.extra_state["kl_ctl"] = ctl.state_dict()
        if hasattr(algo, "state_dict"):
            loop.extra_state["algo"] = algo.state_dict()
        loop.advance()
        loop.log(metrics)
    final = run.final_model_dir(cfg.algorithm)
    loop.finish(final)
    task.codec.save(final)
    return final
