"""Compare finished runs side by side, and rebuild a run's report.

``rlhf compare RUN_DIR [RUN_DIR ...] --out DIR`` writes ``DIR/compare.md`` and
``DIR/compare.png``: the config keys on which the runs differ, every run's training curves
overlaid (one panel per metric that more than one run logged), and the evaluation's headline
rows side by side. ``rlhf report RUN_DIR`` rewrites a run's ``report.md`` and plots from its
``eval.json`` (after a change to the report code, or a lost report).

A run folder is anything ``rlhf run`` / ``tune`` / ``evaluate`` / ``train-reward`` wrote:
``config.yaml``, and ``metrics.jsonl`` and/or ``eval.json`` (or ``eval/eval.json``, a tune
folder with its evaluation inside, as ``scripts/counterpoint_seeds.py`` writes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from rlhf.errors import UserError
from rlhf.report import markdown_table, plt, save_fig
from rlhf.runs import atomic_write_text, read_metrics

CURVE_KEYS = ("reward/task", "kl/mean", "loss/val", "loss/train", "rules/clean", "bleu", "acc/val", "loss/policy")  # preferred panels, in order
MAX_PANELS = 6
SMOOTH_ABOVE = 200  # points per curve above which a moving average over a fiftieth of them is drawn
EVAL_KEYS = ("rules/per_note", "rules/clean", "distinct/100", "kl/prior", "bleu", "bleu/beam", "chrf", "reward/task", "accuracy")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def load_run(path: Path) -> dict[str, Any]:
    """A run folder's config (flattened), metrics rows and evaluation; UserError if it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a run folder (no such directory); pass folders written by rlhf run, tune, evaluate or train-reward")
    cfg_path, ev_path, metrics_path = path / "config.yaml", path / "eval.json", path / "metrics.jsonl"
    if not ev_path.is_file() and (path / "eval" / "eval.json").is_file():  # a tune folder with its evaluation beside (scripts/counterpoint_seeds.py)
        ev_path = path / "eval" / "eval.json"
        cfg_path = cfg_path if cfg_path.is_file() else path / "eval" / "config.yaml"
    if not cfg_path.is_file() or not (ev_path.is_file() or metrics_path.is_file()):
        raise UserError(f"{path}: not a run folder (it needs config.yaml and metrics.jsonl or eval.json); pass folders written by "
                        "rlhf run, tune, evaluate or train-reward")
    try:
        config = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{cfg_path}: not valid YAML ({e}).") from None
    try:
        metrics = read_metrics(metrics_path)
    except ValueError as e:
        raise UserError(f"{metrics_path}: a line is not JSON ({e}).") from None
    try:
        evaluation = json.loads(ev_path.read_text(encoding="utf-8")) if ev_path.is_file() else {}
    except ValueError as e:
        raise UserError(f"{ev_path}: not valid JSON ({e}).") from None
    return {"name": path.name, "path": path,
            "config": _flatten(config), "metrics": metrics, "eval": evaluation}


def short_names(paths: Sequence[Path]) -> list[str]:
    """The shortest path tails that tell the runs apart (``seeds/seed-0`` vs ``b1.5/seed-0``)."""
    parts = [Path(p).resolve().parts for p in paths]
    for k in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]  # the same folder twice


def config_diff(runs: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """Rows [key, value in run 1, ...] for every config key whose values differ (or is missing in some)."""
    keys = sorted({k for r in runs for k in r["config"]})
    missing = object()
    rows = []
    for k in keys:
        values = [r["config"].get(k, missing) for r in runs]
        if any(v != values[0] for v in values[1:]):
            rows.append([f"`{k}`"] + ["–" if v is missing else json.dumps(v) for v in values])
    return rows


def curve_panels(runs: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(stage, metric) panels logged by more than one run (or by the only run), preferred keys first."""
    counts: dict[tuple[str, str], int] = {}
    for r in runs:
        seen = {(row.get("stage", ""), k) for row in r["metrics"] for k, v in row.items()
                if k not in ("stage", "step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for key in seen:
            counts[key] = counts.get(key, 0) + 1
    shared = [k for k, n in counts.items() if n >= min(2, len(runs))]
    rank = {k: i for i, k in enumerate(CURVE_KEYS)}
    shared.sort(key=lambda sk: (rank.get(sk[1], len(rank)), sk[0], sk[1]))
    return shared[:MAX_PANELS]


def plot_runs(runs: Sequence[dict[str, Any]], panels: Sequence[tuple[str, str]], path: Path) -> Path | None:
    if not panels:
        return None
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, (stage, key) in zip(axes.flat, panels):
        for r in runs:
            pts = [(row["step"], row[key]) for row in r["metrics"] if row.get("stage", "") == stage and isinstance(row.get(key), (int, float))]
            if pts:
                xs, ys = map(np.asarray, zip(*pts))
                if len(pts) > SMOOTH_ABOVE:  # thousands of noisy RL steps: the raw curve faint, its moving average on top
                    w = len(pts) // 50
                    line = ax.plot(xs, ys, alpha=0.2, linewidth=0.6)[0]
                    ax.plot(xs[w - 1 :], np.convolve(ys, np.ones(w) / w, mode="valid"), color=line.get_color(), label=r["name"])
                else:
                    ax.plot(xs, ys, label=r["name"], marker="." if len(pts) < 30 else None)
        ax.set_title(f"{key} ({stage})" if stage else key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return save_fig(fig, path)


def headline(evaluation: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Model -> its headline figures: ``rows`` of a task evaluation, or each reward model's
    ``overall`` figures of a ``train-reward`` evaluation."""
    if isinstance(evaluation.get("rows"), dict):
        found = evaluation["rows"]
    else:
        found = {m: v.get("overall") for m, v in (evaluation.get("methods") or {}).items() if isinstance(v, dict)}
    return {m: {k: float(x) for k, x in row.items() if isinstance(x, (int, float)) and not isinstance(x, bool)}
            for m, row in found.items() if isinstance(row, dict)}


def eval_rows(runs: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows [run, model, metrics...] of every run's headline evaluation rows: the
    usual figures (EVAL_KEYS) where the runs have them, else every figure they share."""
    heads = [(r["name"], headline(r["eval"])) for r in runs]
    rows_all = [row for _, h in heads for row in h.values()]
    present = [k for k in EVAL_KEYS if any(k in row for row in rows_all)]
    if not present and rows_all:
        present = sorted(set.intersection(*(set(row) for row in rows_all)))[:8]
    rows = [[name, model] + [row.get(k, float("nan")) for k in present] for name, h in heads for model, row in h.items()]
    return ["run", "model", *present], rows


def compare(run_dirs: Sequence[Path], out: Path) -> Path:
    """Write ``out/compare.md`` and ``out/compare.png``; returns the Markdown path."""
    runs = [load_run(Path(p)) for p in run_dirs]
    for r, name in zip(runs, short_names([r["path"] for r in runs])):
        r["name"] = name
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Run comparison", "", "| run | folder |", "|---|---|", *[f"| {r['name']} | `{r['path']}` |" for r in runs], ""]
    diff = config_diff(runs)
    lines += ["## Config differences", ""]
    lines += [markdown_table(["key", *[r["name"] for r in runs]], diff), ""] if diff else ["The configs are identical.", ""]
    png = plot_runs(runs, curve_panels(runs), out / "compare.png")
    lines += ["## Training curves", ""]
    lines += ["![training curves](compare.png)", ""] if png else ["No metric is logged by more than one run.", ""]
    header, rows = eval_rows(runs)
    lines += ["## Evaluation (headline rows)", ""]
    lines += [markdown_table(header, rows), ""] if rows else ["No run has evaluation rows (eval.json).", ""]
    md = out / "compare.md"
    atomic_write_text(md, "\n".join(lines))
    return md


def rebuild_report(run_dir: Path) -> Path:
    """Rewrite ``run_dir/report.md`` (and its plots) from ``eval.json`` with the run's own config."""
    from apps.pipeline import load_run_config, make_task

    run = load_run(run_dir)
    if not run["eval"]:
        raise UserError(f"{run_dir}: no eval.json to report on; evaluate first (rlhf evaluate CONFIG --model DIR --out {run_dir}).")
    cfg = load_run_config(Path(run_dir) / "config.yaml")
    model_dir = next((p for p in (Path(run_dir) / "models").glob("*") if (p / "tokenizer_config.json").is_file()), None)
    task = make_task(cfg, model_dir)
    stats_path = Path(run_dir) / "data_stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    return task.report(Path(run_dir), run["eval"], stats)
