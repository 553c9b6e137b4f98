"""Fine-tuning against the frozen prior: ``rlhf tune`` and the tuning stage of ``rlhf run``.

One iteration reads top to bottom: rollout (the algorithm's hook) → score (the reward, on the
batch's :class:`~rlhf.interfaces.Completions`) → update (the KL-shaped reward, advantages and
the gradient step, inside the algorithm) → adapt β → log. The KL term enters through
``kl.shape_rewards`` (PPO, RLOO, MRT) or ``td.td_reward`` (Q, Ψ, G) and nowhere else; a
sequence reward becomes per-step rewards in ``Rewards.per_step`` and nowhere else.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from pydantic import Field, ValidationError, model_serializer, model_validator
from torch.optim.swa_utils import AveragedModel

import rlhf.algorithms  # noqa: F401  (registers the built-in algorithms)
from rlhf import distributed
from rlhf.algorithms.common import ALGORITHMS, BuildContext, KLConfig, Rollout, beam_rollout, make_rollout
from rlhf.config import CheckpointEvery, GradClip, KeepCheckpoints, LearningRate, Section, Steps
from rlhf.errors import UserError
from rlhf.interfaces import ActionRewards, Algorithm, Completions, RewardFn, Step, Task, as_rewards
from rlhf.kl import AdaptiveKLController, FixedKLController
from rlhf.lora import AdaptersOff, LoraSettings, with_lora
from rlhf.models import load_model
from rlhf.policy import frozen
from rlhf.prompt_sampling import PromptSampler, PromptSampling
from rlhf.rewards import task_reward
from rlhf.runs import Run
from rlhf.trainer import TrainLoop, seed_everything

log = logging.getLogger("rlhf")


class TuneConfig(Section):
    algorithm: str = Field(
        "ppo",
        description="ppo, rloo (REINFORCE with leave-one-out baseline), tilt (on-policy distillation of the prior tilted by every action's reward), "
        "mrt (minimum risk training over k candidates per prompt), Sequence "
        "Tutor's q, psi, g, or an algorithm of yours (an rlhf.algorithms entry point or 'package.module:SPEC'). Its settings are the "
        "section tune.<algorithm> (tune.kl_control for q, psi and g); a section of another algorithm is an error (null drops one "
        "inherited from a base config).",
    )
    steps: Steps = 150
    batch_size: int = Field(64, ge=2, description="Sequences sampled per iteration.")
    lr: LearningRate = 3e-4
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="constant: tune.lr throughout; cosine: tune.lr decayed by half a cosine to 0 over tune.steps (iterations, not optimizer "
        "steps), so the last iterations average out the noise of the sampled batches (rlhf/tune.py: scheduled_lr).",
    )
    grad_clip: GradClip = 1.0
    temperature: float = Field(
        1.0, gt=0,
        description="Sampling temperature τ of rollouts. RLOO then trains the tempered policy softmax(logits/τ): its log-probs score the "
        "samples, so the update stays on-policy, and the KL is taken against the prior tempered alike (greedy decoding is the same for "
        "every τ). PPO needs 1; Q/Ψ/G sample from their own exploration policy.",
    )
    checkpoint_every: CheckpointEvery = 50
    keep_checkpoints: KeepCheckpoints = 2
    average_from: int | None = Field(
        None, ge=0,
        description="Weight averaging (SWA, Izmailov et al. 2018): from this iteration on, keep the uniform mean of the weights after "
        "each iteration; the final model is that mean. Checkpoints hold the last iterate and the mean, so a resumed run is exact. "
        "It keeps a second copy of the trained model in memory. null: the final model is the last iterate.",
    )
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
    settings: Any = Field(None, exclude=True, description="The chosen algorithm's settings (read from tune.<algorithm>).")

    @model_validator(mode="before")
    @classmethod
    def _pick_settings(cls, data: Any) -> Any:
        """tune.<algorithm> -> ``settings``, validated by the algorithm's own config class: a
        discriminated union on ``algorithm`` (only the chosen algorithm's section is valid)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        name = str(data.get("algorithm", "ppo"))
        try:
            spec = ALGORITHMS.get(name)
        except UserError as e:
            raise ValueError(str(e).replace("unknown algorithm", "tune.algorithm: unknown algorithm")) from None
        key = spec.key(name)
        others = {ALGORITHMS.get(n).key(n) for n in ALGORITHMS.names()} - {key}
        for k in [k for k in data if k in others and data[k] is None]:  # tune.rloo: null in a preset drops its base's rloo section
            del data[k]
        for k in data:
            if k in others:
                raise ValueError(f"tune.{k}: settings of another algorithm, but tune.algorithm is {name} (whose settings are tune.{key}); "
                                 f"remove tune.{k} (tune.{k}: null where it comes from a base config) or set tune.algorithm to the algorithm it configures")
        raw = data.pop(key, None)
        if data.get("settings") is not None and raw is None:  # a copy of a loaded config
            return data
        try:
            data["settings"] = raw if isinstance(raw, spec.config) else spec.config.model_validate(raw or {})
        except ValidationError as err:
            msgs = [f"tune.{key}.{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r})"
                    if e["type"] != "extra_forbidden" else f"tune.{key}.{'.'.join(map(str, e['loc']))}: unknown key; allowed: "
                    f"{', '.join(spec.config.model_fields)}" for e in err.errors()]
            raise ValueError("; ".join(msgs)) from None
        return data

    @model_serializer(mode="wrap")
    def _dump(self, handler, info) -> dict[str, Any]:
        out = handler(self)
        if self.settings is not None:
            out[ALGORITHMS.get(self.algorithm).key(self.algorithm)] = self.settings.model_dump(mode=info.mode)
        return out

    @classmethod
    def described_sections(cls) -> list[tuple[str, type]]:
        """For ``rlhf config-help``: every registered algorithm's settings section."""
        out = {}
        for n in ALGORITHMS.names():
            spec = ALGORITHMS.get(n)
            out.setdefault(spec.key(n), spec.config)
        return list(out.items())

    def with_algorithm(self, name: str, **update: Any) -> "TuneConfig":
        """A copy for another algorithm (with its default settings) and other fields changed."""
        data = {k: v for k, v in self.model_dump().items() if k != ALGORITHMS.get(self.algorithm).key(self.algorithm)}
        return TuneConfig.model_validate({**data, "algorithm": name, **update})

    @model_validator(mode="after")
    def _groups(self) -> "TuneConfig":
        group = self.group
        if self.batch_size % group:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of {self.algorithm}.k ({group})")
        if self.average_from is not None and self.average_from >= self.steps:
            raise ValueError(f"average_from ({self.average_from}) must be below steps ({self.steps}): the mean would hold no iterate; "
                             "lower it, or null to keep the last iterate")
        self.settings.check_tune(self)  # the algorithm's own cross-checks with the shared settings
        return self

    @property
    def group(self) -> int:
        """Samples drawn per prompt in one iteration: the settings' k (RLOO, MRT), else 1."""
        return self.settings.group


def build_algorithm(cfg: TuneConfig, prior_dir: Path, allowed: torch.Tensor | None,
                    lora: LoraSettings | None = None) -> tuple[Algorithm, torch.nn.Module, torch.nn.Module]:
    """(algorithm, trainable module, frozen prior) for ``cfg.algorithm``; the policy starts as the
    prior. With ``lora`` the policy is the prior's weights wearing fresh adapters (only they
    train), and the prior is the same weights with the adapters off: one copy in memory."""
    if lora is None:
        prior = frozen(load_model(prior_dir))
        policy = load_model(prior_dir).eval()  # eval: no dropout noise in ratios and TD targets
    else:
        policy = with_lora(load_model(prior_dir), lora).eval()
        prior = AdaptersOff(policy)
    # the prior is never prepared by accelerate, and algorithms copy the policy (target networks):
    # both must already sit on the process's device
    device = distributed.local_device()
    policy, prior = policy.to(device), prior.to(device)
    ctx = BuildContext(cfg.algorithm, cfg.settings, cfg.kl, cfg.temperature, policy, prior, allowed)
    algo, model = ALGORITHMS.get(cfg.algorithm).build(ctx)
    return algo, model, prior


@dataclass
class Sampling:
    """How one iteration samples: the frozen prior scores every rollout, and with
    ``row_seeds`` each row draws from its own random stream (so N processes sample exactly the
    sequences one process samples)."""

    prior: torch.nn.Module
    pad_id: int
    allowed: torch.Tensor | None
    eos_id: int | None
    temperature: float
    generator: torch.Generator
    max_new: int  # the longest completion budget of the global batch
    row_seeds: list[int] | None = None
    prior_temperature: float = 1.0  # the KL anchor is p^(1/T) (KLConfig.prior_temperature)

    def sample(self, policy, prompts: Sequence[Any], *, probs_fn=None, hidden: bool = False, temperature: float | None = None) -> Rollout:
        """Sample ``policy`` on ``prompts`` (τ = 0: greedy, no random numbers drawn)."""
        t = self.temperature if temperature is None else temperature
        if self.row_seeds is not None and t > 0:  # row b of the global batch draws from its own stream, whatever process samples it
            probs_fn = distributed.RowSampler(self.row_seeds, self.max_new, allowed=self.allowed, temperature=t, base=probs_fn)
        return make_rollout(policy, self.prior, [p.ids for p in prompts], [p.n_new for p in prompts], pad_id=self.pad_id, allowed=self.allowed,
                            generator=self.generator if t > 0 else None, probs_fn=probs_fn, temperature=t, eos_id=self.eos_id, hidden=hidden,
                            prior_temperature=self.prior_temperature)

    def beam(self, policy, prompts: Sequence[Any], k: int) -> Rollout:
        """The k best beam-search completions of each prompt."""
        return beam_rollout(policy, self.prior, [p.ids for p in prompts], [p.n_new for p in prompts], k, pad_id=self.pad_id,
                            allowed=self.allowed, eos_id=self.eos_id, prior_temperature=self.prior_temperature)


class Tuner:
    """State of one fine-tuning run (policy, prior, algorithm, β controller, training loop);
    :meth:`iteration` is one rollout → score → update → adapt-β step. ``task`` is a
    :class:`~rlhf.interfaces.Task`; ``reward`` replaces the task's own reward (e.g. a learned
    reward model, or a weighted sum with rewards of yours)."""

    def __init__(self, run: Run, cfg: TuneConfig, task: Task, prior_dir: Path, *, seed: int, progress: bool = True, name: str | None = None,
                 reward: RewardFn | None = None, lora: LoraSettings | None = None):
        self.cfg, self.task, self.seed = cfg, task, seed
        self.reward = reward if reward is not None else task_reward(task)
        seed_everything(seed)  # minibatch order, replay sampling: reproducible from the seed alone
        # the task builds its action mask on the CPU; sampling, log-probs and TD targets use it where the policy is
        self.allowed = None if task.allowed is None else task.allowed.to(distributed.local_device())
        self.algo, model, self.prior = build_algorithm(cfg, prior_dir, self.allowed, lora)
        if self.algo.needs_action_rewards and not isinstance(self.reward, ActionRewards):
            raise UserError(f"tune.algorithm={cfg.algorithm} with these settings needs the reward of every action at every step, which the "
                            f"reward ({type(self.reward).__name__}) does not give; use a sequence- or token-level setting (e.g. "
                            "tune.rloo.credit: token)")
        # fused: one kernel for all parameter tensors instead of one op chain per tensor (5x faster step on CPU)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, fused=True)
        self.loop = TrainLoop(run, f"tune-{name or cfg.algorithm}", model, optimizer, total_steps=cfg.steps, checkpoint_every=cfg.checkpoint_every,
                              keep_checkpoints=cfg.keep_checkpoints, grad_clip=cfg.grad_clip, tokenizer=task.tokenizer, progress=progress)
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
        self.kl_window: list[float] = []
        self.rollbacks = 0
        self.average: AveragedModel | None = None
        if cfg.average_from is not None:
            if cfg.average_from >= cfg.steps:  # a model_copy skips the config's own check; the mean would hold no iterate
                raise UserError(f"tune.average_from ({cfg.average_from}) must be below tune.steps ({cfg.steps})")
            if distributed.is_deepspeed(self.loop.model):  # ZeRO partitions the parameters the mean would copy
                raise UserError("tune.average_from: weight averaging is not available under DeepSpeed; set it to null")
            self.average = AveragedModel(self.loop.unwrapped, use_buffers=False)  # uniform running mean (SWA's default)
            self.loop.extra_state["average"] = self.average.state_dict  # called at save time: resume continues the same mean

    def guard_kl(self, kl_per_token: float) -> bool:
        """``tune.kl.max``: when the mean KL per token over the last ``max_window`` iterations
        exceeds it, stop (``on_max: stop``) or roll back (:meth:`rollback`; returns True). Runs
        before this iteration's checkpoint could be written, so the last checkpoint is one from
        before the drift."""
        kl = self.cfg.kl
        self.kl_window.append(kl_per_token)
        del self.kl_window[: -kl.max_window]
        mean = sum(self.kl_window) / len(self.kl_window)
        if kl.max is None or len(self.kl_window) < kl.max_window or mean <= kl.max:
            return False
        where = f"stage {self.loop.stage}, step {self.loop.step + 1}: KL to the prior {mean:.3f} nats per token (kl/mean over {kl.max_window} iterations) exceeds tune.kl.max={kl.max}"
        if kl.on_max == "rollback" and self.rollback():
            log.warning("%s: rolled back to step %d with β doubled to %g (rollback %d of %d)", where, self.loop.step, self.ctl.value,
                        self.rollbacks, kl.max_rollbacks)
            return True
        last = self.loop.run.latest_checkpoint(self.loop.stage)
        why = f" after {self.rollbacks} rollbacks (tune.kl.max_rollbacks)" if kl.on_max == "rollback" and last else ""
        raise UserError(f"{where}; the run stopped{why}"
                        + (f"; the last checkpoint, {last}, is from before (resume from it with a larger tune.kl.beta or a lower tune.lr)"
                           if last else "; no checkpoint was written yet (a smaller tune.checkpoint_every gives tune.kl.on_max: rollback one)") + ".")

    def rollback(self) -> bool:
        """Reload the last checkpoint (weights, optimizer, step, random state, β) and double β,
        so the repeated iterations take a more cautious path. False when none is left to take."""
        if self.rollbacks >= self.cfg.kl.max_rollbacks:
            return False
        if distributed.broadcast_object(self.loop.run.latest_checkpoint(self.loop.stage)) is None:
            return False  # nothing to go back to (and resume() would start the stage's metrics over)
        done = self.rollbacks
        if not self.resume():
            return False
        # resume() restored the checkpoint's β and rollback count: double β once per rollback since
        self.ctl.value *= 2.0 ** (done + 1 - self.rollbacks)
        self.rollbacks = done + 1
        self.kl_window.clear()
        return True

    def resume(self) -> bool:
        if not self.loop.resume():
            return False
        self.ctl.load_state_dict(self.loop.extra_state["kl_ctl"])
        if "prompts" in self.loop.extra_state:  # absent in checkpoints written before prompt sampling existed
            self.sampler.load_state_dict(self.loop.extra_state["prompts"])
        if "algo" in self.loop.extra_state:
            self.algo.load_state_dict(self.loop.extra_state["algo"])
        self.rollbacks = int(self.loop.extra_state.get("kl_rollbacks", 0))
        self.kl_window = list(self.loop.extra_state.get("kl_window", []))  # the guard's window goes on where it was
        if self.average is not None:
            if "average" not in self.loop.extra_state:
                raise UserError(f"{self.loop.run.latest_checkpoint(self.loop.stage)}: written without tune.average_from; "
                                "resume with the config that wrote it")
            self.average.load_state_dict(self.loop.extra_state["average"])
            self.loop.extra_state["average"] = self.average.state_dict
        return True

    def update_average(self, step: int) -> None:
        """After iteration ``step`` (0-based): fold the weights into the mean once ``step`` ≥
        ``tune.average_from``."""
        if self.average is not None and step >= self.cfg.average_from:
            self.average.update_parameters(self.loop.unwrapped)

    def use_average(self) -> None:
        """Make the mean the model's weights (after the last checkpoint, which keeps the iterate)."""
        if self.average is not None:
            with torch.no_grad():
                for p, a in zip(self.loop.unwrapped.parameters(), self.average.module.parameters()):
                    p.copy_(a)

    def completions(self, prompts: Sequence[Any], ro: Rollout) -> Completions:
        return Completions(prompts, ro.tokens, ro.mask, ro.lengths, self.task.eos_id, self.task.tokenizer)

    def score(self, prompts: Sequence[Any], ro: Rollout) -> torch.Tensor:
        """The reward of a rollout as per-step rewards [B, T]."""
        comps = self.completions(prompts, ro)
        return as_rewards(self.reward(comps)).per_step(comps)

    def iteration(self, step: int) -> dict[str, float] | None:
        """One rollout → score → update → adapt-β step; its metrics, or None when the KL guard
        rolled the run back to its last checkpoint."""
        cfg, task, algo = self.cfg, self.task, self.algo
        group = cfg.group
        lr = scheduled_lr(cfg.lr, cfg.lr_schedule, step, cfg.steps)
        for g in self.loop.optimizer.param_groups:
            g["lr"] = lr
        rng = np.random.default_rng([self.seed, step])
        index = [int(i) for i in self.sampler.draw(rng, cfg.batch_size // group) for _ in range(group)]
        batch = [self.prompts[i] for i in index]
        picked = batch[self.start : self.end]  # this process's rows of the global batch
        base_seed = int(rng.integers(2**62))
        self.gen.manual_seed(base_seed)
        rows = distributed.row_seeds(base_seed, step, range(self.start, self.end)) if self.per_sequence else None
        sampling = Sampling(self.prior, task.tokenizer.pad_token_id, self.allowed, task.eos_id, cfg.temperature, self.gen,
                            max(p.n_new for p in batch), rows, cfg.kl.prior_temperature)
        with distributed.generation(self.loop.model):
            ro = algo.rollout(sampling, picked)  # [B, T]
        comps = self.completions(picked, ro)
        rewards = as_rewards(self.reward(comps))
        task_reward = rewards.per_step(comps)  # [B, T]
        self.loop.check_finite("reward/task", float(task_reward.sum()))  # a NaN/Inf reward stops the run here
        self.sampler.update(torch.tensor(index[self.start : self.end]), task_reward.sum(-1).cpu())
        # [B, T, V], for algorithms that ask; a task builds it on the CPU, the update runs where the policy is
        action_rewards = lambda: self.reward.action_rewards(comps).to(task_reward.device)  # noqa: E731
        with self.loop.autocast():  # mixed_precision: the training forwards (backward stays float32)
            metrics = algo.update(self.loop, Step(ro, task_reward, self.ctl.value, comps, sampling, self.score, action_rewards))
        metrics.update({f"reward/{k}": v for k, v in rewards.diagnostics.items()})
        metrics["kl/coef"] = self.ctl.value
        metrics["lr"] = lr
        if "kl/mean" in metrics and self.guard_kl(metrics["kl/mean"]):  # every built-in algorithm reports kl/mean (rl_metrics)
            return None
        if self.cfg.kl.on_max == "rollback":
            metrics["kl/rollbacks"] = float(self.rollbacks)
        self.ctl.update(metrics["kl/seq"], cfg.batch_size)  # kl/seq is the global batch's mean (rl_metrics)
        self.loop.extra_state["kl_ctl"] = self.ctl.state_dict()
        self.loop.extra_state["kl_rollbacks"] = self.rollbacks
        self.loop.extra_state["kl_window"] = list(self.kl_window)
        # callables: evaluated (on every rank) only when a checkpoint is written
        self.loop.extra_state["prompts"] = self.sampler.state_dict
        self.loop.extra_state["algo"] = algo.state_dict
        return metrics


def scheduled_lr(peak: float, schedule: Literal["constant", "cosine"], step: int, total: int) -> float:
    """The learning rate of iteration ``step`` of ``total``: ``peak``, or with ``cosine``
    peak·½(1 + cos(π·step/total)) (Loshchilov & Hutter 2017, "SGDR", eq. 5 with one cycle and
    η_min = 0). A function of the iteration alone, so a resumed run goes on where it was."""
    return peak if schedule == "constant" else peak * 0.5 * (1.0 + math.cos(math.pi * step / total))


def tune(run: Run, cfg: TuneConfig, task: Task, prior_dir: Path, *, seed: int, resume: bool = False, progress: bool = True, name: str | None = None,
         reward: RewardFn | None = None, lora: LoraSettings | None = None) -> Path:
    """Fine-tune a copy of the prior on the task's reward (or ``reward``); returns
    ``run/models/<name>`` (``name`` defaults to the algorithm; metrics go to stage ``tune-<name>``).
    ``lora`` (``model.lora``): train adapters only; the folder then holds the merged weights and
    the adapters alone in ``adapter/``."""
    tuner = Tuner(run, cfg, task, prior_dir, seed=seed, progress=progress, name=name, reward=reward, lora=lora)
    if resume:
        tuner.resume()
    for step in tuner.loop.steps():
        metrics = tuner.iteration(step)
        if metrics is None:  # rolled back to the last checkpoint: its step comes again
            continue
        tuner.update_average(step)
        tuner.loop.advance()
        tuner.loop.log(metrics)
    final = run.final_model_dir(name or cfg.algorithm)
    tuner.loop.finish(final, before_final=tuner.use_average)
    if tuner.loop.accelerator.is_main_process:
        task.save(final)
    tuner.loop.accelerator.wait_for_everyone()
    return final
