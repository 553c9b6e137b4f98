"""The counterpoint_columns architecture as prior and policy: built from a run config, exact
through rlhf.fast_gpt2 (teacher forcing, cached decoding, gradients) against transformers' own
forward of the same model, saved with save_pretrained and loaded in a fresh process through its
entry point, and its next-note embedding reads the ids up to each position only."""

import subprocess
import sys

import pytest
import torch

from rlhf import fast_gpt2
from rlhf.models import ModelConfig, build_model
from rlhf.rollout import _cache_kw, decode, left_pad, position_ids, sequence_forward
from tasks.counterpoint.columns import ColumnsForCausalLM
from tasks.counterpoint.piece import FirstSpeciesPiece
from tasks.counterpoint.tokens import build_codec

CFG = ModelConfig(arch="counterpoint_columns", n_layer=2, n_embd=32, n_head=2, dropout=0.0, max_positions=64)
PIECES = [
    FirstSpeciesPiece((50, 52, 53, 55, 53, 52, 50), (57, 55, 57, 59, 57, 55, 50), "below", 2, ""),
    FirstSpeciesPiece((60, 62, 64, 62, 60), (48, 47, 45, 47, 48), "above", 0, ""),
    FirstSpeciesPiece((57, 55, 53, 52, 50, 52, 53, 55, 57), (64, 64, 65, 67, 65, 64, 62, 59, 57), "below", 9, ""),
]


def policy(slots: int = 16) -> tuple[ColumnsForCausalLM, object]:
    codec = build_codec("first_species", cantus_slots=slots)
    torch.manual_seed(0)
    model = build_model(CFG, codec.tokenizer).eval()
    with torch.no_grad():  # the column embeddings start at zero-ish scale; make them matter for the comparison
        for p in model.transformer.columns.parameters():
            p.normal_(std=0.5)
    return model, codec


def batch(codec, slots_padding: bool = True):
    prompts, pmask = left_pad([codec.encode_prompt(p) for p in PIECES], codec.pad_id)
    comps = [codec.encode_completion(p) for p in PIECES]
    t = max(map(len, comps))
    return prompts, pmask, torch.tensor([c + [codec.pad_id] * (t - len(c)) for c in comps])


@pytest.mark.parametrize("slots", [16, 0])  # 0: unpadded cantus, so the prompts are left-padded to different lengths
def test_fast_path_matches_transformers_forward(slots):
    model, codec = policy(slots)
    assert isinstance(model, ColumnsForCausalLM) and model.config.next_note and fast_gpt2.supports(model)
    prompts, pmask, tokens = batch(codec)
    attn = torch.cat([pmask, torch.ones_like(tokens)], 1)
    with torch.no_grad():
        fast, _ = sequence_forward(model, prompts, pmask, tokens)
        ref = model(input_ids=torch.cat([prompts, tokens], 1), attention_mask=attn, position_ids=position_ids(attn)).logits
    p = prompts.shape[1]
    assert torch.allclose(fast, ref[:, p - 1 : -1], atol=1e-5)
    # the column terms change the prediction: a plain GPT-2 with the same weights gives other logits
    with torch.no_grad():
        plain = model.transformer.wte(torch.cat([prompts, tokens], 1))
        ref_plain = model(inputs_embeds=plain, attention_mask=attn, position_ids=position_ids(attn)).logits
    assert not torch.allclose(ref_plain[:, p - 1 : -1], ref[:, p - 1 : -1], atol=1e-3)


@pytest.mark.parametrize("slots", [16, 0])
def test_cached_decoding_matches_teacher_forcing(slots):
    """Each step of decode adds the column terms from the ids so far; scoring the samples again
    in one pass gives the same logits, so sampled log-probs are the policy's log-probs."""
    model, codec = policy(slots)
    prompts, pmask, _ = batch(codec)
    d = decode(model, prompts, pmask, 10, keep_logits=True, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tf, _ = sequence_forward(model, prompts, pmask, d.tokens)
    assert torch.allclose(tf, d.logits, atol=1e-5)


def test_gradients_match_transformers():
    model, codec = policy()
    prompts, pmask, tokens = batch(codec)
    attn = torch.cat([pmask, torch.ones_like(tokens)], 1)
    grads = []
    for fast in (True, False):
        model.zero_grad()
        if fast:
            logits, _ = sequence_forward(model, prompts, pmask, tokens)
        else:
            logits = model(input_ids=torch.cat([prompts, tokens], 1), attention_mask=attn, position_ids=position_ids(attn)).logits
            logits = logits[:, prompts.shape[1] - 1 : -1]
        logits.log_softmax(-1).gather(-1, tokens[..., None]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("columns.hold" in n for n in grads[0])
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, atol=1e-5), name


def test_transformers_cached_decoding_is_refused_with_the_fix():
    model, codec = policy()
    prompts, pmask, _ = batch(codec)
    kw = _cache_kw(model)
    out = model(input_ids=prompts, attention_mask=pmask, use_cache=True)
    with pytest.raises(ValueError, match="rlhf.fast_gpt2"):
        model(input_ids=prompts[:, -1:], attention_mask=torch.cat([pmask, torch.ones_like(pmask[:, :1])], 1),
              use_cache=True, **{kw: out.past_key_values})


def test_saved_policy_loads_in_a_fresh_process(tmp_path):
    model, codec = policy()
    model.save_pretrained(tmp_path / "prior")
    codec.tokenizer.save_pretrained(tmp_path / "prior")
    prompts, pmask, tokens = batch(codec)
    with torch.no_grad():
        ref, _ = sequence_forward(model, prompts, pmask, tokens)
    torch.save({"prompts": prompts, "pmask": pmask, "tokens": tokens, "ref": ref}, tmp_path / "batch.pt")
    code = (
        "import torch, sys\n"
        "from rlhf.models import load_model\n"
        "from rlhf.rollout import sequence_forward\n"
        f"m = load_model({str(tmp_path / 'prior')!r}).eval()\n"
        f"b = torch.load({str(tmp_path / 'batch.pt')!r})\n"
        "with torch.no_grad():\n"
        "    out, _ = sequence_forward(m, b['prompts'], b['pmask'], b['tokens'])\n"
        "assert type(m).__name__ == 'ColumnsForCausalLM', type(m)\n"
        "assert torch.allclose(out, b['ref'], atol=1e-6)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_unknown_architecture_names_the_choices():
    with pytest.raises(ValueError, match="counterpoint_columns"):
        ModelConfig(arch="no_such_arch")


def test_transformers_generate_matches_our_greedy_decoding():
    """TRL samples through model.generate: it reads the whole sequence at every step (no cache)
    and writes what rlhf.rollout writes, on left-padded prompts."""
    model, codec = policy(0)
    prompts, pmask, _ = batch(codec)
    ours = decode(model, prompts, pmask, 6, temperature=0.0).tokens
    theirs = model.generate(input_ids=prompts, attention_mask=pmask, do_sample=False, max_new_tokens=6, pad_token_id=codec.pad_id)
    assert torch.equal(theirs[:, prompts.shape[1]:], ours)


def test_trl_loads_the_saved_policy(tmp_path):
    """TRL's trainers load a model path through create_model_from_path (benchmarks/time_to_quality.py)."""
    from trl.trainer.utils import create_model_from_path

    model, codec = policy()
    model.save_pretrained(tmp_path / "prior")
    loaded = create_model_from_path(str(tmp_path / "prior"))
    assert type(loaded) is ColumnsForCausalLM
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
