"""Which training prompts an RL iteration samples: uniformly, or more often where the policy
still does worst (rank-based prioritisation, Schaul et al. 2016, "Prioritized experience
replay", sec. 3.3, applied to prompts instead of transitions)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from rlhf import distributed

PromptSampling = Literal["uniform", "prioritized"]


def rank_priorities(returns: np.ndarray, alpha: float, uniform_share: float) -> np.ndarray:
    """Sampling probabilities [P] of P prompts from their running mean returns [P]:

        P(i) = (1 − ε) · rank_i^(−α) / Σ_j rank_j^(−α) + ε / P

    with rank 1 the lowest return (ties broken by index; NaN, a prompt never seen, ranks
    first) and ε = ``uniform_share``, which keeps every prompt's probability at least ε/P.
    Rank-based rather than proportional to the return: scale-free, so it works for rule
    penalties and BLEU alike, and robust to outliers (Schaul et al. 2016, sec. 3.3)."""
    p = len(returns)
    order = np.argsort(np.where(np.isnan(returns), -np.inf, returns), kind="stable")  # worst first
    rank = np.empty(p, dtype=np.float64)
    rank[order] = np.arange(1, p + 1)
    w = rank ** (-alpha)
    return (1.0 - uniform_share) * w / w.sum() + uniform_share / p


class PromptSampler:
    """Draws each iteration's prompt indices and, when prioritized, keeps every prompt's
    exponential moving average of the task return (its state, saved with checkpoints)."""

    def __init__(self, n_prompts: int, mode: PromptSampling, alpha: float, uniform_share: float, ema: float):
        self.n, self.mode, self.alpha, self.uniform_share, self.ema = n_prompts, mode, alpha, uniform_share, ema
        self.returns = np.full(n_prompts, np.nan)  # [P] running mean task return; NaN = not seen yet

    def probs(self) -> np.ndarray:
        if self.mode == "uniform":
            return np.full(self.n, 1.0 / self.n)
        return rank_priorities(self.returns, self.alpha, self.uniform_share)

    def draw(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """[count] prompt indices, i.i.d. from :meth:`probs`."""
        if self.mode == "uniform":
            return rng.integers(0, self.n, count)  # the historical stream: uniform runs stay bit-identical
        return rng.choice(self.n, size=count, p=self.probs())

    def update(self, index: torch.Tensor, returns: torch.Tensor) -> None:
        """Fold one batch into the running means: ``index`` [B] prompt indices, ``returns`` [B]
        task return of each row. Per prompt, the batch's mean return r moves the average by
        R ← R + ema·(r − R) (the first visit sets R = r). Under a launcher each rank passes its
        own rows; the sums are all-reduced, so every rank keeps the same state."""
        if self.mode == "uniform":
            return
        sums = torch.zeros(self.n, dtype=torch.float64).index_add_(0, index, returns.double())
        counts = torch.zeros(self.n, dtype=torch.float64).index_add_(0, index, torch.ones_like(returns, dtype=torch.float64))
        if distributed.world_size() > 1:
            sums, counts = distributed.all_sum(torch.stack([sums, counts])).unbind(0)
        seen = counts.numpy() > 0
        mean = sums.numpy()[seen] / counts.numpy()[seen]
        old = self.returns[seen]
        self.returns[seen] = np.where(np.isnan(old), mean, old + self.ema * (mean - old))

    def state_dict(self) -> dict:
        return {"returns": self.returns.tolist()}

    def load_state_dict(self, state: dict) -> None:
        returns = np.asarray(state["returns"], dtype=np.float64)
        if returns.shape != (self.n,):
            raise ValueError(f"the checkpoint's prompt sampler has {returns.shape[0]} prompts, this task {self.n}: resume with the same task config")
        self.returns = returns
