"""Greedy and beam-search translation, and translating files.

Decoding uses Hugging Face ``generate`` on the prompts (``<bos> <en> source <de>``). A
decoder-only model gets them left-padded: every row's next token is predicted from the last
column, and ``generate`` derives position ids from the attention mask. An encoder–decoder
gets them right-padded (an encoder's positions ignore the mask) and writes the translation
after its decoder start token. Either way a padded batch translates each sentence exactly as
it would alone (tested). Sentences are sorted by length before batching so a
batch carries little padding. Tokens the action space excludes (``<pad>``, ``<bos>``,
``<unk>``, language tags) are suppressed, as in sampling for RL.

``translate_file`` is what ``rlhf translate --model PATH --input FILE --output FILE`` runs.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Sequence

import torch
from transformers import PreTrainedModel

from rlhf.errors import UserError
from rlhf.models import is_seq2seq
from rlhf.runs import atomic_write_text
from tasks.translation.tokenizer import TranslationCodec

log = logging.getLogger("rlhf")


def max_new_tokens(src_len: int, ratio: float = 1.5, extra: int = 5, cap: int = 64) -> int:
    """Generation budget of a source of ``src_len`` subword tokens: ⌈ratio·src_len⌉ + extra,
    at most ``cap`` (German runs about 1.1× the English token count on Multi30k)."""
    return max(1, min(cap, math.ceil(ratio * src_len) + extra))


def model_positions(model: PreTrainedModel) -> int:
    """Longest sequence the model accepts (``n_positions`` of GPT-2, ``max_position_embeddings`` else)."""
    cfg = model.config
    return int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings"))


@torch.no_grad()
def generate(
    model: PreTrainedModel, prompts: Sequence[Sequence[int]], n_new: Sequence[int], *, eos_id: int, pad_id: int,
    suppress: Sequence[int] = (), beam: int = 1, batch_size: int = 64,
) -> list[list[int]]:
    """Greedy (``beam == 1``) or beam-search completions of ``prompts``, one per prompt: token
    ids up to and including the first ``<eos>``, or ``n_new[i]`` tokens when none came."""
    if len(prompts) != len(n_new):
        raise ValueError(f"{len(prompts)} prompts but {len(n_new)} lengths")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), n_new[i]))
    seq2seq = is_seq2seq(model)
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # decoder-only: left padding, the last column is every row's last prompt token
            at = slice(0, len(prompts[i])) if seq2seq else slice(width - len(prompts[i]), width)
            ids[row, at] = torch.tensor(list(prompts[i]), dtype=torch.long)
            mask[row, at] = 1
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(n_new[i] for i in idx),
            do_sample=False, num_beams=beam, early_stopping=beam > 1, eos_token_id=eos_id, pad_token_id=pad_id,
            suppress_tokens=list(suppress) or None,
            # the model's scores alone, as in the RL rollouts: none of the rules a downloaded
            # generation_config may carry (OPUS-MT forces </s> as the budget's last token)
            forced_eos_token_id=None, forced_bos_token_id=None, no_repeat_ngram_size=0, repetition_penalty=1.0, bad_words_ids=None,
        )  # [b, width + new] (decoder-only) or [b, 1 + new] (encoder–decoder: the start token first)
        first = 1 if seq2seq else width
        for row, i in enumerate(idx):
            toks = gen[row, first:].tolist()[: n_new[i]]
            out[i] = toks[: toks.index(eos_id) + 1] if eos_id in toks else toks
    model.train(was_training)
    return out


def translate(
    model: PreTrainedModel, codec: TranslationCodec, sentences: Sequence[str], *, beam: int = 1, batch_size: int = 64,
    ratio: float = 1.5, extra: int = 5, cap: int = 64,
) -> list[str]:
    """Translations of ``sentences`` (empty in, empty out). A source too long for the model's
    positions is cut to fit (logged with the count)."""
    limit = model_positions(model)
    seq2seq = is_seq2seq(model)  # the source and the translation each have the model's positions
    prompts, n_new, cut = [], [], 0
    for s in sentences:
        src = codec.encode_text(s)
        # room for the source: the positions less the layout's own tokens (<bos> and the tags; </s> for OPUS-MT)
        room = limit - codec.n_layout - (0 if seq2seq else max_new_tokens(len(src), ratio, extra, cap))
        if len(src) > room:
            src, cut = src[: max(room, 1)], cut + 1
        prompts.append(codec.prompt_ids(src))
        n_new.append(min(max_new_tokens(len(src), ratio, extra, cap), limit - 1 if seq2seq else limit - len(prompts[-1])))
    if cut:
        log.warning("%d of %d source sentences were cut to fit the model's %d positions", cut, len(sentences), limit)
    keep = [i for i, s in enumerate(sentences) if s.strip()]
    suppress = torch.nonzero(~codec.allowed()).flatten().tolist()
    comps = generate(model, [prompts[i] for i in keep], [n_new[i] for i in keep], eos_id=codec.eos_id, pad_id=codec.pad_id,
                     suppress=suppress, beam=beam, batch_size=batch_size)
    out = [""] * len(sentences)
    for i, text in zip(keep, codec.decode_batch(comps)):
        out[i] = text
    return out


def translate_file(model_dir: str | Path, input_path: str | Path, output_path: str | Path, beam: int = 1, batch_size: int = 64) -> int:
    """Translate ``input_path`` line by line (UTF-8, .gz allowed) with the model and tokenizer in
    ``model_dir``; write line i's translation to line i of ``output_path``. Returns the line count."""
    from rlhf.models import load_model
    from tasks.translation.data import read_sentences

    if beam < 1:
        raise UserError(f"--beam must be at least 1 (1 = greedy), got {beam}.")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}.")
    out = Path(output_path)
    if out.is_dir():
        raise UserError(f"{out}: --output is a folder; give a file path, e.g. {out / 'translations.de'}.")
    if out.exists() and Path(input_path).exists() and out.resolve() == Path(input_path).resolve():
        raise UserError(f"{out}: --output is the --input file, which would be overwritten; write the translations to another file.")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: the folder of --output does not exist; create it first or write elsewhere.")
    codec = TranslationCodec.load(model_dir)
    model = load_model(model_dir)
    sentences = read_sentences(input_path)
    hyps = translate(model, codec, sentences, beam=beam, batch_size=batch_size)
    # one line per input line: a line break the model wrote (byte-level BPE can) becomes a space, as in the input
    atomic_write_text(Path(output_path), "".join(re.sub("[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]", " ", h) + "\n" for h in hyps))
    return len(hyps)
