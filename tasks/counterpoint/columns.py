"""GPT-2 that sees both voices of a first-species piece at every note: a reward backbone and a
policy architecture (``counterpoint_columns``).

In the task's token scheme (``tokens.py``) note i of the counterpoint is the interval token
``iv_<d_i>`` and its cantus note ``cf_i`` sits S + 1 positions earlier, so a melodic move of the
counterpoint, ``(cf_i + d_i) − (cf_{i−1} + d_{i−1})``, is arithmetic over four tokens. A plain
tiny GPT-2 learns that only in part: as a reward model it stopped at 0.73–0.86 held-out accuracy
for raters who judge the melodic line (docs/results/reward_models.md), and as a policy its last
violations are the melodic rules (`unrecovered_leap`, `forbidden_leap`; docs/results/counterpoint.md).

The architecture is GPT-2 with one change: the input embedding of each token adds the
embeddings of its note column,

    e_t = wte(iv_{d_i}) + wpe(t) + E_cf(cf_i) + E_cp(cp_i) + E_mc(cf_i − cf_{i−1}) + E_mp(cp_i − cp_{i−1})

with ``cp_i = cf_i + d_i`` (moves clipped to ±``MAX_MOVE``; no move on the first note), and, with
``next_note`` (the policy), of what the NEXT note j = i + 1 is judged against, at the token that
predicts it (the last prompt token for j = 0):

    + E_ncf(cf_j) + E_hold(cp_{j−1} − cf_j) + E_nmc(cf_j − cf_{j−1}) + E_left(N − j)

``hold`` is the interval the counterpoint would make if it repeated its note, so the melodic move
of a candidate interval d is ``d − hold``: a leap, its size and its direction are a function of
the candidate token and one input, not of four tokens. ``left`` (notes still to write) tells the
cadence apart. Every term is read from the sequence's own tokens, a lossless re-description like
the interval tokens themselves; what is good is still learned (from the corpus, the labels or the
reward). The sequence, its positions and the heads are GPT-2's, so BT
(``AutoModelForSequenceClassification``), VPL (``AutoModel``), RL scoring and the policy
(``AutoModelForCausalLM``) use it on the task's token ids unchanged, and
:mod:`rlhf.fast_gpt2` runs it through :meth:`ColumnsModel.extra_embeddings`.

Select it with ``model.arch: counterpoint_columns`` (a run config) or ``backbone:
counterpoint_columns`` (a reward config); saved folders have ``model_type: counterpoint_columns``
and load wherever this module is importable (``rlhf.models.ensure_model_type`` imports it through
its entry point).
"""

from __future__ import annotations

from types import MappingProxyType

import torch
import torch.nn as nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    PreTrainedTokenizerBase,
)

from rlhf.errors import UserError
from rlhf.models import ModelConfig
from tasks.counterpoint.tokens import CANTUS_HIGH, CANTUS_LOW, MAX_INTERVAL, SEP, cantus_token, interval_token, mode_vocab

MODEL_TYPE = "counterpoint_columns"
MAX_MOVE = 24  # melodic moves beyond two octaves share the outermost embedding
MAX_HOLD = 36  # |cp_{j-1} - cf_j| beyond three octaves shares the outermost embedding
MAX_LEFT = 32  # notes still to write, clipped


class ColumnsConfig(GPT2Config):
    """GPT-2's config plus where the first-species tokens are in the vocabulary."""

    model_type = MODEL_TYPE
    auto_map = MappingProxyType({})  # no remote code; TRL's loader reads config.auto_map for an architecture transformers does not know

    def __init__(self, cf_first_id: int = 0, iv_first_id: int = 0, sep_id: int = -1, next_note: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.cf_first_id = cf_first_id  # id of cf_<CANTUS_LOW>; cantus ids are contiguous up to cf_<CANTUS_HIGH>
        self.iv_first_id = iv_first_id  # id of iv_-MAX_INTERVAL; interval ids are contiguous
        self.sep_id = sep_id  # id of <sep>, the prompt's last tokens (-1: unknown)
        self.next_note = next_note  # also embed what the next note is judged against (the policy)


def note_columns(input_ids: torch.Tensor, cf_first_id: int, iv_first_id: int, sep_id: int = -1) -> dict[str, torch.Tensor]:
    """Per position of [N, L] first-species ids (left padding allowed):

    - ``valid`` [N, L]: a counterpoint note whose cantus note is in the row; its cantus pitch
      ``cf`` and counterpoint pitch ``cp`` (MIDI), ``has_prev`` (a previous note exists) and the
      moves ``mc = cf − cf_prev``, ``mp = cp − cp_prev``;
    - ``next_valid``: the token predicts counterpoint note j (an interval token, or a ``<sep>``
      after the cantus, the last of which ends the prompt; j < the number of cantus notes), with ``next_cf`` (cf_j), ``next_has_prev`` (j > 0),
      ``hold`` (cp_{j−1} − cf_j), ``next_mc`` (cf_j − cf_{j−1}) and ``left`` (notes from j on).

    Completion note k of a row is its k-th interval token; its cantus note is the row's k-th
    cantus token, wherever the prompt starts and the completion begins. Every value at t is read
    from the ids up to t, so teacher forcing and decoding one token at a time agree."""
    n_iv, n_cf = 2 * MAX_INTERVAL + 1, CANTUS_HIGH - CANTUS_LOW + 1
    iv = input_ids - iv_first_id
    is_iv = (iv >= 0) & (iv < n_iv)  # [N, L]
    cf_idx = input_ids - cf_first_id
    is_cf = (cf_idx >= 0) & (cf_idx < n_cf)
    L = input_ids.shape[1]
    n_notes = is_cf.long().cumsum(-1)  # [N, L] cantus notes up to t: causal, so decoding one token at a time sees the same
    first_cf = is_cf.long().argmax(1, keepdim=True)  # [N, 1] where the cantus starts (0 when it has none)
    done = is_iv.long().cumsum(-1)  # [N, L] interval tokens up to and including t
    k = done - 1  # note index of each interval token

    def cantus_at(note: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        src = (first_cf + note).clamp(0, L - 1)
        ok = (note >= 0) & (note < n_notes) & is_cf.gather(1, src)
        return CANTUS_LOW + cf_idx.gather(1, src), ok

    cf, valid = cantus_at(k)
    valid = valid & is_iv
    cp = cf + iv - MAX_INTERVAL
    # the previous note sits one position back: a completion's interval tokens are contiguous
    has_prev = valid & torch.roll(valid, 1, dims=1) & (k > 0)
    cf_prev, cp_prev = torch.roll(cf, 1, dims=1), torch.roll(cp, 1, dims=1)
    out = {"valid": valid, "cf": cf, "cp": cp, "has_prev": has_prev, "mc": cf - cf_prev, "mp": cp - cp_prev}
    next_cf, next_ok = cantus_at(done)  # note j = done is the one this position predicts
    next_valid = next_ok & (valid | (input_ids == sep_id))  # a <sep> after the cantus: the prompt's last one predicts note 0
    next_has_prev = next_valid & valid  # j > 0: this token is note j - 1
    out.update(next_valid=next_valid, next_cf=next_cf, next_has_prev=next_has_prev, hold=cp - next_cf, next_mc=next_cf - cf,
               left=n_notes - done)
    return out


def _index(x: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Embedding indices of values clipped to [low, high]."""
    return x.clamp(low, high) - low


class ColumnEmbedding(nn.Module):
    """E_cf(cf) + E_cp(cp) + E_mc(move of the cantus) + E_mp(move of the counterpoint) at each
    counterpoint note, plus (``next_note``) the next note's terms; 0 elsewhere ([N, L] ids → [N, L, H])."""

    def __init__(self, config: ColumnsConfig):
        super().__init__()
        h = config.n_embd
        self.cf_first_id, self.iv_first_id = config.cf_first_id, config.iv_first_id
        self.sep_id = getattr(config, "sep_id", -1)
        self.lowest = CANTUS_LOW - MAX_INTERVAL  # lowest counterpoint pitch
        self.cantus = nn.Embedding(CANTUS_HIGH - CANTUS_LOW + 1, h)
        self.counterpoint = nn.Embedding(CANTUS_HIGH - CANTUS_LOW + 2 * MAX_INTERVAL + 1, h)
        self.cantus_move = nn.Embedding(2 * MAX_MOVE + 1, h)
        self.counterpoint_move = nn.Embedding(2 * MAX_MOVE + 1, h)
        self.next_note = bool(getattr(config, "next_note", False))
        if self.next_note:
            self.next_cantus = nn.Embedding(CANTUS_HIGH - CANTUS_LOW + 1, h)
            self.hold = nn.Embedding(2 * MAX_HOLD + 1, h)
            self.next_cantus_move = nn.Embedding(2 * MAX_MOVE + 1, h)
            self.left = nn.Embedding(MAX_LEFT + 1, h)

    def forward(self, input_ids: torch.Tensor, last: int | None = None) -> torch.Tensor:
        """[N, L, H], or with ``last`` [N, last, H] for the last positions only (the columns read
        the whole sequence; the lookups are only made where they are needed)."""
        c = note_columns(input_ids, self.cf_first_id, self.iv_first_id, self.sep_id)
        if last is not None:
            c = {k: v[:, -last:] for k, v in c.items()}
        f = lambda m: m.unsqueeze(-1).float()  # noqa: E731  [N, L] bool -> [N, L, 1]
        e = self.cantus(_index(c["cf"], CANTUS_LOW, CANTUS_HIGH))
        e = e + self.counterpoint(_index(c["cp"] - self.lowest, 0, self.counterpoint.num_embeddings - 1))
        moves = self.cantus_move(_index(c["mc"], -MAX_MOVE, MAX_MOVE)) + self.counterpoint_move(_index(c["mp"], -MAX_MOVE, MAX_MOVE))
        e = (e + moves * f(c["has_prev"])) * f(c["valid"])  # [N, L, H]
        if self.next_note:
            n = self.next_cantus(_index(c["next_cf"], CANTUS_LOW, CANTUS_HIGH)) + self.left(_index(c["left"], 0, MAX_LEFT))
            prev = self.hold(_index(c["hold"], -MAX_HOLD, MAX_HOLD)) + self.next_cantus_move(_index(c["next_mc"], -MAX_MOVE, MAX_MOVE))
            e = e + (n + prev * f(c["next_has_prev"])) * f(c["next_valid"])
        return e


class ColumnsModel(GPT2Model):
    """GPT-2 whose tokens also embed their note column (``AutoModel``). It reads the whole
    sequence at every call, so incremental decoding goes through :mod:`rlhf.fast_gpt2`, which
    adds :meth:`extra_embeddings` of the ids so far at each step."""

    config_class = ColumnsConfig

    def __init__(self, config: ColumnsConfig):
        super().__init__(config)
        self.columns = ColumnEmbedding(config)
        self.post_init()

    def extra_embeddings(self, input_ids: torch.Tensor, last: int) -> torch.Tensor:
        """[N, L] ids -> [N, last, H] for the last ``last`` positions, added to the token and position embeddings."""
        return self.columns(input_ids, last)

    def forward(self, input_ids: torch.Tensor | None = None, *args, inputs_embeds: torch.Tensor | None = None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if input_ids is not None and cache is not None and cache.get_seq_length() > 0:
            raise ValueError(f"{MODEL_TYPE} embeds each token from the whole sequence before it, so it cannot decode one cached "
                             "token at a time through transformers; sample with rlhf.rollout (rlhf.fast_gpt2), or pass the whole sequence")
        if input_ids is not None:
            inputs_embeds = self.wte(input_ids) + self.columns(input_ids)
        return super().forward(None, *args, inputs_embeds=inputs_embeds, **kwargs)


class ColumnsForSequenceClassification(GPT2ForSequenceClassification):
    """The scalar reward read at the last real token, as ``GPT2ForSequenceClassification``."""

    config_class = ColumnsConfig

    def __init__(self, config: ColumnsConfig):
        super().__init__(config)
        self.transformer = ColumnsModel(config)
        self.post_init()


class ColumnsForCausalLM(GPT2LMHeadModel):
    """The policy / prior: GPT-2's LM head (tied to ``wte``) on :class:`ColumnsModel`."""

    config_class = ColumnsConfig

    def __init__(self, config: ColumnsConfig):
        super().__init__(config)
        self.transformer = ColumnsModel(config)
        self.post_init()

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> dict:
        """transformers' ``generate`` (TRL's trainers sample through it): every step reads the
        whole sequence without a KV cache, since each token's column embedding needs the ids
        before it. Slower than :mod:`rlhf.rollout`, which caches through :mod:`rlhf.fast_gpt2`."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0), "use_cache": False}


AutoConfig.register(MODEL_TYPE, ColumnsConfig, exist_ok=True)
AutoModel.register(ColumnsConfig, ColumnsModel, exist_ok=True)
AutoModelForSequenceClassification.register(ColumnsConfig, ColumnsForSequenceClassification, exist_ok=True)
AutoModelForCausalLM.register(ColumnsConfig, ColumnsForCausalLM, exist_ok=True)


def columns_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> ColumnsConfig:
    """The config for ``cfg`` (its GPT-2 sizes) and the task's first-species tokenizer. Built as a
    policy (``model.arch: counterpoint_columns``) it also embeds the next note's terms; as a
    reward backbone (``backbone:``, with ``model.arch: gpt2``) it does not."""
    if cfg.arch not in ("gpt2", MODEL_TYPE):
        raise UserError(f"{MODEL_TYPE} is a GPT-2; set model.arch: gpt2 or {MODEL_TYPE} (got {cfg.arch}).")
    vocab = tokenizer.get_vocab()
    if any(vocab.get(t) != i for i, t in enumerate(mode_vocab("first_species"))):
        raise UserError(f"{MODEL_TYPE} reads first-species counterpoint tokens: in a reward config set data.tokenizer: first_species; "
                        "in a run config use it with task.name: counterpoint, task.mode: first_species.")
    return ColumnsConfig(
        cf_first_id=vocab[cantus_token(CANTUS_LOW)], iv_first_id=vocab[interval_token(-MAX_INTERVAL)],
        sep_id=vocab[SEP], next_note=cfg.arch == MODEL_TYPE,
        vocab_size=len(tokenizer), n_positions=cfg.max_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, activation_function="gelu_pytorch_tanh",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
