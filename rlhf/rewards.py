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

import numpy as np
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
    followed by v.

    ``shaped``: the same return paid step by step as potential-based shaping (Ng, Harada &
    Russell 1999): Φ_i(t) = −(share of the others whose first t tokens are y_i's) for 0 < t < T_i,
    Φ_i(0) = 0, Φ_i(T_i) = r_i, and r_i,t = Φ_i(t+1) − Φ_i(t), which sums to r_i. A step is
    charged where it follows the other samples and credited where it leaves them, so a learner
    of per-state targets (``tilt``) meets the novelty at every step, not only at the last one."""

    def __init__(self, shaped: bool = False):
        self.shaped = shaped

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
        if not self.shaped:
            return Rewards(torch.tensor(values, dtype=torch.float32))
        out = torch.zeros(completions.tokens.shape, dtype=torch.float32)  # [B, T]
        for b, (others, shared) in enumerate(self._shared_prefixes(completions)):
            phi = self._potential(shared, completions.lengths[b], values[b], max(len(others), 1))
            out[b, : len(phi) - 1] = torch.from_numpy(np.diff(phi)).float()
        return Rewards(out.to(completions.mask.device))

    def action_rewards(self, completions: Completions) -> torch.Tensor:
        c = completions
        vocab = len(c.tokenizer)
        out = torch.zeros((*c.tokens.shape, vocab), dtype=torch.float32)  # [B, T, V]
        seqs = [c.tokens[b, : n].tolist() for b, n in enumerate(c.lengths)]
        if not self.shaped:
            for b, group in enumerate(self._groups(c)):
                others = [j for j in group if j != b]
                t = c.lengths[b] - 1  # the last step, where the reward is given
                for j in others:
                    if c.lengths[j] == c.lengths[b] and seqs[j][:t] == seqs[b][:t]:
                        out[b, t, seqs[j][t]] += 1.0  # count of others that end like this
                out[b, t] /= -max(len(others), 1)
            return out
        for b, (others, shared) in enumerate(self._shared_prefixes(c)):
            n, T = max(len(others), 1), c.lengths[b]
            for j, s in zip(others, shared):
                # other j follows row b's prefix up to step t (s ≥ t): action y_j[t] would keep following it
                last = min(s, c.lengths[j] - 1, T - 1) if c.lengths[j] == T else min(s, c.lengths[j] - 1, T - 2)
                for t in range(last + 1):
                    out[b, t, seqs[j][t]] -= 1.0 / n
            phi = self._potential(shared, T, 0.0, n)  # Φ_b(t) before each step (the last entry is unused)
            out[b, :T] -= torch.from_numpy(phi[:T]).float()[:, None]
        return out

    def _shared_prefixes(self, c: Completions) -> list[tuple[list[int], np.ndarray]]:
        """Per row: the other rows of its prompt, and how many leading tokens each shares with it."""
        tok = c.tokens.cpu().numpy()
        out = []
        for b, group in enumerate(self._groups(c)):
            others = [j for j in group if j != b]
            shared = []
            for j in others:
                m = min(c.lengths[b], c.lengths[j])
                diff = np.nonzero(tok[b, :m] != tok[j, :m])[0]
                shared.append(int(diff[0]) if len(diff) else m)
            out.append((others, np.array(shared, dtype=np.int64)))
        return out

    @staticmethod
    def _potential(shared: np.ndarray, length: int, final: float, n: int) -> np.ndarray:
        """[T + 1] Φ(0..T): 0, −(share of the others sharing the first t tokens) for 0 < t < T, ``final`` at T."""
        t = np.arange(length + 1)
        phi = -(shared[None, :] >= t[:, None]).sum(1) / n
        phi[0], phi[length] = 0.0, final
        return phi
