"""Batched sampling with a KV cache, and per-token log-probabilities of completions.

The action space of a task can be a subset of the vocabulary (a counterpoint note is one
of 49 interval tokens, never ``<bos>``); ``allowed`` masks the rest.  Sampling and scoring
both use the *masked* distribution, log p(a|s) = log_softmax(logits masked to allowed),
so that the log-probs of the policy and of the prior describe the same action space.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from rlhf.kl import masked_log_softmax


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus (top-p) filtering of [B, V] logits; removed entries become -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    prompts: torch.Tensor,
    n_new: int,
    *,
    allowed: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample ``n_new`` tokens after equal-length ``prompts`` [B, P]; returns [B, n_new].

    One forward pass per new token over the whole batch, reusing the KV cache.
    ``temperature == 0`` is greedy decoding.
    """
    was_training = model.training
    model.eval()
    out = model(input_ids=prompts, use_cache=True)
    past = out.past_key_values
    logits = out.logits[:, -1, :]  # [B, V]
    tokens = []
    for t in range(n_new):
        logits = logits.float()
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        tokens.append(nxt)
        if t + 1 < n_new:
            out = model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1, :]
    model.train(was_training)
    return torch.stack(tokens, dim=1)


def completion_logits(model: PreTrainedModel, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """Logits that predict each completion token: [B, T, V] for completions [B, T]."""
    seq = torch.cat([prompts, completions], dim=1)
    logits = model(input_ids=seq).logits  # [B, P+T, V]
    p = prompts.shape[1]
    return logits[:, p - 1 : -1, :]


def completion_logprobs(
    model: PreTrainedModel, prompts: torch.Tensor, completions: torch.Tensor, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """log p(completion_t | prompt, completion_<t) under the masked distribution: [B, T]."""
    logp = masked_log_softmax(completion_logits(model, prompts, completions).float(), allowed)
    return logp.gather(-1, completions.unsqueeze(-1)).squeeze(-1)


def _groups(prompts: list[list[int]], lengths: list[int], max_batch: int) -> list[list[int]]:
    """Indices grouped by (prompt length, completion length), in chunks of ``max_batch``:
    equal shapes need no padding, so no position-id or attention-mask bookkeeping."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        by_shape.setdefault((len(p), n), []).append(i)
    return [idx[j : j + max_batch] for idx in by_shape.values() for j in range(0, len(idx), max_batch)]


def sample_many(
    model: PreTrainedModel,
    prompts: list[list[int]],
    n_new: list[int],
    *,
    allowed: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    max_batch: int = 512,
) -> list[list[int]]:
    """:func:`sample` over prompts of mixed lengths; returns one completion per prompt."""
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
    for idx in _groups(prompts, n_new, max_batch):
        p = torch.tensor([prompts[i] for i in idx], dtype=torch.long, device=device)
        toks = sample(model, p, n_new[idx[0]], allowed=allowed, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        for i, row in zip(idx, toks.tolist()):
            out[i] = row
    return out


@torch.no_grad()
def logprobs_many(
    model: PreTrainedModel, prompts: list[list[int]], completions: list[list[int]], *, allowed: torch.Tensor | None = None, max_batch: int = 512
) -> list[list[float]]:
    """:func:`completion_logprobs` over prompts of mixed lengths; one list of floats per item."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[float]] = [[] for _ in prompts]
    for idx in _groups(prompts, [len(c) for c in completions], max_batch):
        p = torch.tensor([prompts[i] for i in idx], dtype=torch.long, device=device)
        c = torch.tensor([completions[i] for i in idx], dtype=torch.long, device=device)
        for i, row in zip(idx, completion_logprobs(model, p, c, allowed).tolist()):
            out[i] = row
    model.train(was_training)
    return out


# ----- RL rollouts: prompts of mixed lengths in one batch ------------------------------------


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids [B, P] and their attention mask [B, P] (1 on real tokens)."""
    p = max(len(x) for x in prompts)
    ids = torch.full((len(prompts), p), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), p), dtype=torch.long)
    for i, x in enumerate(prompts):
        ids[i, p - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, p - len(x):] = 1
    return ids.to(device), mask.to(device)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: 0 at each row's first real token. [B, L]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sequence_forward(
    model: PreTrainedModel, prompts: torch.Tensor, prompt_mask: torch.Tensor, tokens: torch.Tensor, hidden: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits [B, T, V] that predict each completion token (and the last hidden states [B, T, H]
    of the same positions if ``hidden``), for left-padded prompts [B, P] and completions [B, T]."""
    attn = torch.cat([prompt_mask, torch.ones_like(tokens)], dim=1)
    out = model(input_ids=torch.cat([prompts, tokens], 1), attention_mask=attn, position_ids=position_ids(attn), output_hidden_states=hidden)
    p, t = prompts.shape[1], tokens.shape[1]
    logits = out.logits[:, p - 1 : p + t - 1]
    return logits, (out.hidden_states[-1][:, p - 1 : p + t - 1] if hidden else None)


@torch.no_grad()
def sample_padded(
    model: PreTrainedModel,
    prompts: torch.Tensor,
    prompt_mask: torch.Tensor,
    n_new: int,
    *,
    probs_fn=None,
    allowed: torch.Tensor | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    return_logits: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample ``n_new`` tokens after left-padded prompts, with a KV cache: [B, n_new].

    ``probs_fn(logits [B, V]) -> probs [B, V]`` replaces temperature sampling (e.g. ε-greedy
    over Q-values); by default probs = softmax(masked logits / temperature).
    ``return_logits`` also returns the raw logits of every step [B, n_new, V] (what a second
    forward pass over the sampled sequence would compute, without paying for it).
    """
    was_training = model.training
    model.eval()
    attn = prompt_mask.clone()
    out = model(input_ids=prompts, attention_mask=attn, position_ids=position_ids(attn), use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1, :]
    next_pos = attn.sum(-1, keepdim=True)  # [B, 1]
    tokens, step_logits = [], []
    for t in range(n_new):
        logits = logits.float()
        if return_logits:
            step_logits.append(logits)
        if probs_fn is not None:
            probs = probs_fn(logits)
        else:
            if allowed is not None:
                logits = logits.masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(logits / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator)  # [B, 1]
        tokens.append(nxt)
        if t + 1 < n_new:
            attn = torch.cat([attn, torch.ones_like(nxt)], dim=1)
            out = model(input_ids=nxt, attention_mask=attn, position_ids=next_pos + t, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1, :]
    model.train(was_training)
    if return_logits:
        return torch.cat(tokens, dim=1), torch.stack(step_logits, dim=1)
    return torch.cat(tokens, dim=1)


def length_mask(lengths: list[int], t: int, device: torch.device | None = None) -> torch.Tensor:
    """[B, T] float mask, 1 on the first ``lengths[b]`` positions."""
    return (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).float().to(device)


@torch.no_grad()
def kl_to_reference_many(
    model: PreTrainedModel, ref: PreTrainedModel, prompts: list[list[int]], completions: list[list[int]], *,
    pad_id: int, allowed: torch.Tensor | None = None, max_batch: int = 256,
) -> list[float]:
    """Exact KL(model‖ref) over the action space at each step of each completion, averaged
    per completion: the "KL to the prior per note" of evaluation tables."""
    from rlhf.kl import kl_exact

    device = next(model.parameters()).device
    out: list[float] = []
    for i in range(0, len(prompts), max_batch):
        ps, cs = prompts[i : i + max_batch], completions[i : i + max_batch]
        ids, pmask = left_pad(ps, pad_id, device)
        t = max(len(c) for c in cs)
        toks = torch.tensor([list(c) + [pad_id] * (t - len(c)) for c in cs], dtype=torch.long, device=device)
        mask = length_mask([len(c) for c in cs], t, device)
        kl = kl_exact(sequence_forward(model, ids, pmask, toks)[0].float(), sequence_forward(ref, ids, pmask, toks)[0].float(), allowed)
        out += ((kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)).tolist()
    return out
