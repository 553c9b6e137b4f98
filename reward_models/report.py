"""Markdown + PNG report of a reward-model run (``report.md`` and ``plots/`` in the run folder).

Tables: held-out accuracy of BT and VPL on agreed and disputed pairs per rater group with the
ceilings; VPL accuracy against context size; calibration. Plots: accuracy vs context size, the
KL term and active latent units over training, training losses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf.report import markdown_table, plot_curves, save_fig
from rlhf.runs import Run, atomic_write_text, read_metrics

NAN = float("nan")


def _final(m: dict[str, Any], context: int | None = None) -> dict[str, Any]:
    """The breakdown of a method: BT's own, VPL's at ``context`` (default: the largest)."""
    if m["kind"] == "bt":
        return m
    ks = sorted(m["by_context"], key=int)
    return m["by_context"][str(context) if context is not None and str(context) in m["by_context"] else ks[-1]]


def _status(value: float, target: float, above: bool = True) -> str:
    if value != value:
        return "–"
    return "met" if (value >= target if above else value <= target) else "not met"


def headline(result: dict[str, Any]) -> list[tuple[str, float, str, str]]:
    """(claim, value, target, status) rows of the issue's targets."""
    rows = []
    methods = result["methods"]
    bt = methods.get("bt")
    vpl = methods.get("vpl")
    ceil = result.get("ceilings", {})
    if bt is not None and "by_kind" in bt:
        d = bt["by_kind"].get("disputed", NAN)
        best = ceil.get("bt_features", {}).get("disputed")
        if best is None:
            rows.append(("BT accuracy on disputed pairs", d, f"≈ ceiling {ceil.get('bt_ceiling_disputed', NAN):.3f}", "by construction"))
        else:  # the reference a BT reward can reach: BT's own likelihood on the true features (evaluate.py: bt_features)
            rows.append(("BT accuracy on disputed pairs", d, f"within 0.03 of the features' BT, {best:.3f} (majority {ceil.get('bt_ceiling_disputed', NAN):.3f})",
                         "met" if d >= best - 0.03 else "not met"))
        rows.append(("BT accuracy on agreed pairs", bt["by_kind"].get("agreed", NAN), "≥ 0.95", _status(bt["by_kind"].get("agreed", NAN), 0.95)))
    if vpl is not None:
        k = "8" if "8" in vpl["by_context"] else max(vpl["by_context"], key=int)
        f = vpl["by_context"][k]
        if "by_kind" in f:
            worst = worst_disputed(f)
            rows.append((f"VPL accuracy on disputed pairs, worst group (context {k})", worst, "≥ 0.90", _status(worst, 0.90)))
            rows.append((f"VPL accuracy on agreed pairs (context {k})", f["by_kind"].get("agreed", NAN), "≥ 0.95", _status(f["by_kind"].get("agreed", NAN), 0.95)))
        if "by_context_active" in vpl:
            need = {how: pairs_to_reach(vpl[key], 0.90) for how, key in (("active", "by_context_active"), ("random", "by_context"))}
            rows.append(("context pairs for 0.90 on every group's disputed pairs: active / random", NAN,
                         f"{_fmt_need(need['active'])} / {_fmt_need(need['random'])}", "active fewer" if need["active"] < need["random"] else "not fewer"))
    return rows


def worst_disputed(f: dict[str, Any]) -> float:
    """The lowest accuracy on disputed pairs over the rater groups (NaN without kinds)."""
    vals = [v for k, v in f.get("by_group_kind", {}).items() if k.endswith("/disputed")]
    return min(vals) if vals else NAN


def pairs_to_reach(curve: dict[str, Any], target: float) -> float:
    """The smallest context size whose worst-group disputed accuracy reaches ``target`` (inf if none)."""
    ok = [int(k) for k, f in curve.items() if worst_disputed(f) >= target]
    return float(min(ok)) if ok else float("inf")


def _fmt_need(x: float) -> str:
    return "never" if x == float("inf") else str(int(x))


def active_table(result: dict[str, Any]) -> str:
    """Worst-group and per-group disputed accuracy against context size, pairs chosen at random
    and by expected information gain."""
    vpl = result["methods"].get("vpl")
    if vpl is None or "by_context_active" not in vpl:
        return ""
    ks = sorted(vpl["by_context"], key=int)
    groups = sorted(k.split("/")[0] for k in vpl["by_context"][ks[0]].get("by_group_kind", {}) if k.endswith("/disputed"))
    rows = []
    for k in ks:
        r, a = vpl["by_context"][k], vpl["by_context_active"][k]
        rows.append([int(k), worst_disputed(r), worst_disputed(a)] + [x["by_group_kind"][f"{g}/disputed"] for g in groups for x in (r, a)]
                    + [r["by_kind"].get("agreed", NAN), a["by_kind"].get("agreed", NAN)])
    head = ["context pairs", "worst group, random", "worst group, active"] + [f"{g} disputed, {how}" for g in groups for how in ("random", "active")]
    return markdown_table(head + ["agreed, random", "agreed, active"], rows)


def plot_active(result: dict[str, Any], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    vpl = result["methods"].get("vpl")
    if vpl is None or "by_context_active" not in vpl:
        return None
    ks = sorted(vpl["by_context"], key=int)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for how, key, style in (("random", "by_context", "--"), ("active (EIG)", "by_context_active", "-")):
        ax.plot([int(k) for k in ks], [worst_disputed(vpl[key][k]) for k in ks], style, marker="o", label=f"{how}: worst group")
    ax.axhline(0.9, color="grey", lw=1)
    _context_axes(ax, ks, "accuracy on disputed pairs", "VPL: actively chosen vs random context pairs", legend_size=8)
    return save_fig(fig, path)


def _context_axes(ax: Any, ks: list[str], ylabel: str, title: str, legend_size: int) -> None:
    """The accuracy-against-context-size axes: a log-like x axis at the context sizes."""
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks([int(k) for k in ks])
    ax.set_xticklabels(ks)
    ax.set_xlabel("labelled context pairs of the held-out rater")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, loc="lower right")
    ax.set_title(title)


def group_kind_table(result: dict[str, Any]) -> str:
    methods = result["methods"]
    keys = sorted({k for m in methods.values() for k in _final(m).get("by_group_kind", {})})
    if not keys:
        keys = sorted({k for m in methods.values() for k in _final(m).get("by_group", {})})
        field = "by_group"
    else:
        field = "by_group_kind"
    header = ["method"] + [k.replace("/", " · ") for k in keys] + ["all"]
    rows = []
    for name, m in methods.items():
        f = _final(m)
        label = name if m["kind"] == "bt" else f"{name} (context {max(m['by_context'], key=int)})"
        rows.append([label] + [f.get(field, {}).get(k, NAN) for k in keys] + [f["overall"]["acc/test"]])
    ceil = result.get("ceilings", {})
    if ceil.get("noise_ceiling_by_kind") and field == "by_group_kind":
        nk = ceil["noise_ceiling_by_kind"]
        rows.append(["noise ceiling"] + [nk.get(k.split("/")[-1], NAN) for k in keys] + [ceil["noise_ceiling"]])
    return markdown_table(header, rows)


def context_table(result: dict[str, Any]) -> str:
    vpl = result["methods"].get("vpl")
    if vpl is None:
        return ""
    ks = sorted(vpl["by_context"], key=int)
    first = vpl["by_context"][ks[0]]
    cols = ["all"] + [f"kind {k}" for k in sorted(first.get("by_kind", {}))] + [f"group {g}" for g in sorted(first.get("by_group", {}))]
    rows = []
    for k in ks:
        f = vpl["by_context"][k]
        row = [int(k), f["overall"]["acc/test"]] + [f["by_kind"][x] for x in sorted(f.get("by_kind", {}))] + [f["by_group"][g] for g in sorted(f.get("by_group", {}))]
        rows.append(row + [f["active_units"]])
    bt = result["methods"].get("bt")
    if bt is not None:
        rows.append(["BT (any)", bt["overall"]["acc/test"]] + [bt.get("by_kind", {}).get(x, NAN) for x in sorted(first.get("by_kind", {}))]
                    + [bt["by_group"].get(g, NAN) for g in sorted(first.get("by_group", {}))] + ["–"])
    return markdown_table(["context pairs"] + cols + ["active units"], rows)


def calibration_table(result: dict[str, Any]) -> str:
    rows = []
    for name, m in result["methods"].items():
        if m["kind"] == "bt":
            rows.append([name, *(m["overall"][k] for k in ("acc/test", "logloss/test", "ece/test", "pairs/test"))])
        else:
            for k in sorted(m["by_context"], key=int):
                o = m["by_context"][k]["overall"]
                rows.append([f"{name} context {k}", *(o[x] for x in ("acc/test", "logloss/test", "ece/test", "pairs/test"))])
    return markdown_table(["model", "accuracy", "log-loss (nats)", "ECE (10 bins)", "pairs"], rows)


def plot_context(result: dict[str, Any], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    vpl = result["methods"].get("vpl")
    if vpl is None:
        return None
    ks = sorted(vpl["by_context"], key=int)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    series = {"all": lambda f: f["overall"]["acc/test"]}
    for kind in sorted(vpl["by_context"][ks[0]].get("by_kind", {})):
        series[kind] = lambda f, kind=kind: f["by_kind"][kind]
    for g in sorted(vpl["by_context"][ks[0]].get("by_group", {})):
        series[f"group {g}"] = lambda f, g=g: f["by_group"][g]
    for label, get in series.items():
        ax.plot([int(k) for k in ks], [get(vpl["by_context"][k]) for k in ks], marker="o", label=f"VPL {label}")
    bt = result["methods"].get("bt")
    if bt is not None:
        for kind, v in bt.get("by_kind", {}).items():
            ax.axhline(v, ls="--", lw=1, color="grey")
            ax.text(int(ks[-1]), v, f" BT {kind}", va="center", fontsize=8)
    _context_axes(ax, ks, "pairwise accuracy", "Accuracy on held-out raters vs context size", legend_size=7)
    return save_fig(fig, path)


def _inference(method: dict[str, Any]) -> str:
    if method.get("inference") == "bank":
        return (f"the posterior mean over a bank of {method.get('bank_size')} training raters' latents, weighed by the decoder's BT "
                "likelihood of the context pairs (no context: the bank's mean)")
    return "the encoder's mean μ(C) (no context: 0)"


def write_report(run: Run, result: dict[str, Any]) -> Path:
    rows = read_metrics(run.root / "metrics.jsonl")
    plots = run.root / "plots"
    made = {
        "context": plot_context(result, plots / "accuracy_vs_context.png"),
        "active": plot_active(result, plots / "active_queries.png"),
        "kl": plot_curves([r for r in rows if r.get("stage") == "reward-vpl"], ["vpl/kl", "vpl/active_units"], plots / "vpl_kl.png",
                          "VPL: KL(q(z|C) ‖ N(0,I)) per rater and active units"),
        "bt": plot_curves([r for r in rows if r.get("stage") == "reward-bt"], ["loss/bt", "logloss/val"], plots / "bt_loss.png", "BT: training and held-out log-loss", "nats"),
        "vpl_loss": plot_curves([r for r in rows if r.get("stage") == "reward-vpl"], ["loss/bt", "logloss/val_ctx8", "logloss/val_ctx0"], plots / "vpl_loss.png",
                                "VPL: target NLL (train) and held-out log-loss", "nats"),
    }
    d = result.get("data", {})
    p = result["protocol"]
    ceil = result.get("ceilings", {})
    lines = [
        "# Reward models from pairwise preferences",
        "",
        f"Data `{d.get('path', '?')}`: {d.get('records', '?')} records ({d.get('ties', 0)} ties, left out of BT), split by {d.get('split_by')}: "
        f"{d.get('train')} train ({d.get('train_raters')} raters), {d.get('test')} test ({d.get('test_raters')} raters), {d.get('dropped')} dropped (mixed). "
        f"Held-out protocol: {p['held_out_raters']} raters, the first {p['context_pool']} of each rater's pairs are its context pool, "
        f"the other {p['targets']} pairs are the targets every method is scored on.",
        "",
    ]
    hl = headline(result)
    if hl:
        lines += ["## Targets", "", markdown_table(["claim", "value", "target", "status"], hl), ""]
    if ceil:
        follow = ceil.get("disputed_accuracy_if_following", {})
        share = ceil.get("disputed_share_by_group", {})
        lines += [
            "## Ceilings",
            "",
            f"* BT ceiling on disputed pairs: **{ceil.get('bt_ceiling_disputed', NAN):.3f}** -- a reward without a rater variable orders a "
            "disputed pair one way for everyone; following one group's prototype scores "
            + ", ".join(f"{g}: {v:.3f}" for g, v in follow.items())
            + f" (share of disputed targets by group: {', '.join(f'{g} {v:.2f}' for g, v in share.items())}).",
            *([f"* BT on the simulator's own features (the linear reward fitted by BT's likelihood on the {ceil['bt_features']['pairs']} training pairs): "
               + ", ".join(f"{k} {v:.3f}" for k, v in ceil["bt_features"].items() if k in ("agreed", "disputed"))
               + " -- the best a BT reward can do; on disputed pairs the likelihood weighs the minority's labels, so it stays below the majority's ceiling."]
              if "bt_features" in ceil else []),
            f"* Noise ceiling (labels agreeing with the rater's own noiseless utility): {ceil['noise_ceiling']:.3f} overall, "
            + ", ".join(f"{k} {v:.3f}" for k, v in ceil.get("noise_ceiling_by_kind", {}).items()) + ".",
            "",
        ]
    lines += ["## Held-out accuracy by rater group and pair kind", "", group_kind_table(result), ""]
    ct = context_table(result)
    if ct:
        how = [f"z of a rater: {_inference(m)}." for m in result["methods"].values() if m.get("kind") == "vpl"]
        lines += ["## VPL: accuracy vs context size", "", *how, *([""] if how else []), ct, ""]
    at = active_table(result)
    if at:
        lines += ["## VPL: actively chosen context pairs", "",
                  "Each held-out rater's context pairs come from the same pool, in random order or chosen one at a time by expected "
                  "information gain about z (reward_models/active.py); accuracy on disputed pairs of the worst group and of each group.", "",
                  at, ""]
    lines += ["## Calibration", "", calibration_table(result), ""]
    lines += ["## Plots", ""]
    for key, title in (("context", "accuracy vs context size"), ("active", "active vs random context pairs"), ("kl", "VPL KL term and active units"), ("bt", "BT losses"), ("vpl_loss", "VPL losses")):
        if made[key] is not None:
            lines.append(f"![{title}](plots/{made[key].name})")
    path = run.root / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
