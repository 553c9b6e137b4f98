"""The RL reward as a weighted sum of terms (``rewards:`` of a run config).

    rewards:
      - fn: task                        # the task's own reward (the counterpoint rules, BLEU, ...), or reward.model's
      - fn: novelty                     # built in: each sample's novelty among its prompt's samples
      - fn: my_rules:no_repeated_notes  # a callable of yours: Completions -> Rewards / tensor / list
        weight: 0.5
      - fn: chrf                        # a registered reward (an rlhf.rewards entry point) ...
        args: {column: reference}       # ... or a factory, called once with these arguments

Each term's values become per-step rewards ([B, T], ``Rewards.per_step``) before the sum
r_t = Σ_i w_i · r_i,t, so sequence and per-step terms mix. The sum knows every action's reward
(``action_rewards``, for ``rloo.credit: all_actions``) only when every term does.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from pydantic import Field

from rlhf.config import Section
from rlhf.errors import UserError
from rlhf.interfaces import ActionRewards, Completions, RewardFn, Rewards, Task, as_rewards
from rlhf.registry import REWARDS


class RewardTerm(Section):
    fn: str = Field(..., description="task (the task's own reward), a registered reward (rlhf.rewards entry point), or an import path 'package.module:callable'.")
    weight: float = Field(1.0, description="Weight w_i of the term in r = Σ w_i r_i.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments: the named object is a factory, called once with them (a class is always called).")


def resolve_reward(term: RewardTerm, task: Task, base: RewardFn | None = None) -> RewardFn:
    """The reward function a term names; the term ``task`` is ``base`` when given (a trained
    reward model standing in for the task's reward), else the task's own reward."""
    if term.fn == "task":
        if term.args:
            raise UserError("rewards: the term 'task' takes no args; set the task's reward in task: instead")
        return base if base is not None else task_reward(task)
    obj = REWARDS.get(term.fn)
    if inspect.isclass(obj) or term.args:
        try:
            obj = obj(**term.args)
        except TypeError as e:
            raise UserError(f"rewards: {term.fn} with args {term.args}: {e}") from None
    if not callable(obj):
        raise UserError(f"rewards: {term.fn} is a {type(obj).__name__}, not a callable Completions -> Rewards")
    return obj


def task_reward(task: Task) -> RewardFn:
    """The task's own reward, with its per-action rewards where the task has them."""
    return _TaskReward(task) if isinstance(task, ActionRewards) else task.reward


class _TaskReward:
    """The task's reward with its per-action rewards (a bound method hides them)."""

    def __init__(self, task: Any):
        self.task = task

    def __call__(self, completions: Completions) -> Rewards:
        return self.task.reward(completions)

    def action_rewards(self, completions: Completions) -> torch.Tensor:
        return self.task.action_rewards(completions)


def _label(term: RewardTerm) -> str:
    return term.fn.rpartition(":")[2].rpartition(".")[2]


class WeightedSum:
    """r_t = Σ_i w_i · r_i,t over the terms, per step; diagnostics: each term's mean return."""

    def __init__(self, terms: list[tuple[str, float, RewardFn]]):
        self.terms = terms

    def __call__(self, completions: Completions) -> Rewards:
        total = torch.zeros(completions.mask.shape, dtype=torch.float32, device=completions.mask.device)
        diagnostics: dict[str, float] = {}
        for label, w, fn in self.terms:
            r = as_rewards(fn(completions), f"reward {label}")
            steps = r.per_step(completions)  # [B, T]
            total = total + w * steps
            diagnostics[label] = float(steps.sum(-1).mean())
            diagnostics.update({f"{label}/{k}": v for k, v in r.diagnostics.items()})
        return Rewards(total, diagnostics)


class WeightedActionSum(WeightedSum):
    """A weighted sum whose terms all know every action's reward."""

    def action_rewards(self, completions: Completions) -> torch.Tensor:
        return sum(w * fn.action_rewards(completions) for _, w, fn in self.terms)  # type: ignore[attr-defined]


def compose_rewards(terms: list[RewardTerm], task: Task, base: RewardFn | None = None) -> RewardFn:
    """The weighted sum of ``terms`` as one reward function (the term ``task`` is ``base`` when
    given: :func:`resolve_reward`)."""
    fns = [(_label(t), t.weight, resolve_reward(t, task, base)) for t in terms]
    labels = [lab for lab, _, _ in fns]
    if len(set(labels)) != len(labels):
        raise UserError(f"rewards: two terms share the name {sorted(lab for lab in labels if labels.count(lab) > 1)[0]!r}; each term is logged as reward/<name>")
    cls = WeightedActionSum if all(isinstance(fn, ActionRewards) for _, _, fn in fns) else WeightedSum
    return cls(fns)


class GroupNovelty:
    """A sample's novelty among the other samples of its prompt in the same batch:

        r_i = −|{j ≠ i : prompt_j = prompt_i, y_j = y_i}| / |{j ≠ i : prompt_j = prompt_i}|

    (0 when no other sample of the prompt is the same completion, −1 when all are), given at
    the last token. With k samples per prompt (RLOO, MRT) it penalises a policy that collapses
    onto one answer per prompt, which the KL term alone does not prevent once the task reward
    is flat among good answers. Its per-action reward (``rloo.credit: all_actions``) is exact:
    at a row's last step, action v costs the share of the others that equal the row's prefix
    followed by v."""

    def _groups(self, c: Completions) -> list[list[int]]:
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for b, ids in enumerate(c.prompt_ids):
            by_prompt.setdefault(tuple(ids), []).append(b)
        return [by_prompt[tuple(ids)] for ids in c.prompt_ids]  # [B] the rows of each row's prompt

    def __call__(self, completions: Completions) -> Rewards:
        seqs = [tuple(completions.tokens[b, : n].tolist()) for b, n in enumerate(completions.lengths)]
        values = []
        for b, group in enumerate(self._groups(completions)):
            others = [j for j in group if j != b]
            values.append(-sum(seqs[j] == seqs[b] for j in others) / len(others) if others else 0.0)
        return Rewards(torch.tensor(values, dtype=torch.float32))

    def action_rewards(self, completions: Completions) -> torch.Tensor:
        c = completions
        vocab = len(c.tokenizer)
        out = torch.zeros((*c.tokens.shape, vocab), dtype=torch.float32)  # [B, T, V]
        seqs = [c.tokens[b, : n].tolist() for b, n in enumerate(c.lengths)]
        for b, group in enumerate(self._groups(c)):
            others = [j for j in group if j != b]
            t = c.lengths[b] - 1  # the last step, where the reward is given
            for j in others:
                if c.lengths[j] == c.lengths[b] and seqs[j][:t] == seqs[b][:t]:
                    out[b, t, seqs[j][t]] += 1.0  # count of others that end like this
            out[b, t] /= -max(len(others), 1)
        return out
