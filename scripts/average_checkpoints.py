"""Average the weights of several checkpoints of one run into one model (tail averaging).

    python scripts/average_checkpoints.py OUT CHECKPOINT...

θ̄ = (1/n) Σ_i θ_i over the given save_pretrained folders (e.g. the step-* checkpoints of a tune
run with ``tune.keep_checkpoints`` large enough to keep them): stochastic weight averaging done
after the fact (Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima and Better
Generalization"). The iterates of an RL run scatter around the direction it moves in; their
mean keeps the direction and drops part of the scatter. The checkpoints must share one
architecture; OUT gets the config and tokenizer of the last one and is written atomically.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from run_logged import REPO  # scripts/ is on sys.path as this script's folder


def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of state dicts with the same keys and shapes (summed in float64)."""
    keys = set(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != keys or any(s[k].shape != states[0][k].shape for k in keys):
            raise SystemExit(f"checkpoint {i + 1} has other tensors than the first: average checkpoints of one run only")
    return {k: (sum(s[k].double() for s in states) / len(states)).to(states[0][k].dtype) for k in states[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("checkpoints", type=Path, nargs="+")
    args = ap.parse_args(argv)
    for c in args.checkpoints:
        if not (c / "model.safetensors").is_file():
            raise SystemExit(f"{c}: no model.safetensors; pass save_pretrained folders (a tune run's checkpoints/<stage>/step-* folders)")
    sys.path.insert(0, str(REPO))
    from rlhf.runs import atomic_dir

    avg = average([load_file(str(c / "model.safetensors")) for c in args.checkpoints])
    last = args.checkpoints[-1]

    def write(tmp: Path) -> None:
        for f in last.iterdir():  # config, generation config, tokenizer; not the trainer's resume state
            if f.is_file() and f.name not in ("model.safetensors", "trainer_state.pt"):
                shutil.copy(f, tmp / f.name)
        save_file(avg, str(tmp / "model.safetensors"), metadata={"format": "pt"})

    atomic_dir(args.out, write)
    print(f"{args.out}: the mean of {len(args.checkpoints)} checkpoints")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
