"""MLE pre-training of the prior: next-token cross-entropy on completion tokens.

The loss is taken on completion tokens only (the counterpoint given the cantus, the
melody events given ``<bos>``): the prior is p(completion | prompt), the distribution the
KL term later keeps the policy close to. A decoder-only model reads prompt + completion as one
sequence; an encoder–decoder model reads the prompt with its encoder and is teacher-forced on
the completion (Vaswani et al. 2017), optionally with label smoothing (Szegedy et al. 2016).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from pydantic import Field
from transformers import GPT2LMHeadModel, PreTrainedModel, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from rlhf import distributed
from rlhf.config import CheckpointEvery, EvalEvery, GradClip, KeepCheckpoints, LearningRate, Section, Steps, WarmupSteps, WeightDecay
from rlhf.models import is_seq2seq
from rlhf.rollout import shift_right
from rlhf.runs import Run
from rlhf.trainer import TrainLoop

log = logging.getLogger("rlhf")

Example = tuple[Sequence[int], Sequence[int]]  # (prompt ids, completion ids)


class PretrainConfig(Section):
    steps: Steps = 3000
    batch_size: int = Field(64, ge=1, description="Sequences per optimizer step (global, over all processes).")
    lr: LearningRate = 2e-3
    weight_decay: WeightDecay = 0.01
    warmup_steps: WarmupSteps = 100
    grad_clip: GradClip = 1.0
    eval_every: EvalEvery = 250
    checkpoint_every: CheckpointEvery = 500
    keep_checkpoints: KeepCheckpoints = 2
    label_smoothing: float = Field(
        0.0, ge=0, lt=1,
        description="ε of label smoothing: the training loss is the cross-entropy against (1 − ε)·one-hot + ε·uniform over the "
        "vocabulary (Szegedy et al. 2016); loss/train reports it, loss/val stays the plain NLL. 0 = plain MLE.",
    )
    length_chunks: int = Field(
        1, ge=1,
        description="Sort each batch by length and run it as this many chunks, each padded only to its own "
        "longest sequence. The loss and gradient are the whole batch's (one token mean, one backward), "
        "so this only saves the arithmetic spent on padding: worth it when lengths vary (translation).",
    )


def collate(examples: Sequence[Example], pad_id: int, start_id: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 on prompt and padding). With
    ``start_id`` (an encoder–decoder's decoder start token), :func:`seq2seq_collate` instead."""
    if start_id is not None:
        return seq2seq_collate(examples, pad_id, start_id)
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


def seq2seq_collate(examples: Sequence[Example], pad_id: int, start_id: int) -> dict[str, torch.Tensor]:
    """Encoder input_ids and attention_mask (the prompts, right-padded), labels [B, T] (the
    completions, -100 on padding) and decoder_input_ids [B, T] (start token, then labels[:, :-1])."""
    n, t = max(len(p) for p, _ in examples), max(len(c) for _, c in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    labels = torch.full((len(examples), t), -100, dtype=torch.long)
    for i, (p, c) in enumerate(examples):
        ids[i, : len(p)], mask[i, : len(p)] = torch.tensor(list(p)), 1
        labels[i, : len(c)] = torch.tensor(list(c))
    dec = shift_right(labels.masked_fill(labels == -100, pad_id), start_id)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "decoder_input_ids": dec}


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


def length_chunks(examples: Sequence[Example], n_chunks: int) -> list[list[Example]]:
    """``examples`` sorted by total length and cut into ``n_chunks`` near-equal runs, so that
    each chunk pads to a length close to that of its own members (fewer if there are fewer
    examples)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]) + len(examples[i][1]))
    return [[examples[i] for i in part] for part in np.array_split(order, min(n_chunks, len(examples))) if len(part)]


def token_stats(model: PreTrainedModel, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed NLL, correct next-token predictions, number of predicted tokens) of a batch; with
    ``label_smoothing`` ε > 0 the first entry is the summed label-smoothed cross-entropy.

    A plain GPT-2 (not wrapped for DDP, whose gradient hooks need its own forward) gets the LM
    head only at labelled positions: in translation half the positions are the source or
    padding, and the [positions, vocabulary] logits are the largest tensor of the step."""
    if "decoder_input_ids" in batch:  # encoder–decoder (seq2seq_collate): labels are not shifted
        valid = batch["labels"] != -100  # [B, T]
        target = batch["labels"][valid]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=batch["decoder_input_ids"],
                       use_cache=False).logits[valid]
        nll = torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum", label_smoothing=label_smoothing)
        return nll, (logits.argmax(-1) == target).sum(), valid.sum()
    labels = batch["labels"][:, 1:]
    valid = labels != -100  # [B, T-1]
    target = labels[valid]  # [N]
    if type(model) is GPT2LMHeadModel:
        hidden = model.transformer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = model.lm_head(hidden[:, :-1][valid])  # [N, V]
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][valid]
    nll = torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum", label_smoothing=label_smoothing)
    correct = (logits.argmax(-1) == target).sum()
    return nll, correct, valid.sum()


def start_token(model: PreTrainedModel) -> int | None:
    """The decoder start token of an encoder–decoder model (None for a decoder-only one)."""
    model = getattr(model, "module", model)  # under DDP
    return model.config.decoder_start_token_id if is_seq2seq(model) else None


def chunked_token_stats(model: PreTrainedModel, examples: Sequence[Example], pad_id: int, device: torch.device, n_chunks: int,
                        label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`token_stats` of ``examples`` summed over :func:`length_chunks`: the same sums as
    one padded batch, with less padding."""
    start = start_token(model)
    stats = [token_stats(model, {k: v.to(device) for k, v in collate(c, pad_id, start).items()}, label_smoothing)
             for c in length_chunks(examples, n_chunks)]
    nll, correct, count = (sum(x) for x in zip(*stats))  # each summed over the chunks
    return nll, correct, count


@torch.no_grad()
def evaluate_lm(model: PreTrainedModel, examples: Sequence[Example], pad_id: int, device: torch.device, batch_size: int = 256) -> dict[str, float]:
    """Held-out loss (mean NLL per completion token), perplexity and next-token accuracy."""
    was_training = model.training
    model.eval()
    s, c, n = chunked_token_stats(model, examples, pad_id, device, -(-len(examples) // batch_size)) if examples else (0, 0, 0)
    nll, correct, count = float(s), float(c), float(n)
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
        with loop.autocast():
            nll, correct, count = chunked_token_stats(loop.model, [train[i] for i in idx[shard]], pad_id, loop.device, cfg.length_chunks,
                                                      cfg.label_smoothing)
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
