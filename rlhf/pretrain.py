"""MLE pre-training of the prior: next-token cross-entropy on completion tokens.

The loss is taken on completion tokens only (the counterpoint given the cantus, the
melody events given ``<bos>``): the prior is p(completion | prompt), the distribution the
KL term later keeps the policy close to.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from pydantic import Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from rlhf import distributed
from rlhf.config import Section
from rlhf.runs import Run
from rlhf.trainer import TrainLoop

log = logging.getLogger("rlhf")

Example = tuple[Sequence[int], Sequence[int]]  # (prompt ids, completion ids)


class PretrainConfig(Section):
    steps: int = Field(3000, ge=1, description="Optimizer steps of MLE training.")
    batch_size: int = Field(64, ge=1, description="Sequences per optimizer step (global, over all processes).")
    lr: float = Field(2e-3, gt=0, le=1.0, description="Peak learning rate (AdamW, cosine decay after warm-up).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps.")
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm to this value.")
    eval_every: int = Field(250, ge=1, description="Held-out loss every this many steps.")
    checkpoint_every: int = Field(500, ge=1, description="Write a resumable checkpoint every this many steps.")
    keep_checkpoints: int = Field(2, ge=1, description="How many of the newest checkpoints to keep.")


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 on prompt and padding)."""
    seqs = [list(p) + list(c) for p, c in examples]
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), n), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, ((p, c), s) in enumerate(zip(examples, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, len(p) : len(s)] = torch.tensor(list(c))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_indices(n_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the global batch of ``step``: epoch-wise shuffles, so any step is reproducible
    without replaying earlier ones (what makes ``--resume`` exact)."""
    start = step * batch_size
    idx = []
    while len(idx) < batch_size:
        epoch, offset = divmod(start + len(idx), n_examples)
        perm = np.random.default_rng([seed, epoch]).permutation(n_examples)
        idx.extend(perm[offset : offset + batch_size - len(idx)].tolist())
    return np.asarray(idx)


def token_stats(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed NLL, correct next-token predictions, number of predicted tokens) of a batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    valid = labels != -100
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="sum")
    correct = ((logits.argmax(-1) == labels) & valid).sum()
    return nll, correct, valid.sum()


@torch.no_grad()
def evaluate_lm(model: PreTrainedModel, examples: Sequence[Example], pad_id: int, device: torch.device, batch_size: int = 256) -> dict[str, float]:
    """Held-out loss (mean NLL per completion token), perplexity and next-token accuracy."""
    was_training = model.training
    model.eval()
    nll = correct = count = 0.0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
        s, c, n = token_stats(model, batch)
        nll, correct, count = nll + float(s), correct + float(c), count + float(n)
    model.train(was_training)
    loss = nll / max(count, 1.0)
    return {"loss/val": loss, "ppl/val": math.exp(min(loss, 50.0)), "acc/val": correct / max(count, 1.0)}


def pretrain(
    run: Run,
    cfg: PretrainConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: Sequence[Example],
    val: Sequence[Example],
    *,
    seed: int,
    resume: bool = False,
    progress: bool = True,
    stage: str = "prior",
) -> Path:
    """Train ``model`` by MLE; returns the folder of the final model (``run/models/<stage>``)."""
    if not train:
        raise ValueError("pretrain: the training set is empty")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    loop = TrainLoop(
        run, stage, model, optimizer, scheduler, total_steps=cfg.steps, checkpoint_every=cfg.checkpoint_every,
        keep_checkpoints=cfg.keep_checkpoints, grad_clip=cfg.grad_clip, tokenizer=tokenizer, progress=progress,
    )
    if resume:
        loop.resume()
    acc = loop.accelerator
    pad_id = tokenizer.pad_token_id
    # Each process takes its slice of the same global batch, so the result does not depend
    # on the number of processes (up to floating-point summation order).
    shard = slice(*distributed.shard_bounds(cfg.batch_size, "pretrain.batch_size"))
    loop.model.train()
    for step in loop.steps():
        idx = batch_indices(len(train), cfg.batch_size, step, seed)
        mine = idx[shard]
        batch = {k: v.to(loop.device) for k, v in collate([train[i] for i in mine], pad_id).items()}
        nll, correct, count = token_stats(loop.model, batch)
        if acc.num_processes == 1:
            loss = nll / count.clamp(min=1)
            metrics = loop.update(loss)
            metrics.update({"loss/train": float(loss.detach()), "acc/train": float(correct) / max(float(count), 1.0)})
        else:
            # ranks hold different numbers of completion tokens: normalise by the global count
            # so that DDP's gradient mean is the gradient of the global token mean
            total = distributed.all_sum(torch.stack([count.double(), nll.detach().double(), correct.double()]))
            loss = nll * (acc.num_processes / total[0].clamp(min=1).item())
            metrics = loop.update(loss)
            # identical on every rank, so loop.log's mean over ranks keeps them
            metrics.update({"loss/train": float(total[1] / total[0].clamp(min=1)), "acc/train": float(total[2] / total[0].clamp(min=1))})
        if loop.step % cfg.eval_every == 0 or loop.step == cfg.steps:
            metrics.update(evaluate_lm(loop.unwrapped, val, pad_id, loop.device) if val else {})
        loop.log(metrics)
    return loop.finish(run.final_model_dir(stage))
