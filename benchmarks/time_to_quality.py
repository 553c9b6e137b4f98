"""Wall-clock time to quality on first-species counterpoint: our default tuner vs. TRL's
``GRPOTrainer``, both tuning the same prior on the same rule reward in one process.

Quality = the share of sampled pieces that break no hard rule (``rules/clean``) on the HELD-OUT
cantus firmi (``task.heldout_prompts()``: Fux's cantus firmi and the held-out split of the
generated pool), measured at fixed points of each system's training clock (every
``--eval-every`` minutes; minute 0 = the prior; the clock is stopped while evaluating). The
target is our final held-out clean share; ``ratio_time_to_target_vs_trl`` = TRL's minutes to
reach it / ours (a TRL that never reaches it is charged its whole budget, ``--trl-minutes``,
by default 3 x the minutes ours actually trained, so such a TRL gives a ratio of at least 3). Prints ONE JSON line
on stdout (everything else goes to stderr):

    python benchmarks/time_to_quality.py [--prior DIR] [--config configs/counterpoint.yaml] [--minutes 15] [--trl-minutes 45]
        [--eval-every 1.5] [--eval-samples 8] [--trl-group 4] [--seed 0] [--threads N] [--set KEY=VALUE ...]

Without ``--prior`` a small prior is trained first with the repo's own stages (``stage_data``,
``stage_prior``, ``configs/counterpoint.yaml --quick``: under a minute once the corpus is cached)
into a temp run folder. Its pieces are never clean, and even the default prior's are clean 0%
of the time (README): the clean share leaves 0 only after minutes of tuning, so short runs
only test the plumbing; use a fully trained prior (``rlhf pretrain``) and the default budget.
``--set`` overrides keys of ``--config`` (e.g. ``task.pool.size=200`` for a quick smoke run).

Keys: ``clean_share_by_minute`` ({ours, trl_grpo}: [[minute, share], ...]; the minute is the
training clock when the step that passed an eval point ended), ``violations_per_note_by_minute``
(hard-rule violations per note, same points: it moves long before the clean share leaves 0),
``target_clean_share``, ``ours_minutes_to_target``, ``trl_minutes_to_target``,
``trl_reached_target``, ``ratio_time_to_target_vs_trl`` (null when our final share is the
prior's, e.g. 0 clean pieces after a short run from a weak prior), ``minutes_budget``,
``config`` (both systems' batch, lr, β, group size, updates), ``ours_iterations`` and
``trl_steps`` (optimizer steps), ``trl_rollouts`` (rollout batches of the same size as ours),
``heldout_prompts``, ``load_avg_*`` (1-minute load average), or ``trl_error`` if TRL failed.

How the comparison is kept fair (all in this process):

* model: both load the policy and the frozen reference from the same prior folder
  (``save_pretrained`` model + counterpoint tokenizer); fp32 (TRL: bf16=False), no dropout
  (ours: policy in eval mode; TRL: disable_dropout=True), no gradient checkpointing, no vLLM.
* reward: the summed rule reward of the piece plus the task's ``clean_bonus`` on a clean piece,
  divided by ``tune.kl.c``: what our ``task.step_rewards`` sums to inside our shaped return.
  TRL's reward callable decodes ``completion_ids[:n_new]`` with ``task.decode`` and scores with
  ``task.score``, the calls our side makes.
* prompts: the same training prompts (``task.train_prompts()``), as text for TRL:
  ``tokenizer.decode(ids)`` re-encodes to exactly the same ids (checked at start).
* sampling: temperature 1, no top-k/top-p, only note (interval) tokens, exactly ``n_new``
  notes per cantus. TRL: a logits processor added to the policy's ``generate`` allows only the
  note tokens until the row has as many notes as its prompt has cantus notes, then only
  ``<eos>`` (TRL needs it to end a row); max_completion_length = longest cantus + 1.
* batch and updates: our ``tune.batch_size`` completions per rollout. Our default (tilt) and
  RLOO take ``k`` samples per prompt and one gradient step per rollout; TRL runs the same structure:
  num_generations = k, generation_batch_size = per_device_train_batch_size = batch,
  num_iterations = 1 (with PPO: per_device_train_batch_size = batch / minibatches,
  steps_per_generation = minibatches, num_iterations = epochs, clip ε = ``ppo.clip``).
  Same peak lr (Adam(W), no weight decay), grad-norm clip, β (TRL ``beta``). TRL's lr stays
  constant (its run ends by the clock, not at a step count); ours runs as configured: its
  ``tune.lr_schedule`` over ``tune.steps`` (the default: a cosine decay to 0), and it stops at
  ``tune.steps`` or at its budget, whichever comes first.
* clock: each system's clock runs only during its own training (TRL: from one ``on_step_end``
  to the next, so its batching, generation, scoring and update all count; ours:
  ``Tuner.iteration`` + ``loop.advance``). The two are interleaved: after each TRL optimizer
  step ours runs until its clock has caught up with TRL's, so load from other processes on the
  machine falls on both alike. Model construction and evaluation are outside both clocks.
* evaluation: ``task.sample`` (our sampler, the same for both) with the same seed at every
  point, so both see the same random numbers and minute 0 gives both the same share.

Differences that remain: the algorithms. Ours (the default ``tilt``) trains the policy toward
the prior tilted by the rule reward of every note it could write, p^(1/T)·exp(r/(βc)), at each
state it visits, with no sampled return; with ``--config configs/counterpoint-rloo.yaml`` ours
(``rloo`` with ``credit: all_actions``) averages each note's rule reward exactly over every note
it could have been and samples only the later consequences, with a leave-one-out baseline per
step, and takes the exact per-note KL over the action space with its pathwise gradient. GRPO
uses the group-normalised sequence reward as every token's advantage, KL as k3 in the loss
(TRL's ``loss_type`` default ``dapo``; group-std scaling makes the 1/c reward scale irrelevant
to it). With ``tune.algorithm: ppo``
ours samples one completion per prompt and GRPO ``--trl-group`` (default 4). TRL's log-probs
are over the whole vocabulary while it samples from the note tokens (ours masks both to the
action space), and it also trains on the forced ``<eos>``. TRL samples with ``model.generate`` and re-scores the
sample with one more forward pass; ours samples through ``rlhf.rollout`` / ``rlhf.fast_gpt2``. The
default prior (``model.arch: counterpoint_columns``) embeds each token from the ids before it, so
``generate`` reads the whole sequence at each step without a KV cache (TRL's sampling is slower
on it than on a plain GPT-2; its clock counts that).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from apps.pipeline import load_run_config, make_task, stage_data, stage_prior
from rlhf.models import ensure_model_type, folder_model_type
from rlhf.runs import Run
from rlhf.tune import TuneConfig, Tuner
from tasks.counterpoint.task import CounterpointTask, Prompt
from tasks.counterpoint.tokens import Codec

log = logging.getLogger("time_to_quality")


class Clock:
    """A stopwatch that runs only while a system trains (stopped for evaluations and the other system)."""

    def __init__(self) -> None:
        self.total: float = 0.0  # seconds of finished intervals
        self.since: float | None = None  # perf_counter() at start, while running

    def start(self) -> None:
        self.since = time.perf_counter()

    def stop(self) -> None:
        if self.since is not None:
            self.total += time.perf_counter() - self.since
            self.since = None

    @property
    def minutes(self) -> float:
        running = time.perf_counter() - self.since if self.since is not None else 0.0
        return (self.total + running) / 60.0


class Curve:
    """One system's clean share at the eval points of its training clock. :meth:`check` is called
    with the clock stopped before the first step and after every step; it evaluates at due
    points (a point passed during a long step is taken at the step's end, with its real minute)
    and once the budget is spent."""

    def __init__(self, name: str, evaluate: Callable[[torch.nn.Module], tuple[float, float]], every: float, budget: float,
                 max_steps: int | None = None):
        self.name, self.evaluate, self.every, self.budget, self.max_steps = name, evaluate, every, budget, max_steps
        self.clock, self.next, self.steps = Clock(), 0.0, 0
        self.points: list[list[float]] = []  # [[minute, clean share], ...]
        self.violations: list[list[float]] = []  # [[minute, hard-rule violations per note], ...]

    def _spent(self, minutes: float) -> bool:
        return minutes >= self.budget or (self.max_steps is not None and self.steps >= self.max_steps)

    @property
    def done(self) -> bool:
        return self._spent(self.clock.minutes)

    def check(self, model: torch.nn.Module) -> bool:
        """Evaluate if a point is due; True once the budget (or ``max_steps``) is spent."""
        m = self.clock.minutes
        last = self._spent(m)
        if m >= self.next or last:
            share, per_note = self.evaluate(model)
            self.points.append([round(m, 3), round(share, 4)])
            self.violations.append([round(m, 3), round(per_note, 4)])
            log.info("%s: %.2f min, %d steps, held-out clean share %.3f, %.3f violations/note", self.name, m, self.steps, share, per_note)
            self.next = (math.floor(m / self.every) + 1) * self.every  # skip points a long step jumped over
        return last


def minutes_to(points: list[list[float]], target: float) -> float | None:
    """The first eval minute whose share reaches ``target``, or None."""
    return next((m for m, share in points if share >= target - 1e-9), None)


def time_to_target(ours: list[list[float]], trl: list[list[float]], budget: float, *, trl_ok: bool = True) -> dict:
    """Target = our final share; minutes each system took to reach it (TRL: its budget if never)
    and TRL's / ours. The ratio is None when ours was at the target from minute 0 (it never
    improved on the prior, e.g. both stay at 0 clean pieces) or TRL failed."""
    target = ours[-1][1]
    ours_t, trl_t = minutes_to(ours, target), minutes_to(trl, target)
    trl_minutes = trl_t if trl_t is not None else budget
    return {"target_clean_share": target, "ours_minutes_to_target": ours_t, "trl_reached_target": trl_t is not None,
            "trl_minutes_to_target": trl_minutes, "ratio_time_to_target_vs_trl": trl_minutes / ours_t if trl_ok and ours_t else None}


def quality(task: CounterpointTask, prompts: list[Prompt], per_prompt: int, seed: int, model: torch.nn.Module) -> tuple[float, float]:
    """(share of pieces that break no hard rule, hard-rule violations per note) of ``per_prompt``
    samples per prompt at temperature 1, as ``CounterpointTask.summarize`` computes them."""
    was_training = model.training
    model.eval()
    try:
        rep, comps = task.sample(model, prompts, per_prompt, temperature=1.0, seed=seed)
    finally:
        model.train(was_training)
    s = task.score(task.decode(rep, comps))
    hard = sum(v.sum() for k, v in s.violations.items() if k not in s.soft)
    return float(s.clean().mean()), float(hard) / max(float(s.notes.sum()), 1.0)


def piece_rewards(task: CounterpointTask, prompts: list[Prompt], completions: list[list[int]], c: float) -> list[float]:
    """What our ``task.step_rewards`` sums to per piece, over c: rule reward + clean bonus if clean."""
    items = task.decode(prompts, [list(ids[: p.n_new]) for p, ids in zip(prompts, completions)])
    s = task.score(items)
    total = s.totals
    if task.cfg.clean_bonus and task.cfg.mode == "first_species":
        total = total + task.cfg.clean_bonus * s.clean()
    return (total / c).tolist()


class CantusLength:
    """Logits processor for TRL's ``generate``: only note tokens until a row has one note per
    cantus note of its prompt, then only ``<eos>``. Stateless: it counts cantus tokens (prompt
    only) and note tokens (completion only) in each row."""

    def __init__(self, tokenizer, note_ids: torch.Tensor, eos_id: int):
        self.cantus_ids = torch.tensor([i for t, i in tokenizer.get_vocab().items() if t.startswith("cf_")])
        self.note_ids, self.eos_id = note_ids, eos_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n_new = torch.isin(input_ids, self.cantus_ids.to(input_ids.device)).sum(1)
        done = torch.isin(input_ids, self.note_ids.to(input_ids.device)).sum(1)
        notes = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        notes[self.note_ids] = True
        eos = torch.zeros_like(notes)
        eos[self.eos_id] = True
        allow = torch.where((done < n_new)[:, None], notes[None], eos[None])  # [B, V]
        return scores.masked_fill(~allow, float("-inf"))


def trl_settings(tcfg: TuneConfig, group: int) -> dict:
    """GRPOConfig fields that mirror our tune config (see the module doc)."""
    if tcfg.algorithm == "ppo":
        minibatches, epochs, clip = tcfg.settings.minibatches, tcfg.settings.epochs, tcfg.settings.clip
    elif tcfg.algorithm in ("rloo", "tilt"):
        minibatches, epochs, clip, group = 1, tcfg.settings.epochs, 0.2, tcfg.settings.k  # clip: TRL's default (moot at 1 epoch)
    else:
        raise SystemExit(f"tune.algorithm={tcfg.algorithm}: only ppo, rloo and tilt have a GRPO counterpart here")
    return {"per_device_train_batch_size": tcfg.batch_size // minibatches, "steps_per_generation": minibatches,
            "num_iterations": epochs, "num_generations": group, "epsilon": clip, "learning_rate": tcfg.lr,
            "beta": tcfg.kl.beta, "max_grad_norm": tcfg.grad_clip, "temperature": 1.0}


def run_both(task: CounterpointTask, tcfg: TuneConfig, prior: Path, ours: Curve, trl: Curve, *, group: int, seed: int,
             trl_factor: float | None = None) -> str | None:
    """Train TRL's GRPO with ours interleaved (see the module doc) until both budgets are spent;
    returns TRL's error, if it failed (ours then runs alone). With ``trl_factor`` TRL's budget
    becomes that multiple of the minutes ours actually trained once ours has ended (its last
    step ends past its budget, or it ends earlier at tune.steps)."""
    with tempfile.TemporaryDirectory(prefix="ttq-ours-") as run_dir:
        # tune.steps stays: the learning-rate schedule decays over it, and ours stops there (or at its budget)
        tuner = Tuner(Run(run_dir), tcfg.model_copy(update={"checkpoint_every": 10**9}), task, prior,
                      seed=seed, progress=False)
        policy = tuner.algo.policy
        ours.check(policy)

        def ours_until(minutes: float) -> None:
            while not ours.done and ours.clock.minutes < minutes:
                ours.clock.start()
                tuner.iteration(tuner.loop.step)
                tuner.loop.advance()
                ours.clock.stop()
                ours.steps += 1
                ours.check(policy)
            if ours.done and trl_factor is not None:
                trl.budget = trl_factor * ours.clock.minutes

        error = None
        try:
            train_trl(task, tcfg, prior, trl, group=group, seed=seed, between=lambda: ours_until(trl.clock.minutes))
        except Exception as e:  # noqa: BLE001 - the benchmark reports why TRL could not run
            log.exception("TRL GRPOTrainer failed")
            error = f"{type(e).__name__}: {e}"
        ours_until(math.inf)
    return error


def train_trl(task: CounterpointTask, tcfg: TuneConfig, prior: Path, curve: Curve, *, group: int, seed: int, between: Callable[[], None]) -> None:
    """TRL's GRPOTrainer on the task until ``curve``'s budget is spent; ``between()`` runs after
    every optimizer step with TRL's clock stopped."""
    from datasets import Dataset
    from transformers import LogitsProcessorList, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    train = task.train_prompts()
    tok = task.tokenizer
    tok.padding_side = "left"
    texts = [tok.decode(p.ids) for p in train]
    every = max(1, len(train) // 200)
    for p, t in zip(train[::every], texts[::every]):
        if tok(text=t)["input_ids"] != p.ids:  # TRL tokenizes with add_special_tokens=True
            raise RuntimeError(f"prompt text {t!r} does not re-encode to its ids {p.ids}")

    def reward(prompts: list[str], completions: list[str], completion_ids: list[list[int]], idx: list[int], **kw) -> list[float]:
        ps = [train[i] for i in idx]  # idx: the dataset column, repeated per generation by TRL
        for p, ids in zip(ps, completion_ids):  # the length processor must have ended every row after n_new notes
            if len(ids) != p.n_new + 1 or ids[-1] != tok.eos_token_id:
                raise RuntimeError(f"TRL completion of length {len(ids)} for a {p.n_new}-note cantus: {ids}")
        return piece_rewards(task, ps, completion_ids, tcfg.kl.c)

    class Timing(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            curve.check(model)
            curve.clock.start()

        def on_step_end(self, args, state, control, model=None, **kw):
            curve.clock.stop()
            curve.steps += 1
            if curve.check(model):
                control.should_training_stop = True
                return
            between()
            curve.clock.start()

    settings = trl_settings(tcfg, group)
    with tempfile.TemporaryDirectory(prefix="ttq-trl-") as out_dir:
        args = GRPOConfig(
            output_dir=out_dir, seed=seed, max_steps=10**9, gradient_accumulation_steps=1, **settings,
            max_completion_length=max(p.n_new for p in train) + 1, top_k=0, top_p=1.0,
            weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
            use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, disable_dropout=True, use_vllm=False,
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
            log_completions=False, dataloader_num_workers=0,
        )
        data = Dataset.from_dict({"prompt": texts, "idx": list(range(len(train)))})
        ensure_model_type(folder_model_type(prior))  # a task architecture (counterpoint_columns) registers its classes for TRL's loader
        trainer = GRPOTrainer(model=str(prior), reward_funcs=reward, args=args, train_dataset=data, processing_class=tok,
                              callbacks=[Timing()])
        # GRPOTrainer has no per-row length; it calls model.generate (this object: one CPU process, no wrapper), so give
        # that call the processor. reward() checks every completion, so a bypassed processor fails loudly.
        proc = CantusLength(tok, torch.tensor(task.codec.completion_token_ids), tok.eos_token_id)
        trainer.model.generate = functools.partial(trainer.model.generate, logits_processor=LogitsProcessorList([proc]))
        trainer.train()


def quick_prior(root: Path, seed: int) -> Path:
    """A small prior trained with the repo's own data and pre-training stages (quick config)."""
    cfg = load_run_config("configs/counterpoint.yaml", [f"run_dir={root}", "progress=false", f"seed={seed}"], quick=True)
    run = Run(root)
    task = make_task(cfg)
    train, val = stage_data(cfg, run, task)
    return stage_prior(cfg, run, task, train, val, resume=False)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prior", type=Path, default=None, help="Prior folder (default: train a quick one first).")
    p.add_argument("--config", default="configs/counterpoint.yaml", help="Run config whose task and tune sections are used.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="Config override (repeatable).")
    p.add_argument("--minutes", type=float, default=15.0, help="Our training budget (our own clock).")
    p.add_argument("--trl-minutes", type=float, default=None,
                   help="TRL's training budget (its own clock); default 3 x the minutes ours actually trained (its last step ends past --minutes), so a TRL that never reaches our final share "
                        "within it shows a ratio of at least 3 (with equal budgets the ratio cannot exceed budget / our time to target).")
    p.add_argument("--eval-every", type=float, default=1.5, help="Minutes of training between evaluations.")
    p.add_argument("--eval-samples", type=int, default=8, help="Samples per held-out prompt at each evaluation.")
    p.add_argument("--trl-group", type=int, default=4, help="GRPO num_generations when ours is PPO (GRPO needs >= 2).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for both systems (default: torch's).")
    a = p.parse_args(argv)

    if a.threads is not None:
        torch.set_num_threads(a.threads)
    result: dict = {"minutes_budget": a.minutes, "eval_every": a.eval_every, "eval_samples": a.eval_samples, "seed": a.seed,
                    "threads": torch.get_num_threads(), "load_avg_start": os.getloadavg()[0]}
    cfg = load_run_config(a.config, a.overrides)
    tcfg = cfg.tune
    if tcfg is None:
        raise SystemExit(f"{a.config}: tune is null")
    with tempfile.TemporaryDirectory(prefix="ttq-prior-") as tmp:
        prior = a.prior or quick_prior(Path(tmp), a.seed)
        task = make_task(cfg)
        saved = Codec.load(prior)
        if (saved.mode, saved.cantus_slots) != (task.codec.mode, task.codec.cantus_slots):
            raise SystemExit(f"{prior}: tokenizer ({saved.mode}, {saved.cantus_slots} cantus slots) does not match {a.config}")
        heldout = task.heldout_prompts()
        evaluate = functools.partial(quality, task, heldout, a.eval_samples, a.seed)
        trl_minutes = a.trl_minutes if a.trl_minutes is not None else 3 * a.minutes
        ours = Curve("ours", evaluate, a.eval_every, a.minutes, max_steps=tcfg.steps)
        trl = Curve("trl_grpo", evaluate, a.eval_every, trl_minutes)
        error = run_both(task, tcfg, prior, ours, trl, group=a.trl_group, seed=a.seed, trl_factor=None if a.trl_minutes is not None else 3.0)

    group = tcfg.group
    result["config"] = {
        "ours": {"algorithm": tcfg.algorithm, "batch": tcfg.batch_size, "lr": tcfg.lr, "beta": tcfg.kl.beta, "kl_estimator": tcfg.kl.estimator,
                 "c": tcfg.kl.c, "group": group, "epochs": tcfg.settings.epochs,
                 "minibatches": getattr(tcfg.settings, "minibatches", 1)},
        "trl_grpo": {**trl_settings(tcfg, a.trl_group), "batch": tcfg.batch_size, "kl_estimator": "k3", "c": tcfg.kl.c},
    }
    result["heldout_prompts"] = len(heldout)
    result["clean_share_by_minute"] = {"ours": ours.points, "trl_grpo": trl.points}
    result["violations_per_note_by_minute"] = {"ours": ours.violations, "trl_grpo": trl.violations}
    result["ours_iterations"], result["trl_steps"] = ours.steps, trl.steps
    # rollout batches of tune.batch_size completions: TRL generates once per steps_per_generation * num_iterations steps
    s = result["config"]["trl_grpo"]
    result["trl_rollouts"] = -(-trl.steps // (s["steps_per_generation"] * s["num_iterations"]))
    result["trl_minutes_budget"] = trl.budget
    result.update(time_to_target(ours.points, trl.points, trl.budget, trl_ok=error is None))
    if error is not None:
        result["trl_error"] = error
    result["load_avg_end"] = os.getloadavg()[0]
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    warnings.simplefilter("ignore", FutureWarning)
    t_start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # HF Trainer prints its summary to stdout
        res = main()
    res["total_seconds"] = time.perf_counter() - t_start
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}))
