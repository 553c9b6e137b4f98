"""Worker of ``tests/test_distributed.py``, run under ``accelerate launch`` (DDP or DeepSpeed):
trains the toy runs of ``toy.PARTS`` one after the other and, after every optimizer step,
gathers every rank's parameter checksum; rank 0 writes them to ``<out>/checksums.json``.

    accelerate launch --multi_gpu --num_processes 2 tests/dist_scripts/train.py OUT PRIOR bt ppo ...

``--die-rank R --die-after K``: rank R kills itself with SIGKILL after K optimizer steps (the
"one rank dies" test: the launcher must end the job, not hang).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: `dist_scripts` is a package
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

import torch  # noqa: E402

from dist_scripts import toy  # noqa: E402
from rlhf import distributed  # noqa: E402
from rlhf.trainer import TrainLoop  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("prior")
    ap.add_argument("parts", nargs="+", choices=toy.PARTS)
    ap.add_argument("--steps", type=int, default=None, help="override the part's steps")
    ap.add_argument("--die-rank", type=int, default=None)
    ap.add_argument("--die-after", type=int, default=2)
    ap.add_argument("--probe", action="store_true", help="bt: also write rank 0's rewards on a probe batch (checkpoint test)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pid-{distributed.env_rank()}").write_text(str(os.getpid()))  # the kill test checks that no rank outlives the job
    records: dict[str, list] = {}
    n_steps = {"n": 0}
    current = {"part": ""}  # records are keyed "<part>:<stage>" (an -s2s part repeats its twin's stages)
    loops: dict[str, TrainLoop] = {}
    real_step = TrainLoop.accumulate_step  # every optimizer step goes through it (optimizer_step too)

    def checked_step(self: TrainLoop, losses) -> tuple[float, dict[str, float]]:
        metrics = real_step(self, losses)
        n_steps["n"] += 1
        if args.die_rank is not None and distributed.rank() == args.die_rank and n_steps["n"] >= args.die_after:
            print(f"rank {args.die_rank}: killing myself (SIGKILL) after {n_steps['n']} optimizer steps", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        records.setdefault(f"{current['part']}:{self.stage}", []).append(distributed.gather_objects(distributed.checksum(self.unwrapped)))
        loops[self.stage] = self
        return metrics

    TrainLoop.accumulate_step = checked_step
    info = {"world_size": None, "distributed_type": None}
    for part in args.parts:
        current["part"] = part
        over = {"steps": args.steps} if args.steps else {}
        toy.run_part(part, out, Path(args.prior), **over)
        if args.probe and part == "bt":
            from reward_models.bradley_terry import rewards

            model = loops["reward-bt"].unwrapped.eval()  # the trained model as the job holds it (ZeRO-2: full copy per rank)
            ids, mask = toy.probe_batch(toy.word_tokenizer())
            with torch.no_grad():
                info["probe_live"] = rewards(model, ids, mask).tolist()
    from accelerate.state import PartialState

    state = PartialState()
    info.update(world_size=state.num_processes, distributed_type=str(state.distributed_type))
    if distributed.is_main_process():
        (out / "checksums.json").write_text(json.dumps({"info": info, "records": records}))


if __name__ == "__main__":
    main()
