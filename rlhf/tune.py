"""Fine-tuning against the frozen prior: ``rlhf tune`` and the tuning stage of ``rlhf run``.

One iteration reads top to bottom: rollout → score → (KL-shaped reward and update, inside
the algorithm) → adapt β → log. The KL term enters through ``kl.shape_rewards`` (PPO, RLOO)
or ``td.td_reward`` (Q, Ψ, G) and nowhere else.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from rlhf import distributed
from rlhf.algorithms.common import Algorithm, KLConfig, beam_rollout, make_rollout
from rlhf.algorithms.kl_control import KLControl, KLControlConfig
from rlhf.algorithms.mrt import MRT, MRTConfig
from rlhf.algorithms.ppo import PPO, PPOConfig
from rlhf.algorithms.rloo import RLOO, RLOOConfig
from rlhf.config import Section
from rlhf.errors import UserError
from rlhf.kl import AdaptiveKLController, FixedKLController
from rlhf.models import load_causal_lm
from rlhf.policy import PolicyWithValue, frozen
from rlhf.prompt_sampling import PromptSampler, PromptSampling
from rlhf.runs import Run
from rlhf.trainer import TrainLoop, seed_everything

log = logging.getLogger("rlhf")


class TuneConfig(Section):
    algorithm: Algorithm = Field("ppo", description="ppo, rloo (REINFORCE with leave-one-out baseline), mrt (minimum risk training over k candidates per prompt), or Sequence Tutor's q, psi, g.")
    steps: int = Field(150, ge=1, description="Iterations (rollout + update).")
    batch_size: int = Field(64, ge=2, description="Sequences sampled per iteration.")
    lr: float = Field(3e-4, gt=0, le=1, description="Adam learning rate.")
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm.")
    temperature: float = Field(
        1.0, gt=0,
        description="Sampling temperature τ of rollouts. RLOO then trains the tempered policy softmax(logits/τ): its log-probs score the "
        "samples, so the update stays on-policy, and the KL is taken against the prior tempered alike (greedy decoding is the same for "
        "every τ). PPO needs 1; Q/Ψ/G sample from their own exploration policy.",
    )
    checkpoint_every: int = Field(50, ge=1, description="Write a resumable checkpoint every this many iterations.")
    rollout_seeds: Literal["auto", "batch", "sequence"] = Field(
        "auto",
        description="batch: one random stream for the whole rollout batch; sequence: one per sequence, seeded by its index in the "
        "global batch, so N processes sample exactly the sequences one process samples; auto: batch with one process, sequence with several.",
    )
    prompt_sampling: PromptSampling = Field(
        "uniform",
        description="uniform: each iteration's prompts drawn uniformly; prioritized: more often the prompts where the policy's running mean "
        "task return is lowest (rank-based, Schaul et al. 2016; rlhf/prompt_sampling.py), e.g. the cantus firmi it still gets wrong.",
    )
    priority_alpha: float = Field(0.5, gt=0, description="prioritized: P(i) ∝ rank_i^-alpha (rank 1 = lowest mean return); larger = more focused.")
    priority_uniform: float = Field(0.25, ge=0, le=1, description="prioritized: share of the sampling mass spread uniformly over all prompts.")
    priority_ema: float = Field(0.1, gt=0, le=1, description="prioritized: weight of a new batch in each prompt's running mean return.")
    kl: KLConfig = Field(default_factory=KLConfig, description="The KL term and reward scale.")
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="PPO settings.")
    rloo: RLOOConfig = Field(default_factory=RLOOConfig, description="RLOO settings.")
    mrt: MRTConfig = Field(default_factory=MRTConfig, description="Minimum risk training settings.")
    kl_control: KLControlConfig = Field(default_factory=KLControlConfig, description="Q/Ψ/G-learning settings.")

    @model_validator(mode="after")
    def _groups(self) -> "TuneConfig":
        if self.batch_size % self.group:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of {self.algorithm}.k ({self.group})")
        if self.algorithm == "ppo" and self.temperature != 1.0:
            raise ValueError(f"temperature={self.temperature}: PPO's probability ratios and value targets assume samples from the policy "
                             "itself; set tune.temperature: 1, or use tune.algorithm: rloo, which trains the tempered policy")
        if self.algorithm == "mrt" and self.mrt.candidates == "beam" and self.temperature != 1.0:
            raise ValueError(f"temperature={self.temperature} with mrt.candidates=beam: beam candidates are not samples, so there is no "
                             "sampling temperature; set tune.temperature: 1 (mrt.alpha sets how sharply the loss weighs them)")
        return self

    @property
    def group(self) -> int:
        """Samples drawn per prompt in one iteration: RLOO's and MRT's k, else 1."""
        return {"rloo": self.rloo.k, "mrt": self.mrt.k}.get(self.algorithm, 1)


def build_algorithm(cfg: TuneConfig, prior_dir: Path, allowed: torch.Tensor):
    """(algorithm, trainable module) for ``cfg.algorithm``; the policy starts as the prior."""
    prior = frozen(load_causal_lm(prior_dir))
    policy = load_causal_lm(prior_dir).eval()  # eval: no dropout noise in ratios and TD targets
    if cfg.algorithm == "ppo":
        model = PolicyWithValue(policy, shared_trunk=cfg.ppo.shared_trunk)
        return PPO(cfg.ppo, cfg.kl, model, allowed), model, prior
    if cfg.algorithm == "rloo":
        return RLOO(cfg.rloo, cfg.kl, policy, allowed, temperature=cfg.temperature), policy, prior
    if cfg.algorithm == "mrt":
        return MRT(cfg.mrt, cfg.kl, policy, allowed, temperature=cfg.temperature), policy, prior
    return KLControl(cfg.algorithm, cfg.kl_control, cfg.kl, policy, prior, allowed), policy, prior


class Tuner:
    """State of one fine-tuning run (policy, prior, algorithm, β controller, training loop);
    :meth:`iteration` is one rollout → score → update → adapt-β step.

    ``task`` needs: ``allowed`` ([V] bool action mask), ``tokenizer``, ``train_prompts()``
    (objects with ``ids`` and ``n_new``) and ``step_rewards(prompts, tokens [B, T]) -> [B, T]``;
    with ``rloo.credit: all_actions`` also ``action_rewards(prompts, tokens) -> [B, T, V]``, the
    reward every action would get at every step (equal to step_rewards at the sampled tokens).
    """

    def __init__(self, run: Run, cfg: TuneConfig, task, prior_dir: Path, *, seed: int, progress: bool = True, name: str | None = None):
        self.cfg, self.task, self.seed = cfg, task, seed
        if cfg.algorithm == "rloo" and cfg.rloo.credit == "all_actions" and not callable(getattr(task, "action_rewards", None)):
            raise UserError(f"tune.rloo.credit=all_actions needs per-action rewards, which the {type(task).__name__} task does not give; "
                            "use tune.rloo.credit: token")
        seed_everything(seed)  # minibatch order, replay sampling: reproducible from the seed alone
        self.algo, model, self.prior = build_algorithm(cfg, prior_dir, task.allowed)
        # fused: one kernel for all parameter tensors instead of one op chain per tensor (5x faster step on CPU)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, fused=True)
        self.loop = TrainLoop(run, f"tune-{name or cfg.algorithm}", model, optimizer, total_steps=cfg.steps, checkpoint_every=cfg.checkpoint_every,
                              grad_clip=cfg.grad_clip, tokenizer=task.tokenizer, progress=progress)
        # Each process samples and trains on its contiguous share of the global batch (RLOO, MRT: whole groups).
        self.start, self.end = distributed.shard_bounds(cfg.batch_size, "tune.batch_size")
        if (self.end - self.start) % cfg.group:
            raise ValueError(f"tune.batch_size / processes ({self.end - self.start}) must be a multiple of {cfg.algorithm}.k ({cfg.group}): "
                             "a prompt's group of samples must stay on one process")
        seeds = cfg.rollout_seeds if cfg.rollout_seeds != "auto" else ("batch" if distributed.world_size() == 1 else "sequence")
        self.per_sequence = seeds == "sequence"
        kl = cfg.kl
        self.ctl = AdaptiveKLController(kl.beta, kl.target_kl, kl.horizon) if kl.adaptive else FixedKLController(kl.beta)
        self.prompts = task.train_prompts()
        self.sampler = PromptSampler(len(self.prompts), cfg.prompt_sampling, cfg.priority_alpha, cfg.priority_uniform, cfg.priority_ema)
        self.gen = torch.Generator()

    def resume(self) -> bool:
        if not self.loop.resume():
            return False
        self.ctl.load_state_dict(self.loop.extra_state["kl_ctl"])
        if "prompts" in self.loop.extra_state:  # absent in checkpoints written before prompt sampling existed
            self.sampler.load_state_dict(self.loop.extra_state["prompts"])
        if hasattr(self.algo, "load_state_dict"):
            self.algo.load_state_dict(self.loop.extra_state["algo"])
        return True

    def iteration(self, step: int) -> dict[str, float]:
        cfg, task, algo = self.cfg, self.task, self.algo
        group = cfg.group
        rng = np.random.default_rng([self.seed, step])
        index = [int(i) for i in self.sampler.draw(rng, cfg.batch_size // group) for _ in range(group)]
        batch = [self.prompts[i] for i in index]
        picked = batch[self.start : self.end]  # this process's rows of the global batch
        base_seed = int(rng.integers(2**62))
        self.gen.manual_seed(base_seed)
        probs_fn = algo.probs_fn() if hasattr(algo, "probs_fn") else None
        if self.per_sequence:
            # row b of the global batch draws from its own stream, whatever process samples it
            probs_fn = distributed.RowSampler(distributed.row_seeds(base_seed, step, range(self.start, self.end)), max(p.n_new for p in batch),
                                              allowed=task.allowed, temperature=cfg.temperature, base=probs_fn)
        with distributed.generation(self.loop.model):
            if cfg.algorithm == "mrt" and cfg.mrt.candidates == "beam":
                ro = beam_rollout(algo.sampler, self.prior, [p.ids for p in picked[::group]], [p.n_new for p in picked[::group]], group,
                                  pad_id=task.tokenizer.pad_token_id, allowed=task.allowed, eos_id=getattr(task, "eos_id", None))
            else:
                ro = make_rollout(algo.sampler, self.prior, [p.ids for p in picked], [p.n_new for p in picked], pad_id=task.tokenizer.pad_token_id,
                                  allowed=task.allowed, generator=self.gen, probs_fn=probs_fn, temperature=cfg.temperature,
                                  eos_id=getattr(task, "eos_id", None), hidden=cfg.algorithm == "ppo")
        task_reward = task.step_rewards(picked, ro.tokens)  # [B, T]
        self.sampler.update(torch.tensor(index[self.start : self.end]), task_reward.sum(-1).cpu())
        extra = {}
        if cfg.algorithm == "rloo" and cfg.rloo.baseline == "greedy":
            extra["greedy"] = self.greedy_rollout(picked[::group])
        if cfg.algorithm == "rloo" and cfg.rloo.credit == "all_actions":
            extra["action_rewards"] = task.action_rewards(picked, ro.tokens)  # [B, T, V]
        metrics = algo.update(self.loop, ro, task_reward, self.ctl.value, **extra)
        metrics["kl/coef"] = self.ctl.value
        self.ctl.update(metrics["kl/seq"], cfg.batch_size)  # kl/seq is the global batch's mean (rl_metrics)
        self.loop.extra_state["kl_ctl"] = self.ctl.state_dict()
        # callables: evaluated (on every rank) only when a checkpoint is written
        self.loop.extra_state["prompts"] = self.sampler.state_dict
        if hasattr(algo, "state_dict"):
            self.loop.extra_state["algo"] = algo.state_dict
        return metrics

    def greedy_rollout(self, prompts: list) -> tuple:
        """(rollout, task reward [n, T]) of the policy's greedy output for each prompt: the
        self-critical baseline. Greedy decoding draws no random numbers."""
        task = self.task
        with distributed.generation(self.loop.model):
            ro = make_rollout(self.algo.sampler, self.prior, [p.ids for p in prompts], [p.n_new for p in prompts],
                              pad_id=task.tokenizer.pad_token_id, allowed=task.allowed, generator=None, temperature=0.0,
                              eos_id=getattr(task, "eos_id", None))
        return ro, task.step_rewards(prompts, ro.tokens)


def tune(run: Run, cfg: TuneConfig, task, prior_dir: Path, *, seed: int, resume: bool = False, progress: bool = True, name: str | None = None) -> Path:
    """Fine-tune a copy of the prior on the task's reward; returns ``run/models/<name>``
    (``name`` defaults to the algorithm; metrics go to stage ``tune-<name>``)."""
    tuner = Tuner(run, cfg, task, prior_dir, seed=seed, progress=progress, name=name)
    if resume:
        tuner.resume()
    for step in tuner.loop.steps():
        metrics = tuner.iteration(step)
        tuner.loop.advance()
        tuner.loop.log(metrics)
    final = run.final_model_dir(name or cfg.algorithm)
    tuner.loop.finish(final)
    if tuner.loop.accelerator.is_main_process:
        task.codec.save(final)
    tuner.loop.accelerator.wait_for_everyone()
    return final
