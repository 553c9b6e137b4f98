"""Reward networks on Hugging Face backbones, and the padded pair tensors they read.

A reward model is a sequence-classification model with ``num_labels = 1`` (the scalar reward
is read at the last real token, as ``GPT2ForSequenceClassification`` does with
``config.pad_token_id``), built either tiny from :class:`rlhf.models.ModelConfig` with the
task's tokenizer, or from ``model.path``: a folder written by ``save_pretrained`` (a causal-LM
prior, e.g. ``runs/counterpoint/models/prior``, or a reward model). VPL uses the bare backbone
(``AutoModel``) and its own heads (see ``reward_models/vpl.py``). Nothing is downloaded.

A task can bring its own backbone architecture (``backbone:`` of a reward config, from the
core's registry :data:`rlhf.models.ARCHITECTURES`): a function (model config, tokenizer) →
Hugging Face config whose module registers its model classes with ``AutoConfig`` /
``AutoModel`` / ``AutoModelForSequenceClassification``. Its name is the config's
``model_type``, so a saved folder of that type finds its module again
(:func:`rlhf.models.ensure_model_type`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModel, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from rlhf.errors import UserError
from rlhf.lora import with_lora
from rlhf.models import ARCHITECTURES, ModelConfig, build_model, ensure_model_type, folder_model_type

hf_logging.disable_progress_bar()  # as rlhf.trainer: no "Loading weights" bars from from_pretrained


BACKBONES = ARCHITECTURES
"""Backbone name (= its ``model_type``) -> function (ModelConfig, tokenizer) -> PretrainedConfig:
the core's architecture registry, so one registered architecture serves policies and reward models."""


def backbone_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, backbone: str | None = None) -> PretrainedConfig:
    """The HF config of a backbone built from ``cfg`` (the prior's builder, so both agree), or of
    the registered ``backbone``."""
    if backbone is not None:
        config = BACKBONES.get(backbone)(cfg, tokenizer)
        config.pad_token_id = tokenizer.pad_token_id
        return config
    with torch.device("meta"):  # no weights are materialised: only the config is wanted
        config = build_model(cfg.model_copy(update={"path": None}), tokenizer).config
    config.pad_token_id = tokenizer.pad_token_id
    if getattr(config, "activation_function", None) == "gelu_new":
        # the same function (GELU, tanh approximation) as one fused kernel instead of ~8 ops
        config.activation_function = "gelu_pytorch_tanh"
    return config


def _check_path(path: str) -> None:
    p = Path(path)
    if p.exists() and not (p / "config.json").is_file():
        raise UserError(f"{p}: model.path is not a model folder (no config.json); point it at a folder written by save_pretrained.")
    if not p.exists() and (path.startswith((".", "/")) or p.suffix):
        raise UserError(f"{p}: model.path not found; train a prior first (`rlhf pretrain`) or fix the path.")


def check_lora(cfg: ModelConfig) -> None:
    """``model.lora`` adapts a pre-trained backbone (``model.path``) only: one built from scratch
    would keep its random weights frozen under the adapters."""
    if cfg.lora is not None and cfg.path is None:
        raise UserError("model.lora trains adapters on a pre-trained backbone, but this one is built from scratch (no model.path), so its "
                        "random weights would stay frozen; set model.path to a trained model folder (e.g. runs/counterpoint/models/prior) "
                        "or remove model.lora to train every weight.")


def build_reward_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, backbone: str | None = None) -> PreTrainedModel:
    """A ``*ForSequenceClassification`` with one output, tiny from config (GPT-2/Llama, or the
    registered ``backbone``) or from ``cfg.path``; with ``cfg.lora``, LoRA adapters on the loaded
    backbone (peft's SEQ_CLS: the new score head trains whole)."""
    check_lora(cfg)
    if cfg.path is not None:
        _check_path(cfg.path)
        ensure_model_type(folder_model_type(cfg.path))
        try:
            model = AutoModelForSequenceClassification.from_pretrained(cfg.path, num_labels=1)
        except (OSError, ValueError) as e:
            raise UserError(f"{cfg.path}: could not load a sequence-classification model ({e}).") from None
        set_dropout(model, cfg.dropout)
    else:
        config = backbone_config(cfg, tokenizer, backbone)
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config)
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.config.vocab_size < len(tokenizer):
        raise UserError(f"model vocabulary ({model.config.vocab_size}) is smaller than the tokenizer's ({len(tokenizer)}); use the tokenizer the model was trained with.")
    return model if cfg.lora is None else with_lora(model, cfg.lora, task_type="SEQ_CLS")


def build_backbone(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, backbone: str | None = None) -> PreTrainedModel:
    """The bare transformer (``AutoModel``: hidden states, no head), for VPL (which puts
    ``cfg.lora``'s adapters on it: :func:`reward_models.vpl.build_vpl`)."""
    check_lora(cfg)
    if cfg.path is not None:
        _check_path(cfg.path)
        ensure_model_type(folder_model_type(cfg.path))
        try:
            model = AutoModel.from_pretrained(cfg.path)
        except (OSError, ValueError) as e:
            raise UserError(f"{cfg.path}: could not load a backbone ({e}).") from None
        set_dropout(model, cfg.dropout)
    else:
        model = AutoModel.from_config(backbone_config(cfg, tokenizer, backbone))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Use ``model.dropout`` for a loaded model too (a prior may have been trained with 0.1)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


# --------------------------------------------------------------------------- tensors


@dataclass
class PairTensors:
    """All pairs of a data set over a table of distinct sequences, right-padded once: a batch
    is an index plus a trim to its longest sequence, and a sequence that several pairs share
    (the same answer in many comparisons) can be run through the backbone once per batch."""

    seqs: torch.Tensor  # [U, L] long, distinct sequences
    lens: torch.Tensor  # [U] long
    chosen: torch.Tensor  # [N] long, row of seqs
    rejected: torch.Tensor  # [N] long
    margin: torch.Tensor | None  # [N] float (missing margins are 0), or None when no record has one

    def __len__(self) -> int:
        return int(self.chosen.shape[0])

    @classmethod
    def build(cls, chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]], pad_id: int,
              margins: Sequence[float | None] | None = None) -> "PairTensors":
        table: dict[tuple[int, ...], int] = {}
        ci = [table.setdefault(tuple(s), len(table)) for s in chosen]
        ri = [table.setdefault(tuple(s), len(table)) for s in rejected]
        seqs, lens = pad_sequences(list(table), pad_id)
        m = None
        if margins is not None and any(x is not None for x in margins):
            m = torch.tensor([0.0 if x is None else float(x) for x in margins])
        return cls(seqs, lens, torch.tensor(ci, dtype=torch.long), torch.tensor(ri, dtype=torch.long), m)

    def rows(self, rows: torch.Tensor, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) [R, L_b] of sequence rows, trimmed to the longest."""
        lens = self.lens[rows]
        n = int(lens.max()) if len(rows) else 0
        mask = (torch.arange(n)[None, :] < lens[:, None]).long()
        return self.seqs[rows, :n].to(device), mask.to(device)

    def batch(self, idx: torch.Tensor | Sequence[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """``input_ids`` / ``attention_mask`` of shape [2B, L_b] (chosen rows first, then rejected,
        TRL's layout) and ``margin`` [B] if any."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        ids, mask = self.rows(torch.cat([self.chosen[idx], self.rejected[idx]]), device)
        out = {"input_ids": ids, "attention_mask": mask}
        if self.margin is not None:
            out["margin"] = self.margin[idx].to(device)
        return out

    def unique_batch(self, idx: torch.Tensor | Sequence[int], device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The distinct sequences of pairs ``idx`` and the map back: (batch, inverse [2B]) where
        row ``inverse[i]`` of the batch is sequence i of TRL's [chosen; rejected] layout."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        uniq, inverse = torch.unique(torch.cat([self.chosen[idx], self.rejected[idx]]), return_inverse=True)
        ids, mask = self.rows(uniq, device)
        out = {"input_ids": ids, "attention_mask": mask}
        if self.margin is not None:
            out["margin"] = self.margin[idx].to(device)
        return out, inverse.to(device)


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [N, L] ids and [N] lengths."""
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    out = torch.full((len(seqs), int(lens.max()) if len(seqs) else 0), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out, lens


def last_token_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[N, H] hidden state at each row's last real token (right padding), the pooled
    representation a ``*ForSequenceClassification`` head reads."""
    last = attention_mask.sum(-1).clamp(min=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
