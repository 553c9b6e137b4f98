"""A lean forward pass for Hugging Face GPT-2 models, the hot path of RL on small models.

For a tiny GPT-2 (4 layers, 128 wide) one ``model(...)`` call costs far more in transformers'
bookkeeping (mask construction, cache objects, output dataclasses, hooks) than in arithmetic,
and sampling makes one such call per new token. :func:`forward` computes the same function
from the model's own parameters with a handful of tensor ops per layer: the token and position
embeddings, pre-LN blocks with fused scaled-dot-product attention, ``F.gelu(approximate=
"tanh")`` (the same function as GPT-2's ``gelu_new``, as one kernel instead of five), ``ln_f``
and the tied LM head. It reads and writes a KV cache allocated once per rollout
(:class:`KVCache`), written in place instead of re-concatenated at every step.

It is an exact re-implementation, not an approximation: ``tests/test_fast_gpt2.py`` checks its
logits against transformers' on padded batches, with and without the cache, and its gradients.
:func:`supports` says when it applies (a plain GPT-2 LM whose dropout is inactive); otherwise
callers use transformers' forward, so every other architecture keeps working unchanged.

A GPT-2 subclass whose only change is an additive input embedding computed from the ids (a
task's architecture, e.g. ``counterpoint_columns``) runs here too: its transformer implements
:class:`ExtraEmbeddings`, and each call adds them for the new positions, computed from the ids
so far (``context``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


@runtime_checkable
class ExtraEmbeddings(Protocol):
    """A GPT-2 transformer that adds ``extra_embeddings(ids, last)`` [B, last, H] (a function of
    the ids up to each position, for the last ``last`` positions of ``ids`` [B, L]) to its token
    and position embeddings, and is GPT-2 otherwise. A sampling step asks for one position
    after the whole sequence so far."""

    def extra_embeddings(self, input_ids: torch.Tensor, last: int) -> torch.Tensor: ...


def has_extras(model: torch.nn.Module) -> bool:
    """A GPT-2 LM head model whose transformer adds :class:`ExtraEmbeddings`."""
    return isinstance(model, GPT2LMHeadModel) and isinstance(model.transformer, ExtraEmbeddings)


def supports(model: torch.nn.Module) -> bool:
    """Whether :func:`forward` computes exactly what ``model`` would: a GPT-2 LM head model (or
    one whose transformer is :class:`ExtraEmbeddings`) without cross-attention or
    upcast/reordered attention, a GELU activation, and no active dropout (eval mode, or every
    dropout probability 0)."""
    if type(model) is not GPT2LMHeadModel and not has_extras(model):
        return False
    c = model.config
    if c.add_cross_attention or c.reorder_and_upcast_attn or c.activation_function not in _GELU:
        return False
    if not _plain_layers(model):
        return False
    return not model.training or max(c.embd_pdrop, c.attn_pdrop, c.resid_pdrop) == 0.0


def _plain_layers(model: GPT2LMHeadModel) -> bool:
    """Whether every projection :func:`forward` reads is a plain ``Conv1D``: a layer that peft
    wrapped (LoRA adapters injected into the base model of a ``PeftModel``) adds to its output
    what the weights alone do not say."""
    return all(type(m) is Conv1D for b in model.transformer.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj))


@dataclass
class KVCache:
    """Keys and values of every layer in [B, H, max_len, D] buffers allocated once; slots
    [0, filled) hold the positions seen so far."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    filled: int = 0

    @classmethod
    def empty(cls, model: GPT2LMHeadModel, batch: int, max_len: int) -> "KVCache":
        c = model.config
        p = next(model.parameters())
        shape = (batch, c.n_head, max_len, c.n_embd // c.n_head)
        return cls([p.new_empty(shape) for _ in range(c.n_layer)], [p.new_empty(shape) for _ in range(c.n_layer)])


def attention_mask(key_mask: torch.Tensor, n_query: int) -> torch.Tensor:
    """Boolean SDPA mask [B, 1, Q, K] for the last Q of K positions: causal, and blind to keys
    where ``key_mask`` [B, K] is 0 (left padding). A query always sees itself, so a padding
    query has a finite output (it is never read) instead of a NaN that 0·NaN would spread."""
    k = key_mask.shape[1]
    q_pos = torch.arange(k - n_query, k, device=key_mask.device)[:, None]  # [Q, 1]
    k_pos = torch.arange(k, device=key_mask.device)[None, :]  # [1, K]
    causal = k_pos <= q_pos  # [Q, K]
    return (causal[None] & key_mask.bool()[:, None, :]) | (k_pos == q_pos)[None]  # [B, Q, K]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q·kᵀ·scale, masked)·v for q [B, h, L, d], k, v [B, h, K, d], boolean mask
    [B, 1, L, K]. One query per row (a sampling step) goes through two batched matmuls: for
    such tiny products torch's fused CPU attention kernel costs more than the arithmetic."""
    if q.shape[2] != 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    b, h, _, d = q.shape
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # [B, h, 1, K]
    weights = torch.softmax(scores.masked_fill_(~mask, float("-inf")), dim=-1)
    return torch.matmul(weights, v)  # [B, h, 1, d]


def forward(
    model: GPT2LMHeadModel,
    ids: torch.Tensor,
    positions: torch.Tensor,
    key_mask: torch.Tensor,
    *,
    cache: KVCache | None = None,
    logits_from: int = 0,
    context: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, L - logits_from, V], last hidden states [B, L, H]) of ``ids`` [B, L] at
    ``positions`` [B, L], attending to ``key_mask`` [B, K] (1 on real tokens; K = the cache's
    filled slots + L, or L without a cache). With ``cache`` the new keys and values are
    written into slots [filled, filled + L) and ``filled`` advances. ``context`` [B, K]: every
    id so far, ending with ``ids``, for a transformer with :class:`ExtraEmbeddings` (default:
    ``ids``, right without a cache)."""
    tr, cfg = model.transformer, model.config
    b, n = ids.shape
    h, d = cfg.n_head, cfg.n_embd // cfg.n_head
    scale = d**-0.5 if cfg.scale_attn_weights else 1.0
    approximate = _GELU[cfg.activation_function]
    start = cache.filled if cache is not None else 0
    mask = attention_mask(key_mask, n)[:, None]  # [B, 1, L, K]
    x = tr.wte(ids) + tr.wpe(positions)  # [B, L, H*D]
    if type(model) is not GPT2LMHeadModel:  # supports(): its transformer has ExtraEmbeddings
        x = x + tr.extra_embeddings(ids if context is None else context, n)
    for i, block in enumerate(tr.h):
        layer_scale = scale / (i + 1) if cfg.scale_attn_by_inverse_layer_idx else scale
        a = block.attn
        qkv = torch.addmm(a.c_attn.bias, F.layer_norm(x, (cfg.n_embd,), block.ln_1.weight, block.ln_1.bias,
                                                       cfg.layer_norm_epsilon).view(b * n, -1), a.c_attn.weight)
        q, k, v = qkv.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)  # each [B, h, L, d]
        if cache is not None:
            cache.keys[i][:, :, start : start + n] = k
            cache.values[i][:, :, start : start + n] = v
            k, v = cache.keys[i][:, :, : start + n], cache.values[i][:, :, : start + n]
        att = _attend(q, k, v, mask, layer_scale)  # [B, h, L, d]
        att = torch.addmm(a.c_proj.bias, att.transpose(1, 2).reshape(b * n, -1), a.c_proj.weight)
        x = x + att.view(b, n, -1)
        m = block.mlp
        y = F.layer_norm(x, (cfg.n_embd,), block.ln_2.weight, block.ln_2.bias, cfg.layer_norm_epsilon)
        y = F.gelu(torch.addmm(m.c_fc.bias, y.view(b * n, -1), m.c_fc.weight), approximate=approximate)
        x = x + torch.addmm(m.c_proj.bias, y, m.c_proj.weight).view(b, n, -1)
    if cache is not None:
        cache.filled = start + n
    x = F.layer_norm(x, (cfg.n_embd,), tr.ln_f.weight, tr.ln_f.bias, cfg.layer_norm_epsilon)  # [B, L, H*D]
    return model.lm_head(x[:, logits_from:]), x
