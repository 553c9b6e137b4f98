"""The interfaces of the core, each documented once, here.

* :class:`Task` — what the tuner needs from a task: prompts, the action space, the tokenizer and
  the reward. :class:`PipelineTask` adds what ``rlhf run`` needs (corpus, evaluation, report)
  and :class:`TaskFactory` is what a registry entry (or ``task.name: pkg.module:Class``) names.
* :class:`RewardFn` — a reward: one :class:`Completions` batch in, :class:`Rewards` out.
  :class:`ActionRewards` is the optional extra of a reward that knows what every action would
  have earned (for ``rloo.credit: all_actions``).
* :class:`Algorithm` — an RL algorithm as the tuner drives it: ``rollout`` → ``update``.

A sequence reward ([B]) becomes per-step rewards ([B, T], on the last token) in one place:
:meth:`Rewards.per_step`. The interfaces admit encoder–decoder policies: a prompt's ``ids`` is
what the policy is conditioned on (a decoder-only model's prefix, or an encoder's source), and
the completion is always the generated ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from rlhf.kl import terminal_to_steps


@runtime_checkable
class Prompt(Protocol):
    """One prompt of a task (tasks add their own fields: a name, a reference, a cantus…)."""

    ids: list[int]  # what the policy is conditioned on
    n_new: int  # the completion's token budget (an EOS included, where the task has one)


@dataclass
class Completions:
    """One batch of sampled completions as a reward sees it: B rows, T steps."""

    prompts: Sequence[Any]  # [B] the task's prompt objects (each a Prompt)
    tokens: torch.Tensor  # [B, T] completion ids, padded after each row's end
    mask: torch.Tensor  # [B, T] float: 1 on a row's first lengths[b] tokens (its EOS included)
    lengths: list[int]  # [B]
    eos_id: int | None = None
    tokenizer: Any = None  # decodes ``texts``; None where the task has no text

    def ids(self, b: int) -> list[int]:
        """Row b's completion ids, without its EOS."""
        row = self.tokens[b, : self.lengths[b]].tolist()
        return row[:-1] if row and self.eos_id is not None and row[-1] == self.eos_id else row

    @property
    def prompt_ids(self) -> list[list[int]]:
        return [list(p.ids) for p in self.prompts]

    @cached_property
    def texts(self) -> list[str]:
        """Each completion decoded (special tokens skipped); needs a tokenizer."""
        if self.tokenizer is None:
            raise ValueError("these completions have no tokenizer to decode them with")
        return [self.tokenizer.decode(self.ids(b), skip_special_tokens=True) for b in range(len(self.lengths))]

    def __len__(self) -> int:
        return len(self.lengths)


@dataclass
class Rewards:
    """What a reward returns: ``values`` [B] (one per sequence) or [B, T] (one per step), and
    diagnostics to log (names without a namespace; the tuner logs them as ``reward/<name>``)."""

    values: torch.Tensor
    diagnostics: dict[str, float] = field(default_factory=dict)

    def per_step(self, completions: Completions) -> torch.Tensor:
        """[B, T] float: per-step values as they are, a sequence reward on each row's last token."""
        v = torch.as_tensor(self.values, dtype=torch.float32, device=completions.mask.device)
        if v.dim() == 1:
            return terminal_to_steps(v, completions.mask)
        if v.shape != completions.mask.shape:
            raise ValueError(f"a per-step reward must be [B, T] = {tuple(completions.mask.shape)}, got {tuple(v.shape)}")
        return v * completions.mask


class RewardFn(Protocol):
    """A reward: ``reward(completions) -> Rewards`` (a plain tensor, [B] or [B, T], is accepted
    and wrapped by :func:`as_rewards`)."""

    def __call__(self, completions: Completions) -> Rewards: ...


@runtime_checkable
class ActionRewards(Protocol):
    """A reward that also knows, for every step, what each action would have earned there."""

    def action_rewards(self, completions: Completions) -> torch.Tensor:
        """[B, T, V]: the reward of action v at step t of row b, after the row's own first t
        actions; at the sampled actions it equals the per-step reward."""
        ...


def as_rewards(out: Rewards | torch.Tensor | Sequence[float], what: str = "reward") -> Rewards:
    """A reward function's return value as :class:`Rewards` (clear error for anything else)."""
    if isinstance(out, Rewards):
        return out
    try:
        return Rewards(torch.as_tensor(out, dtype=torch.float32))
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{what} returned {type(out).__name__}; return Rewards, a tensor [B] or [B, T], or a list of floats ({e})") from None


@runtime_checkable
class Task(Protocol):
    """What the tuner needs from a task."""

    tokenizer: Any  # a Hugging Face tokenizer: pad_token_id, save_pretrained
    allowed: torch.Tensor | None  # [V] bool: the actions the policy may take; None = every token
    eos_id: int | None  # ends a completion early; None = every completion has n_new tokens

    def train_prompts(self) -> Sequence[Prompt]: ...

    def reward(self, completions: Completions) -> Rewards: ...

    def save(self, path: Path) -> None:
        """Write what a model of this task needs beside it (tokenizer, codec) into ``path``."""
        ...


@runtime_checkable
class PipelineTask(Task, Protocol):
    """What ``rlhf run`` needs from a task in addition: data for the prior, evaluation, report."""

    def corpus(self, seed: int, *, progress: bool, run_dir: Path) -> tuple[list, list]:
        """(train, val) items of the MLE corpus; may write (e.g. a tokenizer) into ``run_dir``."""
        ...

    def examples(self, items: Sequence[Any]) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, completion ids) pairs for MLE."""
        ...

    def data_stats(self, train: Sequence[Any], val: Sequence[Any]) -> dict[str, Any]: ...

    def evaluate(self, models: dict[str, Any], prior: Any, *, seed: int, val: Sequence[Any] | None) -> dict[str, Any]:
        """Evaluation of each model (name -> causal LM) against the prior; JSON-serialisable."""
        ...

    def report(self, run_dir: Path, evaluation: dict[str, Any], stats: dict[str, Any]) -> Path:
        """Write report.md (+ plots, exported samples) into ``run_dir``; returns the report."""
        ...


class TaskFactory(Protocol):
    """What ``task.name`` names: a class with a typed ``Config`` and ``build``."""

    Config: type  # a rlhf.config.TaskConfig subclass: the task: section

    @classmethod
    def build(cls, cfg: Any, model_dir: Path | None = None) -> PipelineTask:
        """The task for ``cfg``; with ``model_dir``, reading the tokenizer saved beside that model
        (so token ids match the model's)."""
        ...


@dataclass
class Step:
    """What an algorithm's update receives: the rollout, its per-step task reward and the
    current β, plus the batch's completions and hooks for algorithms that need more."""

    rollout: Any  # rlhf.algorithms.common.Rollout
    task_reward: torch.Tensor  # [B, T]
    beta: float
    completions: Completions
    sampling: Any  # rlhf.tune.Sampling: draws more rollouts (e.g. a greedy baseline)
    score: Callable[[Sequence[Any], Any], torch.Tensor]  # (prompts, rollout) -> its task reward [B, T]
    action_rewards: Callable[[], torch.Tensor]  # () -> [B, T, V] (the reward's ActionRewards)


@runtime_checkable
class Algorithm(Protocol):
    """An RL algorithm as ``rlhf.tune.Tuner`` drives it, one iteration:
    ``rollout(sampling, prompts)`` → the tuner scores it → ``update(loop, step)`` → log."""

    policy: Any  # the causal LM that samples (the tuned model; PPO's without its value head)
    group: int  # samples per prompt in one iteration (RLOO's and MRT's k; 1 otherwise)
    needs_action_rewards: bool  # update calls step.action_rewards(): the reward must be ActionRewards

    def rollout(self, sampling: Any, prompts: Sequence[Any]) -> Any:
        """Sample completions of ``prompts`` (rlhf.tune.Sampling: sample / beam)."""
        ...

    def update(self, loop: Any, step: Step) -> dict[str, float]:
        """One update from the scored rollout; returns its metrics."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
