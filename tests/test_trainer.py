"""The training-loop layer: MLE learns, checkpoints are HF folders, --resume is exact."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.models import ModelConfig, build_model
from rlhf.pretrain import PretrainConfig, batch_indices, collate, pretrain
from rlhf.runs import Run, latest_checkpoint, read_metrics
from tasks.counterpoint.tokens import build_codec


def toy_examples(codec, n, seed):
    """Melodies from a tiny 'grammar' (ascending scale fragments) that a model can learn."""
    g = torch.Generator().manual_seed(seed)
    bos = codec.encode_prompt(None)
    ids = codec.completion_token_ids
    out = []
    for _ in range(n):
        start = int(torch.randint(0, len(ids) - 16, (1,), generator=g))
        out.append((bos, [ids[start + (t // 2)] for t in range(32)] + [codec.eos_id]))
    return out


def setup(tmp_path, steps, name="run"):
    codec = build_codec("melody")
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, max_positions=40), codec.tokenizer)
    cfg = PretrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=5, checkpoint_every=5)
    return codec, model, cfg, Run(tmp_path / name)


def test_mle_learns_and_writes_hf_checkpoints(tmp_path):
    codec, model, cfg, run = setup(tmp_path, 40)
    train, val = toy_examples(codec, 64, 0), toy_examples(codec, 16, 1)
    final = pretrain(run, cfg, model, codec.tokenizer, train, val, seed=0, progress=False)
    rows = [r for r in read_metrics(run.root / "metrics.jsonl", "prior") if "loss/val" in r]
    assert rows[-1]["loss/val"] < rows[0]["loss/val"] - 0.5, rows
    assert rows[-1]["step"] == 40
    m = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.convert_tokens_to_ids(codec.tokenizer.convert_ids_to_tokens(5)) == 5
    assert (final / "model.safetensors").is_file()
    ck = latest_checkpoint(run.stage_dir("prior"))
    assert ck.name == "step-000040" and (ck / "trainer_state.pt").is_file()
    assert not any(p.name.startswith(".tmp") for p in run.stage_dir("prior").iterdir())
    assert sum(1 for _ in run.stage_dir("prior").iterdir()) == cfg.keep_checkpoints
    assert m.config.vocab_size == len(codec.tokenizer)


class Crash(Exception):
    pass


class CrashingData(list):
    """Training data that fails after ``limit`` reads: a run killed mid-stage."""

    def __init__(self, items, limit):
        super().__init__(items)
        self.reads, self.limit = 0, limit

    def __getitem__(self, i):
        self.reads += 1
        if self.reads > self.limit:
            raise Crash()
        return super().__getitem__(i)


def test_resume_after_a_crash_is_exact(tmp_path):
    codec = build_codec("melody")
    train, val = toy_examples(codec, 64, 0), toy_examples(codec, 8, 1)
    _, model, cfg, run = setup(tmp_path, 20, "straight")
    a = pretrain(run, cfg, model, codec.tokenizer, train, val, seed=3, progress=False)

    _, model, cfg, run = setup(tmp_path, 20, "resumed")
    with pytest.raises(Crash):  # dies during step 13, after the step-10 checkpoint
        pretrain(run, cfg, model, codec.tokenizer, CrashingData(train, 8 * 12 + 3), val, seed=3, progress=False)
    assert latest_checkpoint(run.stage_dir("prior")).name == "step-000010"
    _, model, _, _ = setup(tmp_path, 20, "resumed")  # a new process: fresh init, then resume
    torch.manual_seed(123)
    b = pretrain(run, cfg, model, codec.tokenizer, train, val, seed=3, resume=True, progress=False)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    steps = [r["step"] for r in read_metrics(run.root / "metrics.jsonl", "prior")]
    assert steps == list(range(1, 21))  # rows of the lost steps 11-12 were dropped on resume


def test_a_run_killed_before_its_first_checkpoint_starts_over_without_stale_rows(tmp_path):
    codec = build_codec("melody")
    train, val = toy_examples(codec, 64, 0), toy_examples(codec, 8, 1)
    _, model, cfg, run = setup(tmp_path, 8, "early")
    with pytest.raises(Crash):  # dies during step 4, before the step-5 checkpoint
        pretrain(run, cfg, model, codec.tokenizer, CrashingData(train, 8 * 3 + 3), val, seed=3, progress=False)
    assert latest_checkpoint(run.stage_dir("prior")) is None
    assert [r["step"] for r in read_metrics(run.root / "metrics.jsonl", "prior")] == [1, 2, 3]
    _, model, _, _ = setup(tmp_path, 8, "early")
    pretrain(run, cfg, model, codec.tokenizer, train, val, seed=3, resume=True, progress=False)
    assert [r["step"] for r in read_metrics(run.root / "metrics.jsonl", "prior")] == list(range(1, 9))  # not 1, 2, 3, 1, 2, …


def test_batches_are_a_function_of_step():
    a = [batch_indices(50, 16, s, 7).tolist() for s in range(10)]
    b = [batch_indices(50, 16, s, 7).tolist() for s in range(10)]
    assert a == b
    flat = sum(a[:4], [])[:50]  # the first 50 draws are one epoch: a permutation
    assert sorted(flat) == list(range(50))


def test_collate_masks_prompt_and_padding():
    batch = collate([([1, 2], [3, 4, 5]), ([1], [6])], pad_id=0)
    assert batch["labels"].tolist() == [[-100, -100, 3, 4, 5], [-100, 6, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def naive_completion_nll(model, examples):
    """Reference (summed NLL, correct argmax predictions): one unpadded forward per example
    and a loop over its completion tokens."""
    total, correct = torch.zeros(()), 0
    for prompt, completion in examples:
        ids = torch.tensor([list(prompt) + list(completion)])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        for t, tok in enumerate(completion):
            total = total - logp[len(prompt) + t - 1, tok]
            correct += int(logp[len(prompt) + t - 1].argmax()) == tok
    return total, correct


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("n_chunks", [1, 3])
def test_chunked_token_stats_equal_a_per_example_loop(arch, n_chunks):
    """Length chunks and the completion-only LM head (GPT-2) change neither the summed NLL nor
    its gradient; the Llama model takes the generic full-logits path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.pretrain import chunked_token_stats, length_chunks

    codec = build_codec("melody")
    torch.manual_seed(0)
    if arch == "gpt2":
        model = build_model(ModelConfig(n_layer=2, n_embd=32, n_head=2, max_positions=40, dropout=0.0), codec.tokenizer)
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(codec.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, max_position_embeddings=40, pad_token_id=codec.pad_id))
    ids = codec.completion_token_ids
    g = torch.Generator().manual_seed(1)
    examples = [([codec.bos_id] + ids[:int(torch.randint(0, 4, (1,), generator=g))],
                 [ids[int(i)] for i in torch.randint(0, len(ids), (int(torch.randint(1, 20, (1,), generator=g)),), generator=g)])
                for _ in range(7)]
    chunks = length_chunks(examples, n_chunks)
    assert sorted(map(id, sum(chunks, []))) == sorted(map(id, examples)) and len(chunks) == n_chunks
    nll, correct, count = chunked_token_stats(model, examples, codec.pad_id, torch.device("cpu"), n_chunks)
    grad = torch.autograd.grad(nll, list(model.parameters()))
    ref, ref_correct = naive_completion_nll(model, examples)
    ref_grad = torch.autograd.grad(ref, list(model.parameters()))
    assert int(count) == sum(len(c) for _, c in examples)
    assert int(correct) == ref_correct
    assert torch.allclose(nll, ref, rtol=1e-5), (float(nll), float(ref))
    for a, b in zip(grad, ref_grad):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
