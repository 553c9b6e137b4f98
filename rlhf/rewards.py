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
    followed by v.

    ``shaped``: the same return paid step by step as potential-based shaping (Ng, Harada &
    Russell 1999): Φ_i(t) = −(share of the others whose first t tokens are y_i's) for 0 < t < T_i,
    Φ_i(0) = 0, Φ_i(T_i) = r_i, and r_i,t = Φ_i(t+1) − Φ_i(t), which sums to r_i. A step is
    charged where it follows the other samples and credited where it leaves them, so a learner
    of per-state targets (``tilt``) meets the novelty at every step, not only at the last one."""

    def __init__(self, shaped: bool = False):
        self.shaped = shaped

    def __call__(self, completions: Completions) -> Rewards:
        c = completions
        same, shared, L, n = _pairs(c)
        final = _novelty(same, shared, L, n)  # [B] float64
        if not self.shaped:
            return Rewards(final.float())
        T = c.tokens.shape[1]
        t = torch.arange(T + 1)
        phi = _potential(same, shared, n, t)  # [B, T + 1]: Φ(t) for 0 < t < T_b
        phi[:, 0] = 0.0
        phi[torch.arange(len(L)), L] = final  # Φ(T_b): the novelty itself
        steps = (phi[:, 1:] - phi[:, :-1]).float() * (t[:-1][None, :] < L[:, None])  # [B, T]
        return Rewards(steps.to(c.mask.device))

    def action_rewards(self, completions: Completions) -> torch.Tensor:
        c = completions
        B, T = c.tokens.shape
        out = torch.zeros((B, T, len(c.tokenizer)), dtype=torch.float32)  # [B, T, V]
        same, shared, L, n = _pairs(c)
        tok = c.tokens.cpu()
        t = torch.arange(T)
        if not self.shaped:
            # at row b's last step, action v costs the share of the others of b's length that equal b's prefix then v
            last = L - 1  # [B]
            follows = same & (L[None, :] == L[:, None]) & (shared >= last[:, None])  # [B, B]
            b, j = follows.nonzero(as_tuple=True)
            out.index_put_((b, last[b], tok[j, last[b]]), torch.ones(len(b)), accumulate=True)
            out[torch.arange(B), last] /= -n[:, None].float()
            return out
        # other j follows row b's prefix up to step t (t ≤ shared): action y_j[t] would keep following it;
        # at b's last step only an other that ends there too (a longer one is not equalled by ending)
        last = torch.minimum(torch.minimum(shared, L[None, :] - 1), (L - 1)[:, None] - (L[None, :] != L[:, None]).long())  # [B, B]
        follows = same[:, :, None] & (t[None, None, :] <= last[:, :, None])  # [B, B, T]
        b, j, s = follows.nonzero(as_tuple=True)
        # every addend of row b is the same −1/n_b, so the order of accumulation does not change the sum
        out.index_put_((b, s, tok[j, s]), (-1.0 / n.double())[b].float(), accumulate=True)
        phi = _potential(same, shared, n, t)  # [B, T]: Φ_b(t) before each step
        phi[:, 0] = 0.0
        out -= (phi.float() * (t[None, :] < L[:, None]))[:, :, None]
        return out


def _pairs(c: Completions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``same`` [B, B] bool: rows of one prompt (not the row itself); ``shared`` [B, B] int64: how many
    leading tokens two rows share (at most the shorter length); ``L`` [B] lengths; ``n`` [B] int64 the
    number of other rows of each row's prompt (at least 1, so a lone row divides by 1)."""
    keys: dict[tuple[int, ...], int] = {}
    group = torch.tensor([keys.setdefault(tuple(ids), len(keys)) for ids in c.prompt_ids])
    same = group[:, None] == group[None, :]
    same.fill_diagonal_(False)
    tok, L = c.tokens.cpu(), torch.tensor(c.lengths, dtype=torch.int64)
    upto = torch.minimum(L[:, None], L[None, :])  # [B, B]
    eq = (tok[:, None, :] == tok[None, :, :]) & (torch.arange(tok.shape[1]) < upto[:, :, None])  # [B, B, T]
    shared = eq.long().cumprod(-1).sum(-1)
    return same, shared, L, same.sum(1).clamp(min=1)


def _novelty(same: torch.Tensor, shared: torch.Tensor, L: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """[B] float64: −(share of the others that are the same completion): same length, all of it shared."""
    equal = same & (L[None, :] == L[:, None]) & (shared == L[:, None])
    return -equal.sum(1).double() / n.double()


def _potential(same: torch.Tensor, shared: torch.Tensor, n: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """[B, len(t)] float64: −(share of the others whose first t tokens are the row's), for each t."""
    count = (same[:, :, None] & (shared[:, :, None] >= t[None, None, :])).sum(1)
    return -count.double() / n.double()[:, None]
