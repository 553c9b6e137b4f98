"""Throughput of the batched sentence-BLEU reward vs a plain loop of ``sacrebleu.sentence_bleu``.

Pairs: the first N references of Multi30k train (German) with real hypotheses: a perturbed
copy of the reference (word drops, repeats, swaps; seeded) for 3 pairs in 4, another training
sentence for the rest. Both paths score the same pairs; the scores must agree to 1e-9 on
sacrebleu's 0–100 scale. Timed (best of ``--repeats`` interleaved runs, so load from other
processes hits both paths alike):

* ``loop``: ``[sacrebleu.sentence_bleu(h, [r]).score for h, r in pairs]``;
* ``batched``: a fresh ``SentenceBLEU`` scoring all pairs, reference statistics included
  (the one-shot cost);
* ``batched_warm``: the same object again on new hypotheses with the references already
  cached, which is the RL case (each training reference is prepared once and reused every
  iteration).

Single process, single thread. Times are CPU seconds of this process (``time.process_time``):
equal to wall time on an idle machine, and not inflated when other jobs share the cores.
Prints one JSON line.

    python benchmarks/bleu_reward.py [--pairs 10000] [--repeats 3] [--data DIR]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import sacrebleu  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rlhf.errors import UserError  # noqa: E402
from tasks.translation.bleu import SentenceBLEU  # noqa: E402
from tasks.translation.data import load_split, resolve_data_dir  # noqa: E402


def perturb(sentence: str, rng: random.Random) -> str:
    """A hypothesis near the reference: up to 4 word drops, repeats or swaps."""
    w = sentence.split()
    for _ in range(rng.randint(0, 4)):
        op = rng.random()
        if op < 0.3 and len(w) > 1:
            del w[rng.randrange(len(w))]
        elif op < 0.6 and w:
            w.insert(rng.randrange(len(w) + 1), rng.choice(w))
        elif len(w) > 1:
            i, j = rng.randrange(len(w)), rng.randrange(len(w))
            w[i], w[j] = w[j], w[i]
    return " ".join(w)


def make_pairs(refs: list[str], seed: int, variant: int = 0) -> list[str]:
    """One hypothesis per reference (``variant`` gives a different draw of the same kind)."""
    rng = random.Random(seed * 1000 + variant)
    return [perturb(r, rng) if rng.random() < 0.75 else refs[rng.randrange(len(refs))] for r in refs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="Multi30k folder (default: $RLHF_MULTI30K_DIR or ../shared/data/multi30k)")
    a = ap.parse_args()
    train, _ = load_split(resolve_data_dir(a.data), "train", "text", "en", "de")
    refs = [p.tgt for p in train[: a.pairs]]
    loop_t, cold_t, warm_t = [], [], []
    max_diff = 0.0
    for rep in range(a.repeats):
        hyps = make_pairs(refs, a.seed, 2 * rep)  # fresh strings every repeat: no tokenizer cache carries over
        t = time.process_time()
        expected = np.array([sacrebleu.sentence_bleu(h, [r]).score for h, r in zip(hyps, refs)])
        loop_t.append(time.process_time() - t)

        t = time.process_time()
        metric = SentenceBLEU()
        got = metric.scores(hyps, refs)
        cold_t.append(time.process_time() - t)
        max_diff = max(max_diff, float(np.abs(got - expected).max()))

        hyps2 = make_pairs(refs, a.seed, 2 * rep + 1)
        t = time.process_time()
        got2 = metric.scores(hyps2, refs)
        warm_t.append(time.process_time() - t)
        check = np.array([sacrebleu.sentence_bleu(h, [r]).score for h, r in zip(hyps2[:1000], refs[:1000])])
        max_diff = max(max_diff, float(np.abs(got2[:1000] - check).max()))
    n = len(refs)
    loop, cold, warm = n / min(loop_t), n / min(cold_t), n / min(warm_t)
    print(json.dumps({
        "benchmark": "bleu_reward", "pairs": n, "loop_per_s": round(loop), "batched_per_s": round(cold), "batched_warm_per_s": round(warm),
        "ratio": round(cold / loop, 2), "ratio_warm": round(warm / loop, 2), "max_abs_diff": max_diff,
        "scale": "sacrebleu 0-100", "sacrebleu": sacrebleu.__version__, "threads": 1, "clock": "process_time",
    }))


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # e.g. no Multi30k: say where to get it, no traceback
        sys.exit(f"error: {e}")
