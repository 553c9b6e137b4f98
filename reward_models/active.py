"""Active queries for a new rater: ask for the labels that say most about their latent z.

A VPL model infers a rater's z from labelled pairs, q(z | C). The next pair to ask about is the
one whose label is most informative about z (BALD: Houlsby, Huszár, Ghahramani, Lengyel 2011,
"Bayesian active learning for classification and preference learning"; the active-query
experiment of Poddar et al. 2024, "Personalizing RLHF with variational preference learning"):

    EIG(a, b | C) = I(y; z | C) = H[ E_q p(y | z) ] − E_q H[ p(y | z) ],
    p(y = a ≻ b | z) = σ(r(a, z) − r(b, z)),   z ~ q(z | C),

estimated with S samples of z. A pair that every plausible rater would label alike (an agreed
pair) has EIG ≈ 0 however uncertain its label; a pair that raters of different z label
differently (a disputed pair) has EIG up to log 2. Queries are chosen greedily: after each
answer, C grows and q(z | C) is inferred again.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from reward_models.backbone import PairTensors
from reward_models.vpl import VPLRewardModel, reparameterize


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) = −p log p − (1 − p) log(1 − p) in nats, elementwise (0 at p ∈ {0, 1})."""
    return -(torch.xlogy(p, p) + torch.xlogy(1 - p, 1 - p))


def expected_information_gain(p: torch.Tensor) -> torch.Tensor:
    """[S, Q] → [Q]: I(y_q; z) = H(mean_s p_sq) − mean_s H(p_sq), with p_sq = p(y_q = 1 | z_s) for
    S samples z_s ~ q(z | C) (BALD's Monte-Carlo estimate; in nats, within [0, log 2])."""
    return binary_entropy(p.mean(0)) - binary_entropy(p).mean(0)


@torch.no_grad()
def posterior(model: VPLRewardModel, h_chosen: torch.Tensor, h_rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, log σ²) [1, D] of q(z | C) for context pairs given as pooled states [C, H] (C may be 0:
    the prior N(0, I))."""
    device = h_chosen.device
    if not len(h_chosen):
        zero = torch.zeros(1, model.latent_dim, device=device)
        return zero, zero
    mask = torch.ones(1, len(h_chosen), dtype=torch.bool, device=device)
    return model.encode(h_chosen[None], h_rejected[None], mask)


@torch.no_grad()
def information_gains(model: VPLRewardModel, h_a: torch.Tensor, h_b: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                      samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[Q] EIG of the candidate pairs (a_q, b_q), pooled states [Q, H] each, under q(z | C) =
    N(μ, σ²) estimated with ``samples`` draws of z."""
    eps = torch.randn(samples, model.latent_dim, generator=generator).to(h_a.device)
    z = reparameterize(mu, logvar, eps)[:, None]  # [S, 1, D]
    shape = (samples, *h_a.shape)
    p = torch.sigmoid(model.reward(h_a.expand(shape), z) - model.reward(h_b.expand(shape), z))  # [S, Q]
    return expected_information_gain(p)


@torch.no_grad()
def active_order(model: VPLRewardModel, pairs: PairTensors, pool: Sequence[int], n: int, *, samples: int = 64,
                 generator: torch.Generator | None = None, answer: Callable[[int], int] | None = None) -> list[int]:
    """The first ``n`` pairs of ``pool`` (indices into ``pairs``) in the order of greedy EIG.

    Each step infers q(z | C) from the pairs asked so far, samples ``samples`` latents, and asks
    the pool pair with the largest EIG. ``answer(i)`` gives the rater's label of pair i: 1 if
    they prefer its ``chosen`` side (the default, as for recorded labels), 0 if ``rejected``;
    the pair enters the context oriented by that answer."""
    model.eval()
    device = next(model.parameters()).device
    pool = [int(i) for i in pool]
    b, inverse = pairs.unique_batch(torch.as_tensor(pool), device)
    hc, hr = model.embed(b["input_ids"], b["attention_mask"])[inverse].chunk(2)  # [P, H] each
    left = list(range(len(pool)))
    ctx: list[tuple[int, bool]] = []  # (pool position, prefers chosen)
    for _ in range(min(n, len(pool))):
        won = torch.stack([hc[j] if yes else hr[j] for j, yes in ctx]) if ctx else hc[:0]
        lost = torch.stack([hr[j] if yes else hc[j] for j, yes in ctx]) if ctx else hr[:0]
        mu, logvar = posterior(model, won, lost)
        idx = torch.as_tensor(left, device=device)
        j = left.pop(int(information_gains(model, hc[idx], hr[idx], mu, logvar, samples, generator).argmax()))
        ctx.append((j, True if answer is None else bool(answer(pool[j]))))
    return [pool[j] for j, _ in ctx]
