"""The translation run's report: data, prior training, RL curves, BLEU tables, examples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhf.report import fmt, markdown_table, plot_curves
from rlhf.runs import atomic_write_text, read_metrics

# (key in an evaluation row, column header); see TranslationTask.score_split for definitions
COLUMNS = (
    ("bleu", "BLEU greedy"),
    ("bleu/beam", "BLEU beam"),
    ("ratio", "length ratio greedy"),
    ("ratio/beam", "length ratio beam"),
    ("reward/sentence", "sentence BLEU/100 (reward)"),
    ("kl/prior", "KL to prior / token"),
    ("eos", "share ended with `<eos>`"),
    ("vocab", "distinct words"),
)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root))


def data_section(stats: dict[str, Any]) -> list[str]:
    """Sizes and skips of the corpus."""
    rows = [[k, v.get("examples", "–"), v.get("src_tokens", "–"), v.get("tgt_tokens", "–"), v.get("tokens_per_word", "–"),
             ", ".join(f"{r}: {n}" for r, n in v.get("skipped", {}).items() if n) or "none"]
            for k, v in stats.items() if isinstance(v, dict) and "examples" in v]
    if not rows:
        return []
    tok = stats.get("tokenizer", {})
    held = (f" RL samples its sources from {stats['rl_holdout']} training pairs held out of the tokenizer and of pre-training"
            " (the train row counts the rest).") if stats.get("rl_holdout") else ""
    return ["## Data", "", f"Tokenizer: {tok.get('kind', '?')}, {tok.get('vocab', '?')} tokens.{held}", "",
            markdown_table(["split", "pairs", "source tokens", "target tokens", "tokens / word", "skipped"], rows), ""]


def training_sections(root: Path) -> list[str]:
    """Prior loss curve and, per tuning stage, reward / KL / β curves with first-vs-last means."""
    md: list[str] = []
    plots = root / "plots"
    prior = read_metrics(root / "metrics.jsonl", stage="prior")
    if prior:
        md += ["## The prior (MLE)", ""]
        val = [r for r in prior if "loss/val" in r]
        if val:
            v = val[-1]
            minutes = (prior[-1]["time"] - prior[0]["time"]) / 60
            md += [markdown_table(["held-out loss (nats/token)", "perplexity", "next-token accuracy", "steps", "minutes"],
                                  [[v["loss/val"], v["ppl/val"], v["acc/val"], v["step"], minutes]]), ""]
        p = plot_curves(prior, ["loss/train", "loss/val"], plots / "prior_loss.png", "MLE training of the prior", "nats / token")
        if p:
            md += [f"![prior loss]({_rel(p, root)})", ""]
    rows = read_metrics(root / "metrics.jsonl")
    for stage in sorted({r["stage"] for r in rows if str(r.get("stage", "")).startswith("tune-")}):
        rl = [r for r in rows if r["stage"] == stage]
        alg = stage.removeprefix("tune-")
        md += [f"## Fine-tuning: {alg}", "", f"{len(rl)} iterations. Task reward (`task.reward` in config.yaml: sentence BLEU/100, or its mix with chrF/100) and KL to the prior per sentence (batch means), β.", ""]
        for key, name, ylabel in (("reward/task", "reward", "task reward (BLEU / chrF mix, /100)"), ("kl/seq", "kl", "KL(π‖prior) / sentence (nats)"), ("kl/coef", "beta", "β")):
            p = plot_curves(rl, [key], plots / f"{stage}_{name}.png", f"{alg}: {key}", ylabel)
            if p:
                md += [f"![{alg} {name}]({_rel(p, root)})", ""]
        k = max(1, len(rl) // 10)
        keys = [c for c in ("reward/task", "kl/seq", "logp/prior") if c in rl[0]]
        mean = lambda rs, c: sum(r[c] for r in rs) / len(rs)  # noqa: E731
        md += [markdown_table([""] + keys, [[f"first {k} iterations"] + [mean(rl[:k], c) for c in keys],
                                            [f"last {k} iterations"] + [mean(rl[-k:], c) for c in keys]]), ""]
    return md


def ablation_note(rows: dict[str, dict[str, float]]) -> list[str]:
    """What the KL term prevents: the β = 0 run against the smallest positive β of a sweep."""
    sweep = {float(n.rsplit("-beta", 1)[1]): n for n in rows if "-beta" in n}
    if 0.0 not in sweep or len(sweep) < 2 or "prior" not in rows:
        return []
    off, on = rows[sweep[0.0]], rows[sweep[min(b for b in sweep if b > 0)]]
    p = rows["prior"]
    pick = lambda r, k: fmt(r.get(k, float("nan")))  # noqa: E731
    return [f"**Without the KL term (β = 0) vs with it (β = {min(b for b in sweep if b > 0):g}) vs the prior:** "
            f"BLEU {pick(off, 'bleu')} / {pick(on, 'bleu')} / {pick(p, 'bleu')}; length ratio {pick(off, 'ratio')} / {pick(on, 'ratio')} / {pick(p, 'ratio')}; "
            f"distinct words {pick(off, 'vocab')} / {pick(on, 'vocab')} / {pick(p, 'vocab')}; KL to the prior per token {pick(off, 'kl/prior')} / {pick(on, 'kl/prior')}.", ""]


def evaluation_section(evaluation: dict[str, Any]) -> list[str]:
    """One BLEU table per split, the sacrebleu signature, and the examples side by side."""
    md = ["## Evaluation", "",
          f"Corpus BLEU with sacrebleu (`{evaluation['signature']}`), greedy and beam search (beam {evaluation['beam']}); "
          "the length ratio is hypothesis/reference length in 13a words; KL to the prior is exact over the action space, "
          "per token of the model's own greedy translation (`<eos>` included).", ""]
    for key, split in evaluation["splits"].items():
        rows = split["rows"]
        cols = [(k, h) for k, h in COLUMNS if any(k in r for r in rows.values())]
        md += [f"### {split['split']} ({split['sentences']} sentences; the references use {int(split['reference_vocab'])} distinct words)", "",
               markdown_table(["model"] + [h for _, h in cols], [[n] + [r.get(k, float("nan")) for k, _ in cols] for n, r in rows.items()], digits=3), ""]
        md += ablation_note(rows)
    ex = evaluation.get("examples", [])
    if ex:
        models = [k for k in ex[0] if k not in ("src", "ref")]
        md += ["## Examples", "", markdown_table(["source", "reference"] + models, [[_cell(e["src"]), _cell(e["ref"])] + [_cell(e[m]) for m in models] for e in ex]), ""]
    return md


def write_report(root: Path, evaluation: dict[str, Any], data_stats: dict[str, Any] | None = None) -> Path:
    """Write ``report.md`` (and ``eval.json``, plots) into the run folder ``root``."""
    md = ["# Translation run report", ""]
    md += data_section(data_stats or {})
    md += training_sections(root)
    md += evaluation_section(evaluation)
    cfg = root / "config.yaml"
    if cfg.is_file():
        md += ["## Resolved config", "", "```yaml", cfg.read_text().rstrip(), "```", ""]
    out = root / "report.md"
    atomic_write_text(out, "\n".join(md))
    atomic_write_text(root / "eval.json", json.dumps(evaluation, indent=1))
    return out
