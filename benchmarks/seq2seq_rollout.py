"""Sampling speed of an encoder–decoder rollout: ours (``rlhf.rollout.decode``) vs.
transformers' ``generate``, on the same model, batch and lengths.

Throughput = sampled target tokens / seconds = B * T / mean(s). The model is a randomly
initialised Marian built by ``rlhf.models.build_model`` with the translation default's size
(3 + 3 layers, 256 wide, 4 heads, an 8,000-token vocabulary; ``--layers/--width/--vocab``),
fp32 on the CPU. Sources are B random token rows of S tokens (mixed lengths S/2..S, so the
batch is padded). Both sides sample T new tokens at temperature 1 with no early stop
(``generate``: ``min_new_tokens = max_new_tokens = T``, ``do_sample=True``, ``top_k=0``,
no EOS), so both produce exactly B × T tokens from the same distribution; both run the
encoder once and decode with a KV cache, and both return every step's logits (what RL needs
for the policy's log-probs: ``keep_logits=True``; ``output_logits=True``). Each side is
warmed up, then the two are interleaved (ours, theirs, ours, …) so that load from other
processes hits both alike. Prints ONE JSON line:

    python benchmarks/seq2seq_rollout.py [--batch 64] [--src 24] [--new 32] [--iters 5] [--threads N]

Keys: ``ours_tokens_per_s``, ``generate_tokens_per_s``, ``ratio`` (ours / generate),
``ours_seconds``, ``generate_seconds`` (mean per call), the settings, ``params``,
``load_avg_1m``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from rlhf.models import ModelConfig, build_model, count_parameters  # noqa: E402
from rlhf.rollout import decode, left_pad  # noqa: E402


def tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of ``vocab`` tokens (ids 0-3: pad, bos, eos, unk): only its size matters."""
    words = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *[f"w{i}" for i in range(vocab - 4)]])}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<unk>")),
                                   pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--src", type=int, default=24, help="longest source in tokens")
    ap.add_argument("--new", type=int, default=32, help="sampled target tokens per row")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    tok = tokenizer(a.vocab)
    model = build_model(ModelConfig(arch="marian", n_layer=a.layers, n_embd=a.width, n_head=4, dropout=0.0, max_positions=128), tok).eval()
    g = torch.Generator().manual_seed(a.seed)
    lengths = torch.randint(a.src // 2, a.src + 1, (a.batch,), generator=g).tolist()
    sources = [torch.randint(4, a.vocab, (n,), generator=g).tolist() for n in lengths]
    ids, mask = left_pad(sources, tok.pad_token_id)
    right = torch.full_like(ids, tok.pad_token_id)  # generate reads an encoder's input right-padded
    rmask = torch.zeros_like(mask)
    for b, s in enumerate(sources):
        right[b, : len(s)], rmask[b, : len(s)] = torch.tensor(s), 1

    def ours() -> int:
        d = decode(model, ids, mask, a.new, generator=torch.Generator().manual_seed(1), keep_logits=True)
        return d.tokens.numel()

    @torch.no_grad()
    def theirs() -> int:
        out = model.generate(input_ids=right, attention_mask=rmask, do_sample=True, top_k=0, max_new_tokens=a.new, min_new_tokens=a.new,
                             eos_token_id=None, pad_token_id=tok.pad_token_id, output_logits=True, return_dict_in_generate=True)
        assert len(out.logits) == a.new
        return out.sequences[:, 1:].numel()

    for fn in (ours, theirs):  # warm-up
        fn()
    times = {"ours": [], "generate": []}
    counts = {}
    for _ in range(a.iters):
        for name, fn in (("ours", ours), ("generate", theirs)):
            t = time.perf_counter()
            counts[name] = fn()
            times[name].append(time.perf_counter() - t)
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    out = {"benchmark": "seq2seq_rollout", "batch": a.batch, "src_max": a.src, "new_tokens": a.new, "layers": a.layers, "width": a.width,
           "vocab": a.vocab, "params": count_parameters(model), "threads": torch.get_num_threads(),
           "ours_seconds": round(mean["ours"], 4), "generate_seconds": round(mean["generate"], 4),
           "ours_tokens_per_s": round(counts["ours"] / mean["ours"], 1), "generate_tokens_per_s": round(counts["generate"] / mean["generate"], 1),
           "ratio": round(mean["generate"] / mean["ours"] * counts["ours"] / counts["generate"], 3), "load_avg_1m": os.getloadavg()[0]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
