"""A reward backbone that sees both voices of a first-species piece at every note.

A preference over counterpoint is a function of each voice's melodic motion (steps, leaps,
contrary motion) as much as of the vertical intervals. In the task's token scheme
(``tokens.py``) note i of the counterpoint is the interval token ``iv_<d_i>``, and its cantus
note ``cf_i`` sits S + 1 positions earlier; a melodic move of the counterpoint is
``(cf_i + d_i) − (cf_{i−1} + d_{i−1})``, arithmetic over four tokens. A plain 2-layer GPT-2
learns that from one bit per labelled pair only in part: on the music preference set it
stopped at 0.73–0.86 held-out accuracy for the `stepwise` raters (docs/results/reward_models.md).

This backbone is GPT-2 with one change: the input embedding of each counterpoint token adds
the embeddings of its note column,

    e_t = wte(iv_{d_i}) + wpe(t) + E_cf(cf_i) + E_cp(cp_i) + E_mc(cf_i − cf_{i−1}) + E_mp(cp_i − cp_{i−1})

with ``cp_i = cf_i + d_i`` (moves clipped to ±``MAX_MOVE``; no move on the first note). Every
term is read from the piece's own tokens: the two voices' pitches and their melodic intervals,
a lossless re-description of the piece, like the interval tokens themselves. Which moves and
sonorities a rater likes is still learned from the labels. The sequence, its positions and the
last-token reward read-out are GPT-2's, so BT (``AutoModelForSequenceClassification``), VPL
(``AutoModel``) and RL scoring (``RewardSource``) use it on the task's token ids unchanged.

Select it with ``backbone: counterpoint_columns`` in a reward config (``configs/reward-music.yaml``);
saved folders have ``model_type: counterpoint_columns`` and load wherever this module is
importable (``reward_models.backbone.ensure_model_type`` imports it through its entry point).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, GPT2Config, GPT2ForSequenceClassification, GPT2Model, PreTrainedTokenizerBase

from rlhf.errors import UserError
from rlhf.models import ModelConfig
from tasks.counterpoint.tokens import CANTUS_HIGH, CANTUS_LOW, MAX_INTERVAL, cantus_token, interval_token, mode_vocab

MODEL_TYPE = "counterpoint_columns"
MAX_MOVE = 24  # melodic moves beyond two octaves share the outermost embedding


class ColumnsConfig(GPT2Config):
    """GPT-2's config plus where the first-species tokens are in the vocabulary."""

    model_type = MODEL_TYPE

    def __init__(self, cf_first_id: int = 0, iv_first_id: int = 0, cantus_offset: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.cf_first_id = cf_first_id  # id of cf_<CANTUS_LOW>; cantus ids are contiguous up to cf_<CANTUS_HIGH>
        self.iv_first_id = iv_first_id  # id of iv_-MAX_INTERVAL; interval ids are contiguous
        self.cantus_offset = cantus_offset  # position of cf_1 in a prompt (<bos> <cf_pos> cf_1 ...)


def note_columns(input_ids: torch.Tensor, cf_first_id: int, iv_first_id: int, cantus_offset: int) -> dict[str, torch.Tensor]:
    """Per position of [N, L] first-species ids: ``valid`` [N, L] (a counterpoint note whose
    cantus note is in the row), its cantus pitch ``cf`` and counterpoint pitch ``cp`` (MIDI), and
    ``has_prev`` (a previous note exists, so the moves ``cf − cf_prev`` and ``cp − cp_prev``
    are defined). Completion note k of a row is its k-th interval token; its cantus note is the
    k-th token after ``cantus_offset``, wherever the completion starts (any ``cantus_slots``)."""
    n_iv, n_cf = 2 * MAX_INTERVAL + 1, CANTUS_HIGH - CANTUS_LOW + 1
    iv = input_ids - iv_first_id
    is_iv = (iv >= 0) & (iv < n_iv)  # [N, L]
    cf_idx = input_ids - cf_first_id
    is_cf = (cf_idx >= 0) & (cf_idx < n_cf)
    L = input_ids.shape[1]
    k = is_iv.long().cumsum(-1) - 1  # note index of each interval token
    src = (cantus_offset + k).clamp(0, L - 1)  # where its cantus note is
    valid = is_iv & (cantus_offset + k < L) & is_cf.gather(1, src)
    cf = CANTUS_LOW + cf_idx.gather(1, src)
    cp = cf + iv - MAX_INTERVAL
    # the previous note sits one position back: a completion's interval tokens are contiguous
    has_prev = valid & torch.roll(valid, 1, dims=1) & (k > 0)
    cf_prev, cp_prev = torch.roll(cf, 1, dims=1), torch.roll(cp, 1, dims=1)
    return {"valid": valid, "cf": cf, "cp": cp, "has_prev": has_prev, "mc": cf - cf_prev, "mp": cp - cp_prev}


class ColumnEmbedding(nn.Module):
    """E_cf(cf) + E_cp(cp) + E_mc(move of the cantus) + E_mp(move of the counterpoint) at each
    counterpoint note, 0 elsewhere ([N, L] ids → [N, L, H])."""

    def __init__(self, config: ColumnsConfig):
        super().__init__()
        h = config.n_embd
        self.cf_first_id, self.iv_first_id, self.cantus_offset = config.cf_first_id, config.iv_first_id, config.cantus_offset
        self.lowest = CANTUS_LOW - MAX_INTERVAL  # lowest counterpoint pitch
        self.cantus = nn.Embedding(CANTUS_HIGH - CANTUS_LOW + 1, h)
        self.counterpoint = nn.Embedding(CANTUS_HIGH - CANTUS_LOW + 2 * MAX_INTERVAL + 1, h)
        self.cantus_move = nn.Embedding(2 * MAX_MOVE + 1, h)
        self.counterpoint_move = nn.Embedding(2 * MAX_MOVE + 1, h)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        c = note_columns(input_ids, self.cf_first_id, self.iv_first_id, self.cantus_offset)
        v, p = c["valid"], c["has_prev"]
        e = self.cantus((c["cf"] - CANTUS_LOW).clamp(0, self.cantus.num_embeddings - 1))
        e = e + self.counterpoint((c["cp"] - self.lowest).clamp(0, self.counterpoint.num_embeddings - 1))
        moves = self.cantus_move((c["mc"].clamp(-MAX_MOVE, MAX_MOVE) + MAX_MOVE)) + self.counterpoint_move(c["mp"].clamp(-MAX_MOVE, MAX_MOVE) + MAX_MOVE)
        e = e + moves * p.unsqueeze(-1).to(e.dtype)
        return e * v.unsqueeze(-1).to(e.dtype)  # [N, L, H]


class ColumnsModel(GPT2Model):
    """GPT-2 whose counterpoint tokens also embed their note column (``AutoModel``)."""

    config_class = ColumnsConfig

    def __init__(self, config: ColumnsConfig):
        super().__init__(config)
        self.columns = ColumnEmbedding(config)
        self.post_init()

    def forward(self, input_ids: torch.Tensor | None = None, *args, inputs_embeds: torch.Tensor | None = None, **kwargs):
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


AutoConfig.register(MODEL_TYPE, ColumnsConfig, exist_ok=True)
AutoModel.register(ColumnsConfig, ColumnsModel, exist_ok=True)
AutoModelForSequenceClassification.register(ColumnsConfig, ColumnsForSequenceClassification, exist_ok=True)


def columns_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> ColumnsConfig:
    """The backbone config for ``cfg`` (its GPT-2 sizes) and the task's first-species tokenizer."""
    if cfg.arch != "gpt2":
        raise UserError(f"backbone {MODEL_TYPE} is a GPT-2; set model.arch: gpt2 (got {cfg.arch}).")
    vocab = tokenizer.get_vocab()
    if any(vocab.get(t) != i for i, t in enumerate(mode_vocab("first_species"))):
        raise UserError(f"backbone {MODEL_TYPE} reads first-species counterpoint tokens; set data.tokenizer: first_species.")
    return ColumnsConfig(
        cf_first_id=vocab[cantus_token(CANTUS_LOW)], iv_first_id=vocab[interval_token(-MAX_INTERVAL)], cantus_offset=2,
        vocab_size=len(tokenizer), n_positions=cfg.max_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, activation_function="gelu_pytorch_tanh",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
