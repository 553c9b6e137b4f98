"""An OPUS-MT-style model folder, built offline for the tests: what ``save_pretrained`` of a
``MarianTokenizer`` writes (SentencePiece ``source.spm`` / ``target.spm`` and ``vocab.json``,
no ``tokenizer.json``) beside a tiny random ``MarianMTModel`` whose decoder starts from
``<pad>``, as the OPUS-MT downloads are laid out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch


def build(root: Path, src_texts: Sequence[str], tgt_texts: Sequence[str], *, vocab_size: int = 400, seed: int = 0) -> tuple[Path, object]:
    """``root/opus-mt`` (the model folder) and its tokenizer; each side's SentencePiece model is
    trained on its own texts, and ``vocab.json`` joins the two, as OPUS-MT's does."""
    import sentencepiece
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    root.mkdir(parents=True, exist_ok=True)
    vocab = {"</s>": 0, "<unk>": 1}
    for name, texts in (("source", src_texts), ("target", tgt_texts)):
        sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(list(texts)), model_prefix=str(root / name), vocab_size=vocab_size,
                                                 pad_id=-1, bos_id=-1, eos_id=-1, unk_id=0, hard_vocab_limit=False, minloglevel=2)
        (root / f"{name}.model").rename(root / f"{name}.spm")
        sp = sentencepiece.SentencePieceProcessor(model_file=str(root / f"{name}.spm"))
        for i in range(sp.get_piece_size()):
            vocab.setdefault(sp.id_to_piece(i), len(vocab))
    vocab["<pad>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    tok = MarianTokenizer(str(root / "source.spm"), str(root / "target.spm"), str(root / "vocab.json"), source_lang="en", target_lang="de")
    folder = root / "opus-mt"
    torch.manual_seed(seed)
    MarianMTModel(MarianConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                               decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                               decoder_start_token_id=tok.pad_token_id)).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder, tok
