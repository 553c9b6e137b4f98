"""How well a translation prior translates the sources RL would sample, against unseen ones.

    python scripts/translation_memorisation.py MODEL [key=value ...] [--n 500] [--config configs/translation.yaml]

Greedy corpus BLEU, length ratio and mean sentence reward (the RL reward of the config, on the
greedy output) of MODEL on N pairs drawn at random (seed 0) from each of: the pairs it was pre-trained on, the pairs held
out of pre-training by ``task.rl_holdout`` (when set) and val. RL samples its sources from the
training split (or from the held-out pairs): a prior that has memorised its training pairs
scores far higher there than on val, and the reward then says little about what generalises.
Prints a Markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from run_logged import REPO  # scripts/ is on sys.path as this script's folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the config (e.g. task.rl_holdout=4000)")
    ap.add_argument("--n", type=int, default=500, help="pairs per part, drawn at random (seed 0): the training file is not shuffled")
    ap.add_argument("--config", default="configs/translation.yaml")
    args = ap.parse_intermixed_args(argv)
    sys.path.insert(0, str(REPO))
    from apps.pipeline import load_run_config
    from rlhf.models import load_model
    from tasks.translation.bleu import corpus_bleu
    from tasks.translation.task import TranslationTask

    cfg = load_run_config(args.config, args.overrides).task
    task = TranslationTask.build(cfg, args.model)
    model = load_model(args.model)
    mle, rl = task.train_parts()
    parts = {"pre-training pairs": mle}
    if cfg.rl_holdout:
        parts["held-out training pairs"] = rl
    parts["val"] = task.split("val")
    out = {}
    for name, pairs in parts.items():
        pairs = random.Random(0).sample(pairs, min(args.n, len(pairs)))
        refs = [p.tgt for p in pairs]
        hyps = task.decode_split(model, pairs, beam=1)[2]
        b = corpus_bleu(hyps, refs, cfg.reward.tokenize)
        out[name] = {"pairs": len(pairs), "bleu": round(b.score, 2), "ratio": round(b.ratio, 3),
                     "reward": round(float(task.rewards(hyps, refs).mean()), 4)}
    print("| part | pairs | greedy BLEU | length ratio | mean reward (greedy) |\n|---|---|---|---|---|")
    for name, r in out.items():
        print(f"| {name} | {r['pairs']} | {r['bleu']:.2f} | {r['ratio']:.3f} | {r['reward']:.3f} |")
    print(json.dumps({"model": str(args.model), **out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
