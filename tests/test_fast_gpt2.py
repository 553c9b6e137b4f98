"""rlhf.fast_gpt2 computes what transformers' GPT-2 computes: logits, hidden states and
gradients on left-padded batches, with and without the KV cache; and the rollout code takes
it only where it is exact."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rlhf import fast_gpt2
from rlhf.rollout import decode, position_ids, sequence_forward


def gpt2(**kw) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = dict(n_layer=3, n_embd=32, n_head=4, vocab_size=29, n_positions=64, bos_token_id=0, eos_token_id=1)
    return GPT2LMHeadModel(GPT2Config(**{**cfg, **kw})).eval()


def padded_batch(b: int = 5, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, L] and a key mask with rows left-padded by 0..B-1 positions."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 29, (b, length), generator=g)
    mask = torch.ones_like(ids)
    for r in range(b):
        mask[r, :r] = 0
    return ids, mask


@pytest.mark.parametrize("kw", [{}, {"scale_attn_by_inverse_layer_idx": True}, {"activation_function": "gelu_pytorch_tanh"},
                                {"activation_function": "gelu", "scale_attn_weights": False}])
def test_full_forward_matches_transformers(kw):
    model = gpt2(**kw)
    ids, mask = padded_batch()
    pos = position_ids(mask)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
        logits, hidden = fast_gpt2.forward(model, ids, pos, mask)
    real = mask.bool()  # padding positions' outputs are never read
    assert torch.allclose(logits[real], ref.logits[real], atol=1e-5)
    assert torch.allclose(hidden[real], ref.hidden_states[-1][real], atol=1e-5)
    assert torch.isfinite(logits).all()  # padding queries see themselves: no NaN to spread


def test_cached_steps_match_one_full_pass():
    model = gpt2()
    ids, mask = padded_batch(length=10)
    pos = position_ids(mask)
    with torch.no_grad():
        full, _ = fast_gpt2.forward(model, ids, pos, mask)
        cache = fast_gpt2.KVCache.empty(model, ids.shape[0], ids.shape[1])
        first, _ = fast_gpt2.forward(model, ids[:, :4], pos[:, :4], mask[:, :4], cache=cache)  # prefill 4 positions
        steps = [first] + [fast_gpt2.forward(model, ids[:, t : t + 1], pos[:, t : t + 1], mask[:, : t + 1], cache=cache)[0]
                           for t in range(4, 10)]
    assert cache.filled == 10
    real = mask.bool()
    assert torch.allclose(torch.cat(steps, 1)[real], full[real], atol=1e-5)


def test_logits_from_skips_the_head_on_earlier_positions():
    model = gpt2()
    ids, mask = padded_batch()
    with torch.no_grad():
        all_logits, _ = fast_gpt2.forward(model, ids, position_ids(mask), mask)
        tail, _ = fast_gpt2.forward(model, ids, position_ids(mask), mask, logits_from=7)
    assert tail.shape[1] == ids.shape[1] - 7
    assert torch.equal(tail, all_logits[:, 7:])


def test_gradients_match_transformers():
    ids, mask = padded_batch()
    pos = position_ids(mask)
    grads = []
    for fast in (False, True):
        model = gpt2()
        logits = fast_gpt2.forward(model, ids, pos, mask)[0] if fast else model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        weights = torch.linspace(-1, 1, logits.shape[-1])
        (logits.log_softmax(-1) * weights * mask[..., None]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, atol=1e-5), name


def test_supports_only_where_exact():
    assert fast_gpt2.supports(gpt2())
    assert not fast_gpt2.supports(gpt2().train())  # dropout 0.1 is active in training mode
    assert fast_gpt2.supports(gpt2(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0).train())
    assert not fast_gpt2.supports(gpt2(activation_function="relu"))
    assert not fast_gpt2.supports(gpt2(reorder_and_upcast_attn=True))
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=4, vocab_size=29))
    assert not fast_gpt2.supports(llama)


def test_rollout_paths_agree(monkeypatch):
    """decode and sequence_forward give the same numbers through fast_gpt2 and through
    transformers (the fallback every other architecture takes)."""
    model = gpt2()
    prompts, pmask = padded_batch(length=6)
    out = {}
    for fast in (True, False):
        monkeypatch.setattr(fast_gpt2, "supports", lambda m, fast=fast: fast)
        g = torch.Generator().manual_seed(3)
        d = decode(model, prompts, pmask, 9, generator=g, keep_logits=True, keep_hidden=True, eos_id=1, pad_id=0)
        logits, hidden = sequence_forward(model, prompts, pmask, d.tokens, hidden=True)
        out[fast] = (d, logits, hidden)
    (d1, l1, h1), (d0, l0, h0) = out[True], out[False]
    assert torch.equal(d1.tokens, d0.tokens)
    assert torch.allclose(d1.logits, d0.logits, atol=1e-5) and torch.allclose(d1.hidden, d0.hidden, atol=1e-5)
    assert torch.allclose(l1, l0, atol=1e-5) and torch.allclose(h1, h0, atol=1e-5)
    assert torch.allclose(l1, d1.logits, atol=1e-5)  # scoring the sample again gives the sampling logits
