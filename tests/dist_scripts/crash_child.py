"""Child of ``tests/test_crash_resume.py``: trains one toy stage (``tests/dist_scripts/toy.py``)
in a run folder, either uninterrupted, or killing itself with SIGKILL at a point drawn from a
seed, or resuming what a killed run left.

    crash_child.py run STAGE RUN_DIR PRIORS --seed S [--kill step|checkpoint] [--resume]
    crash_child.py priors PRIORS          # the toy GPT-2 and Marian priors the tune stages start from
    crash_child.py serve                  # fork server: one JSON request per stdin line (below)

STAGE is ``pretrain``, ``bt``, ``vpl``, or a tune algorithm (``ppo rloo mrt q psi g``), with
``-s2s`` for the encoder–decoder (Marian) toy. ``--kill step`` dies right after optimizer step
k; ``--kill checkpoint`` dies inside the n-th checkpoint write (``atomic_dir``), after the
weights and the trainer state are in the ``.tmp-*`` folder and before its rename. k and n come from
``random.Random(seed)``; what was drawn is written to ``RUN_DIR/../kill.json`` first.

The kill hooks wrap ``TrainLoop.accumulate_step`` (every optimizer step goes through it) and
``rlhf.trainer.atomic_dir`` in this process only: the library carries no test hooks.

``serve`` exists because starting Python with torch and transformers takes ~4 s here and the
test needs three runs per stage. It imports everything once, runs no torch op itself, and
``fork``s a child per request, so every run (a resume included) still happens in a process of
its own that shares nothing with the killed one but the run folder. A request is
``{"argv": [...], "log": path}``; the answer ``{"returncode": rc}`` uses subprocess's
convention (-9: killed by SIGKILL).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: `dist_scripts` is a package
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

import torch  # noqa: E402

import rlhf.trainer  # noqa: E402
from dist_scripts import toy  # noqa: E402
from reward_models.backbone import build_backbone  # noqa: E402
from reward_models.bradley_terry import train_bt  # noqa: E402
from reward_models.vpl import build_vpl, train_vpl  # noqa: E402
from rlhf.models import build_model  # noqa: E402
from rlhf.pretrain import pretrain  # noqa: E402
from rlhf.runs import Run  # noqa: E402
from rlhf.trainer import TrainLoop  # noqa: E402
from rlhf.tune import tune  # noqa: E402
from tasks.counterpoint.tokens import build_codec  # noqa: E402

STEPS, EVERY = 6, 2  # training steps of every stage, checkpoint every EVERY: step-2, step-4, then finish() writes step-6
ALGORITHMS = ("ppo", "rloo", "mrt", "q", "psi", "g")
STAGES = ("pretrain", "pretrain-s2s", *ALGORITHMS, *(f"{a}-s2s" for a in ALGORITHMS), "bt", "vpl")
SHORT = {"steps": STEPS, "checkpoint_every": EVERY}


def stage_name(stage: str) -> str:
    """The TrainLoop stage (metrics rows, checkpoints/<stage>)."""
    base = stage.removesuffix("-s2s")
    return {"pretrain": "prior", "bt": "reward-bt", "vpl": "reward-vpl"}.get(base, f"tune-{base}")


def final_name(stage: str) -> str:
    """The folder under models/ that holds the finished model."""
    base = stage.removesuffix("-s2s")
    return {"pretrain": "prior", "bt": "reward-bt", "vpl": "reward-vpl"}.get(base, base)


def tune_cfg(algorithm: str):
    # toy.tune_config: the small settings of the multi-process tests (PPO: 2 epochs x 2
    # minibatches and no early stop; Q/Ψ/G: 2 updates per iteration from a replay buffer; adaptive β)
    return toy.tune_config(algorithm, **SHORT)


def optimizer_steps_per_iteration(stage: str) -> int:
    base = stage.removesuffix("-s2s")
    if base not in ALGORITHMS:
        return 1
    s = tune_cfg(base).settings
    return {"ppo": lambda: s.epochs * s.minibatches, "rloo": lambda: s.epochs}.get(base, lambda: getattr(s, "updates_per_step", 1))()


def checkpoint_writes() -> int:
    """Checkpoint folders a run writes (atomic_dir calls 1..n): those inside the loop and
    finish()'s last one; call n + 1 is the final model folder."""
    return len(range(EVERY, STEPS, EVERY)) + 1


def draw_kill(mode: str, seed: int, stage: str) -> dict:
    """Where to die. Both draws leave a checkpoint before the kill (k after the first
    checkpoint, n >= 2), so the resume restores state instead of starting over, and both leave
    training steps to redo (n is a checkpoint, not the final model folder)."""
    rng = random.Random(seed)
    if mode == "step":
        per = optimizer_steps_per_iteration(stage)
        return {"mode": mode, "optimizer_step": rng.randint(EVERY * per + 1, STEPS * per), "per_iteration": per}
    return {"mode": mode, "write": rng.randint(2, checkpoint_writes())}


def install_kill(kill: dict, out: Path) -> None:
    def die(where: str) -> None:
        out.write_text(json.dumps({**kill, "where": where}))
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if kill["mode"] == "step":
        real_step = TrainLoop.accumulate_step
        count = {"n": 0}

        def step_then_die(self, losses):
            result = real_step(self, losses)
            count["n"] += 1
            if count["n"] == kill["optimizer_step"]:  # weights moved in memory, not yet on disk
                die(f"after optimizer step {count['n']} (training step {self.step + 1} in progress)")
            return result

        TrainLoop.accumulate_step = step_then_die
    else:
        real_atomic = rlhf.trainer.atomic_dir
        count = {"n": 0}

        def atomic_then_die(target, write):
            count["n"] += 1

            def write_then_die(tmp):
                write(tmp)
                if count["n"] == kill["write"]:  # everything is in tmp; the rename never happens
                    die(f"in write {count['n']} ({target.parent.name}/{target.name}), before the rename of {tmp.name}")

            return real_atomic(target, write_then_die)

        rlhf.trainer.atomic_dir = atomic_then_die


def run_stage(stage: str, root: Path, priors: Path, seed: int, resume: bool) -> Path:
    """Train ``stage`` in the run folder ``root``; returns the final model folder."""
    run = Run(root)
    base, arch = stage.removesuffix("-s2s"), "marian" if stage.endswith("-s2s") else "gpt2"
    if base == "pretrain":
        codec = build_codec("melody")
        torch.manual_seed(toy.SEED)
        model = build_model(toy.TINY.model_copy(update={"arch": arch}), codec.tokenizer)
        return pretrain(run, toy.PRETRAIN.model_copy(update=SHORT), model, codec.tokenizer, toy.pretrain_examples(codec), [],
                        seed=seed, resume=resume, progress=False)
    if base == "bt":
        tok = toy.word_tokenizer()
        return train_bt(run, toy.BT.model_copy(update=SHORT), toy.bt_model(tok), tok, toy.bt_records(), seed=seed, resume=resume, progress=False)
    if base == "vpl":
        tok = toy.word_tokenizer()
        torch.manual_seed(toy.SEED)
        v = toy.VPL.model_copy(update=SHORT)
        model = build_vpl(build_backbone(toy.TINY, tok), v.latent_dim, v.pair_hidden, v.head_hidden, v.pooling)
        return train_vpl(run, v, model, tok, toy.bt_records(), seed=seed, resume=resume, progress=False)
    prior = priors / ("prior-s2s" if arch == "marian" else "prior")
    return tune(run, tune_cfg(base), toy.ToyTask(), prior, seed=seed, resume=resume, progress=False)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("stage", choices=STAGES)
    r.add_argument("root", type=Path)
    r.add_argument("priors", type=Path)
    r.add_argument("--seed", type=int, required=True)
    r.add_argument("--kill", choices=("step", "checkpoint"))
    r.add_argument("--resume", action="store_true")
    p = sub.add_parser("priors")
    p.add_argument("folder", type=Path)
    sub.add_parser("serve")
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        return serve()
    if args.cmd == "priors":
        toy.save_prior(args.folder / "prior-s2s", arch="marian")
        toy.save_prior(args.folder / "prior")
        return
    if args.kill:
        install_kill(draw_kill(args.kill, args.seed, args.stage), args.root.parent / "kill.json")
    run_stage(args.stage, args.root, args.priors, args.seed, args.resume)


def serve() -> None:
    """Answer each request line with the exit status of a forked child that ran it."""
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: output to the request's log, never to the server's stdout (the answers)
            code = 1
            try:
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                main(req["argv"])
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)  # no atexit handlers or buffers of the server run twice
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
