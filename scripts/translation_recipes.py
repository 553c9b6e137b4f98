"""Train several translation priors side by side and tabulate their BLEU: the recipe screen.

    python scripts/translation_recipes.py OUT --variant base --variant "drop2 model.dropout=0.2" \
        [--variant "NAME key=value ..."] [--config configs/translation.yaml] [--parallel 4] [--beam 1]

Each variant is a name and the overrides it gives the config (``base`` alone = the config as
it is). For each: ``rlhf pretrain CONFIG run_dir=OUT/NAME OVERRIDES`` then ``rlhf evaluate
CONFIG run_dir=OUT/NAME OVERRIDES --model OUT/NAME/models/prior --out OUT/NAME/eval
task.eval.beam=BEAM`` (greedy on val and test; beam search too when BEAM > 1). ``--parallel``
variants run at once (each process gets cores / parallel threads). Last, a Markdown table
(val and test BLEU, length ratio, final val loss (loss/val), the pre-training's wall-clock minutes) is
printed and written with the figures to OUT/recipes.json. A variant whose eval.json exists is
not run again, so a second call resumes. Choose on the val columns only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from run_logged import RLHF, run_logged  # scripts/ is on sys.path as this script's folder


def run_variant(out: Path, name: str, overrides: list[str], config: str, beam: int, threads: int) -> dict:
    """Pre-train and evaluate one variant; its row of the table."""
    run = out / name
    ev = run / "eval" / "eval.json"
    log = out / f"{name}.log"
    common = [f"run_dir={run}", *overrides, "progress=false"]
    if not ev.exists():
        t0 = time.time()
        run_logged([*RLHF, "pretrain", config, *common], log, threads)
        (run / "pretrain_minutes.txt").write_text(f"{(time.time() - t0) / 60:.2f}\n")
        run_logged([*RLHF, "evaluate", config, *common, "--model", str(run / "models" / "prior"), "--out", str(run / "eval"), f"task.eval.beam={beam}"], log, threads)
    rows = json.loads(ev.read_text())["splits"]
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val_loss = [r["loss/val"] for r in losses if "loss/val" in r]
    minutes = run / "pretrain_minutes.txt"
    return {"name": name, "overrides": overrides,
            **{f"{s}/{k}": rows[s]["rows"]["prior"][k] for s in rows for k in ("bleu", "ratio", "bleu/beam") if k in rows[s]["rows"]["prior"]},
            "loss/val": val_loss[-1] if val_loss else None,
            "minutes": float(minutes.read_text()) if minutes.exists() else None}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--variant", action="append", required=True, help='"NAME key=value ..." (repeatable)')
    ap.add_argument("--config", default="configs/translation.yaml")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--beam", type=int, default=1)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    variants = [(v.split()[0], v.split()[1:]) for v in a.variant]
    threads = max(1, (os.cpu_count() or 1) // a.parallel)
    with ThreadPoolExecutor(a.parallel) as pool:
        futures = {name: pool.submit(run_variant, a.out, name, ov, a.config, a.beam, threads) for name, ov in variants}
    rows, failed = [], []
    for name, f in futures.items():
        try:
            rows.append(f.result())
        except SystemExit as e:  # run_logged: a failed command of this variant
            failed.append(f"{name}: {str(e).removeprefix('error: ')}")
    cols = [c for c in ("val/bleu", "val/bleu/beam", "test/bleu", "test/bleu/beam", "val/ratio", "test/ratio", "loss/val", "minutes")
            if any(r.get(c) is not None for r in rows)]
    lines = ["| variant | " + " | ".join(cols) + " | overrides |", "|" + "---|" * (len(cols) + 2)]
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else "–" for c in cols]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {' '.join(r['overrides']) or '(config)'} |")
    print("\n".join(lines))
    (a.out / "recipes.json").write_text(json.dumps({"rows": rows, "failed": failed}, indent=1))
    for f in failed:
        print("error:", f, file=sys.stderr)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
