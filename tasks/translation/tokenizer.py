"""Subword tokenizer of the translation task and the codec that turns pairs into token ids.

Choice (documented in docs/translation.md): ONE joint byte-level BPE vocabulary (GPT-2 style,
``tokenizers`` library) trained on both sides of the training split, default 4000 tokens,
with language tags. Why:

* joint: a decoder-only model reads the source and writes the target with one embedding
  table; English and German share names, numbers and many subwords ("Mann"/"man",
  "Frisbee"), so a joint vocabulary spends fewer tokens on each and lets the two sides share
  embeddings;
* byte-level: every UTF-8 string is encodable (no ``<unk>``) and decoding is exact, so the
  text scored by BLEU is exactly what the model wrote (``decode(encode(s)) == s`` for any
  whitespace-normalised s, tested);
* 4000 tokens: on Multi30k that is about 1.40 tokens per word (8000: 1.26). On a CPU the
  output layer is most of a small model's cost (V·d per token against 12·L·d² for the
  blocks), so halving V buys more training steps than the 10% longer sequences cost.

Token scheme (decoder-only model, source as prompt)::

    prompt      <bos> <en> x_1 ... x_n <de>
    completion  y_1 ... y_m <eos>

The target-language tag ends the prompt (it is the separator) and says which language to
write, so the same tokenizer can serve both directions. The tokenizer is saved with
``save_pretrained`` beside every model; ``tokenizer_config.json`` records the two languages
(``src_lang``, ``tgt_lang``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rlhf.errors import UserError
from rlhf.models import action_mask, encode_batch, special_layout

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)  # ids 0..3


def lang_tag(lang: str) -> str:
    """The language tag token, e.g. ``<de>``."""
    return f"<{lang}>"


def train_tokenizer(sentences: Iterable[str], src_lang: str, tgt_lang: str, vocab_size: int = 4000, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A joint byte-level BPE tokenizer trained on ``sentences`` (both languages), wrapped as a
    ``PreTrainedTokenizerFast`` with ``<pad> <bos> <eos> <unk>`` and the two language tags."""
    tags = [lang_tag(src_lang), lang_tag(tgt_lang)]
    backend = Tokenizer(models.BPE(unk_token=UNK))
    # add_prefix_space: a sentence-initial word is tokenised like the same word mid-sentence
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[*SPECIALS, *tags],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(sentences, trainer=trainer)
    return wrap(backend, src_lang, tgt_lang)


def wrap(backend: Tokenizer, src_lang: str, tgt_lang: str) -> PreTrainedTokenizerFast:
    """The HF wrapper of a trained backend, with special tokens and the language pair."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[lang_tag(src_lang), lang_tag(tgt_lang)],
        clean_up_tokenization_spaces=False,  # "Mann ." must stay "Mann ." (BLEU sees the text as written)
        src_lang=src_lang, tgt_lang=tgt_lang,
    )


class TranslationCodec:
    """Sentences <-> token ids for one language pair; the tokenizer is the saved artefact
    (``save(dir)`` is what the pipeline calls after training a model)."""

    kind = "joint byte-level BPE"

    def __init__(self, tokenizer: PreTrainedTokenizerFast, src_lang: str, tgt_lang: str):
        self.tokenizer = tokenizer
        self.src_lang, self.tgt_lang = src_lang, tgt_lang
        ids = tokenizer.convert_tokens_to_ids([*SPECIALS, lang_tag(src_lang), lang_tag(tgt_lang)])
        if tokenizer.unk_token_id in ids[:2] + ids[4:] or len(set(ids)) != len(ids):
            raise ValueError(f"tokenizer lacks the special tokens {SPECIALS} and tags <{src_lang}>, <{tgt_lang}>")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id, self.src_tag_id, self.tgt_tag_id = ids

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode_text(self, text: str) -> list[int]:
        """Subword ids of a sentence, no special tokens (a literal "<eos>" in the text is text)."""
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode_text` of many sentences in one batched call."""
        return encode_batch(self.tokenizer, texts)

    def encode_targets(self, texts: Sequence[str]) -> list[list[int]]:
        """Subword ids of target sentences (one joint vocabulary: the same as :meth:`encode_texts`)."""
        return self.encode_texts(texts)

    def prompt_ids(self, src: Sequence[int]) -> list[int]:
        """``<bos> <src_lang> x_1..x_n <tgt_lang>`` around the source's subword ids."""
        return [self.bos_id, self.src_tag_id, *src, self.tgt_tag_id]

    @property
    def n_layout(self) -> int:
        """How many tokens :meth:`prompt_ids` adds around a source."""
        return len(self.prompt_ids([]))

    def encode_prompt(self, src: str) -> list[int]:
        """:meth:`prompt_ids` of a source sentence."""
        return self.prompt_ids(self.encode_text(src))

    def encode_target(self, tgt: str) -> list[int]:
        """``y_1..y_m <eos>``."""
        return [*self.encode_targets([tgt])[0], self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of a completion: tokens up to the first ``<eos>``, special tokens dropped."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def decode_batch(self, rows: Sequence[Sequence[int]]) -> list[str]:
        """:meth:`decode` of many completions at once (one Rust call)."""
        cut = []
        for r in rows:
            r = [int(i) for i in r]
            cut.append(r[: r.index(self.eos_id)] if self.eos_id in r else r)
        return [s.strip() for s in self.tokenizer.batch_decode(cut, skip_special_tokens=True)]

    def allowed(self) -> torch.Tensor:
        """[V] bool action space of a completion: every subword and ``<eos>``; never ``<pad>``,
        ``<bos>``, ``<unk>`` or a language tag (they cannot occur in a target)."""
        mask = torch.ones(len(self.tokenizer), dtype=torch.bool)
        mask[[self.pad_id, self.bos_id, self.unk_id, self.src_tag_id, self.tgt_tag_id]] = False
        return mask

    def save(self, path: str | Path) -> None:
        """Write the tokenizer (with the language pair in its config) into the folder ``path``."""
        self.tokenizer.save_pretrained(str(path))

    @classmethod
    def load(cls, path: str | Path) -> "TranslationCodec":
        """Reload a codec saved by :meth:`save` (or beside a model); the tokenizer of a model
        trained elsewhere (OPUS-MT's ``MarianTokenizer``) gives a :class:`ModelCodec`."""
        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # noqa: BLE001  a damaged tokenizer.json makes `tokenizers` raise a bare Exception; config.json, many types
            raise UserError(f"{path}: no translation tokenizer found ({e}). Point to a model folder written by `rlhf pretrain`, or to a "
                            "translation model saved with save_pretrained (its tokenizer beside it).") from None
        src, tgt = tok.init_kwargs.get("src_lang"), tok.init_kwargs.get("tgt_lang")
        if not src or not tgt:
            src, tgt = tok.init_kwargs.get("source_lang"), tok.init_kwargs.get("target_lang")  # MarianTokenizer's names
            if src and tgt and tok.eos_token_id is not None:
                return ModelCodec(tok, src, tgt, model_vocab_size(path))
            raise UserError(f"{path}/tokenizer_config.json has no src_lang/tgt_lang (nor source_lang/target_lang): not a translation tokenizer. "
                            "Use a model folder written by `rlhf pretrain` with a translation config, or an OPUS-MT-style Marian folder.")
        try:
            return cls(tok, src, tgt)
        except (ValueError, TypeError) as e:
            raise UserError(f"{path}: {e}.") from None


def model_vocab_size(folder: str | Path) -> int | None:
    """``vocab_size`` in the model config saved in ``folder`` (None without one)."""
    try:
        v = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return v if isinstance(v, int) else None


class ModelCodec(TranslationCodec):
    """The codec of a translation model trained elsewhere, with its own tokenizer (an OPUS-MT
    ``MarianTokenizer``: SentencePiece source and target vocabularies, ``</s>`` ends a source,
    no language tags since the model translates one pair)::

        prompt (encoder)   x_1 ... x_n </s>        (the tokenizer's own layout)
        completion         y_1 ... y_m </s>        (encoded with the target vocabulary)

    The action space is every id the tokenizer has (the model may have more rows) but its
    special tokens other than eos, so ``<pad>`` (OPUS-MT's decoder start) is never written."""

    def __init__(self, tokenizer, src_lang: str, tgt_lang: str, vocab: int | None = None):
        self.tokenizer = tokenizer
        self.src_lang, self.tgt_lang = src_lang, tgt_lang
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        self.bos_id, self.unk_id = tokenizer.bos_token_id, tokenizer.unk_token_id
        self.vocab = max(len(tokenizer), vocab or 0)
        self.kind = f"{type(tokenizer).__name__} of the model"
        self.layout = special_layout(tokenizer)  # ([], [</s>]) for OPUS-MT

    def __len__(self) -> int:
        return self.vocab

    def encode_targets(self, texts: Sequence[str]) -> list[list[int]]:
        return encode_batch(self.tokenizer, texts, target=True)

    def prompt_ids(self, src: Sequence[int]) -> list[int]:
        return [*self.layout[0], *src, *self.layout[1]]

    def allowed(self) -> torch.Tensor:
        return action_mask(self.tokenizer, self.vocab, self.eos_id)
