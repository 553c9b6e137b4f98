"""Left-padded batches give the same numbers as each row alone."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rlhf.rollout import completion_logits, left_pad, sample, sample_padded, sequence_forward


def models():
    torch.manual_seed(0)
    yield GPT2LMHeadModel(GPT2Config(vocab_size=19, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    yield LlamaForCausalLM(LlamaConfig(vocab_size=19, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64)).eval()


def test_padded_forward_equals_unpadded_rows():
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    comps = torch.tensor([[3, 4, 5], [6, 7, 8], [9, 10, 11]])
    for m in models():
        ids, mask = left_pad(prompts, pad_id=0)
        logits, hidden = sequence_forward(m, ids, mask, comps, hidden=True)
        assert hidden.shape[:2] == comps.shape
        for i, p in enumerate(prompts):
            ref = completion_logits(m, torch.tensor([p]), comps[i : i + 1])
            assert torch.allclose(logits[i : i + 1], ref, atol=1e-4), (type(m).__name__, i)


def test_padded_sampling_equals_unpadded_for_a_single_row_and_greedy_batches():
    for m in models():
        # greedy: each padded row must follow its own unpadded greedy continuation
        prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
        ids, mask = left_pad(prompts, 0)
        argmax = lambda logits: torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()  # noqa: E731
        out = sample_padded(m, ids, mask, 6, probs_fn=argmax)
        for i, p in enumerate(prompts):
            assert torch.equal(out[i], sample(m, torch.tensor([p]), 6, temperature=0)[0])
        # stochastic: with no padding the RNG stream is consumed identically
        p = torch.tensor([[1, 2, 3], [3, 2, 1]])
        a = sample_padded(m, p, torch.ones_like(p), 5, generator=torch.Generator().manual_seed(3))
        b = sample(m, p, 5, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b)


def test_kl_to_reference_matches_a_per_row_loop():
    from rlhf.kl import kl_exact
    from rlhf.rollout import kl_to_reference_many

    a, b = list(models())[0], GPT2LMHeadModel(GPT2Config(vocab_size=19, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    allowed = torch.ones(19, dtype=torch.bool)
    allowed[:2] = False
    prompts = [[2, 3], [4, 5, 6, 7], [8]]
    comps = [[3, 4, 5], [6, 7], [9, 10, 11, 12]]
    got = kl_to_reference_many(a, b, prompts, comps, pad_id=0, allowed=allowed, max_batch=2)
    for p, c, g in zip(prompts, comps, got):
        la = completion_logits(a, torch.tensor([p]), torch.tensor([c]))[0]
        lb = completion_logits(b, torch.tensor([p]), torch.tensor([c]))[0]
        ref = sum(float(kl_exact(la[t], lb[t], allowed)) for t in range(len(c))) / len(c)
        assert abs(g - ref) < 1e-5


def test_sampling_logits_equal_a_second_forward_pass():
    for m in models():
        ids, mask = left_pad([[1, 2, 3], [4, 5, 6, 7, 8], [9]], 0)
        toks, logits = sample_padded(m, ids, mask, 5, generator=torch.Generator().manual_seed(0), return_logits=True)
        ref, _ = sequence_forward(m, ids, mask, toks)
        assert torch.allclose(logits, ref, atol=1e-4)
