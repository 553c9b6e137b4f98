"""Bradley-Terry reward model: p(a ≻ b) = σ(r(a) − r(b)), trained on pairwise preferences.

Bradley & Terry (1952); as a reward model for RLHF: Christiano et al. (2017), Ouyang et al.
(2022), eq. 1. The network is a Hugging Face sequence-classification model (num_labels = 1).

The training loop is ours (``rlhf.trainer.TrainLoop``: accelerate, checkpoints, resume,
metrics) rather than ``trl.RewardTrainer``, because it shares data handling and evaluation
with VPL and reads the counterpoint task's token strings; ``tests/test_reward_training.py``
shows that both give the same loss on the same batch, and ``benchmarks/reward_training.py``
compares their speed. The data is TRL's format, so ``RewardTrainer`` can train on it too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from reward_models.backbone import PairTensors
from reward_models.data import Preference, comparable, encode_pairs
from reward_models.metrics import summary
from rlhf.config import CheckpointEvery, EMADecay, EvalEvery, GradClip, KeepCheckpoints, LearningRate, Section, Steps, WarmupSteps, WeightDecay
from rlhf.pretrain import batch_indices
from rlhf.errors import UserError
from rlhf.runs import Run
from rlhf import distributed
from rlhf.trainer import TrainLoop

log = logging.getLogger("rlhf")


# --------------------------------------------------------------------------- math


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
            center_coef: float | None = None) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood with optional margin and reward centring:

        L = (1/B) Σ_i −log σ(r_c,i − r_r,i − m_i)  +  λ · (1/B) Σ_i (r_c,i + r_r,i)²

    The margin m (Touvron et al. 2023, Llama 2, eq. 2) asks for a larger gap on clearer
    pairs; the centring term (λ = ``center_coef``; Eisenstein et al. 2023, "Helping or
    herding?") pins the free additive constant of r near 0. Same as ``trl.RewardTrainer``.
    """
    d = r_chosen - r_rejected
    if margin is not None:
        d = d - margin
    loss = -F.logsigmoid(d).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def fit_linear_bt(gaps: torch.Tensor, ridge: float = 1e-6, iters: int = 50) -> torch.Tensor:
    """Maximum-likelihood weights w [F] of the linear Bradley-Terry reward r(x) = w · φ(x) from
    feature gaps x_i = φ(chosen_i) − φ(rejected_i) [N, F]:

        w = argmin_w −(1/N) Σ_i log σ(w · x_i) + (λ/2)‖w‖²

    by Newton's method (the objective is convex; the tiny ridge λ keeps it finite when the data
    are separable). With the simulator's own features this is the best reward BT's likelihood
    can choose, the reference for a learned BT reward (reward_models/evaluate.py ceilings)."""
    x = gaps.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64)
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    for _ in range(iters):
        p = torch.sigmoid(x @ w)  # [N] P(chosen wins)
        grad = -(x * (1 - p)[:, None]).mean(0) + ridge * w  # [F]
        hess = (x * (p * (1 - p))[:, None]).T @ x / len(x) + ridge * eye  # [F, F]
        step = torch.linalg.solve(hess, grad)
        w = w - step
        if float(step.abs().max()) < 1e-10:
            break
    return w


def rewards(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[N] scalar rewards of right-padded sequences."""
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.squeeze(-1)


def pair_rewards(model: PreTrainedModel, batch: dict[str, torch.Tensor], inverse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen [B], r_rejected [B]) from one forward over TRL's [chosen; rejected] layout, or
    over the distinct sequences of a batch mapped back by ``inverse`` (PairTensors.unique_batch)."""
    r = rewards(model, batch["input_ids"], batch["attention_mask"])
    if inverse is not None:
        r = r[inverse]
    return r.chunk(2)


# --------------------------------------------------------------------------- training


class BTConfig(Section):
    steps: Steps = 600
    batch_size: int = Field(64, ge=1, description="Preference pairs per optimizer step (global).")
    lr: LearningRate = 1e-3
    weight_decay: WeightDecay = 0.0
    warmup_steps: WarmupSteps = 20
    grad_clip: GradClip = 1.0
    center_coef: float | None = Field(None, ge=0, description="Reward centring λ·mean((r_c + r_r)²) as TRL's center_rewards_coefficient; null = off.")
    ema: EMADecay = None
    eval_every: EvalEvery = 100
    checkpoint_every: CheckpointEvery = 200
    keep_checkpoints: KeepCheckpoints = 2


def pair_tensors(records: Sequence[Preference], tokenizer: PreTrainedTokenizerBase, max_length: int | None = None) -> PairTensors:
    """Tokenize the non-tie records (TRL's way) into padded tensors."""
    recs = comparable(records)
    chosen, rejected = encode_pairs(recs, tokenizer, max_length)
    return PairTensors.build(chosen, rejected, tokenizer.pad_token_id, [r.margin for r in recs])


@torch.no_grad()
def score_pairs(model: PreTrainedModel, pairs: PairTensors, batch_size: int = 512) -> np.ndarray:
    """[N] Δ = r(chosen) − r(rejected) for every pair, in eval mode."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(pairs), batch_size):
        rc, rr = pair_rewards(model, *pairs.unique_batch(torch.arange(i, min(i + batch_size, len(pairs))), device))
        out.append((rc - rr).float().cpu())
    model.train(was)
    return torch.cat(out).numpy() if out else np.zeros(0)


class PairTrainer:
    """The loop shared by the BT and VPL trainers: ``step`` every iteration, ``evaluate`` every
    ``cfg.eval_every`` steps and at the end; subclasses set ``loop`` and ``cfg``."""

    loop: TrainLoop
    cfg: Any

    def _build_loop(self, run: Run, stage: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, progress: bool,
                    global_rows: int, what: str) -> None:
        """AdamW (fused: one kernel over all parameter tensors, several times faster per step on
        CPU) with cosine warm-up, the training loop, and this rank's ``shard`` of the
        ``global_rows`` drawn per step (the same global batch on every rank)."""
        cfg = self.cfg
        trainable = [p for p in model.parameters() if p.requires_grad]  # with model.lora: the adapters and the heads
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
        self.loop = TrainLoop(run, stage, model, optimizer, scheduler, total_steps=cfg.steps, checkpoint_every=cfg.checkpoint_every,
                              keep_checkpoints=cfg.keep_checkpoints, grad_clip=cfg.grad_clip, tokenizer=tokenizer, progress=progress)
        self.shard = slice(*distributed.shard_bounds(global_rows, what))
        self.ema = None
        if cfg.ema is not None:
            if distributed.is_deepspeed(self.loop.model):  # ZeRO partitions the parameters this average would copy
                raise UserError(f"{what.split('.')[0]}.ema: weight averaging is not available under DeepSpeed; set it to null")
            self.ema = AveragedModel(self.loop.unwrapped, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=False)
            self.loop.extra_state["ema"] = self.ema.state_dict  # called at save time: resume continues the same average

    def step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def fit(self, resume: bool = False) -> None:
        resumed = self.loop.resume() if resume else False
        if resumed and self.ema is not None:
            if "ema" not in self.loop.extra_state:
                raise UserError(f"{self.loop.run.latest_checkpoint(self.loop.stage)}: written without ema; resume with the config that wrote it")
            self.ema.load_state_dict(self.loop.extra_state["ema"])
            self.loop.extra_state["ema"] = self.ema.state_dict
        self.loop.model.train()
        for step in self.loop.steps():
            metrics = self.step(step)
            if self.ema is not None:
                self.ema.update_parameters(self.loop.unwrapped)
                if self.loop.step == self.cfg.steps:  # the average becomes the model: evaluated, saved, used
                    torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(self.ema.module.parameters()),
                                                        self.loop.unwrapped.parameters())
            if self.loop.step % self.cfg.eval_every == 0 or self.loop.step == self.cfg.steps:
                metrics.update(self.evaluate())
            self.loop.log(metrics)


class BTTrainer(PairTrainer):
    """One Bradley-Terry training run; :meth:`step` is one optimizer step (used by the benchmark)."""

    def __init__(self, run: Run, cfg: BTConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 train: PairTensors, val: PairTensors | None, *, seed: int, progress: bool = True, stage: str = "reward-bt"):
        if len(train) == 0:
            raise ValueError("BT training: no comparable (non-tie) training pairs")
        self.cfg, self.train, self.val, self.seed = cfg, train, val, seed
        self._build_loop(run, stage, model, tokenizer, progress, cfg.batch_size, "bt.batch_size")

    def step(self, step: int) -> dict[str, float]:
        """One optimizer step on the global batch of ``step`` (this process's slice)."""
        idx = batch_indices(len(self.train), self.cfg.batch_size, step, self.seed)
        mine = idx[self.shard]
        batch, inverse = self.train.unique_batch(mine, self.loop.device)  # each distinct sequence once
        with self.loop.autocast():
            rc, rr = (r.float() for r in pair_rewards(self.loop.model, batch, inverse))  # the loss in float32 under mixed precision
        bt = bt_loss(rc, rr, batch.get("margin"))
        loss = bt_loss(rc, rr, batch.get("margin"), self.cfg.center_coef) if self.cfg.center_coef else bt
        metrics = self.loop.update(loss)
        with torch.no_grad():
            metrics.update({
                "loss/train": float(loss), "loss/bt": float(bt), "acc/pairwise": float(((rc > rr).float() + 0.5 * (rc == rr).float()).mean()),
                "reward/mean": float(torch.cat([rc, rr]).mean()), "reward/gap": float((rc - rr).mean()),
            })
        return metrics

    def evaluate(self) -> dict[str, float]:
        if self.val is None or len(self.val) == 0:
            return {}
        return summary(score_pairs(self.loop.unwrapped, self.val), None if self.val.margin is None else self.val.margin.numpy(), split="val")



def train_bt(run: Run, cfg: BTConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
             train: Sequence[Preference], val: Sequence[Preference] = (), *, seed: int, resume: bool = False,
             progress: bool = True, stage: str = "reward-bt", max_length: int | None = None) -> Path:
    """Train ``model`` on ``train`` (ties left out); returns the final model folder ``run/models/<stage>``."""
    tr = pair_tensors(train, tokenizer, max_length)
    va = pair_tensors(val, tokenizer, max_length) if comparable(val) else None
    trainer = BTTrainer(run, cfg, model, tokenizer, tr, va, seed=seed, progress=progress, stage=stage)
    trainer.fit(resume)
    return trainer.loop.finish(run.final_model_dir(stage))
