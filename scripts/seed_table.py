"""Mean ± standard deviation over seeds of counterpoint or melody evaluations (``eval.json`` files).

    python scripts/seed_table.py RUN_DIR [RUN_DIR ...] [--model ppo] [--columns melody] [--json out.json]

Each RUN_DIR holds an ``eval.json`` written by ``rlhf run`` or ``rlhf evaluate``. Prints one
Markdown table: a row per seed for the tuned model on the held-out cantus firmi (the headline)
and on the training pool, then the mean ± standard deviation (sample std, n − 1) and the prior.
``--columns melody``: Sequence Tutor's Table 1 statistics instead, and two last columns saying
whether the seed meets every target of the paper's Q column, and 90 distinct melodies per 100
(``MELODY_TARGETS``, compared at the paper's precision: ``meets_melody_target``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

COLUMNS = {
    "counterpoint": (("rules/per_note", "violations / note"), ("ratio", "vs prior"), ("rules/clean", "clean"), ("distinct/100", "distinct / 100"),
                     ("kl/prior", "KL / note")),
    "melody": (("table1/notes_not_in_key", "not in key"), ("table1/notes_excessively_repeated", "excessively repeated"),
               ("table1/compositions_starting_with_tonic", "start on tonic"), ("table1/leaps_resolved", "leaps resolved"),
               ("table1/notes_in_motif", "in motif"), ("distinct/100", "distinct / 100"), ("kl/prior", "KL / note")),
}


def _row(r: dict[str, float], prior: dict[str, float]) -> dict[str, float]:
    return {**r, "ratio": r["rules/per_note"] / prior["rules/per_note"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--model", default=None, help="the tuned model's row name (default: the one row besides prior and references)")
    ap.add_argument("--json", type=Path, default=None, help="also write the per-seed figures and their mean and std here")
    ap.add_argument("--columns", choices=sorted(COLUMNS), default="counterpoint", help="first-species rule figures, or melody mode's Table 1")
    args = ap.parse_args(argv)
    cols = COLUMNS[args.columns]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tasks.counterpoint.report import MELODY_TARGETS, meets_melody_target

    def meets(r: dict[str, float]) -> str:
        if args.columns != "melody":
            return ""
        ok = {k: meets_melody_target(k, r.get(k, float("nan")), at_least, b) for k, at_least, b in MELODY_TARGETS}
        mark = lambda good: " ✓ |" if good else " ✗ |"  # noqa: E731
        return mark(all(v for k, v in ok.items() if k.startswith("table1/"))) + mark(ok["distinct/100"])
    heads, trains, priors, names = [], [], [], []
    for run in args.runs:
        path = run / "eval.json" if run.is_dir() else run
        if not path.is_file():
            print(f"error: {path} not found; evaluate the run first (rlhf evaluate CONFIG --model DIR --prior DIR --out DIR)", file=sys.stderr)
            return 2
        ev = json.loads(path.read_text())
        rows = ev["rows"]
        model = args.model or next(n for n in rows if n != "prior" and "kl/prior" in rows[n])
        heads.append(_row(rows[model], rows["prior"]))
        priors.append(rows["prior"])
        train = ev.get("rows_by_set", {}).get("pool-train", {})
        trains.append(_row(train[model], train["prior"]) if model in train else None)
        names.append(run.parent.name if run.name == "eval" else run.name)
    last = " Table 1 Q met | ≥ 90 distinct |" if args.columns == "melody" else ""
    held = "samples" if args.columns == "melody" else "held out"  # melody mode has no prompts to hold out
    print("| run | set | " + " | ".join(c[1] for c in cols) + " |" + last)
    print("|---|---|" + "---|" * (len(cols) + last.count("|")))
    for name, h, t in zip(names, heads, trains):
        print(f"| {name} | {held} | " + " | ".join(f"{h.get(k, float('nan')):.3f}" for k, _ in cols) + " |" + meets(h))
    summary: dict[str, dict[str, list[float]]] = {}
    for label, rows in ((held, heads), ("trained on", [t for t in trains if t is not None])):
        if not rows:
            continue
        stats = {k: [float(np.mean([r.get(k, np.nan) for r in rows])), float(np.std([r.get(k, np.nan) for r in rows], ddof=1)) if len(rows) > 1 else 0.0]
                 for k, _ in cols}
        summary[label] = stats
        print(f"| mean ± std ({len(rows)} seeds) | {label} | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in stats.values()) + " |" + " |" * last.count("|"))
    p = priors[0]
    print(f"| prior | {held} | " + " | ".join(f"{_row(p, p).get(k, float('nan')):.3f}" for k, _ in cols) + " |" + meets(p))
    if args.json:
        args.json.write_text(json.dumps({"runs": names, "heldout": heads, "train": trains, "summary": summary, "prior": p}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
