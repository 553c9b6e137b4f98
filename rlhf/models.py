"""Build or load the Hugging Face causal LMs used as prior and policy.

No weights are ever downloaded: a model is either built from this config (tiny, trained
here) or loaded from a local folder written by ``save_pretrained``.  Users with hub access
can pass a hub id as ``path``; it is handed to ``from_pretrained`` unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase

from rlhf.config import Section
from rlhf.errors import UserError


class ModelConfig(Section):
    arch: Literal["gpt2", "llama"] = Field("gpt2", description="Architecture of a model built from config.")
    n_layer: int = Field(4, ge=1, le=48, description="Transformer blocks.")
    n_embd: int = Field(128, ge=8, le=8192, description="Hidden width; must be divisible by n_head.")
    n_head: int = Field(4, ge=1, le=128, description="Attention heads.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on embeddings, attention and residuals.")
    max_positions: int = Field(128, ge=8, le=65536, description="Longest sequence (prompt + completion) in tokens.")
    path: str | None = Field(
        None, description="Load a pre-trained causal LM from this folder (or hub id) instead of building one."
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelConfig":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); e.g. n_embd=128, n_head=4")
        return self


def build_causal_lm(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A freshly initialised causal LM sized by ``cfg`` with the tokenizer's vocabulary."""
    if cfg.path is not None:
        return load_causal_lm(cfg.path)
    vocab = len(tokenizer)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if cfg.arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_positions=cfg.max_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, **ids,
        )
    else:
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=cfg.n_embd, intermediate_size=4 * cfg.n_embd, num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head, max_position_embeddings=cfg.max_positions, attention_dropout=cfg.dropout, **ids,
        )
    return AutoModelForCausalLM.from_config(config)


def load_causal_lm(path: str | Path) -> PreTrainedModel:
    p = Path(path)
    if p.exists() and not (p / "config.json").is_file():
        raise UserError(f"{p}: not a model folder (no config.json). Point --model at a folder written by save_pretrained, e.g. runs/counterpoint/models/prior.")
    if not p.exists() and (str(path).startswith((".", "/")) or p.suffix):
        raise UserError(f"{p}: model folder not found. Run `rlhf pretrain` first or fix the path.")
    try:
        return AutoModelForCausalLM.from_pretrained(str(path))
    except OSError as e:
        raise UserError(f"{path}: could not load a causal LM ({e}).") from None


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
