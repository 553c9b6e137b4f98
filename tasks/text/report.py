"""The text run's report: data, training (one plot), the evaluation table and examples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhf.report import markdown_table, save_fig
from rlhf.runs import atomic_write_text, read_metrics

# (key in an evaluation row, column header); see TextTask.evaluate for definitions
COLUMNS = (
    ("reward", "task reward"),
    ("exact", "exact match"),
    ("kl/prior", "KL to prior / token"),
    ("distinct/prompt", "distinct / prompt"),
    ("distinct-1", "distinct-1"),
    ("distinct-2", "distinct-2"),
    ("length", "length (tokens)"),
    ("eos", "ended with eos"),
)


def _cell(text: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return "–" if text is None else str(text).replace("|", "\\|").replace("\n", " ") or "(empty)"


def data_section(stats: dict[str, Any]) -> list[str]:
    rows = [[k, v.get("examples"), v.get("prompts"), v.get("with_reference"), v.get("mle_targets"), v.get("prompt_tokens") or "–",
             v.get("target_tokens") or "–", ", ".join(f"{r}: {n}" for r, n in v.get("skipped", {}).items() if n) or "none"]
            for k, v in stats.items() if isinstance(v, dict) and "examples" in v]
    if not rows:
        return []
    tok = stats.get("tokenizer", {})
    return ["## Data", "", f"From `{stats.get('source', '?')}`. Tokenizer: {tok.get('kind', '?')}, {tok.get('vocab', '?')} tokens.", "",
            markdown_table(["split", "rows", "distinct prompts", "with reference", "MLE targets", "prompt tokens (mean)", "target tokens (mean)",
                            "skipped"], rows, digits=2), ""]


def training_plot(root: Path) -> Path | None:
    """``plots/training.png``: the prior's MLE loss and each tuning stage's task reward, where logged."""
    rows = read_metrics(root / "metrics.jsonl")
    prior = [r for r in rows if r.get("stage") == "prior"]
    stages = sorted({r["stage"] for r in rows if str(r.get("stage", "")).startswith("tune-")})
    panels = [p for p, ok in (("prior", bool(prior)), ("tune", bool(stages))) if ok]
    if not panels:
        return None
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "prior":
            for key in ("loss/train", "loss/val"):
                pts = [(r["step"], r[key]) for r in prior if r.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), label=key, marker="." if len(pts) < 30 else None)
            ax.set_title("MLE training of the prior")
            ax.set_ylabel("nats / token")
        else:
            for stage in stages:
                pts = [(r["step"], r["reward/task"]) for r in rows if r.get("stage") == stage and r.get("reward/task") is not None]
                if pts:
                    ax.plot(*zip(*pts), label=stage.removeprefix("tune-"), marker="." if len(pts) < 30 else None)
            ax.set_title("Fine-tuning: reward/task (batch mean)")
            ax.set_ylabel("reward")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    return save_fig(fig, root / "plots" / "training.png")


def training_section(root: Path) -> list[str]:
    rows = read_metrics(root / "metrics.jsonl")
    md: list[str] = []
    val = [r for r in rows if r.get("stage") == "prior" and "loss/val" in r]
    if val:
        v = val[-1]
        md += ["## Training", "", "The prior (MLE), last held-out evaluation:", "",
               markdown_table(["step", "held-out loss (nats/token)", "perplexity", "next-token accuracy"],
                              [[v["step"], v["loss/val"], v.get("ppl/val", float("nan")), v.get("acc/val", float("nan"))]]), ""]
    stages = sorted({r["stage"] for r in rows if str(r.get("stage", "")).startswith("tune-")})
    if stages:
        md += ([] if md else ["## Training", ""]) + ["Fine-tuning, batch means of the first and last tenth of the iterations "
                                                     "(`reward/task`: the run's reward, summed over a completion):", ""]
        table = []
        for stage in stages:
            rl = [r for r in rows if r.get("stage") == stage]
            k = max(1, len(rl) // 10)
            mean = lambda rs, c: sum(r.get(c, float("nan")) for r in rs) / len(rs)  # noqa: E731
            table.append([stage.removeprefix("tune-"), len(rl), mean(rl[:k], "reward/task"), mean(rl[-k:], "reward/task"),
                          mean(rl[:k], "kl/seq"), mean(rl[-k:], "kl/seq")])
        md += [markdown_table(["algorithm", "iterations", "reward first", "reward last", "KL / sequence first", "KL / sequence last"], table), ""]
    plot = training_plot(root)
    if plot is not None:
        md += [f"![training]({plot.relative_to(root)})", ""]
    return md


def evaluation_section(evaluation: dict[str, Any]) -> list[str]:
    rows = evaluation.get("rows", {})
    cols = [(k, h) for k, h in COLUMNS if any(k in r for r in rows.values())]
    temp = evaluation.get("temperature")
    md = ["## Evaluation", "",
          f"{evaluation.get('prompts')} held-out prompts, {evaluation.get('samples')} samples each at temperature {temp}"
          f"{' (greedy)' if temp == 0 else ''}; task reward: {evaluation.get('reward')}. KL to the prior is exact over the action space, "
          "per token of the model's own samples (eos included).", "",
          markdown_table(["model"] + [h for _, h in cols], [[n] + [r.get(k, float("nan")) for k, _ in cols] for n, r in rows.items()]), ""]
    ex = evaluation.get("examples", [])
    if ex:
        models = [k for k in ex[0] if k not in ("prompt", "reference")]
        md += ["## Examples", "", "The first sample of each model.", "",
               markdown_table(["prompt", "reference"] + models, [[_cell(e["prompt"]), _cell(e["reference"])] + [_cell(e[m]) for m in models] for e in ex]), ""]
    return md


def write_report(root: Path, evaluation: dict[str, Any], data_stats: dict[str, Any] | None = None) -> Path:
    """Write ``report.md``, ``eval.json`` and ``plots/training.png`` into the run folder ``root``."""
    md = ["# Text run report", ""]
    md += data_section(data_stats or {})
    md += training_section(root)
    md += evaluation_section(evaluation)
    cfg = root / "config.yaml"
    if cfg.is_file():
        md += ["## Resolved config", "", "```yaml", cfg.read_text(encoding="utf-8").rstrip(), "```", ""]
    out = root / "report.md"
    atomic_write_text(root / "eval.json", json.dumps(evaluation, indent=1))
    atomic_write_text(out, "\n".join(md))
    return out
