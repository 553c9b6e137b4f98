"""Active queries for a new rater: ask for the labels that say most about their latent z.

A VPL model infers a rater's z from labelled pairs, q(z | C). The next pair to ask about is the
one whose label is most informative about z (BALD: Houlsby, Huszár, Ghahramani, Lengyel 2011,
"Bayesian active learning for classification and preference learning"; the active-query
experiment of Poddar et al. 2024, "Personalizing RLHF with variational preference learning"):

    EIG(a, b | C) = I(y; z | C) = H[ E_q p(y | z) ] − E_q H[ p(y | z) ],
    p(y = a ≻ b | z) = σ(r(a, z) − r(b, z)),   z ~ q(z | C),

estimated with S samples of z (or, with ``inference: bank``, over the bank of latents weighed
by their posterior, ``bank_posterior``). A pair that every plausible rater would label alike (an agreed
pair) has EIG ≈ 0 however uncertain its label; a pair that raters of different z label
differently (a disputed pair) has EIG up to log 2. Queries are chosen greedily: after each
answer, C grows and q(z | C) is inferred again.
"""

from __future__ import annotations

from typing import Sequence

import torch

from reward_models.backbone import PairTensors
from reward_models.vpl import VPLRewardModel


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) = −p log p − (1 − p) log(1 − p) in nats, elementwise (0 at p ∈ {0, 1})."""
    return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p))


def expected_information_gain(p: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """[S, Q] → [Q]: I(y_q; z) = H(Σ_s w_s p_sq) − Σ_s w_s H(p_sq), with p_sq = p(y_q = 1 | z_s) for
    S samples z_s of the posterior with weights w_s (default 1/S: samples z_s ~ q(z | C), BALD's
    Monte-Carlo estimate; in nats, within [0, log 2])."""
    if w is None:
        return binary_entropy(p.mean(0)) - binary_entropy(p).mean(0)
    return binary_entropy(w @ p) - w @ binary_entropy(p)


@torch.no_grad()
def information_gains(model: VPLRewardModel, h_a: torch.Tensor, h_b: torch.Tensor, z: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """[Q] EIG of the candidate pairs (a_q, b_q), pooled states [Q, H] each, under the posterior
    given as latents z [S, D] with weights w [S] (None: equal; :meth:`VPLRewardModel.posterior_samples`)."""
    shape = (len(z), *h_a.shape)
    zs = z[:, None]  # [S, 1, D]
    p = torch.sigmoid(model.reward(h_a.expand(shape), zs) - model.reward(h_b.expand(shape), zs))  # [S, Q]
    return expected_information_gain(p, w)


@torch.no_grad()
def next_query(model: VPLRewardModel, h_a: torch.Tensor, h_b: torch.Tensor, answered: Sequence[tuple[int, bool]], left: Sequence[int],
               samples: int, generator: torch.Generator | None = None) -> int:
    """The row of ``left`` to ask next: the largest EIG under q(z | the ``answered`` pairs).
    ``h_a``, ``h_b`` [N, H]: pooled states of every candidate pair's two sides; ``answered``:
    (row, the rater prefers side a), each entering the context oriented by the answer."""
    won = torch.stack([h_a[i] if a else h_b[i] for i, a in answered]) if answered else h_a[:0]
    lost = torch.stack([h_b[i] if a else h_a[i] for i, a in answered]) if answered else h_b[:0]
    z, w = model.posterior_samples(won, lost, samples, generator)
    idx = torch.as_tensor(list(left), device=h_a.device)
    return int(left[int(information_gains(model, h_a[idx], h_b[idx], z, w).argmax())])


@torch.no_grad()
def active_order(model: VPLRewardModel, pairs: PairTensors, pool: Sequence[int], n: int, *, samples: int = 64,
                 generator: torch.Generator | None = None) -> list[int]:
    """The first ``n`` pairs of ``pool`` (indices into ``pairs``, labelled: the rater prefers
    ``chosen``) in the order of greedy EIG: each step infers q(z | C) from the pairs asked so
    far and asks the pool pair with the largest EIG."""
    model.eval()
    pool = [int(i) for i in pool]
    hc, hr = model.embed_pairs(pairs, pool)  # [P, H] each
    left = list(range(len(pool)))
    asked: list[int] = []
    for _ in range(min(n, len(pool))):
        j = next_query(model, hc, hr, [(i, True) for i in asked], left, samples, generator)
        left.remove(j)
        asked.append(j)
    return [pool[j] for j in asked]
