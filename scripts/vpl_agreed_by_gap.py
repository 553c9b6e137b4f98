"""Where a VPL reward model loses agreed pairs: accuracy on held-out raters' targets binned by
the rater's own utility gap, with the rater's z and with no context.

    python scripts/vpl_agreed_by_gap.py RUN DATA [--context 8]

RUN is a ``rlhf train-reward`` run folder with ``models/reward-vpl`` and ``data/test.jsonl``;
DATA the simulated preference file whose ``.sim.json`` sidecar holds the raters' weights and the
pairs' feature gaps. The held-out protocol is the report's (``eval.context_pool`` and ``seed`` of
RUN/config.yaml): each rater's first ``--context`` pool pairs give z, the targets are scored.
The rater's gap of a pair is |w · (φ(a) − φ(b))| with the rater's jittered weights w.
Also printed: agreed / disputed accuracy per group with z moved toward the bank mean,
z̄ + s·(z − z̄), for s = 1, 0.8, 0.6, 0.5. Prints a Markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apps.reward_cli import load_tokenizer  # noqa: E402
from apps.simulate import load_sidecar  # noqa: E402
from reward_models.bradley_terry import pair_tensors  # noqa: E402
from reward_models.data import comparable, load_preferences  # noqa: E402
from reward_models.reward_source import load_reward_model  # noqa: E402
from reward_models.vpl import HeldOut  # noqa: E402
from rlhf.errors import UserError  # noqa: E402

BINS = ((0.0, 0.5, "< 0.5"), (0.5, 1.0, "0.5–1"), (1.0, float("inf"), "> 1"))
SCALES = (1.0, 0.8, 0.6, 0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--context", type=int, default=8)
    a = ap.parse_args(argv)
    model_dir = a.run / "models" / "reward-vpl"
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: no VPL model; train one with `rlhf train-reward ... methods=[vpl]`")
    side = load_sidecar(a.data)
    if side is None or "raters" not in side:
        raise UserError(f"{a.data}: no .sim.json sidecar with raters; this script needs simulated preferences")
    cfg = yaml.safe_load((a.run / "config.yaml").read_text())
    model = load_reward_model(model_dir).eval()
    if not model.uses_bank:
        raise UserError(f"{model_dir}: this model infers z with its encoder; the script reads the bank posterior (vpl.inference: bank)")
    test = load_preferences(a.run / "data" / "test.jsonl")
    recs = comparable(test)
    max_len = None if cfg["model"].get("path") else cfg["model"].get("max_positions")  # as `rlhf train-reward` tokenizes
    pairs = pair_tensors(test, load_tokenizer(cfg["data"]["tokenizer"], ()), max_len)
    held = HeldOut.build(test, cfg["eval"]["context_pool"], cfg["seed"])
    meta, raters = side["pairs"], side["raters"]
    hits: dict[tuple, list[float]] = {}
    with torch.no_grad():
        hc, hr = model.embed_pairs(pairs, range(len(pairs)))
        zbar = model.z_bank.mean(0)
        for ctx, tgt in zip(held.context, held.targets):
            c, t = torch.as_tensor(ctx[: a.context]), torch.as_tensor(tgt)
            z = model.posterior_z(hc[c][None], hr[c][None], torch.ones(1, len(c), dtype=torch.bool))[0]
            right = {s: (model.reward(hc[t], zbar + s * (z - zbar)) > model.reward(hr[t], zbar + s * (z - zbar))).tolist() for s in SCALES}
            none = (model.reward(hc[t], zbar) > model.reward(hr[t], zbar)).tolist()  # no context: the bank's mean
            for n, i in enumerate(tgt.tolist()):
                r, p = recs[i], meta[recs[i].pair_id]
                kind = "disputed" if p["disputed"] else "agreed"
                gap = abs(float(np.dot(raters[r.rater_id]["weights"], p["feature_gap"])))
                b = next(name for lo, hi, name in BINS if lo <= gap < hi)
                for s in SCALES:
                    hits.setdefault(("scale", s, r.rater_group, kind), []).append(float(right[s][n]))
                hits.setdefault(("gap", "z", r.rater_group, kind, b), []).append(float(right[1.0][n]))
                hits.setdefault(("gap", "none", r.rater_group, kind, b), []).append(float(none[n]))
    acc = {k: (float(np.mean(v)), len(v)) for k, v in hits.items()}
    groups = sorted({k[2] for k in acc})
    print("| rater's gap | " + " | ".join(f"{g} agreed, rater's z / no context" for g in groups) + " | pairs (" + " / ".join(groups) + ") |")
    print("|---|" + "---|" * (len(groups) + 1))
    for _, _, b in BINS:
        cells = [f"{acc[('gap', 'z', g, 'agreed', b)][0]:.3f} / {acc[('gap', 'none', g, 'agreed', b)][0]:.3f}" if ("gap", "z", g, "agreed", b) in acc
                 else "–" for g in groups]
        n = [str(acc.get(("gap", "z", g, "agreed", b), (0, 0))[1]) for g in groups]
        print(f"| {b} | " + " | ".join(cells) + " | " + " / ".join(n) + " |")
    for s in SCALES:
        print(f"z̄ + {s}·(z − z̄): " + ", ".join(f"{g} {k} {acc[('scale', s, g, k)][0]:.3f}" for g in groups for k in ("agreed", "disputed")
                                              if ("scale", s, g, k) in acc))
    print(json.dumps({"|".join(map(str, k)): round(v[0], 4) for k, v in sorted(acc.items(), key=lambda kv: str(kv[0]))}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
