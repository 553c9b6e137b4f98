"""A lean decoding step for Hugging Face Marian models (encoder–decoder), the hot path of RL
rollouts in translation.

Sampling calls the decoder once per new token. Through ``model(...)`` each call pays for
transformers' bookkeeping (mask construction, cache objects, output dataclasses, hooks) on top
of arithmetic that, for a small model, is not much larger. :class:`Decoder` computes the same
function from the model's own parameters: the encoder runs once (transformers' own encoder),
the cross-attention keys and values of every layer are projected once, and each step runs
the post-LN decoder layers (self-attention over a KV cache allocated once and written in
place, cross-attention, feed-forward) and the LM head with its ``final_logits_bias``.

It is an exact re-implementation, not an approximation: ``tests/test_seq2seq.py`` checks its
logits against transformers' forward on padded batches. :func:`supports` says when it applies
(a ``MarianMTModel`` whose dropout is inactive); otherwise callers use transformers' forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import MarianMTModel

_ACT = {"swish": F.silu, "silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def supports(model: torch.nn.Module) -> bool:
    """Whether :class:`Decoder` computes exactly what ``model`` would: a Marian MT model with a
    plain activation, no layer drop, eager or SDPA attention, and no active dropout."""
    if type(model) is not MarianMTModel:
        return False
    c = model.config
    if c.activation_function not in _ACT or c.decoder_layerdrop > 0:
        return False
    return not model.training or max(c.dropout, c.attention_dropout, c.activation_dropout) == 0.0


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """[B, L, h*d] → [B, h, L, d]."""
    b, n, _ = x.shape
    return x.view(b, n, h, -1).transpose(1, 2)


class Decoder:
    """One rollout's decoder state: ``step(ids [B, 1]) -> (logits [B, V], last hidden [B, H])``.

    Built from right-padded sources ``src`` [B, S] and ``src_mask`` [B, S]; holds the
    cross-attention keys and values of every layer ([B, h, S, d], computed once) and a
    self-attention cache of ``max_len`` slots per layer."""

    def __init__(self, model: MarianMTModel, src: torch.Tensor, src_mask: torch.Tensor, max_len: int):
        self.model, c = model, model.config
        self.h, self.act = c.decoder_attention_heads, _ACT[c.activation_function]
        dec = model.get_decoder()
        memory = model.get_encoder()(input_ids=src, attention_mask=src_mask).last_hidden_state  # [B, S, H]
        self.cross = [(_heads(layer.encoder_attn.k_proj(memory), self.h), _heads(layer.encoder_attn.v_proj(memory), self.h)) for layer in dec.layers]
        self.src_mask = src_mask.bool()[:, None, None, :]  # [B, 1, 1, S]
        b, d = src.shape[0], c.d_model // self.h
        self.keys = [memory.new_empty((b, self.h, max_len, d)) for _ in dec.layers]  # [B, h, max_len, d] per layer
        self.values = [memory.new_empty((b, self.h, max_len, d)) for _ in dec.layers]
        self.filled = 0

    def step(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if ids.shape[1] != 1:
            raise ValueError(f"one new token per step, got {ids.shape[1]}")
        dec, t = self.model.get_decoder(), self.filled
        x = dec.embed_tokens(ids) * dec.embed_scale + dec.embed_positions.weight[t : t + ids.shape[1]]  # [B, 1, H]
        for i, layer in enumerate(dec.layers):
            a = layer.self_attn
            q = _heads(a.q_proj(x), self.h)  # [B, h, 1, d]
            self.keys[i][:, :, t : t + 1] = _heads(a.k_proj(x), self.h)
            self.values[i][:, :, t : t + 1] = _heads(a.v_proj(x), self.h)
            # one query at the newest position: every cached key is in its causal past
            att = F.scaled_dot_product_attention(q, self.keys[i][:, :, : t + 1], self.values[i][:, :, : t + 1], scale=a.scaling)
            x = layer.self_attn_layer_norm(x + a.out_proj(att.transpose(1, 2).flatten(2)))
            e = layer.encoder_attn
            k, v = self.cross[i]
            att = F.scaled_dot_product_attention(_heads(e.q_proj(x), self.h), k, v, attn_mask=self.src_mask, scale=e.scaling)
            x = layer.encoder_attn_layer_norm(x + e.out_proj(att.transpose(1, 2).flatten(2)))
            x = layer.final_layer_norm(x + layer.fc2(self.act(layer.fc1(x))))
        self.filled = t + 1
        last = x[:, -1]  # [B, H]
        return self.model.lm_head(last) + self.model.final_logits_bias[0], last
