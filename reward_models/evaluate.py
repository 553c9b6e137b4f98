"""Held-out evaluation of BT and VPL reward models on the same target pairs.

Protocol (:class:`reward_models.vpl.HeldOut`): every held-out rater's pairs are shuffled once
with the run's seed; the first ``context_pool`` pairs are that rater's context pool (VPL with
context size k reads the first k), the remaining pairs are the targets every method is scored
on. Pairs are split into *agreed* and *disputed* by the simulator's sidecar when present.

Ceilings stated beside the accuracies:

* ``bt_ceiling_disputed`` -- the best a rater-agnostic model can do on disputed targets if it
  orders them as one group's prototype does: max_g mean(label = prototype_g's choice). With
  group shares 70/30 this is about 0.7 by construction (per group: ≈ 1 for the group it
  follows, ≈ 0 for the other).
* ``bt_features`` -- the best Bradley-Terry reward of the simulator's own features: the linear
  reward w · φ(x) fitted by maximum likelihood (:func:`fit_linear_bt`) on the training pairs'
  feature gaps (the sidecar's ``feature_gap``), scored on the targets (agreed and disputed). BT's
  likelihood weighs the 30% of labels against the majority on disputed pairs, so its best reward
  stays below ``bt_ceiling_disputed`` there even with the true features; this is what a learned
  BT reward can reach.
* ``noise_ceiling`` -- share of target labels that agree with the labelling rater's own
  noiseless utility (the simulator's temperature flips the rest): no model can beat it.

With ``active`` VPL is also scored with context pairs chosen by expected information gain
(``reward_models/active.py``) from the same pool, instead of the pool's random order:
``by_context_active`` beside ``by_context``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from reward_models.bradley_terry import fit_linear_bt, pair_tensors, score_pairs
from reward_models.data import Preference, comparable
from reward_models.metrics import accuracy_by, summary
from reward_models.active import active_order
from reward_models.vpl import HeldOut, VPLRewardModel, active_units, vpl_deltas


def breakdown(delta: np.ndarray, groups: Sequence[str], kinds: Sequence[str] | None, raters: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"overall": summary(delta, split="test"), "by_group": accuracy_by(delta, groups), "by_rater": accuracy_by(delta, raters)}
    if kinds is not None:
        out["by_kind"] = accuracy_by(delta, kinds)
        out["by_group_kind"] = accuracy_by(delta, [f"{g}/{k}" for g, k in zip(groups, kinds)])
    return out


def evaluate_reward_models(
    models: dict[str, PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    test: Sequence[Preference],
    *,
    context_sizes: Sequence[int],
    context_pool: int,
    seed: int,
    sidecar: dict[str, Any] | None = None,
    max_length: int | None = None,
    active: bool = False,
    active_samples: int = 64,
    train: Sequence[Preference] = (),
) -> dict[str, Any]:
    """Scores of every model on the held-out targets; JSON-serialisable (written to eval.json).
    ``train`` (the training records) gives the ``bt_features`` ceiling when the sidecar has
    feature gaps."""
    recs = comparable(test)
    pairs = pair_tensors(test, tokenizer, max_length)
    held = HeldOut.build(test, context_pool, seed)
    tidx = held.target_indices()
    targets = [recs[i] for i in tidx]
    groups = [r.rater_group or "-" for r in targets]
    raters = [r.rater_id or "-" for r in targets]
    sim_pairs = (sidecar or {}).get("pairs", {})
    kinds = None
    if sim_pairs and all(r.pair_id in sim_pairs for r in targets):
        kinds = ["disputed" if sim_pairs[r.pair_id]["disputed"] else "agreed" for r in targets]
    result: dict[str, Any] = {
        "protocol": {"held_out_raters": len(held.raters), "context_pool": context_pool, "targets": len(targets),
                     "context_sizes": list(context_sizes), "test_records": len(test)},
        "methods": {},
    }
    for name, model in models.items():
        if isinstance(model, VPLRewardModel):
            per_k = {}
            for k in context_sizes:
                delta, mu = vpl_deltas(model, pairs, held, k)
                per_k[str(k)] = {**breakdown(delta, groups, kinds, raters), "active_units": active_units(mu)}
            result["methods"][name] = {"kind": "vpl", "by_context": per_k, "inference": "bank" if model.uses_bank else "encoder",
                                       "bank_size": len(model.z_bank) if model.uses_bank else 0}
            if active:
                gen = torch.Generator().manual_seed(seed)
                n = max(context_sizes)
                chosen = HeldOut(held.raters, [np.asarray(active_order(model, pairs, c, n, samples=active_samples, generator=gen)) for c in held.context],
                                 held.targets)
                result["methods"][name]["by_context_active"] = {
                    str(k): {**breakdown(delta, groups, kinds, raters), "active_units": active_units(mu)}
                    for k in context_sizes for delta, mu in [vpl_deltas(model, pairs, chosen, k)]}
        else:
            delta = score_pairs(model, pairs)[tidx] if len(tidx) else np.zeros(0)
            result["methods"][name] = {"kind": "bt", **breakdown(delta, groups, kinds, raters)}
    if kinds is not None and targets:
        result["ceilings"] = ceilings(targets, kinds, sim_pairs, train)
    return result


def ceilings(targets: Sequence[Preference], kinds: Sequence[str], sim_pairs: dict[str, Any], train: Sequence[Preference] = ()) -> dict[str, Any]:
    disputed = [r for r, k in zip(targets, kinds) if k == "disputed"]
    out: dict[str, Any] = {}
    noise = np.array([sim_pairs[r.pair_id]["p_label"] > 0.5 for r in targets], dtype=float)
    out["noise_ceiling"] = float(noise.mean())
    out["noise_ceiling_by_kind"] = {k: float(np.mean([n for n, kk in zip(noise, kinds) if kk == k])) for k in sorted(set(kinds))}
    if disputed:
        names = sorted(sim_pairs[disputed[0].pair_id]["prefers"])
        follow = {g: float(np.mean([sim_pairs[r.pair_id]["prefers"][g] == "chosen" for r in disputed])) for g in names}
        out["bt_ceiling_disputed"] = max(follow.values())
        out["disputed_accuracy_if_following"] = follow
        out["disputed_share_by_group"] = {g: float(np.mean([r.rater_group == g for r in disputed])) for g in sorted({r.rater_group or "-" for r in disputed})}
    fit = [r for r in comparable(train) if "feature_gap" in sim_pairs.get(r.pair_id or "", {})]
    if fit and all("feature_gap" in sim_pairs[r.pair_id] for r in targets):
        w = fit_linear_bt(torch.tensor([sim_pairs[r.pair_id]["feature_gap"] for r in fit]))
        delta = (torch.tensor([sim_pairs[r.pair_id]["feature_gap"] for r in targets], dtype=torch.float64) @ w).numpy()  # [targets] r(chosen) − r(rejected)
        out["bt_features"] = {"weights": w.tolist(), "pairs": len(fit), **accuracy_by(delta, kinds)}  # scored as the learned models are
    return out
