"""Seconds per tuning iteration of a config, at one or more thread counts, and what that makes
of its iteration budget: how many iterations fit a given number of minutes; optionally with and
without glibc's huge pages for large tensors (apps/hugepages.py).

    python benchmarks/tune_iteration_time.py configs/counterpoint.yaml --prior runs/cp-prior/models/prior \
        [--threads 1 2] [--steps 120] [--warmup 20] [--minutes 15] [--hugepages 0 1] [OVERRIDE ...]

Each thread count (and each ``--hugepages`` setting, passed as ``RLHF_HUGEPAGES``) runs
``rlhf tune CONFIG tune.steps=STEPS`` in a fresh temporary run folder (OMP/MKL threads set), one
after the other, and times the iterations after the first WARMUP from the run's
``metrics.jsonl``. Other processes on the machine stretch the figures: run it on an idle
machine (``load_avg_1m`` is printed). Prints ONE JSON line: ``seconds_per_iteration`` and
``iterations_in_budget`` by thread count, ``configured_steps`` and ``configured_minutes`` (the
config's own tune.steps at those speeds), and ``cpu``: the whole process's CPU seconds in user
code and in the kernel (page faults land there) and its minor page faults, from ``getrusage``.
With two ``--hugepages`` settings the keys read ``"THREADS/hugepages=H"`` and
``ratio_hugepages`` gives, per thread count, seconds per iteration without / with them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def seconds_per_iteration(metrics: Path, warmup: int) -> float:
    """Mean wall seconds between consecutive logged tuning iterations after the first ``warmup``."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    times = [r["time"] for r in rows if str(r.get("stage", "")).startswith("tune") and "step" in r]
    if len(times) <= warmup + 1:
        raise SystemExit(f"error: {metrics} has {len(times)} tuning iterations; run more --steps than --warmup + 1 ({warmup + 1})")
    return (times[-1] - times[warmup]) / (len(times) - 1 - warmup)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    ap.add_argument("--prior", required=True, help="the prior's model folder (rlhf tune --prior)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--minutes", type=float, default=15.0, help="the budget to fit iterations into")
    ap.add_argument("--hugepages", choices=["0", "1"], nargs="+", default=["1"],
                    help="RLHF_HUGEPAGES for the runs: 1 is what the rlhf command does; '0 1' compares")
    args = ap.parse_args(argv)
    if args.steps < args.warmup + 2:
        ap.error(f"--steps {args.steps} leaves nothing to time after --warmup {args.warmup}: use --steps {args.warmup + 2} or more")
    sys.path.insert(0, str(REPO))
    from apps.pipeline import load_run_config

    configured = load_run_config(args.config, args.overrides).tune.steps
    out: dict[str, object] = {"config": args.config, "overrides": args.overrides, "steps_timed": args.steps - 1 - args.warmup,
                              "seconds_per_iteration": {}, "iterations_in_budget": {}, "configured_steps": configured, "configured_minutes": {}, "cpu": {}}
    settings = list(dict.fromkeys(args.hugepages))  # each setting once, in the order given
    for n in args.threads:
        for hp in settings:
            key = str(n) if len(settings) == 1 else f"{n}/hugepages={hp}"
            env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}  # the child decides, from RLHF_HUGEPAGES
            env.update(OMP_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n), RLHF_HUGEPAGES=hp)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, "-m", "apps.cli", "tune", args.config, *args.overrides, f"tune.steps={args.steps}", f"run_dir={tmp}/run",
                       "progress=false", "--prior", args.prior]
                done = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                if done.returncode != 0:
                    print(done.stderr[-2000:], file=sys.stderr)
                    return done.returncode
                s = seconds_per_iteration(Path(tmp) / "run" / "metrics.jsonl", args.warmup)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the finished child's totals, added on wait
            user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
            out["seconds_per_iteration"][key] = round(s, 4)
            out["iterations_in_budget"][key] = int(args.minutes * 60 / s)
            out["configured_minutes"][key] = round(configured * s / 60, 2)
            out["cpu"][key] = {"user_s": round(user, 1), "sys_s": round(system, 1), "sys_share": round(system / max(user + system, 1e-9), 3),
                               "minor_faults": after.ru_minflt - before.ru_minflt}
    if len(settings) == 2:
        spi = out["seconds_per_iteration"]
        out["ratio_hugepages"] = {str(n): round(spi[f"{n}/hugepages=0"] / spi[f"{n}/hugepages=1"], 3) for n in args.threads}
    out["load_avg_1m"] = os.getloadavg()[0]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
