"""Evaluation of a preference model from its reward differences Δ = r(chosen) − r(rejected).

Bradley & Terry (1952), "Rank analysis of incomplete block designs": p(chosen ≻ rejected) = σ(Δ).
All functions are pure numpy; ties (records with ``label: tie``) are excluded by the caller.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np


def pairwise_accuracy(delta: np.ndarray) -> float:
    """Share of pairs ranked right: mean of 1[Δ > 0] + ½·1[Δ = 0] (NaN for no pairs)."""
    d = np.asarray(delta, dtype=np.float64)
    if d.size == 0:
        return float("nan")
    return float(np.mean((d > 0) + 0.5 * (d == 0)))


def log_loss(delta: np.ndarray, margin: np.ndarray | None = None) -> float:
    """Mean negative log-likelihood −log σ(Δ − m) in nats (the BT loss, evaluated)."""
    d = np.asarray(delta, dtype=np.float64)
    if d.size == 0:
        return float("nan")
    if margin is not None:
        d = d - np.asarray(margin, dtype=np.float64)
    return float(np.mean(np.logaddexp(0.0, -d)))


def expected_calibration_error(delta: np.ndarray, bins: int = 10) -> float:
    """ECE of p = σ(Δ) over ``bins`` equal-width bins of [0, 1].

    A pair has no natural orientation, so each contributes both outcomes: (p, y = 1) for
    "chosen ≻ rejected" and (1 − p, y = 0) for the reverse. With n_b predictions in bin b,

        ECE = Σ_b (n_b / N) · | mean_b(y) − mean_b(p) |

    (Naeini et al. 2015; Guo et al. 2017 use the same binning on the top-label confidence).
    """
    d = np.asarray(delta, dtype=np.float64)
    if d.size == 0:
        return float("nan")
    p1 = 1.0 / (1.0 + np.exp(-d))
    p = np.concatenate([p1, 1.0 - p1])
    y = np.concatenate([np.ones_like(p1), np.zeros_like(p1)])
    idx = np.minimum((p * bins).astype(np.int64), bins - 1)
    n = np.bincount(idx, minlength=bins).astype(np.float64)
    sp = np.bincount(idx, weights=p, minlength=bins)
    sy = np.bincount(idx, weights=y, minlength=bins)
    nz = n > 0
    return float(np.sum(np.abs(sy[nz] - sp[nz])) / p.size)


def accuracy_by(delta: np.ndarray, keys: Sequence[Hashable]) -> dict[str, float]:
    """Pairwise accuracy within each key (rater, group, "agreed"/"disputed", ...)."""
    d = np.asarray(delta, dtype=np.float64)
    out: dict[str, list[float]] = {}
    for v, k in zip(d, keys):
        out.setdefault(str(k), []).append(v)
    return {k: pairwise_accuracy(np.array(v)) for k, v in sorted(out.items())}


def summary(delta: np.ndarray, margin: np.ndarray | None = None, split: str = "val") -> dict[str, float]:
    """``acc/<split>``, ``logloss/<split>``, ``ece/<split>`` and ``pairs/<split>``."""
    return {
        f"acc/{split}": pairwise_accuracy(delta),
        f"logloss/{split}": log_loss(delta, margin),
        f"ece/{split}": expected_calibration_error(delta),
        f"pairs/{split}": float(np.asarray(delta).size),
    }
