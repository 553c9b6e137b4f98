"""Counterpoint tuned to one rater's taste: one VPL reward model, one policy per rater group.

    python scripts/personal_music.py OUT --reward-run RUN --prior PRIOR [key=value ...] [--groups A B] [--context 8]

For each group g, a held-out rater of g (never seen in reward training; the first of the group
in RUN/data/test.jsonl, or ``--rater g=ID``) gives z (``infer_z``) from ``--context`` of their labelled
pairs, and ``rlhf tune`` tunes PRIOR against the VPL reward r(x, z) (``reward.*`` of
``configs/counterpoint-rloo.yaml``; the overrides go to every run) into OUT/tuned-g. Then the prior and
every tuned policy sample the evaluation cantus firmi (the same prompts and sample indices), and
each group's simulated prototype rater judges them:

* win rate against the prior: share of index-aligned pairs in which g's prototype prefers the
  policy's piece to the prior's (ties count ½);
* the cross-preference matrix: for groups g ≠ h, how often g's prototype prefers the g-policy's
  piece to the h-policy's;
* rule violations per note and KL to the prior per note of each policy.

The tuning settings are ``DEFAULTS`` below (RLOO with per-token credit, as the learned reward
scores whole pieces; 200 iterations; β = 1.5 on the exact KL; the raw reward r(x, z)), before
your overrides. Writes OUT/eval.json and OUT/report.md; each tuning run is skipped when its
model exists.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULTS = ["tune.rloo.credit=token", "tune.steps=200", "tune.checkpoint_every=100", "tune.kl.beta=1.5", "reward.scale=raw"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("overrides", nargs="*", help="key=value overrides of --config for every tuning run")
    ap.add_argument("--reward-run", type=Path, required=True, help="run folder of `rlhf train-reward` with models/reward-vpl")
    ap.add_argument("--prior", type=Path, required=True, help="the counterpoint prior (rlhf pretrain configs/counterpoint.yaml)")
    ap.add_argument("--groups", nargs="+", default=["A", "B"])
    ap.add_argument("--context", type=int, default=8, help="labelled pairs of the rater that give z")
    ap.add_argument("--rater", action="append", default=[], metavar="GROUP=ID", help="the held-out rater of a group (default: its first)")
    ap.add_argument("--config", default="configs/counterpoint-rloo.yaml", help="the tuning config: an RLOO one, as the learned reward scores whole pieces")
    args = ap.parse_intermixed_args(argv)  # key=value overrides before or after the flags
    args.overrides = [*DEFAULTS, *args.overrides]

    import numpy as np

    from apps.pipeline import load_run_config, make_task, stage_tune
    from apps.simulate import load_sidecar, preference_win_rates, prototype_from_sidecar, win_rate
    from reward_models.data import load_preferences
    from rlhf.errors import UserError
    from rlhf.models import load_model
    from rlhf.report import markdown_table
    from rlhf.runs import Run, atomic_write_text
    from tasks.counterpoint.task import from_json

    run_root, out = args.reward_run.resolve(), args.out.resolve()
    test = run_root / "data" / "test.jsonl"
    vpl = run_root / "models" / "reward-vpl"
    for p in (test, vpl / "config.json", args.prior / "config.json"):
        if not p.is_file():
            raise SystemExit(f"error: {p} not found; train the reward model (rlhf train-reward) and the prior (rlhf pretrain) first")
    from rlhf.config import read_yaml

    meta = load_sidecar(read_yaml(run_root / "config.yaml")[0]["data"]["path"])
    if meta is None:
        raise SystemExit("error: the reward run's data has no .sim.json sidecar; personalisation is judged by simulated raters")
    records = load_preferences(test)
    chosen = dict(x.split("=", 1) for x in args.rater)
    raters = {g: chosen.get(g) or sorted({r.rater_id for r in records if r.rater_group == g})[0] for g in args.groups}
    models: dict[str, Path] = {}
    for g, rid in raters.items():
        # the reward model alone unless an override adds terms (the config's own rewards: list adds the novelty term)
        over = ["rewards=[]", *args.overrides, f"run_dir={out / f'tuned-{g}'}", "progress=false", f"reward.model={vpl}", f"reward.context={test}",
                f"reward.rater_id={rid}", f"reward.context_size={args.context}"]
        cfg = load_run_config(args.config, over)
        assert cfg.tune is not None
        run = Run(cfg.run_dir)
        final = run.final_model_dir(cfg.tune.algorithm)
        if not (final / "config.json").is_file():
            run.attach_log()
            task = make_task(cfg)
            try:
                final = stage_tune(cfg, run, task, args.prior.resolve(), resume=True)
            except UserError as e:
                raise SystemExit(f"error: {e}")
        models[f"tuned-{g}"] = final
    cfg = load_run_config(args.config, [*(o for o in args.overrides if not o.startswith("reward.")), f"run_dir={out}", "progress=false"])
    task = make_task(cfg)
    prior = load_model(args.prior)
    evaluation = task.evaluate({"prior": prior, **{n: load_model(p) for n, p in models.items()}}, prior, seed=cfg.seed)
    win = preference_win_rates(evaluation, meta)
    samples = {n: [from_json(s) for s in evaluation["samples"][n]] for n in models}
    cross = {g: {h: win_rate(prototype_from_sidecar(meta, g), samples[f"tuned-{g}"], samples[f"tuned-{h}"]) for h in args.groups if h != g}
             for g in args.groups}
    rows = evaluation["rows"]
    result = {"raters": raters, "context": args.context, "win_vs_prior": win, "cross": cross,
              "rows": {n: {k: rows[n].get(k) for k in ("rules/per_note", "rules/clean", "kl/prior")} for n in ["prior", *models]},
              "samples_per_model": len(next(iter(samples.values())))}
    atomic_write_text(out / "eval.json", json.dumps(result, indent=1))
    groups = args.groups
    md = ["# Counterpoint tuned to one rater's taste", "",
          f"VPL reward `{vpl}`; z inferred from {args.context} labelled pairs of one held-out rater per group ({', '.join(f'{g}: {r}' for g, r in raters.items())}). "
          f"{result['samples_per_model']} pieces per model on the evaluation cantus firmi, judged by each group's simulated prototype (ties ½).", "",
          "## Win rate against the prior", "",
          markdown_table(["policy"] + [f"judged by {g}" for g in groups] + ["violations / note", "clean", "KL to prior / note"],
                         [[n] + [win[n][g] for g in groups] + [result["rows"][n][k] for k in ("rules/per_note", "rules/clean", "kl/prior")] for n in models]
                         + [["prior", *["–"] * len(groups), *(result["rows"]["prior"][k] for k in ("rules/per_note", "rules/clean", "kl/prior"))]]), "",
          "## Cross-preference: each group judges its own policy against the other's", "",
          markdown_table(["judged by", "own policy preferred to"] + [f"tuned-{h}" for h in groups],
                         [[g, f"tuned-{g}"] + [cross[g].get(h, np.nan) for h in groups] for g in groups]), ""]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    print(json.dumps({"win_vs_prior": win, "cross": cross}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
