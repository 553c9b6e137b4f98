"""Tune one translation prior with several seeds and tabulate BLEU gains over the prior.

    python scripts/translation_seeds.py OUT [key=value ...] [--seeds 0 1 2] [--prior DIR] [--config configs/translation.yaml]

(the key=value overrides come before the options: ``--seeds`` takes every number after it)

Without ``--prior`` the prior is trained first (``rlhf pretrain`` with seed 0, into OUT/prior).
Then, one seed after the other (each run uses every core): ``rlhf tune CONFIG seed=S
run_dir=OUT/seed-S --prior P`` and ``rlhf evaluate CONFIG --model OUT/seed-S/models/<algorithm>
--prior P --out OUT/seed-S/eval`` (greedy and beam on val and test, the prior beside it).
Overrides go to every command. Last, the table: per seed, corpus BLEU of the tuned model and
its gain over the prior on val and test (greedy and beam), the length ratio and the KL per
token, then mean ± standard deviation (n − 1) of each column; it is printed as Markdown and
written to OUT/seeds.json. Each step is skipped when its output exists, so a second call
resumes. Settings are chosen on val: compare runs by their val columns only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from run_logged import REPO, RLHF, run_logged  # scripts/ is on sys.path as this script's folder
COLS = [("val", "bleu"), ("val", "bleu/beam"), ("test", "bleu"), ("test", "bleu/beam")]


def table(evals: dict[int, dict], name: str) -> tuple[str, dict]:
    """Markdown table and summary of per-seed ``eval.json`` contents (rows ``prior`` and ``name``)."""
    head = ["seed"] + [f"{s} {'beam' if k.endswith('beam') else 'greedy'}" for s, k in COLS] + ["test ratio", "test KL / token"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    gains: dict[str, list[float]] = {f"{s}/{k}": [] for s, k in COLS}
    extra: dict[str, list[float]] = {"ratio": [], "kl": []}
    for seed, ev in sorted(evals.items()):
        cells = [str(seed)]
        for s, k in COLS:
            rows = ev["splits"][s]["rows"]
            g = rows[name][k] - rows["prior"][k]
            gains[f"{s}/{k}"].append(g)
            cells.append(f"{rows[name][k]:.2f} ({g:+.2f})")
        t = ev["splits"]["test"]["rows"][name]
        extra["ratio"].append(t["ratio"])
        extra["kl"].append(t["kl/prior"])
        cells += [f"{t['ratio']:.3f}", f"{t['kl/prior']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")

    def ms(v: list[float], fmt: str = "+.2f") -> str:
        return f"{np.mean(v):{fmt}} ± {np.std(v, ddof=1) if len(v) > 1 else 0.0:.2f}"

    prior_row = [next(iter(evals.values()))["splits"][s]["rows"]["prior"][k] for s, k in COLS] if evals else None  # one prior for every seed
    lines.append("| **mean gain ± std** | " + " | ".join(ms(gains[f"{s}/{k}"]) for s, k in COLS) + f" | {ms(extra['ratio'], '.3f')} | {ms(extra['kl'], '.3f')} |")
    if prior_row is not None:
        lines.append("| prior | " + " | ".join(f"{v:.2f}" for v in prior_row) + " | | 0 |")
    summary = {"seeds": sorted(evals), "gain_mean": {k: float(np.mean(v)) for k, v in gains.items()},
               "gain_std": {k: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for k, v in gains.items()},
               "gains": gains, "test_ratio": extra["ratio"], "test_kl": extra["kl"], "prior": dict(zip([f"{s}/{k}" for s, k in COLS], prior_row or []))}
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every command")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--prior", type=Path, default=None)
    ap.add_argument("--config", default="configs/translation.yaml")
    args = ap.parse_intermixed_args(argv)  # key=value overrides before or after the flags
    out = args.out.resolve()
    ov = [*args.overrides, "progress=false"]
    prior = args.prior.resolve() if args.prior else out / "prior" / "models" / "prior"
    if not (prior / "config.json").is_file():
        run_logged([*RLHF, "pretrain", args.config, "seed=0", f"run_dir={out / 'prior'}", *ov], out / "prior.log")
    sys.path.insert(0, str(REPO))
    from apps.pipeline import load_run_config

    alg = load_run_config(args.config, args.overrides).tune.algorithm
    evals = {}
    for seed in args.seeds:
        run = out / f"seed-{seed}"
        model = run / "models" / alg
        if not (model / "config.json").is_file():
            run_logged([*RLHF, "tune", args.config, f"seed={seed}", f"run_dir={run}", "--prior", str(prior), "--resume", *ov], run / "log.txt")
        if not (run / "eval" / "eval.json").is_file():
            run_logged([*RLHF, "evaluate", args.config, f"seed={seed}", "--model", str(model), "--prior", str(prior), "--out", str(run / "eval"), *ov],
                 run / "log.txt")
        evals[seed] = json.loads((run / "eval" / "eval.json").read_text())
    text, summary = table(evals, alg)
    print(text)
    (out / "seeds.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
