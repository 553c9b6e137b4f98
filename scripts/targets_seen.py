"""How many of a reward run's held-out target pairs some training rater also compared.

    python scripts/targets_seen.py RUN [RUN ...]

RUN is a ``rlhf train-reward`` run folder (``data/train.jsonl``, ``data/test.jsonl``,
``config.yaml``). The targets are the report's (:class:`reward_models.vpl.HeldOut` with the run's
``eval.context_pool`` and ``seed``); a target is *seen* when a training record has the same prompt
and the same two responses, in either order. Held-out raters are never in training, so a seen
target's label is the held-out rater's own; what the model may have learned is other raters'
labels on the same two pieces. Prints one JSON line per run: targets, seen share.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reward_models.data import comparable, load_preferences  # noqa: E402
from reward_models.vpl import HeldOut  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args(argv)
    for run in args.runs:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        train, test = load_preferences(run / "data/train.jsonl"), load_preferences(run / "data/test.jsonl")
        key = lambda r: (r.prompt, frozenset((r.chosen, r.rejected)))  # noqa: E731
        seen = {key(r) for r in train}
        recs = comparable(test)
        targets = [recs[i] for i in HeldOut.build(test, cfg["eval"]["context_pool"], cfg["seed"]).target_indices()]
        share = sum(key(r) in seen for r in targets) / max(len(targets), 1)
        print(json.dumps({"run": str(run), "targets": len(targets), "seen": round(share, 4)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
