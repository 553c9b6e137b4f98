"""Sample the tilted prior itself, π*(a|s) ∝ p(a|s)^(1/T) · exp(r(s, a) / (βc)), with no training,
and print what the counterpoint evaluation would say of it: the target that ``tune.algorithm:
tilt`` distils and that RLOO's per-note terms pull toward, before any learning.

    python scripts/tilted_prior.py PRIOR [--config configs/counterpoint.yaml] [key=value ...]

β, c and T come from the config's ``tune.kl`` (beta, c, prior_temperature); r is the task's
reward of every note (its rules, the clean bonus and, with ``task.lookahead``, the shaping).
Prints one JSON line on the held-out sets of ``task.eval.split`` (add ``task.eval.split=validation``
when choosing settings): clean share, hard violations per note, distinct pieces per 100 samples
and the KL to the prior per note.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apps.pipeline import load_run_config, make_task  # noqa: E402
from rlhf.interfaces import Completions  # noqa: E402
from rlhf.kl import masked_log_softmax  # noqa: E402
from rlhf.losses import tilted_target  # noqa: E402
from rlhf.models import load_model  # noqa: E402
from tasks.counterpoint.task import distinct_per_100  # noqa: E402


@torch.no_grad()
def sample_tilted(task, prior, prompts, per: int, scale: float, temperature: float, seed: int):
    """``per`` samples of each prompt from the tilted prior, one note at a time (each step's
    rewards of every note after the notes drawn so far; the notes after it do not enter them)."""
    gen = torch.Generator().manual_seed(seed)
    rep = [p for p in prompts for _ in range(per)]
    comps: list[list[int]] = [[] for _ in rep]
    kls = np.zeros(len(rep))
    fill = int(task.allowed.nonzero()[0])
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(rep):
        groups.setdefault((len(p.ids), p.n_new), []).append(i)
    for (_, n), idx in groups.items():
        ps = [rep[i] for i in idx]
        ids = torch.tensor([p.ids for p in ps])
        toks = torch.full((len(ps), n), fill)
        kl = torch.zeros(len(ps))
        for t in range(n):
            logits = prior(input_ids=torch.cat([ids, toks[:, :t]], 1)).logits[:, -1:].float() / temperature  # [b, 1, V]
            r = task.action_rewards(Completions(ps, toks, torch.ones(len(ps), n), [n] * len(ps)))[:, t : t + 1]  # [b, 1, V]
            target = tilted_target(logits, r, scale, task.allowed)[:, 0]  # [b, V]
            q = target.exp()
            toks[:, t] = torch.multinomial(q, 1, generator=gen).squeeze(-1)
            logp = masked_log_softmax(logits[:, 0] * temperature, task.allowed)  # the prior itself
            kl += torch.where(q > 0, q * (target - logp), torch.zeros_like(q)).sum(-1)
        for j, i in enumerate(idx):
            comps[i], kls[i] = toks[j].tolist(), float(kl[j]) / n
    return rep, comps, kls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("prior", type=Path)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--config", default="configs/counterpoint.yaml")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_intermixed_args(argv)  # key=value overrides before or after the flags
    torch.manual_seed(args.seed)
    cfg = load_run_config(args.config, args.overrides)
    task = make_task(cfg, args.prior)
    prior = load_model(args.prior).eval()
    kl = cfg.tune.kl
    scale, temp = 1.0 / (kl.beta * kl.c), kl.prior_temperature
    e = cfg.task.eval
    rep, comps, kls = sample_tilted(task, prior, task.heldout_prompts(), e.samples_per_cantus, scale, temp, args.seed)
    row = task.summarize(task.decode(rep, comps), None)
    drep, dcomps, _ = sample_tilted(task, prior, task.distinct_prompts(), e.distinct_samples, scale, temp, args.seed + 1)
    out = {"clean": row["rules/clean"], "violations_per_note": row["rules/per_note"],
           "distinct_per_100": distinct_per_100(task.decode(drep, dcomps), [p.name for p in drep]), "kl_per_note": float(kls.mean()),
           "beta": kl.beta, "c": kl.c, "prior_temperature": temp, "lookahead": cfg.task.lookahead, "split": e.split}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
