"""Encoder–decoder policies in the RL core, against independent oracles: transformers'
``generate`` (greedy), a teacher-forced forward (log-probs), an uncached loop (sampling),
rows alone (padding), and transformers' own label loss (MLE)."""

from __future__ import annotations

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration, MarianConfig, MarianMTModel, T5Config, T5ForConditionalGeneration

from rlhf.kl import masked_log_softmax
from rlhf.models import ModelConfig, build_model, is_seq2seq, load_model
from rlhf.policy import PolicyWithValue
from rlhf.pretrain import chunked_token_stats, seq2seq_collate
from rlhf.rollout import decode, draw, left_pad, logprobs_many, right_align, sample_many, sequence_forward

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18], [19]]
V, PAD, BOS, EOS = 40, 0, 1, 2


def marian(seed: int = 0) -> MarianMTModel:
    """A tiny random Marian whose weights are large enough (init_std 0.3) that its outputs
    depend on the source and vary from row to row."""
    torch.manual_seed(seed)
    cfg = MarianConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=2, decoder_attention_heads=2,
                       encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=PAD, eos_token_id=EOS,
                       bos_token_id=BOS, decoder_start_token_id=BOS, forced_eos_token_id=None, init_std=0.3, dropout=0.0)
    return MarianMTModel(cfg).eval()


def t5(seed: int = 0, encoder_layers: int = 2) -> T5ForConditionalGeneration:
    """A tiny random T5 (relative position buckets, no position embeddings), with a decoder
    deeper than its encoder (its text config counts the encoder's layers)."""
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=V, d_model=32, d_kv=16, d_ff=64, num_layers=encoder_layers, num_decoder_layers=3, num_heads=2, pad_token_id=PAD,
                   eos_token_id=EOS, decoder_start_token_id=BOS, dropout_rate=0.0, initializer_factor=2.0)
    return T5ForConditionalGeneration(cfg).eval()


def bart(seed: int = 0) -> BartForConditionalGeneration:
    """A tiny random BART (learned positions with BART's offset of 2, pre-computed layer norms)."""
    torch.manual_seed(seed)
    cfg = BartConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=2, decoder_attention_heads=2,
                     encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS,
                     decoder_start_token_id=BOS, forced_eos_token_id=None, forced_bos_token_id=None, init_std=0.3, dropout=0.0)
    return BartForConditionalGeneration(cfg).eval()


KINDS = {"marian": marian, "t5": t5, "bart": bart}  # Marian takes the lean step of rlhf/fast_marian.py; T5 and BART transformers' forward


def test_right_align_matches_a_loop():
    ids, mask = left_pad(PROMPTS, PAD)
    r_ids, r_mask = right_align(ids, mask)
    for b, p in enumerate(PROMPTS):
        assert r_ids[b, : len(p)].tolist() == p and r_mask[b].tolist() == [1] * len(p) + [0] * (ids.shape[1] - len(p))


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_rollout_equals_generate(kind):
    model = t5(encoder_layers=3) if kind == "t5" else KINDS[kind]()  # transformers' generate wants T5's two stacks equally deep
    ids, mask = left_pad(PROMPTS, PAD)
    got = decode(model, ids, mask, 12, temperature=0).tokens  # [B, 12]
    rows = set()
    for b, p in enumerate(PROMPTS):
        ref = model.generate(input_ids=torch.tensor([p]), max_new_tokens=12, do_sample=False, num_beams=1, eos_token_id=None,
                             pad_token_id=PAD)[0, 1:]  # the start token first
        assert got[b].tolist() == ref.tolist(), b
        rows.add(tuple(ref.tolist()))
    assert len(rows) > 1  # the outputs depend on the source: the check is not vacuous


@pytest.mark.parametrize("kind", KINDS)
def test_sampled_logprobs_equal_a_teacher_forced_forward_and_padding_changes_nothing(kind):
    model = KINDS[kind](1)
    ids, mask = left_pad(PROMPTS, PAD)
    d = decode(model, ids, mask, 9, generator=torch.Generator().manual_seed(3), keep_logits=True)
    lp_rollout = masked_log_softmax(d.logits, None).gather(-1, d.tokens[..., None])[..., 0]  # [B, T]
    logits, hidden = sequence_forward(model, ids, mask, d.tokens, hidden=True)
    lp_forward = masked_log_softmax(logits.float(), None).gather(-1, d.tokens[..., None])[..., 0]
    torch.testing.assert_close(lp_rollout, lp_forward, atol=1e-5, rtol=1e-5)
    assert hidden.shape == (len(PROMPTS), d.tokens.shape[1], 32)
    assert lp_rollout.std() > 0.1  # the check is not vacuous: the log-probs vary
    for b, p in enumerate(PROMPTS):  # each row alone, unpadded
        alone, _ = sequence_forward(model, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), d.tokens[b : b + 1])
        torch.testing.assert_close(alone[0], logits[b], atol=1e-4, rtol=1e-4)  # logits of |x| up to ~20; padding mistakes move them by O(1)
    # the list helpers (equal-shape groups, no padding) agree with the padded batch
    lists = logprobs_many(model, PROMPTS, d.tokens.tolist())
    torch.testing.assert_close(torch.tensor(lists), lp_forward, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_sampling_equals_an_uncached_loop(kind):
    """The same generator stream through a plain loop that re-runs the whole model on the
    decoder prefix at every step: the KV caches change no token."""
    model = KINDS[kind](2)
    ids, mask = left_pad(PROMPTS, PAD)
    allowed = torch.ones(V, dtype=torch.bool)
    allowed[[PAD, BOS]] = False
    got = decode(model, ids, mask, 10, allowed=allowed, generator=torch.Generator().manual_seed(7)).tokens
    g = torch.Generator().manual_seed(7)
    src, src_mask = right_align(ids, mask)
    dec = torch.full((len(PROMPTS), 1), BOS)
    with torch.no_grad():
        for _ in range(10):
            logits = model(input_ids=src, attention_mask=src_mask, decoder_input_ids=dec).logits[:, -1].float()
            probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
            dec = torch.cat([dec, draw(probs, g)], 1)
    assert got.tolist() == dec[:, 1:].tolist()
    assert not torch.isin(got, torch.tensor([PAD, BOS])).any()


def test_sample_many_groups_rows_like_one_batch():
    model = marian(3)
    out = sample_many(model, PROMPTS, [6, 4, 6, 3], temperature=0)
    ids, mask = left_pad(PROMPTS, PAD)
    batch = decode(model, ids, mask, 6, temperature=0).tokens
    for b, n in enumerate([6, 4, 6, 3]):
        assert out[b] == batch[b, :n].tolist()


def test_seq2seq_mle_loss_equals_transformers_label_loss():
    model = marian(4)
    examples = [(p, [(3 * x) % (V - 3) + 3 for x in p[:4]] + [EOS]) for p in PROMPTS]
    batch = seq2seq_collate(examples, PAD, BOS)
    ours, correct, count = chunked_token_stats(model, examples, PAD, torch.device("cpu"), n_chunks=2)
    with torch.no_grad():
        hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss  # mean over labels
    assert int(count) == sum(len(c) for _, c in examples)
    torch.testing.assert_close(ours / count, hf, atol=1e-5, rtol=1e-5)
    smoothed, _, _ = chunked_token_stats(model, examples, PAD, torch.device("cpu"), n_chunks=1, label_smoothing=0.1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
    valid = batch["labels"] != -100
    naive = sum(-(0.9 * torch.log_softmax(logits[b, t].float(), -1)[batch["labels"][b, t]] + 0.1 * torch.log_softmax(logits[b, t].float(), -1).mean())
                for b in range(len(examples)) for t in range(batch["labels"].shape[1]) if valid[b, t])
    torch.testing.assert_close(smoothed, naive, atol=1e-4, rtol=1e-5)


def test_a_built_marian_saves_loads_and_carries_a_value_head(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *[f"w{i}" for i in range(20)]])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    model = build_model(ModelConfig(arch="marian", n_layer=1, n_embd=16, n_head=2, max_positions=32), tok)
    assert is_seq2seq(model) and model.config.decoder_start_token_id == tok.bos_token_id
    model.save_pretrained(tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert type(back).__name__ == "MarianMTModel"
    policy = PolicyWithValue(back)
    ids, mask = left_pad([[4, 5, 6], [7]], 0)
    toks = torch.tensor([[8, 9], [10, 2]])
    logits, values = policy(ids, mask, toks)
    assert logits.shape == (2, 2, len(tok)) and values.shape == (2, 2)
    policy.save_pretrained(tmp_path / "p")
    again = PolicyWithValue(load_model(tmp_path / "m"))
    again.load_checkpoint(tmp_path / "p")  # tied embeddings are saved once and still load
    torch.testing.assert_close(again(ids, mask, toks)[0], logits)


@pytest.mark.parametrize("kind", ["marian", "gpt2"])
def test_scoring_in_length_groups_equals_one_padded_forward(kind):
    """``score_logits`` (rows sorted by length, groups of SCORE_ROWS, each cut to its own
    longest row) and ``gather_logp`` on real tokens only: the numbers of one padded forward."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf.algorithms.common import SCORE_ROWS, gather_logp, score_logits
    from rlhf.rollout import length_mask

    if kind == "gpt2":
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_layer=2, n_embd=32, n_head=2)).eval()
    else:
        model = marian(5)
    g = torch.Generator().manual_seed(0)
    b = SCORE_ROWS * 2 + 37
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
    lengths = torch.randint(1, 13, (b,), generator=g).tolist()
    lengths[5] = 12  # one long row
    tokens = torch.randint(3, V, (b, 12), generator=g)
    ids, pmask = left_pad(prompts, PAD)
    mask = length_mask(lengths, 12, torch.device("cpu"))
    with torch.no_grad():
        whole = sequence_forward(model, ids, pmask, tokens)[0]
        grouped = score_logits(model, ids, pmask, tokens, lengths)
    keep = mask.bool()
    torch.testing.assert_close(grouped[keep], whole[keep], atol=1e-4, rtol=1e-4)
    assert (grouped[~keep] == 0).all(-1).float().mean() > 0.5  # most padding skipped: a group stops at its own longest row
    allowed = torch.ones(V, dtype=torch.bool)
    allowed[PAD] = False
    full = gather_logp(whole, tokens, allowed)
    torch.testing.assert_close(gather_logp(whole, tokens, allowed, mask), full * mask)
