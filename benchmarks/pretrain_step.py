"""Seconds per MLE step of the translation prior: one padded batch vs length chunks.

The default translation model and batch (``configs/translation.yaml``: GPT-2 4 x 256, 64 pairs)
on real Multi30k batches (``pretrain.batch_indices``, seed 0), dropout on, AdamW step included.
Variants, interleaved over ``--repeats`` rounds (best round kept, so load from other processes
hits all alike):

* ``padded``: the whole batch padded to its longest pair, logits at every position (what
  ``pretrain`` did before ``length_chunks``);
* ``chunks_K``: :func:`rlhf.pretrain.chunked_token_stats` with K length-sorted chunks and the
  LM head only at target positions.

Also prints the share of padded positions in one batch and the budget the fastest variant
implies for ``pretrain.steps``. Needs Multi30k (``--data`` or ``$RLHF_MULTI30K_DIR``); trains
the tokenizer once (cached in ``--cache``). Prints one JSON line.

    python benchmarks/pretrain_step.py [--threads 2] [--steps 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rlhf.errors import UserError  # noqa: E402
from rlhf.models import build_model  # noqa: E402
from apps.pipeline import load_run_config, make_task  # noqa: E402
from rlhf.pretrain import batch_indices, chunked_token_stats  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Wrapped(torch.nn.Module):
    """Hides the GPT-2 type so that ``token_stats`` takes the full-logits path."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **kw):
        return self.model(**kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--data", default=None, help="Multi30k folder (default: $RLHF_MULTI30K_DIR or ../shared/data/multi30k)")
    ap.add_argument("--cache", default="/tmp/rlhf-bench-tokenizer", help="where the trained tokenizer is kept between runs")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_run_config(ROOT / "configs/translation.yaml", ["progress=false"] + ([f"task.data.dir={a.data}"] if a.data else []))
    task = make_task(cfg)
    cache = Path(a.cache)
    task.ensure_codec(cache if (cache / "tokenizer.json").exists() else None)
    task.codec.tokenizer.save_pretrained(cache)
    train = task.examples(task.corpus(cfg.seed, progress=False)[0])
    pad = task.codec.pad_id
    b = cfg.pretrain.batch_size
    sample = [train[i] for i in batch_indices(len(train), b, 0, cfg.seed)]
    longest = max(len(p) + len(c) for p, c in sample)
    pad_share = 1 - sum(len(p) + len(c) for p, c in sample) / (longest * b)

    torch.manual_seed(0)
    model = build_model(cfg.model, task.codec.tokenizer)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cpu = torch.device("cpu")

    def step(variant: str, s: int) -> None:
        batch = [train[i] for i in batch_indices(len(train), b, s, cfg.seed)]
        if variant == "padded":
            nll, _, n = chunked_token_stats(Wrapped(model), batch, pad, cpu, 1)
        else:
            nll, _, n = chunked_token_stats(model, batch, pad, cpu, int(variant.split("_")[1]))
        opt.zero_grad(set_to_none=True)
        (nll / n).backward()
        opt.step()

    variants = ["padded"] + [f"chunks_{k}" for k in a.chunks]
    best = {v: float("inf") for v in variants}
    for v in variants:
        step(v, 0)  # warm-up (allocator, first-call overheads)
    for r in range(a.repeats):
        for v in variants:
            t = time.perf_counter()
            for s in range(a.steps):
                step(v, 1 + r * a.steps + s)
            best[v] = min(best[v], (time.perf_counter() - t) / a.steps)
    fastest = min(best, key=best.get)
    steps = cfg.pretrain.steps
    print(json.dumps({
        "threads": a.threads, "batch_size": b, "pad_share": round(pad_share, 3),
        **{f"s_per_step_{v}": round(best[v], 4) for v in variants},
        "fastest": fastest, "speedup": round(best["padded"] / best[fastest], 3),
        "pretrain_steps": steps, "pretrain_minutes_fastest": round(steps * best[fastest] / 60, 1),
        "pretrain_minutes_padded": round(steps * best["padded"] / 60, 1),
    }))


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # e.g. no Multi30k: say where to get it, no traceback
        sys.exit(f"error: {e}")
