"""Greedy BLEU of a translation RL run along its checkpoints: what the gain is made of, over time.

    python scripts/translation_trajectory.py OUT CHECKPOINT... [key=value ...] --prior DIR [--config configs/translation.yaml]

For the prior and each checkpoint folder (``.../step-000022``: iteration 22; a tune run keeps
``tune.keep_checkpoints`` of its newest), greedy corpus BLEU on val and test, the length ratio,
and BLEU/BP: BLEU = BP · exp(¼ Σ log p_n), so BLEU/BP is the n-gram precisions' geometric mean
(×100) and its change is what the translations gained word for word, before the brevity
penalty. Writes OUT/trajectory.json (one row per model and split; a second
call scores only the models not in it), OUT/trajectory.md (the table, gains against the prior)
and OUT/trajectory.png (gain in BLEU and in BLEU/BP, and the length ratio, against iteration).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from run_logged import REPO  # scripts/ is on sys.path as this script's folder


def iteration(path: Path) -> int:
    m = re.search(r"step-0*(\d+)$", path.name)
    if m is None:
        raise SystemExit(f"{path}: not a checkpoint folder (expected a name like step-000022); pass the step-* folders of a tune run")
    return int(m.group(1))


def plot(rows: list[dict], splits: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for split in splits:
        pts = sorted((r for r in rows if r["split"] == split), key=lambda r: r["iteration"])
        prior = pts[0]
        it = [r["iteration"] for r in pts]
        axes[0].plot(it, [r["bleu"] - prior["bleu"] for r in pts], marker="o", label=split)
        axes[1].plot(it, [r["bleu/bp"] - prior["bleu/bp"] for r in pts], marker="o", label=split)
        axes[2].plot(it, [r["ratio"] for r in pts], marker="o", label=split)
    for ax, title in zip(axes, ["greedy BLEU − prior", "BLEU/BP − prior (precision)", "length ratio (greedy)"]):
        ax.set_title(title)
        ax.set_xlabel("RL iteration")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].axhline(0, color="grey", lw=0.8)
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[2].axhline(1, color="grey", lw=0.8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("models", nargs="+", help="checkpoint folders (step-*), then key=value overrides of the config")
    ap.add_argument("--prior", type=Path, required=True, help="the prior the run started from (iteration 0)")
    ap.add_argument("--config", default="configs/translation.yaml")
    ap.add_argument("--splits", nargs="+", default=["val", "test"])
    args = ap.parse_intermixed_args(argv)
    overrides = [m for m in args.models if "=" in m]
    models = [(0, args.prior)] + sorted((iteration(Path(m)), Path(m)) for m in args.models if "=" not in m)
    for _, m in models:
        if not (m / "config.json").is_file():
            raise SystemExit(f"{m}: no config.json; pass a save_pretrained model folder (a tune checkpoint's step-* folder or models/<name>)")
    sys.path.insert(0, str(REPO))
    from apps.pipeline import load_run_config
    from rlhf.models import load_model
    from tasks.translation.bleu import corpus_bleu
    from tasks.translation.task import TranslationTask

    cfg = load_run_config(args.config, overrides).task
    task = TranslationTask.build(cfg, args.prior)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "trajectory.json"
    rows: list[dict] = json.loads(path.read_text()) if path.is_file() else []
    done = {(r["model"], r["split"]) for r in rows}
    pairs = {s: task.split(s) for s in args.splits}
    for it, m in models:
        for split in args.splits:
            if (str(m), split) in done:
                continue
            model = load_model(m)
            hyps = task.decode_split(model, pairs[split], beam=1)[2]
            b = corpus_bleu(hyps, [p.tgt for p in pairs[split]], cfg.reward.tokenize)
            rows.append({"model": str(m), "iteration": it, "split": split, "bleu": b.score, "ratio": b.ratio,
                         "bleu/bp": b.score / b.bp if b.bp > 0 else 0.0, "signature": b.signature})
            path.write_text(json.dumps(rows, indent=1))  # after each model: a second call resumes
            print(json.dumps(rows[-1]), flush=True)
    lines = ["| iteration | " + " | ".join(f"{s} greedy (Δ) | {s} ratio | {s} BLEU/BP Δ" for s in args.splits) + " |",
             "|---|" + "---|---|---|" * len(args.splits)]
    prior = {r["split"]: r for r in rows if r["iteration"] == 0}
    for it in sorted({r["iteration"] for r in rows}):
        cells = [str(it)]
        for s in args.splits:
            r = next((r for r in rows if r["iteration"] == it and r["split"] == s), None)
            cells += ["", "", ""] if r is None else [f"{r['bleu']:.2f} ({r['bleu'] - prior[s]['bleu']:+.2f})", f"{r['ratio']:.3f}",
                                                      f"{r['bleu/bp'] - prior[s]['bleu/bp']:+.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    (args.out / "trajectory.md").write_text("\n".join(lines) + "\n")
    plot(rows, args.splits, args.out / "trajectory.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
