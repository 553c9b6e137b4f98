"""Left-padded batches give the same numbers as each row alone; the cached sampler draws the
tokens of a plain uncached loop; EOS ends rows (and the loop) early."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rlhf import fast_gpt2
from rlhf.algorithms.common import make_rollout
from rlhf.rollout import completion_logits, decode, draw, eos_lengths, left_pad, sample, sample_padded, sequence_forward

V = 19
EOS, PAD = 2, 0


def models():
    torch.manual_seed(0)
    yield GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    yield LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64)).eval()


def action_space(*, eos: bool) -> torch.Tensor:
    """Tokens 3.. plus EOS if ``eos``: never pad or bos."""
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[3:] = True
    allowed[EOS] = eos
    return allowed


@torch.no_grad()
def naive_padded_sample(model, ids, mask, n_new, generator, allowed=None, probs_fn=None):
    """Recompute the whole left-padded batch for every token (no KV cache, no EOS handling);
    one draw over [B, V] per step, as the cached sampler does."""
    seq = ids
    attn = mask
    for _ in range(n_new):
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=seq, attention_mask=attn, position_ids=pos).logits[:, -1].float()  # [B, V]
        if probs_fn is not None:
            probs = probs_fn(logits)
        else:
            probs = torch.softmax(logits if allowed is None else logits.masked_fill(~allowed, float("-inf")), -1)
        seq = torch.cat([seq, draw(probs, generator)], 1)
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
    return seq[:, ids.shape[1]:]


def cut_at_eos(tokens, eos_id, pad_id):
    """Per-row loop: everything after a row's first EOS becomes pad; returns (tokens, lengths)."""
    out, lengths = tokens.clone(), []
    for row in out:
        hits = (row == eos_id).nonzero()
        n = int(hits[0]) + 1 if len(hits) else len(row)
        row[n:] = pad_id
        lengths.append(n)
    return out, lengths


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


def test_padded_greedy_sampling_equals_each_row_alone():
    for m in models():
        prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
        ids, mask = left_pad(prompts, 0)
        argmax = lambda logits: torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()  # noqa: E731
        out = sample_padded(m, ids, mask, 6, probs_fn=argmax)
        for i, p in enumerate(prompts):
            assert torch.equal(out[i], sample(m, torch.tensor([p]), 6, temperature=0)[0])


def test_cached_padded_sampling_draws_the_tokens_of_an_uncached_loop():
    allowed = action_space(eos=False)
    for m in models():
        ids, mask = left_pad([[1, 2, 3], [4, 5, 6, 7, 8], [9], [5, 5]], 0)
        got = sample_padded(m, ids, mask, 12, allowed=allowed, generator=torch.Generator().manual_seed(3))
        ref = naive_padded_sample(m, ids, mask, 12, torch.Generator().manual_seed(3), allowed=allowed)
        assert got.shape == (4, 12)
        assert torch.equal(got, ref), type(m).__name__
        assert bool(allowed[got].all())


def test_sampling_logits_and_hidden_states_equal_a_second_forward_pass():
    for m in models():
        ids, mask = left_pad([[1, 2, 3], [4, 5, 6, 7, 8], [9]], 0)
        d = decode(m, ids, mask, 5, generator=torch.Generator().manual_seed(0), keep_logits=True, keep_hidden=True)
        ref_logits, ref_hidden = sequence_forward(m, ids, mask, d.tokens, hidden=True)
        assert torch.allclose(d.logits, ref_logits, atol=1e-4)
        assert torch.allclose(d.hidden, ref_hidden, atol=1e-4)


def test_eos_ends_rows_with_pad_and_leaves_other_rows_untouched():
    allowed = action_space(eos=True)
    for m in models():
        ids, mask = left_pad([[1, 2, 3], [4, 5, 6, 7, 8], [9], [5, 5]] * 2, PAD)
        n_new = 10
        got = sample_padded(m, ids, mask, n_new, allowed=allowed, generator=torch.Generator().manual_seed(5), eos_id=EOS, pad_id=PAD)
        free = naive_padded_sample(m, ids, mask, n_new, torch.Generator().manual_seed(5), allowed=allowed)
        want, lengths = cut_at_eos(free, EOS, PAD)
        # the seed gives rows that end early and rows that run to n_new: both branches are exercised
        assert min(lengths) < n_new and max(lengths) == n_new, lengths
        assert torch.equal(got, want), type(m).__name__
        assert eos_lengths(got, EOS).tolist() == lengths


def test_loop_stops_once_every_row_has_ended(monkeypatch):
    # EOS gets half the mass at every step, so all 6 rows end long before 40 tokens.
    def probs_fn(logits):
        probs = 0.5 * torch.softmax(logits.masked_fill(~action_space(eos=False), float("-inf")), -1)
        probs[:, EOS] += 0.5
        return probs

    for m in models():
        ids, mask = left_pad([[1, 2, 3], [4, 5], [9], [5, 5, 6], [7], [8, 8]], PAD)
        calls = []
        hook = m.register_forward_hook(lambda *a: calls.append(1))  # transformers' forward
        lean = fast_gpt2.forward
        monkeypatch.setattr(fast_gpt2, "forward", lambda *a, **kw: calls.append(1) or lean(*a, **kw))  # a GPT-2's sampling steps
        got = sample_padded(m, ids, mask, 40, probs_fn=probs_fn, generator=torch.Generator().manual_seed(0), eos_id=EOS, pad_id=PAD)
        hook.remove()
        free = naive_padded_sample(m, ids, mask, 40, torch.Generator().manual_seed(0), probs_fn=probs_fn)
        want, lengths = cut_at_eos(free, EOS, PAD)
        t = max(lengths)
        assert t < 40
        assert got.shape == (6, t)
        assert torch.equal(got, want[:, :t])
        assert len(calls) == t  # prompt forward + t - 1 single-token steps: no step after the last EOS


def test_without_eos_id_eos_tokens_do_not_stop_a_row():
    allowed = action_space(eos=True)
    m = next(models())
    ids, mask = left_pad([[1, 2, 3], [4, 5, 6, 7, 8], [9], [5, 5]] * 2, PAD)
    got = sample_padded(m, ids, mask, 10, allowed=allowed, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, naive_padded_sample(m, ids, mask, 10, torch.Generator().manual_seed(5), allowed=allowed))
    assert bool((got == EOS).any())  # EOS was sampled and sampling went on


def test_rollout_with_eos_has_actual_lengths_and_masks():
    models_ = list(models())
    policy, prior = models_[0], GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    allowed = action_space(eos=True)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [5, 5]] * 2
    n_new = [10, 10, 4, 10, 10, 10, 10, 3]
    ro = make_rollout(policy, prior, prompts, n_new, pad_id=PAD, allowed=allowed, generator=torch.Generator().manual_seed(5), eos_id=EOS)
    ids, mask = left_pad(prompts, PAD)
    free = naive_padded_sample(policy, ids, mask, 10, torch.Generator().manual_seed(5), allowed=allowed)
    want, eos_len = cut_at_eos(free, EOS, PAD)
    lengths = [min(n, e) for n, e in zip(n_new, eos_len)]
    assert ro.lengths == lengths
    assert len(set(lengths)) > 2  # EOS, the per-row cap and the full length all occur
    t = ro.tokens.shape[1]
    assert torch.equal(ro.tokens, want[:, :t])
    for b, n in enumerate(lengths):
        assert ro.mask[b, :n].eq(1).all() and ro.mask[b, n:].eq(0).all()
    # log-probs of the real tokens equal a fresh forward of each model over the sample
    m = ro.mask.bool()
    for model, logp in ((policy, ro.logp), (prior, ro.logp_prior)):
        ref = torch.log_softmax(sequence_forward(model, ids, mask, ro.tokens)[0].masked_fill(~allowed, float("-inf")), -1)
        ref = ref.gather(-1, ro.tokens[..., None])[..., 0]
        assert torch.allclose(logp[m], ref[m], atol=1e-4)


def test_fixed_length_rollout_is_unchanged_by_the_eos_machinery():
    policy = next(models())
    prior = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    allowed = action_space(eos=True)  # EOS can be sampled, but with eos_id=None it is just a token
    prompts, n_new = [[1, 2, 3], [4, 5, 6, 7, 8], [9]], [6, 4, 6]
    ro = make_rollout(policy, prior, prompts, n_new, pad_id=PAD, allowed=allowed, generator=torch.Generator().manual_seed(1), hidden=True)
    ids, mask = left_pad(prompts, PAD)
    assert torch.equal(ro.tokens, naive_padded_sample(policy, ids, mask, 6, torch.Generator().manual_seed(1), allowed=allowed))
    assert ro.lengths == n_new
    assert torch.equal(ro.mask, torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2, [1.0] * 6]))
    assert ro.hidden.shape == (3, 6, 32)


def test_kl_to_reference_matches_a_per_row_loop():
    from rlhf.kl import kl_exact
    from rlhf.rollout import kl_to_reference_many

    a, b = list(models())[0], GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    allowed = torch.ones(V, dtype=torch.bool)
    allowed[:2] = False
    prompts = [[2, 3], [4, 5, 6, 7], [8]]
    comps = [[3, 4, 5], [6, 7], [9, 10, 11, 12]]
    got = kl_to_reference_many(a, b, prompts, comps, pad_id=0, allowed=allowed, max_batch=2)
    for p, c, g in zip(prompts, comps, got):
        la = completion_logits(a, torch.tensor([p]), torch.tensor([c]))[0]
        lb = completion_logits(b, torch.tensor([p]), torch.tensor([c]))[0]
        ref = sum(float(kl_exact(la[t], lb[t], allowed)) for t in range(len(c))) / len(c)
        assert abs(g - ref) < 1e-5


@torch.no_grad()
def naive_beam(model, prompt, n_new, k, allowed):
    """Width-k beam search over one unpadded prompt, no cache, fixed length: at every step
    extend each beam by every allowed token and keep the k best cumulative log-probs."""
    beams = [([], 0.0)]
    for _ in range(n_new):
        grown = []
        for toks, score in beams:
            logits = model(input_ids=torch.tensor([prompt + toks])).logits[0, -1].float()
            logp = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), -1)
            grown += [(toks + [a], score + float(logp[a])) for a in allowed.nonzero().flatten().tolist()]
        beams = sorted(grown, key=lambda b: -b[1])[:k]
    return beams


def test_beam_rollout_returns_each_prompts_k_best_beams_scored_like_a_rollout():
    from rlhf.algorithms.common import beam_rollout
    from rlhf.rollout import completion_logprobs

    prompts, n_new, k = [[1, 5, 6], [7], [3, 4, 8, 9]], 4, 3
    allowed = action_space(eos=False)
    for model in models():
        torch.manual_seed(1)
        prior = type(model)(model.config).eval()
        ro = beam_rollout(model, prior, prompts, [n_new] * 3, k, pad_id=PAD, allowed=allowed)
        assert ro.tokens.shape == (9, n_new) and ro.lengths == [n_new] * 9 and bool(ro.mask.all())
        for g, prompt in enumerate(prompts):
            want = naive_beam(model, prompt, n_new, k, allowed)
            rows = range(k * g, k * g + k)
            assert [ro.tokens[r].tolist() for r in rows] == [toks for toks, _ in want]
            assert torch.equal(ro.prompts[k * g][-len(prompt):], torch.tensor(prompt))
            for r, (toks, score) in zip(rows, want):
                alone = torch.tensor([prompt]), torch.tensor([toks])
                assert torch.allclose(ro.logp[r], completion_logprobs(model, *alone, allowed)[0], atol=1e-5)
                assert torch.allclose(ro.logp_prior[r], completion_logprobs(prior, *alone, allowed)[0], atol=1e-5)
                assert abs(float(ro.logp[r].sum()) - score) < 1e-4
