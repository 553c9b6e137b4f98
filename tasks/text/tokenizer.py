"""Tokenizer of the text task: a byte-level BPE trained on the data, or a saved one of yours,
and the codec that turns prompts and answers into token ids.

Trained here (``task.tokenizer: null``): a byte-level BPE (``tokenizers``, GPT-2 style, with a
prefix space so a word is tokenised alike at the start and mid-sentence) with five special
tokens ``<pad> <bos> <eos> <unk> <sep>``. Byte-level, so any UTF-8 text is encodable and a
completion decodes to exactly what the model wrote.

Loaded (``task.tokenizer: <folder>``, or the folder of a model being tuned): any tokenizer
saved with ``save_pretrained``. It must have an end-of-sequence token (completions end with it;
adding one would need a bigger embedding than the model has); a missing pad token is set to the
eos token, as usual for GPT-2-style tokenizers.

Sequence layout::

    prompt      [<bos>] p_1 ... p_n [<sep>]        completion   y_1 ... y_m <eos>

with ``<bos>`` / ``<sep>`` where the tokenizer has them. A tokenizer that adds special tokens of
its own (``rlhf.models.special_layout``: an OPUS-MT ``MarianTokenizer`` ends a source with
``</s>``, BART's wraps it in ``<s> … </s>``) lays out the prompt its own way instead, the way its
model was trained. Answers are encoded as targets (``text_target``), so a tokenizer with a
separate target vocabulary (OPUS-MT's ``target.spm``) encodes them with it, and decodes with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from rlhf.errors import UserError
from rlhf.models import action_mask, encode_batch, special_layout

PAD, BOS, EOS, UNK, SEP = "<pad>", "<bos>", "<eos>", "<unk>", "<sep>"
SPECIALS = (PAD, BOS, EOS, UNK, SEP)  # ids 0..4 of a trained tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int = 1000, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts``, wrapped as a ``PreTrainedTokenizerFast`` with
    ``<pad> <bos> <eos> <unk> <sep>``. The same texts give the same vocabulary."""
    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK, sep_token=SEP,
                                   clean_up_tokenization_spaces=False)  # the text scored is the text written


def ensure_special_tokens(tokenizer: PreTrainedTokenizerBase, where: str) -> PreTrainedTokenizerBase:
    """The tokenizer with an eos token (required) and a pad token (the eos token if it has none)."""
    if tokenizer.eos_token_id is None:
        raise UserError(f"{where}: the tokenizer has no eos token, so a completion could never end; set one (e.g. tokenizer.eos_token = "
                        "'<|endoftext|>') and save_pretrained it again, with a model whose vocabulary holds it")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # the usual GPT-2 convention; pads are masked out everywhere
    return tokenizer


def load_tokenizer(path: str | Path, what: str = "task.tokenizer") -> PreTrainedTokenizerBase:
    """A tokenizer saved with ``save_pretrained`` in the local folder ``path`` (never downloaded)."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{p}: {what}: folder not found; give a local folder written by save_pretrained (a model folder with its "
                        "tokenizer, or <run_dir>/tokenizer), or task.tokenizer: null to train one on the data")
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"{p}: {what}: no tokenizer could be loaded from this folder ({e}); save one there with "
                        "tokenizer.save_pretrained(folder)") from None
    return ensure_special_tokens(tok, str(p))


def model_vocab_size(folder: str | Path) -> int | None:
    """``vocab_size`` of the model config saved in ``folder`` (None if there is none)."""
    cfg = Path(folder) / "config.json"
    try:
        v = json.loads(cfg.read_text(encoding="utf-8")).get("vocab_size") if cfg.is_file() else None
    except (OSError, ValueError):
        return None
    return int(v) if isinstance(v, int) else None


class TextCodec:
    """Texts <-> token ids with one tokenizer; ``save(dir)`` writes the tokenizer beside a model.

    ``vocab`` is the model's vocabulary size where known (a model may have more rows than the
    tokenizer has tokens); the action space is that wide, the ids no token has are never allowed.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, source: str, vocab: int | None = None):
        self.tokenizer = ensure_special_tokens(tokenizer, source)
        self.source = source  # "trained" or the folder it came from
        self.eos_id: int = int(tokenizer.eos_token_id)
        self.pad_id: int = int(tokenizer.pad_token_id)
        self.bos_id: int | None = tokenizer.bos_token_id
        self.sep_id: int | None = tokenizer.sep_token_id
        self.vocab = max(len(tokenizer), vocab or 0)
        self.layout = special_layout(tokenizer)  # the special tokens it puts around a source itself, if any

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added (a literal "<eos>" in a text is text)."""
        return encode_batch(self.tokenizer, texts)

    def encode_targets(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each answer, encoded as a target (a Marian tokenizer's target vocabulary)."""
        return encode_batch(self.tokenizer, texts, target=True)

    def prompt_ids(self, encoded: Sequence[int]) -> list[int]:
        """``[<bos>] p_1..p_n [<sep>]`` from the prompt's encoded text, or the tokenizer's own
        layout where it adds special tokens itself (``p_1..p_n </s>`` for OPUS-MT)."""
        if self.layout != ([], []):
            return [*self.layout[0], *encoded, *self.layout[1]]
        return [*([self.bos_id] if self.bos_id is not None else []), *encoded, *([self.sep_id] if self.sep_id is not None else [])]

    def target_ids(self, encoded: Sequence[int]) -> list[int]:
        """``y_1..y_m <eos>`` from the answer's encoded text."""
        return [*encoded, self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        """A completion's text: tokens before the first eos, special tokens skipped, stripped."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def allowed(self) -> torch.Tensor | None:
        """[vocab] bool: every token but the special tokens other than eos (pad, bos, unk, sep…,
        where they differ from eos) and ids past the tokenizer's; None when that is every token."""
        mask = action_mask(self.tokenizer, self.vocab, self.eos_id)
        return None if bool(mask.all()) else mask

    def save(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(str(path))
