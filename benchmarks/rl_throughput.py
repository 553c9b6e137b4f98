"""Throughput of one RL training iteration (rollout + scoring + update): our PPO and RLOO vs.
TRL's ``RLOOTrainer``, and how our PPO iteration time grows with sequence length and batch.

Throughput = generated tokens per iteration / mean iteration seconds = B * T / mean(s), with
B = 64 sequences of T = 32 melody tokens (Sequence Tutor's two bars of 16th-note events) on a
tiny GPT-2 (4 layers, 128 wide, 4 heads), CPU, fp32, torch's default thread count for both
systems. Each system is warmed up, then timed over whole iterations. Prints ONE JSON line on
stdout (everything else goes to stderr); about 2 minutes on 2 cores:

    python benchmarks/rl_throughput.py [--iters 8] [--warmup 2] [--sweep-iters 3] [--seed 0] [--threads N] [--no-trl] [--no-sweep]

Keys: ``{ppo,rloo,trl_rloo}_{seconds,median_seconds,tokens_per_s,seconds_all,cpu_seconds}`` (B=64,
T=32), ``ratio_rloo_vs_trl`` (= our RLOO tokens/s / TRL's), ``ratio_ppo_vs_trl_rloo``,
``ratio_rloo_vs_trl_cpu`` (TRL's mean process CPU seconds per step / ours: with ``--threads 1``
the least disturbed by other processes on a shared machine, which stretch wall time only),
``rloo_phase_seconds`` (our RLOO iteration split into ``sample``, ``prior_forward`` and
``reward_update``), ``ratio_ceiling_free_sampling`` (TRL's seconds / our prior_forward +
reward_update: the ratio even a sampler that cost nothing could not pass with our kernels),
``matmul_floor_seconds`` and ``ratio_ceiling_matmul_only`` (the dense matrix products of one
iteration alone, see :func:`matmul_floor`, and TRL's seconds over them),
``ppo_seconds_by_length`` (T = 16..128 at B=64), ``ppo_seconds_by_batch`` (B = 16..256 at
T=32), ``load_avg_*`` (1-minute load average: other processes on the machine skew timings),
or ``trl_error`` if TRL could not run.

How the comparison with TRL is kept fair (all measured in this process):

* model: one randomly initialised GPT-2 saved with ``save_pretrained``; both systems load the
  policy and the frozen reference from that folder (same config and weights; TRL gets the
  folder path, so its reference model is loaded from the same files).
* batch: 64 completions per optimizer step. TRL: per_device_train_batch_size=64,
  gradient_accumulation_steps=1, so steps_per_generation=1 and generation_batch_size=64, with
  num_generations=4, i.e. 16 prompts x 4 samples, as our RLOO's k=4 groups.
* length: 32 new tokens always. Ours samples from the task's action space (the 38 event
  tokens). TRL: max_completion_length=32 and ``suppress_tokens`` = the 4 special tokens
  (pad, bos, eos, unk) via generation_kwargs, so it samples from the same 38 tokens, never
  stops early, and every completion has exactly 32 tokens (``min_new_tokens=32`` as well).
* reward: Sequence Tutor's music-theory reward, ``melody_step_rewards`` on the event codes of
  the completion ids; ours sums it over steps inside the KL-shaped return, TRL's callable
  returns the per-sequence sum. The same vectorised numpy call on both sides.
* KL: β = 0.1 for both, with the k1 estimator (log π − log π_ref summed over the sequence),
  which is what TRL's RLOO uses; our PPO keeps its default (exact KL over the action space).
* update: one gradient step per iteration (our rloo.epochs=1; TRL num_iterations=1), Adam(W)
  at lr 3e-4, no weight decay, grad-norm clip 1.0, constant lr.
* no dropout anywhere (ours: policy in eval mode; TRL: disable_dropout=True), fp32
  (TRL: bf16=False), no gradient checkpointing (TRL's default is on; switched off), no vLLM,
  no logging, no evaluation, no checkpoints.
* timing: ours = wall time of ``Tuner.iteration``; TRL = wall time of one step of
  ``Trainer.train`` (batch fetch + generate + score + update + optimizer), measured from the
  previous ``on_step_end`` callback to this one. The three systems are interleaved (a TRL step,
  then one PPO and one RLOO iteration of ours inside TRL's ``on_step_end``, outside TRL's
  clock), so a burst of load from other processes hits all of them alike.

Differences that remain: TRL samples with ``model.generate`` (DynamicCache, logits
processors, stopping criteria), computes the policy's log-probs of the sample with an extra
forward pass, and scores with its fused LM head (log-probs and entropy without the logits
tensor); ours samples with ``rlhf.rollout.decode`` (KV cache preallocated once, the sampling
logits reused as the policy's scores) and keeps [B, T, V] logits of policy and prior (V = 42
here, so that is cheap). Both are each system's normal path. For a GPT-2, ours runs the
sampling steps, the prior's forward and the update's forward through ``rlhf.fast_gpt2`` (the
same arithmetic without transformers' per-call overhead); TRL runs transformers' forward.

What bounds the ratio: per iteration ours runs the sampling pass, one prior forward, one
policy forward and its backward; TRL the same plus one more forward. Two ceilings are printed.
``ratio_ceiling_free_sampling`` = TRL's time / (ours minus sampling): what our kernels would
reach with a sampler that cost nothing. ``ratio_ceiling_matmul_only`` = TRL's time / the dense
matrix products of the iteration (``matmul_floor``): what an implementation would reach whose
every elementwise op, attention, layer norm, sampling step and optimizer step cost nothing.
On the 2-core machine this was written on (one thread, quiet): ours 1.7x TRL, free sampling
2.7-2.9x, matrix products only 4.6x (0.25 s of TRL's 1.17 s; ours spent 0.44 s on the rest).
The 3x target needs nearly all the non-matrix work gone: on this CPU torch's eager kernels for
the tiny tensors here are slow per element (tanh-GELU 3-5 ns per element, about 75 ms of an
iteration forward and backward; layer norm, softmax and copies add as much), and
``torch.compile`` (inductor) shortened a forward + backward by only 4% (275 -> 264 ms) after
50 s of compilation. Hand-fused CPU kernels would be the way there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, median

import numpy as np
import torch

from rlhf.algorithms.common import KLConfig
from rlhf.algorithms.rloo import RLOOConfig as OurRLOOConfig
from rlhf.models import ModelConfig, build_model
from rlhf.runs import Run
from rlhf.tune import TuneConfig, Tuner
from rlhf.interfaces import Completions, Rewards
from tasks.counterpoint.melody_rules import melody_step_rewards
from tasks.counterpoint.piece import MELODY_STEPS
from tasks.counterpoint.tokens import Codec, build_codec

log = logging.getLogger("rl_throughput")

BATCH = 64  # sequences per iteration
K = 4  # RLOO group size (TRL: num_generations)
BETA = 0.1
LR = 3e-4
MODEL = ModelConfig(arch="gpt2", n_layer=4, n_embd=128, n_head=4, max_positions=256)  # 256: room for the 128-token sweep
SWEEP_LENGTHS = (16, 32, 64, 128)
SWEEP_BATCHES = (16, 64, 256)


@dataclass(frozen=True)
class BenchPrompt:
    """A melody prompt (``[<bos>]``) with any completion length ``n_new``."""

    ids: list[int]
    n_new: int


class MelodyBench:
    """The attributes ``Tuner`` needs, for melodies of ``n_new`` steps: the task's action space
    (the 38 event tokens), its tokenizer and codec, and Sequence Tutor's rule reward per step."""

    def __init__(self, codec: Codec, n_new: int = MELODY_STEPS):
        self.codec, self.n_new = codec, n_new
        self.allowed = torch.zeros(len(codec.tokenizer), dtype=torch.bool)  # [V]
        self.allowed[codec.completion_token_ids] = True

    @property
    def tokenizer(self):
        return self.codec.tokenizer

    def train_prompts(self) -> list[BenchPrompt]:
        return [BenchPrompt(self.codec.encode_prompt(None), self.n_new)]

    eos_id = None

    def reward(self, completions: Completions) -> Rewards:
        """r_MT(s_t, a_t) [B, T] (Jaques et al. 2017, sec. 5), for any T."""
        tokens = completions.tokens
        return Rewards(torch.from_numpy(melody_rewards(self.codec, tokens.cpu().numpy())).float().to(tokens.device))

    def save(self, path: Path) -> None:
        self.codec.save(path)


def melody_rewards(codec: Codec, ids: np.ndarray) -> np.ndarray:
    """[B, T] ``melody_step_rewards`` of completion ids [B, T] (tonic C, default weights)."""
    return melody_step_rewards(codec.completion_values(ids))


def save_prior(folder: Path, codec: Codec, seed: int) -> Path:
    """An untrained GPT-2 of ``MODEL`` size and the melody tokenizer, written with save_pretrained."""
    torch.manual_seed(seed)
    model = build_model(MODEL, codec.tokenizer)
    model.save_pretrained(folder)
    codec.tokenizer.save_pretrained(folder)
    return folder


def make_tuner(stack: contextlib.ExitStack, algorithm: str, prior: Path, codec: Codec, *, n_new: int, batch: int, seed: int) -> Tuner:
    """Our ``Tuner`` for ``algorithm`` on :class:`MelodyBench` (run folder in a temp dir)."""
    cfg = TuneConfig(
        algorithm=algorithm, steps=10**6, batch_size=batch, lr=LR, grad_clip=1.0, checkpoint_every=10**6,
        kl=KLConfig(beta=BETA, estimator="k1" if algorithm == "rloo" else "exact"), **({"rloo": OurRLOOConfig(k=K, epochs=1)} if algorithm == "rloo" else {}),
    )
    run = Run(stack.enter_context(tempfile.TemporaryDirectory(prefix="rl-bench-run-")))
    return Tuner(run, cfg, MelodyBench(codec, n_new), prior, seed=seed, progress=False)


def timed_iteration(tuner: Tuner) -> tuple[float, float]:
    """(wall, process CPU) seconds of one ``Tuner.iteration`` (rollout → reward → update)."""
    t0, c0 = time.perf_counter(), time.process_time()
    tuner.iteration(tuner.loop.step)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    tuner.loop.advance()
    return seconds, cpu


def time_ours(algorithm: str, prior: Path, codec: Codec, *, n_new: int, batch: int, warmup: int, iters: int, seed: int) -> list[float]:
    """Wall seconds of ``warmup + iters`` consecutive iterations of one of our algorithms."""
    with contextlib.ExitStack() as stack:
        tuner = make_tuner(stack, algorithm, prior, codec, n_new=n_new, batch=batch, seed=seed)
        return [timed_iteration(tuner)[0] for _ in range(warmup + iters)]


def run_trl(prior: Path, codec: Codec, *, steps: int, seed: int, between=None) -> tuple[list[float], list[float]]:
    """(wall, process CPU) seconds of each optimizer step of TRL's RLOOTrainer configured as
    our RLOO (see the module doc). ``between()`` runs after each step, outside the timed interval."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.cpu: list[float] = []
            self.start = self.cpu_start = 0.0

        def on_train_begin(self, args, state, control, **kw):
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.start)
            self.cpu.append(time.process_time() - self.cpu_start)
            if between is not None:
                between()
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def melody_reward(prompts, completions, completion_ids, **kw) -> list[float]:
        # Every completion has 32 ids (no special token can be sampled), so they stack to [B, T].
        return melody_rewards(codec, np.asarray(completion_ids, dtype=np.int64)).sum(axis=1).tolist()

    tok = codec.tokenizer
    tok.padding_side = "left"
    specials = [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id]
    with tempfile.TemporaryDirectory(prefix="rl-bench-trl-") as out_dir:
        args = RLOOConfig(
            output_dir=out_dir, seed=seed, max_steps=steps,
            per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, num_generations=K,
            max_completion_length=MELODY_STEPS, temperature=1.0, top_k=0, top_p=1.0,
            generation_kwargs={"suppress_tokens": specials, "min_new_tokens": MELODY_STEPS},
            beta=BETA, num_iterations=1, learning_rate=LR, weight_decay=0.0, lr_scheduler_type="constant",
            warmup_steps=0, max_grad_norm=1.0,
            use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, disable_dropout=True, use_vllm=False,
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
            log_completions=False, dataloader_num_workers=0,
        )
        data = Dataset.from_dict({"prompt": [tok.bos_token] * (BATCH // K) * steps})
        clock = StepClock()
        trainer = RLOOTrainer(model=str(prior), reward_funcs=melody_reward, args=args, train_dataset=data,
                              processing_class=tok, callbacks=[clock])
        trainer.train()
    if len(clock.times) != steps:
        raise RuntimeError(f"TRL ran {len(clock.times)} optimizer steps, expected {steps}")
    return clock.times, clock.cpu


class PhaseClock:
    """Wall seconds of the two rollout phases inside an iteration: sampling (``decode``) and the
    frozen prior's forward pass (``sequence_forward``), as ``rlhf.algorithms.common`` calls
    them; what is left of the iteration is the reward and the update (forward + backward +
    Adam). Only iterations run inside :meth:`measure` are recorded."""

    def __init__(self):
        from rlhf.algorithms import common

        self.common, self.active = common, None
        self.seconds: dict[str, list[float]] = {"sample": [], "prior_forward": []}
        for phase, name in (("sample", "decode"), ("prior_forward", "sequence_forward")):
            setattr(common, name, self._timed(phase, getattr(common, name)))

    def _timed(self, phase: str, fn):
        def timed(*args, **kw):
            if self.active is None:
                return fn(*args, **kw)
            t0 = time.perf_counter()
            out = fn(*args, **kw)
            self.active[phase] += time.perf_counter() - t0
            return out
        return timed

    @contextlib.contextmanager
    def measure(self):
        self.active = dict.fromkeys(self.seconds, 0.0)
        try:
            yield
        finally:
            for phase, secs in self.active.items():
                self.seconds[phase].append(secs)
            self.active = None


def time_head_to_head(
    prior: Path, codec: Codec, *, warmup: int, iters: int, seed: int, trl: bool, phases: PhaseClock
) -> tuple[dict[str, list[float]], dict[str, list[float]], str | None]:
    """Per-iteration wall and CPU seconds of our PPO and RLOO and TRL's RLOO at B=64, T=32,
    interleaved (TRL step, our PPO, our RLOO, TRL step, ...) so that load from other processes
    on the machine falls on all three alike; ``phases`` splits our RLOO iterations. Returns
    both and TRL's error, if it failed."""
    steps = warmup + iters
    times: dict[str, list[float]] = {"ppo": [], "rloo": []}
    cpu: dict[str, list[float]] = {"ppo": [], "rloo": []}
    with contextlib.ExitStack() as stack:
        tuners = {a: make_tuner(stack, a, prior, codec, n_new=MELODY_STEPS, batch=BATCH, seed=seed) for a in times}

        def ours() -> None:
            for a, tuner in tuners.items():
                if len(times[a]) < steps:
                    with phases.measure() if a == "rloo" else contextlib.nullcontext():
                        wall, c = timed_iteration(tuner)
                    times[a].append(wall)
                    cpu[a].append(c)

        error = None
        if trl:
            try:
                times["trl_rloo"], cpu["trl_rloo"] = run_trl(prior, codec, steps=steps, seed=seed, between=ours)
            except Exception as e:  # noqa: BLE001 - the benchmark reports why TRL could not run
                log.exception("TRL RLOOTrainer failed")
                error = f"{type(e).__name__}: {e}"
                times.pop("trl_rloo", None)
                cpu.pop("trl_rloo", None)
        while len(times["ppo"]) < steps or len(times["rloo"]) < steps:
            ours()
    return times, cpu, error


def matmul_floor(batch: int, prompt_len: int, n_new: int, vocab: int, reps: int = 20) -> dict[str, float]:
    """Seconds of only the dense matrix products of one RLOO iteration of ``MODEL`` (no
    attention, GELU, layer norm, softmax, sampling or optimizer), timed on random fp32 tensors
    of the same shapes: the sampling steps ([batch, H] rows), the prior's forward and the
    update's forward and backward ([batch·L, H] rows, L = prompt_len + n_new; the backward is
    two products per layer: dX = dY·Wᵀ and dW = Xᵀ·dY). No implementation can do the model's
    arithmetic in less, whatever it fuses; TRL's time over this is the most any RLOO could lead by."""
    h = MODEL.n_embd
    weights = [torch.randn(i, o) for i, o in ((h, 3 * h), (h, h), (h, 4 * h), (4 * h, h))] * MODEL.n_layer + [torch.randn(h, vocab)]

    def products(rows: int, backward: bool):
        xs = {w.shape[0]: torch.randn(rows, w.shape[0]) for w in weights}
        gs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}

        def run() -> None:
            for w in weights:
                torch.mm(xs[w.shape[0]], w)
                if backward:
                    torch.mm(gs[w.shape[1]], w.t())
                    torch.mm(xs[w.shape[0]].t(), gs[w.shape[1]])
        return run

    def seconds(fn) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps

    step, full, full_bwd = products(batch, False), products(batch * (prompt_len + n_new), False), products(batch * (prompt_len + n_new), True)
    out = {"sample": n_new * seconds(step), "prior_forward": seconds(full), "update": seconds(full_bwd)}
    out["total"] = sum(out.values())
    return out


def summary(seconds: list[float], warmup: int, batch: int, n_new: int) -> dict:
    """Mean and median seconds of the timed iterations and throughput = B * T / mean."""
    timed = seconds[warmup:]
    return {"seconds": mean(timed), "median_seconds": median(timed), "tokens_per_s": batch * n_new / mean(timed),
            "seconds_all": [round(t, 4) for t in timed]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=8, help="Timed iterations per system at B=64, T=32.")
    p.add_argument("--warmup", type=int, default=2, help="Untimed iterations first.")
    p.add_argument("--sweep-iters", type=int, default=3, help="Timed iterations per sweep point (PPO).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for both systems (default: torch's).")
    p.add_argument("--no-trl", action="store_true", help="Skip TRL.")
    p.add_argument("--no-sweep", action="store_true", help="Skip the PPO length/batch sweep.")
    a = p.parse_args(argv)

    if a.threads is not None:
        torch.set_num_threads(a.threads)
    codec = build_codec("melody")
    result: dict = {
        "model": {"arch": "gpt2", "n_layer": MODEL.n_layer, "n_embd": MODEL.n_embd, "n_head": MODEL.n_head, "vocab": len(codec.tokenizer)},
        "batch": BATCH, "new_tokens": MELODY_STEPS, "k": K, "beta": BETA, "threads": torch.get_num_threads(),
        "warmup": a.warmup, "iters": a.iters, "load_avg_start": os.getloadavg()[0],
    }
    with tempfile.TemporaryDirectory(prefix="rl-bench-prior-") as d:
        prior = save_prior(Path(d), codec, a.seed)
        phases = PhaseClock()
        times, cpu, trl_error = time_head_to_head(prior, codec, warmup=a.warmup, iters=a.iters, seed=a.seed, trl=not a.no_trl,
                                                  phases=phases)
        split = {k: mean(v[a.warmup:]) for k, v in phases.seconds.items()}
        split["reward_update"] = mean(times["rloo"][a.warmup:]) - sum(split.values())
        result["rloo_phase_seconds"] = {k: round(v, 4) for k, v in split.items()}
        for name, seconds in times.items():
            s = summary(seconds, a.warmup, BATCH, MELODY_STEPS)
            s["cpu_seconds"] = mean(cpu[name][a.warmup:])
            log.info("%s: %.3f s/iter (median %.3f, cpu %.3f) %s", name, s["seconds"], s["median_seconds"], s["cpu_seconds"], s["seconds_all"])
            result.update({f"{name}_{k}": v for k, v in s.items()})
        if "trl_rloo" in times:
            result["ratio_rloo_vs_trl"] = result["rloo_tokens_per_s"] / result["trl_rloo_tokens_per_s"]
            result["ratio_ppo_vs_trl_rloo"] = result["ppo_tokens_per_s"] / result["trl_rloo_tokens_per_s"]
            result["ratio_rloo_vs_trl_median"] = result["trl_rloo_median_seconds"] / result["rloo_median_seconds"]
            result["ratio_rloo_vs_trl_cpu"] = result["trl_rloo_cpu_seconds"] / result["rloo_cpu_seconds"]
            # The ratio ours would reach if sampling cost nothing (with our kernels for the rest),
            # and the one no implementation could pass (the matrix products alone).
            result["ratio_ceiling_free_sampling"] = result["trl_rloo_seconds"] / (split["prior_forward"] + split["reward_update"])
            floor = matmul_floor(BATCH, 1, MELODY_STEPS, len(codec.tokenizer))
            result["matmul_floor_seconds"] = {k: round(x, 4) for k, x in floor.items()}
            result["ratio_ceiling_matmul_only"] = result["trl_rloo_seconds"] / floor["total"]
        elif trl_error is not None:
            result["trl_error"] = trl_error
        if not a.no_sweep:
            sweep = {"ppo_seconds_by_length": [(t, BATCH) for t in SWEEP_LENGTHS],
                     "ppo_seconds_by_batch": [(MELODY_STEPS, b) for b in SWEEP_BATCHES]}
            for key, points in sweep.items():
                result[key] = {}
                for t, b in points:
                    if (t, b) == (MELODY_STEPS, BATCH):
                        secs = result["ppo_seconds"]
                    else:
                        secs = summary(time_ours("ppo", prior, codec, n_new=t, batch=b, warmup=1, iters=a.sweep_iters, seed=a.seed), 1, b, t)["seconds"]
                    log.info("ppo T=%d B=%d: %.3f s/iter", t, b, secs)
                    result[key][str(t if key.endswith("length") else b)] = round(secs, 4)
            result["sweep_iters"] = a.sweep_iters
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
