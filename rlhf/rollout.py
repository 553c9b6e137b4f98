"""Batched sampling with a KV cache, and per-token log-probabilities of completions.

Decoder-only and encoder–decoder models go through the same functions. A decoder-only model
reads the prompt as the prefix of the completion (left-padded, positions from the mask); an
encoder–decoder model reads the prompt with its encoder (right-padded: its positions do not
look at the mask) once per rollout, and its decoder writes the completion after the
``decoder_start_token_id``. Prompts are passed left-padded either way (:func:`left_pad`);
:func:`right_align` turns them round for an encoder.

The action space of a task can be a subset of the vocabulary (a counterpoint note is one
of 49 interval tokens, never ``<bos>``); ``allowed`` masks the rest.  Sampling and scoring
both use the *masked* distribution, log p(a|s) = log_softmax(logits masked to allowed),
so that the log-probs of the policy and of the prior describe the same action space.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, runtime_checkable

import torch
from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from rlhf import fast_gpt2, fast_marian
from rlhf.kl import kl_exact, masked_log_softmax
from rlhf.models import is_seq2seq


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

    :func:`decode` with no padding: one forward pass per new token over the whole batch,
    reusing a preallocated KV cache. ``temperature == 0`` is greedy decoding.
    """
    return decode(model, prompts, torch.ones_like(prompts), n_new, allowed=allowed, temperature=temperature,
                  top_k=top_k, top_p=top_p, generator=generator).tokens


def completion_logits(model: PreTrainedModel, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """Logits that predict each completion token: [B, T, V] for completions [B, T]."""
    if is_seq2seq(model):
        return seq2seq_forward(model, prompts, torch.ones_like(prompts), completions)[0]
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


def right_align(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, P] and mask [B, P] turned right-padded: each row's real tokens moved to
    the front, in order (padding ids move to the back unchanged)."""
    p = ids.shape[1]
    shift = p - mask.long().sum(-1, keepdim=True)  # [B, 1] padding before each row
    idx = (torch.arange(p, device=ids.device)[None, :] + shift) % p  # [B, P]
    return ids.gather(1, idx), mask.gather(1, idx)


def shift_right(tokens: torch.Tensor, start_id: int) -> torch.Tensor:
    """[B, T] teacher-forced decoder inputs of completions ``tokens`` [B, T]: the start token,
    then tokens[:, :-1]."""
    return torch.cat([torch.full_like(tokens[:, :1], start_id), tokens[:, :-1]], dim=1)


def seq2seq_forward(
    model: PreTrainedModel, prompts: torch.Tensor, prompt_mask: torch.Tensor, tokens: torch.Tensor, hidden: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`sequence_forward` of an encoder–decoder: the encoder reads the prompts, the decoder
    is teacher-forced on ``tokens``. Logits [B, T, V] (decoder hidden states [B, T, H])."""
    src, src_mask = right_align(prompts, prompt_mask)
    out = model(input_ids=src, attention_mask=src_mask, decoder_input_ids=shift_right(tokens, model.config.decoder_start_token_id), use_cache=False,
                output_hidden_states=hidden)
    return out.logits, (out.decoder_hidden_states[-1] if hidden else None)


def sequence_forward(
    model: PreTrainedModel, prompts: torch.Tensor, prompt_mask: torch.Tensor, tokens: torch.Tensor, hidden: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits [B, T, V] that predict each completion token (and the last hidden states [B, T, H]
    of the same positions if ``hidden``), for left-padded prompts [B, P] and completions [B, T]."""
    if is_seq2seq(model):
        return seq2seq_forward(model, prompts, prompt_mask, tokens, hidden)
    attn = torch.cat([prompt_mask, torch.ones_like(tokens)], dim=1)
    p, t = prompts.shape[1], tokens.shape[1]
    if fast_gpt2.supports(model):
        logits, last = fast_gpt2.forward(model, torch.cat([prompts, tokens], 1), position_ids(attn), attn, logits_from=p - 1)
        return logits[:, :t], (last[:, p - 1 : p + t - 1] if hidden else None)
    # Only the last t + 1 positions need the LM head (forward and backward): with long
    # prompts and a large vocabulary that is most of its cost.
    keep = {"logits_to_keep": t + 1} if _accepts_logits_to_keep(model) else {}
    out = model(input_ids=torch.cat([prompts, tokens], 1), attention_mask=attn, position_ids=position_ids(attn), output_hidden_states=hidden, **keep)
    logits = out.logits[:, :t] if keep else out.logits[:, p - 1 : p + t - 1]
    return logits, (out.hidden_states[-1][:, p - 1 : p + t - 1] if hidden else None)


class PreallocatedLayer(DynamicLayer):
    """A transformers ``DynamicLayer`` whose keys/values live in [B, H, max_len, D] buffers
    allocated once; ``update`` writes the new slots in place and returns views of the filled
    prefix. Same results as ``DynamicLayer`` (which re-concatenates the whole cache at every
    step), and attention still only scans the filled slots (``StaticCache`` scans all max_len)."""

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len, self.filled = max_len, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.key_buf = key_states.new_empty((b, h, self.max_len, d))  # [B, H, max_len, D]
        self.value_buf = value_states.new_empty((b, h, self.max_len, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.filled + key_states.shape[-2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} slots is full")
        self.key_buf[:, :, self.filled : end] = key_states
        self.value_buf[:, :, self.filled : end] = value_states
        self.filled = end
        self.keys, self.values = self.key_buf[:, :, :end], self.value_buf[:, :, :end]
        return self.keys, self.values


def preallocated_cache(model: PreTrainedModel, max_len: int) -> DynamicCache:
    """The model's ``DynamicCache`` with every plain full-attention layer swapped for a
    :class:`PreallocatedLayer` of ``max_len`` slots (sliding-window or other special layers
    are kept as transformers builds them)."""
    cache = decoder_cache(model)
    cache.layers = [PreallocatedLayer(max_len) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def decoder_cache(model: PreTrainedModel) -> DynamicCache:
    """A ``DynamicCache`` with one layer per decoder layer. (An encoder–decoder's text config
    may count its encoder's layers: T5's ``num_layers`` with a deeper ``num_decoder_layers``.)"""
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    c = model.config
    n = (getattr(c, "num_decoder_layers", None) or getattr(c, "decoder_layers", None)) if c.is_encoder_decoder else None
    if n is not None and len(cache.layers) < n:  # plain full-attention layers, as such models have
        cache.layers += [DynamicLayer() for _ in range(n - len(cache.layers))]
    return cache


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[B, 1] one action per row of ``probs`` [B, V] (unnormalised, ≥ 0) for uniforms ``u`` [B]
    in [0, 1), by inverse transform sampling:

        a = min{a : F(a) > u · F(V)},   F(a) = Σ_{a' ≤ a} p(a')

    ``>`` (``searchsorted(right=True)``) never lands on a zero-probability action: F(a) > F(a − 1)
    there. Sums in float64; u · F(V) is kept strictly below F(V) (it could round up to it), so
    the last action with p > 0 is the furthest the search can reach."""
    cdf = probs.double().cumsum(-1)  # [B, V]
    total = cdf[:, -1:]  # [B, 1]
    x = torch.minimum(u.to(cdf)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))  # [B, 1]
    return torch.searchsorted(cdf, x, right=True)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, 1] one sample per row of ``probs`` [B, V]: :func:`inverse_cdf` with one float64
    uniform per row from ``generator``. The same law as ``torch.multinomial(probs, 1)`` at a
    small fraction of its CPU cost for a large vocabulary (one cumsum and a binary search)."""
    device = generator.device if generator is not None else probs.device
    u = torch.rand(probs.shape[0], generator=generator, dtype=torch.float64, device=device)
    return inverse_cdf(probs, u.to(probs.device))


def next_tokens(
    logits: torch.Tensor,
    *,
    probs_fn=None,
    blocked: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row [B, 1] from float logits [B, V].

    ``probs_fn(logits) -> probs`` if given (e.g. ε-greedy over Q-values), else
    softmax(filter(logits masked to the action space / temperature)); ``blocked`` = ~allowed [V].
    ``temperature == 0`` is argmax. One :func:`draw` (one uniform) per row and step, so the
    RNG stream is the one a plain, uncached loop over the same logits consumes.
    """
    if probs_fn is not None:
        return draw(probs_fn(logits), generator)
    if blocked is not None:
        logits = logits.masked_fill(blocked, float("-inf"))
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    if temperature != 1.0:  # x / 1.0 == x exactly: skipping it changes no bit
        logits = logits / temperature
    return draw(torch.softmax(filter_logits(logits, top_k, top_p), dim=-1), generator)


@runtime_checkable
class Wrapper(Protocol):
    """A model that runs another one and passes its keyword arguments through (peft's
    ``PeftModel``, the LoRA prior :class:`rlhf.lora.AdaptersOff`)."""

    def get_base_model(self) -> torch.nn.Module: ...


def _forward_params(model: Any) -> Mapping[str, inspect.Parameter]:
    """The parameters of the forward that finally runs: a :class:`Wrapper`'s own takes
    ``**kwargs`` and would hide ``logits_to_keep`` and the name of the cache argument."""
    inner = model.get_base_model() if isinstance(model, Wrapper) else model
    return inspect.signature(inner.forward).parameters


def _accepts_logits_to_keep(model: PreTrainedModel) -> bool:
    """Whether ``model.forward`` can skip the LM head on all but the last positions."""
    return "logits_to_keep" in _forward_params(model)


def _store(buf: torch.Tensor | None, t: int, x: torch.Tensor, n: int) -> torch.Tensor:
    """buf[:, t] = x [B, D], allocating buf [B, n, D] at the first step."""
    if buf is None:
        buf = x.new_empty((x.shape[0], n, x.shape[-1]))
    buf[:, t] = x
    return buf


@dataclass
class Decoded:
    """What :func:`decode` returns. T ≤ n_new: the loop stops once every row has ended."""

    tokens: torch.Tensor  # [B, T] sampled ids; after a row's EOS: pad (or EOS again)
    logits: torch.Tensor | None  # [B, T, V] raw logits of every step (if keep_logits)
    hidden: torch.Tensor | None  # [B, T, H] last hidden states that produced them (if keep_hidden)


@torch.no_grad()
def decode(
    model: PreTrainedModel,
    prompts: torch.Tensor,
    prompt_mask: torch.Tensor,
    n_new: int,
    *,
    probs_fn=None,
    allowed: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    keep_logits: bool = False,
    keep_hidden: bool = False,
) -> Decoded:
    """Sample up to ``n_new`` tokens after left-padded prompts [B, P] with a KV cache.

    Everything the loop needs is allocated once: the KV cache (written in place instead of
    re-concatenated at every step), the [B, P + n_new] attention mask and position ids (each
    step gets views), and the output buffers. A plain GPT-2 runs through
    :mod:`rlhf.fast_gpt2` (same numbers, a fraction of the per-step overhead); any other model
    through transformers' forward with a :func:`preallocated_cache`.

    With ``eos_id``, a row that has sampled EOS is finished: it emits ``pad_id`` (default:
    ``eos_id``) from then on, and the loop stops as soon as every row is finished. Finished
    rows still draw from the generator, so the other rows' tokens are exactly those of a run
    without EOS (see :func:`eos_lengths` for the lengths).
    """
    was_training = model.training
    model.eval()
    b, p = prompts.shape
    device = prompts.device
    attn = torch.ones((b, p + n_new), dtype=torch.long, device=device)  # [B, L] 1 on real tokens
    attn[:, :p] = prompt_mask
    pos = position_ids(attn)  # [B, L]
    blocked = None if allowed is None else ~allowed  # [V]
    fill = eos_id if pad_id is None else pad_id
    tokens = torch.empty((b, n_new), dtype=torch.long, device=device)  # [B, n_new]
    logits_buf = hidden_buf = None
    done = torch.zeros(b, dtype=torch.bool, device=device)  # [B] row has sampled EOS

    if is_seq2seq(model):  # the encoder runs once; the decoder starts from its start token
        step = _seq2seq_step(model, prompts, prompt_mask, n_new, keep_hidden)
        logits, hid = step(torch.full((b, 1), model.config.decoder_start_token_id, dtype=torch.long, device=device), 0)
    else:
        step = _fast_step(model, attn, pos, p + n_new) if fast_gpt2.supports(model) else _hf_step(model, attn, pos, p + n_new, keep_hidden)
        logits, hid = step(prompts, 0)
    steps = n_new
    for t in range(n_new):
        logits = logits.float()  # [B, V]
        if keep_logits:
            logits_buf = _store(logits_buf, t, logits, n_new)
        if keep_hidden:
            hidden_buf = _store(hidden_buf, t, hid, n_new)
        nxt = next_tokens(logits, probs_fn=probs_fn, blocked=blocked, temperature=temperature, top_k=top_k, top_p=top_p,
                          generator=generator)  # [B, 1]
        if eos_id is not None:
            nxt = nxt.masked_fill(done[:, None], fill)
            done |= nxt[:, 0] == eos_id
        tokens[:, t : t + 1] = nxt
        if t + 1 == n_new or (eos_id is not None and bool(done.all())):
            steps = t + 1
            break
        logits, hid = step(nxt, p + t)
    model.train(was_training)
    return Decoded(tokens[:, :steps], None if logits_buf is None else logits_buf[:, :steps],
                   None if hidden_buf is None else hidden_buf[:, :steps])


def _cache_kw(model: PreTrainedModel) -> str:
    """The name of the KV-cache argument: ``cache`` (transformers ≥ 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def _seq2seq_step(model: PreTrainedModel, prompts: torch.Tensor, prompt_mask: torch.Tensor, n_new: int, keep_hidden: bool):
    """``step(ids [B, 1], start) -> (logits [B, V], last decoder hidden [B, H] or None)`` of an
    encoder–decoder: the encoder runs here, once; each step runs the decoder on one new token
    with a :func:`preallocated_cache` for self-attention (the cross-attention keys and values
    are computed at the first step and kept). A Marian model runs through
    :mod:`rlhf.fast_marian` (same numbers, far less per-step overhead)."""
    src, src_mask = right_align(prompts, prompt_mask)
    if fast_marian.supports(model):
        decoder = fast_marian.Decoder(model, src, src_mask, n_new)
        return lambda ids, start: decoder.step(ids)
    encoded = model.get_encoder()(input_ids=src, attention_mask=src_mask)
    cache = EncoderDecoderCache(preallocated_cache(model, n_new), decoder_cache(model))
    kw = _cache_kw(model)

    def step(ids: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = model(encoder_outputs=encoded, attention_mask=src_mask, decoder_input_ids=ids, use_cache=True,
                    output_hidden_states=keep_hidden, **{kw: cache})
        return out.logits[:, -1, :], (out.decoder_hidden_states[-1][:, -1, :] if keep_hidden else None)

    return step


def _hf_step(model: PreTrainedModel, attn: torch.Tensor, pos: torch.Tensor, max_len: int, keep_hidden: bool):
    """``step(ids [B, n], start) -> (logits [B, V], last hidden [B, H] or None)`` of the last of
    n new positions starting at ``start``, through transformers' forward and a
    :func:`preallocated_cache`. Each call gets views of the preallocated mask and positions."""
    cache = preallocated_cache(model, max_len)
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}  # no LM head over the prompt
    kw = _cache_kw(model)

    def step(ids: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        end = start + ids.shape[1]
        out = model(input_ids=ids, attention_mask=attn[:, :end], position_ids=pos[:, start:end], use_cache=True,
                    output_hidden_states=keep_hidden, **{kw: cache}, **extra)
        return out.logits[:, -1, :], (out.hidden_states[-1][:, -1, :] if keep_hidden else None)

    return step


def _fast_step(model: PreTrainedModel, attn: torch.Tensor, pos: torch.Tensor, max_len: int):
    """:func:`_hf_step` through :func:`rlhf.fast_gpt2.forward` (same numbers, far less
    per-call overhead)."""
    cache = fast_gpt2.KVCache.empty(model, attn.shape[0], max_len)
    # [B, max_len] the ids so far, kept only for a model whose extra embeddings read them
    seen = torch.empty((attn.shape[0], max_len), dtype=torch.long, device=attn.device) if fast_gpt2.has_extras(model) else None

    def step(ids: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + ids.shape[1]
        if seen is not None:
            seen[:, start:end] = ids
        logits, last = fast_gpt2.forward(model, ids, pos[:, start:end], attn[:, :end], cache=cache, logits_from=ids.shape[1] - 1,
                                         context=None if seen is None else seen[:, :end])
        return logits[:, -1, :], last[:, -1, :]

    return step


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
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample up to ``n_new`` tokens after left-padded prompts, with a KV cache: [B, T].

    ``probs_fn(logits [B, V]) -> probs [B, V]`` replaces temperature sampling (e.g. ε-greedy
    over Q-values); by default probs = softmax(masked logits / temperature).
    ``return_logits`` also returns the raw logits of every step [B, T, V] (what a second
    forward pass over the sampled sequence would compute, without paying for it).
    T = n_new unless ``eos_id`` is given and every row ended earlier (see :func:`decode`).
    """
    d = decode(model, prompts, prompt_mask, n_new, probs_fn=probs_fn, allowed=allowed, temperature=temperature,
               generator=generator, eos_id=eos_id, pad_id=pad_id, keep_logits=return_logits)
    return (d.tokens, d.logits) if return_logits else d.tokens


def eos_lengths(tokens: torch.Tensor, eos_id: int | None, limits: torch.Tensor | None = None) -> torch.Tensor:
    """Completion lengths [B]: up to and including the first ``eos_id`` of each row of
    ``tokens`` [B, T] (T if none), capped at ``limits`` [B] if given."""
    b, t = tokens.shape
    lengths = torch.full((b,), t, dtype=torch.long, device=tokens.device)
    if eos_id is not None:
        is_eos = tokens == eos_id  # [B, T]
        first = is_eos.int().argmax(-1)  # [B] index of the first EOS (0 if none)
        lengths = torch.where(is_eos.any(-1), first + 1, lengths)
    return lengths if limits is None else torch.minimum(lengths, limits.to(lengths.device))


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
