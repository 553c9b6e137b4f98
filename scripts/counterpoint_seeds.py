"""Tune one counterpoint prior with several seeds and tabulate the held-out evaluation.

    python scripts/counterpoint_seeds.py OUT [--seeds 0 1 2 3 4] [--prior DIR] [--parallel 2] [--config configs/counterpoint.yaml] [key=value ...]

Without ``--prior`` the prior is trained first (``rlhf pretrain`` with seed 0, into OUT/prior).
Then, for each seed S: ``rlhf tune CONFIG seed=S run_dir=OUT/seed-S --prior P`` and
``rlhf evaluate CONFIG --model OUT/seed-S/models/<algorithm> --prior P --out OUT/seed-S/eval``,
``--parallel`` seeds at a time with one thread each (two runs on two cores, one on each, are
faster together than one after the other with two threads). Overrides go to every command.
Last, ``scripts/seed_table.py`` prints the per-seed table with mean ± std and writes
OUT/seeds.json. Each step is skipped when its output exists, so a second call resumes.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from run_logged import REPO, RLHF, run_logged  # scripts/ is on sys.path as this script's folder


def _algorithm(config: str, overrides: list[str]) -> str:
    sys.path.insert(0, str(REPO))
    from apps.pipeline import load_run_config

    cfg = load_run_config(config, overrides)
    assert cfg.tune is not None, "the config has tune: null"
    return cfg.tune.algorithm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every command")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--prior", type=Path, default=None)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--config", default="configs/counterpoint.yaml")
    args = ap.parse_intermixed_args(argv)  # key=value overrides before or after the flags
    out = args.out.resolve()
    ov = [*args.overrides, "progress=false"]
    prior = args.prior.resolve() if args.prior else out / "prior" / "models" / "prior"
    if not (prior / "config.json").is_file():
        run_logged([*RLHF, "pretrain", args.config, "seed=0", f"run_dir={out / 'prior'}", *ov], out / "prior.log", threads=os.cpu_count() or 1)
    alg = _algorithm(args.config, args.overrides)

    def one(seed: int) -> None:
        run = out / f"seed-{seed}"
        model = run / "models" / alg
        if not (model / "config.json").is_file():
            run_logged([*RLHF, "tune", args.config, f"seed={seed}", f"run_dir={run}", "--prior", str(prior), "--resume", *ov], run / "log.txt", 1)
        if not (run / "eval" / "eval.json").is_file():
            run_logged([*RLHF, "evaluate", args.config, f"seed={seed}", "--model", str(model), "--prior", str(prior), "--out", str(run / "eval"), *ov],
                 run / "log.txt", 1)

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        list(pool.map(one, args.seeds))
    from seed_table import main as table  # scripts/ is on sys.path as this script's folder

    return table([str(out / f"seed-{s}" / "eval") for s in args.seeds] + ["--json", str(out / "seeds.json")])


if __name__ == "__main__":
    raise SystemExit(main())
