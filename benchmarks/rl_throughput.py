"""Throughput of one RL training iteration (rollout + scoring + update): our PPO and RLOO vs.
TRL's ``RLOOTrainer``, and how our PPO iteration time grows with sequence length and batch.

Throughput = generated tokens per iteration / mean iteration seconds = B * T / mean(s), with
B = 64 sequences of T = 32 melody tokens (Sequence Tutor's two bars of 16th-note events) on a
tiny GPT-2 (4 layers, 128 wide, 4 heads), CPU, fp32, torch's default thread count for both
systems. Each system is warmed up, then timed over whole iterations. Prints ONE JSON line on
stdout (everything else goes to stderr):

    python benchmarks/rl_throughput.py [--iters 5] [--warmup 2] [--seed 0] [--no-trl] [--no-sweep]

How the comparison with TRL is kept fair (both measured in this process, one after the other):

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
* timing: ours = wall time of ``Tuner.iteration``; TRL = wall time between consecutive
  ``on_step_end`` callbacks of ``Trainer.train`` (batch fetch + generate + score + update).

Differences that remain: TRL samples with ``model.generate`` (logits processors, stopping
criteria) and scores with its fused LM head (log-probs and entropy without the logits tensor);
ours keeps [B, T, V] logits of policy and prior (V = 42 here, so that is cheap). Both are
each system's normal path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

import numpy as np
import torch

from rlhf.algorithms.common import KLConfig
from rlhf.algorithms.rloo import RLOOConfig as OurRLOOConfig
from rlhf.models import ModelConfig, build_causal_lm
from rlhf.runs import Run
from rlhf.tune import TuneConfig, Tuner
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

    def step_rewards(self, prompts, tokens: torch.Tensor) -> torch.Tensor:
        """r_MT(s_t, a_t) [B, T] (Jaques et al. 2017, sec. 5), for any T."""
        return torch.from_numpy(melody_rewards(self.codec, tokens.cpu().numpy())).float().to(tokens.device)


def melody_rewards(codec: Codec, ids: np.ndarray) -> np.ndarray:
    """[B, T] ``melody_step_rewards`` of completion ids [B, T] (tonic C, default weights)."""
    return melody_step_rewards(codec.completion_values(ids))


def save_prior(folder: Path, codec: Codec, seed: int) -> Path:
    """An untrained GPT-2 of ``MODEL`` size and the melody tokenizer, written with save_pretrained."""
    torch.manual_seed(seed)
    model = build_causal_lm(MODEL, codec.tokenizer)
    model.save_pretrained(folder)
    codec.tokenizer.save_pretrained(folder)
    return folder


def time_ours(algorithm: str, prior: Path, codec: Codec, *, n_new: int, batch: int, warmup: int, iters: int, seed: int) -> dict:
    """Seconds per ``Tuner.iteration`` (rollout → reward → update) after ``warmup`` iterations."""
    cfg = TuneConfig(
        algorithm=algorithm, steps=warmup + iters, batch_size=batch, lr=LR, grad_clip=1.0, checkpoint_every=10**6,
        kl=KLConfig(beta=BETA, estimator="k1" if algorithm == "rloo" else "exact"), rloo=OurRLOOConfig(k=K, epochs=1),
    )
    with tempfile.TemporaryDirectory(prefix="rl-bench-run-") as d:
        tuner = Tuner(Run(d), cfg, MelodyBench(codec, n_new), prior, seed=seed, progress=False)
        times, early = [], []
        for step in range(warmup + iters):
            t0 = time.perf_counter()
            metrics = tuner.iteration(step)
            times.append(time.perf_counter() - t0)
            tuner.loop.advance()
            early.append(metrics.get("ppo/early_stop", 0.0))
    timed = times[warmup:]
    out = {"seconds": mean(timed), "seconds_all": [round(t, 4) for t in timed]}
    if algorithm == "ppo":
        out["early_stop_frac"] = mean(early[warmup:])
    return out


def time_trl(prior: Path, codec: Codec, *, warmup: int, iters: int, seed: int) -> dict:
    """Seconds per optimizer step of TRL's RLOOTrainer configured as our RLOO (see module doc)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    class StepClock(TrainerCallback):
        def __init__(self):
            self.stamps: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            self.stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.stamps.append(time.perf_counter())

    def melody_reward(prompts, completions, completion_ids, **kw) -> list[float]:
        # All completions have 32 ids (no EOS can be sampled), so they stack to [B, T].
        return melody_rewards(codec, np.asarray(completion_ids, dtype=np.int64)).sum(axis=1).tolist()

    steps = warmup + iters
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
    times = np.diff(clock.stamps).tolist()
    if len(times) != steps:
        raise RuntimeError(f"TRL ran {len(times)} optimizer steps, expected {steps}")
    timed = times[warmup:]
    return {"seconds": mean(timed), "seconds_all": [round(t, 4) for t in timed]}


def tokens_per_second(batch: int, n_new: int, seconds: float) -> float:
    return batch * n_new / seconds


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=5, help="Timed iterations per system at B=64, T=32.")
    p.add_argument("--warmup", type=int, default=2, help="Untimed iterations first.")
    p.add_argument("--sweep-iters", type=int, default=3, help="Timed iterations per sweep point (PPO).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-trl", action="store_true", help="Skip TRL.")
    p.add_argument("--no-sweep", action="store_true", help="Skip the PPO length/batch sweep.")
    a = p.parse_args(argv)

    codec = build_codec("melody")
    result: dict = {
        "model": {"arch": "gpt2", "n_layer": MODEL.n_layer, "n_embd": MODEL.n_embd, "n_head": MODEL.n_head, "vocab": len(codec.tokenizer)},
        "batch": BATCH, "new_tokens": MELODY_STEPS, "k": K, "beta": BETA, "threads": torch.get_num_threads(),
        "warmup": a.warmup, "iters": a.iters,
    }
    with tempfile.TemporaryDirectory(prefix="rl-bench-prior-") as d:
        prior = save_prior(Path(d), codec, a.seed)
        run = dict(codec=codec, warmup=a.warmup, seed=a.seed)
        for algo in ("ppo", "rloo"):
            r = time_ours(algo, prior, **run, n_new=MELODY_STEPS, batch=BATCH, iters=a.iters)
            log.info("ours %s: %.3f s/iter %s", algo, r["seconds"], r["seconds_all"])
            result[f"{algo}_seconds"] = r["seconds"]
            result[f"{algo}_seconds_all"] = r["seconds_all"]
            result[f"{algo}_tokens_per_s"] = tokens_per_second(BATCH, MELODY_STEPS, r["seconds"])
            if "early_stop_frac" in r:
                result["ppo_early_stop_frac"] = r["early_stop_frac"]
        if not a.no_trl:
            try:
                r = time_trl(prior, codec, warmup=a.warmup, iters=a.iters, seed=a.seed)
                log.info("trl rloo: %.3f s/iter %s", r["seconds"], r["seconds_all"])
                result["trl_rloo_seconds"] = r["seconds"]
                result["trl_rloo_seconds_all"] = r["seconds_all"]
                result["trl_rloo_tokens_per_s"] = tokens_per_second(BATCH, MELODY_STEPS, r["seconds"])
                result["ratio_rloo_vs_trl"] = result["rloo_tokens_per_s"] / result["trl_rloo_tokens_per_s"]
                result["ratio_ppo_vs_trl_rloo"] = result["ppo_tokens_per_s"] / result["trl_rloo_tokens_per_s"]
            except Exception as e:  # noqa: BLE001 - the benchmark reports why TRL could not run
                log.exception("TRL RLOOTrainer failed")
                result["trl_error"] = f"{type(e).__name__}: {e}"
        if not a.no_sweep:
            by_len, by_batch = {}, {}
            for t in SWEEP_LENGTHS:
                by_len[str(t)] = result["ppo_seconds"] if t == MELODY_STEPS else time_ours(
                    "ppo", prior, **run, n_new=t, batch=BATCH, iters=a.sweep_iters)["seconds"]
                log.info("ppo T=%d B=%d: %.3f s/iter", t, BATCH, by_len[str(t)])
            for b in SWEEP_BATCHES:
                by_batch[str(b)] = result["ppo_seconds"] if b == BATCH else time_ours(
                    "ppo", prior, **run, n_new=MELODY_STEPS, batch=b, iters=a.sweep_iters)["seconds"]
                log.info("ppo T=%d B=%d: %.3f s/iter", MELODY_STEPS, b, by_batch[str(b)])
            result["ppo_seconds_by_length"] = by_len
            result["ppo_seconds_by_batch"] = by_batch
            result["sweep_iters"] = a.sweep_iters
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    warnings.simplefilter("ignore", FutureWarning)
    t_start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # HF Trainer prints its summary to stdout
        res = main()
    res["total_seconds"] = time.perf_counter() - t_start
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}))
