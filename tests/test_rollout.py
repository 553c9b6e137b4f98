"""Sampling with a KV cache and completion log-probs, checked against naive recomputation."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf.kl import masked_log_softmax
from rlhf.rollout import completion_logprobs, draw, filter_logits, inverse_cdf, logprobs_many, sample, sample_many


def tiny(vocab=17, seed=0):
    torch.manual_seed(seed)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2))
    return m.eval()


def naive_sample(model, prompts, n_new, allowed, temperature, generator):
    """Recompute the whole sequence for every token (no cache), same RNG stream."""
    seq = prompts.clone()
    for _ in range(n_new):
        logits = model(input_ids=seq).logits[:, -1, :].float().masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(logits / temperature, -1)
        seq = torch.cat([seq, draw(probs, generator)], 1)
    return seq[:, prompts.shape[1]:]


def test_cached_sampling_equals_naive_recomputation():
    m = tiny()
    allowed = torch.zeros(17, dtype=torch.bool)
    allowed[3:12] = True
    prompts = torch.randint(0, 17, (6, 5), generator=torch.Generator().manual_seed(1))
    a = sample(m, prompts, 9, allowed=allowed, temperature=0.8, generator=torch.Generator().manual_seed(7))
    b = naive_sample(m, prompts, 9, allowed, 0.8, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert bool(allowed[a].all())


def test_greedy_is_argmax():
    m = tiny()
    prompts = torch.tensor([[1, 2, 3]])
    a = sample(m, prompts, 4, temperature=0)
    seq = prompts
    for _ in range(4):
        seq = torch.cat([seq, m(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(a, seq[:, 3:])


def test_logprobs_match_per_position_loop():
    m = tiny()
    allowed = torch.ones(17, dtype=torch.bool)
    allowed[0] = False
    prompts = torch.tensor([[1, 2, 3], [4, 5, 6]])
    comps = torch.tensor([[7, 8, 9, 10], [11, 3, 5, 2]])
    lp = completion_logprobs(m, prompts, comps, allowed).detach()
    for b in range(2):
        for t in range(4):
            ctx = torch.cat([prompts[b], comps[b, :t]])[None]
            logits = m(input_ids=ctx).logits[0, -1].masked_fill(~allowed, float("-inf"))
            ref = torch.log_softmax(logits, -1)[comps[b, t]].detach()
            assert abs(float(lp[b, t]) - float(ref)) < 1e-5


def test_mixed_length_helpers_keep_order():
    m = tiny()
    prompts = [[1, 2], [1, 2, 3], [4, 5], [6, 7, 8]]
    n_new = [3, 2, 3, 2]
    comps = sample_many(m, prompts, n_new, generator=torch.Generator().manual_seed(0))
    assert [len(c) for c in comps] == n_new
    lps = logprobs_many(m, prompts, comps)
    for p, c, lp in zip(prompts, comps, lps):
        ref = completion_logprobs(m, torch.tensor([p]), torch.tensor([c]))[0].tolist()
        assert max(abs(x - y) for x, y in zip(lp, ref)) < 1e-5


def test_filter_logits_top_k_top_p_against_loop():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0], [0.0, 0.0, 3.0, 1.0, 2.0]])
    k = filter_logits(logits, top_k=2)
    for row, out in zip(logits, k):
        keep = sorted(range(5), key=lambda i: -row[i])[:2]
        assert [i for i in range(5) if out[i] > float("-inf")] == sorted(keep)
    p = filter_logits(logits, top_p=0.7)
    for row, out in zip(logits, p):
        probs = torch.softmax(row, -1)
        order = sorted(range(5), key=lambda i: -probs[i])
        kept, mass = [], 0.0
        for i in order:
            if mass >= 0.7:
                break
            kept.append(i)
            mass += float(probs[i])
        assert [i for i in range(5) if out[i] > float("-inf")] == sorted(kept)


def test_masked_log_softmax_normalises_over_allowed():
    logits = torch.randn(3, 8)
    allowed = torch.tensor([True, False, True, True, False, False, True, True])
    lp = masked_log_softmax(logits, allowed)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(3))
    assert torch.isinf(lp[:, ~allowed]).all()


def test_inverse_cdf_matches_a_naive_scan_and_never_picks_a_zero():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(50, 13, generator=g) * (torch.rand(50, 13, generator=g) > 0.4)  # unnormalised, many zeros
    probs[:, 5] += 1e-3  # no row all zero
    u = torch.rand(50, generator=g, dtype=torch.float64)
    got = inverse_cdf(probs, u)[:, 0].tolist()
    for b in range(50):  # the naive scan: first a whose running sum exceeds u · total
        total, run = float(probs[b].double().sum()), 0.0
        for a in range(13):
            run += float(probs[b, a].double())
            if run > u[b] * total:
                break
        assert got[b] == a and probs[b, a] > 0
    edge = inverse_cdf(torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([1.0 - 2**-53], dtype=torch.float64))
    assert edge.item() == 1  # u · total rounding up to the total still lands on a possible action


def test_draw_has_the_law_of_multinomial():
    """Frequencies of 200,000 draws against the probabilities: a chi-square statistic far below
    the 99.9% quantile (about 27.9 for 9 degrees of freedom)."""
    p = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.05, 0.03, 0.015, 0.005])
    n = 200_000
    counts = torch.bincount(draw(p.expand(n, -1), torch.Generator().manual_seed(1))[:, 0], minlength=10).double()
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 27.9, chi2


def test_prior_temperature_scores_the_rollout_under_the_tempered_prior():
    """kl.prior_temperature T: the same samples, with the prior's log-probs those of p^(1/T)
    renormalised over the action space (a loop over the allowed tokens), the policy's unchanged."""
    import math

    from rlhf.algorithms.common import make_rollout

    policy, prior = tiny(seed=0), tiny(seed=1)
    allowed = torch.zeros(17, dtype=torch.bool)
    allowed[2:13] = True
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    kw = dict(pad_id=0, allowed=allowed, n_new=[5, 5, 5])
    plain = make_rollout(policy, prior, prompts, generator=torch.Generator().manual_seed(3), **kw)
    warm = make_rollout(policy, prior, prompts, generator=torch.Generator().manual_seed(3), prior_temperature=2.0, **kw)
    assert torch.equal(plain.tokens, warm.tokens) and torch.allclose(plain.logp, warm.logp)
    for b in range(3):
        for t in range(5):
            z = sum(math.exp(plain.logits_prior[b, t, a].item() / 2.0) for a in range(17) if allowed[a])
            a = int(plain.tokens[b, t])
            assert warm.logp_prior[b, t].item() == pytest.approx(plain.logits_prior[b, t, a].item() / 2.0 - math.log(z), abs=1e-5)
