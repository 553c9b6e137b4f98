"""Report building blocks: Markdown tables and PNG plots (matplotlib, headless)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if v != 0 and (abs(v) < 10 ** -digits or abs(v) >= 10**5):
            return f"{v:.{digits}g}"
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c, digits) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def save_fig(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_curves(rows: Sequence[dict[str, Any]], keys: Sequence[str], path: Path, title: str, ylabel: str = "") -> Path | None:
    """Line plot of metric ``keys`` against ``step`` from metrics.jsonl rows."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    drawn = False
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=key, marker="." if len(pts) < 30 else None)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_fig(fig, path)


def plot_bars(groups: dict[str, dict[str, float]], path: Path, title: str, xlabel: str) -> Path:
    """Horizontal grouped bars: one group per category (y), one bar per series (legend)."""
    series = list(groups)
    cats = sorted({c for g in groups.values() for c in g})
    fig, ax = plt.subplots(figsize=(7.0, 0.16 * len(cats) * max(1, len(series)) + 1.5))
    h = 0.8 / max(len(series), 1)
    for i, s in enumerate(series):
        ys = [j + i * h for j in range(len(cats))]
        ax.barh(ys, [groups[s].get(c, 0.0) for c in cats], height=h, label=s)
    ax.set_yticks([j + h * (len(series) - 1) / 2 for j in range(len(cats))])
    ax.set_yticklabels(cats, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    return save_fig(fig, path)
