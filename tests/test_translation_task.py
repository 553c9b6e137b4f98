"""The translation task: tokenizer round trip and save/load, the reward placed at the first
<eos>, decoding that does not depend on batching, configs, and a tiny prior trained on a
Multi30k slice that lowers the held-out loss and translates a file.

The small synthetic corpus below is written here (tests never copy Multi30k); the prior
tests read Multi30k from its folder and are skipped without it."""

import math
import random
from pathlib import Path

import pytest
import sacrebleu
import torch
from transformers import PreTrainedTokenizerFast

from rlhf.config import apply_overrides, load_config, read_yaml
from rlhf.errors import UserError
from rlhf.models import ModelConfig, build_model, load_model
from apps.pipeline import load_run_config
from rlhf.pretrain import PretrainConfig, evaluate_lm, pretrain
from rlhf.runs import Run
from rlhf.tune import TuneConfig
from tasks.translation.config import TranslationConfig, check_positions
from rlhf.interfaces import Completions
from rlhf.rollout import eos_lengths, length_mask
from tasks.translation.data import MULTI30K_ENV, resolve_data_dir
from tasks.translation.decode import generate, translate_file
from tasks.translation.task import TranslationPrompt, TranslationTask
from tasks.translation.tokenizer import TranslationCodec, train_tokenizer

REPO = Path(__file__).resolve().parents[1]

NUM = [("One", "Ein"), ("Two", "Zwei"), ("Three", "Drei"), ("Four", "Vier")]
NOUN = [("dog", "Hund"), ("man", "Mann"), ("child", "Kind"), ("woman", "Frau")]
VERB = [("runs", "rennt"), ("sings", "singt"), ("sleeps", "schläft"), ("laughs", "lacht")]


def synthetic_pairs() -> list[tuple[str, str]]:
    """64 templated en-de sentence pairs: "Two dog runs ." -> "Zwei Hund rennt ."."""
    return [(f"{a} {b} {c} .", f"{x} {y} {z} .") for a, x in NUM for b, y in NOUN for c, z in VERB]


@pytest.fixture()
def synthetic_task(tmp_path):
    pairs = synthetic_pairs()
    for split, chunk in (("train", pairs), ("val", pairs[:8])):
        (tmp_path / f"{split}.en").write_text("".join(e + "\n" for e, _ in chunk), encoding="utf-8")
        (tmp_path / f"{split}.de").write_text("".join(d + "\n" for _, d in chunk), encoding="utf-8")
    cfg = TranslationConfig.model_validate({"data": {"dir": str(tmp_path), "test_split": None}, "tokenizer": {"vocab_size": 300, "min_frequency": 1}})
    task = TranslationTask(cfg)
    task.corpus(0, run_dir=tmp_path / "r")
    return task


def test_tokenizer_round_trip_special_tokens_and_reload(tmp_path):
    texts = [s for pair in synthetic_pairs() for s in pair] + ["Über 3,5 km & 10% \"Freude\" — naïve café !"]
    tok = train_tokenizer(texts, "en", "de", vocab_size=400, min_frequency=1)
    assert isinstance(tok, PreTrainedTokenizerFast)
    codec = TranslationCodec(tok, "en", "de")
    for s in texts + ["unseen wörds ✓ 漢字", "Ein <eos> ist Text <de>"]:  # byte-level: anything round-trips
        assert codec.decode(codec.encode_text(s)) == s
    p, c = codec.encode_prompt("Two dog runs ."), codec.encode_target("Zwei Hund rennt .")
    assert p[:2] == [codec.bos_id, codec.src_tag_id] and p[-1] == codec.tgt_tag_id and c[-1] == codec.eos_id
    assert codec.eos_id not in codec.encode_text("Ein <eos> ist Text")  # literal text never becomes a special token
    assert codec.decode(c + codec.encode_text("junk after eos")) == "Zwei Hund rennt ."
    allowed = codec.allowed()
    assert allowed[codec.eos_id] and not allowed[[codec.pad_id, codec.bos_id, codec.unk_id, codec.src_tag_id, codec.tgt_tag_id]].any()
    codec.save(tmp_path / "m")
    back = TranslationCodec.load(tmp_path / "m")
    assert (back.src_lang, back.tgt_lang, back.eos_id) == ("en", "de", codec.eos_id)
    assert back.encode_prompt("Four child sleeps .") == codec.encode_prompt("Four child sleeps .")
    # same text, same tokenizer: what makes `--resume` (which retrains or reloads it) safe
    again = train_tokenizer(texts, "en", "de", vocab_size=400, min_frequency=1)
    assert again.get_vocab() == tok.get_vocab()


def test_loading_a_non_translation_tokenizer_is_a_user_error(tmp_path):
    from tasks.counterpoint.tokens import build_codec

    build_codec("melody").save(tmp_path / "cp")
    with pytest.raises(UserError, match="not a translation tokenizer"):
        TranslationCodec.load(tmp_path / "cp")


def test_task_corpus_examples_and_prompts(synthetic_task, tmp_path):
    task = synthetic_task
    train, val = task.corpus(0)
    assert len(train) == 64 and len(val) == 8
    prompt_ids, completion_ids = task.examples(train[:1])[0]
    assert task.codec.decode(completion_ids) == train[0].tgt and completion_ids[-1] == task.eos_id
    prompts = task.train_prompts()
    src_len = len(prompts[0].ids) - 3
    assert prompts[0].n_new == min(64, math.ceil(1.5 * src_len) + 5)
    assert (tmp_path / "r" / "tokenizer" / "tokenizer.json").is_file()  # saved for --resume
    reloaded = TranslationTask(task.cfg)
    reloaded.corpus(0, run_dir=tmp_path / "r")
    assert reloaded.codec.tokenizer.get_vocab() == task.codec.tokenizer.get_vocab()
    stats = task.data_stats(train, val)
    assert stats["train"]["examples"] == 64 and stats["train"]["skipped"]["too long"] == 0


def test_rl_holdout_keeps_the_rl_pairs_out_of_the_tokenizer_and_pretraining(synthetic_task, tmp_path):
    pairs = synthetic_pairs()
    cfg = synthetic_task.cfg.model_copy(update={"rl_holdout": 16})
    task = TranslationTask(cfg)
    train, _ = task.corpus(0, run_dir=tmp_path / "h")
    rl = task.train_prompts()
    mle_pairs, rl_pairs = [(p.src, p.tgt) for p in train], [(p.src, p.ref) for p in rl]
    assert len(mle_pairs) == 48 and len(rl_pairs) == 16 and not set(mle_pairs) & set(rl_pairs)
    assert sorted(mle_pairs + rl_pairs) == sorted(pairs)  # a partition of the training split ...
    assert mle_pairs == [p for p in pairs if p in mle_pairs] and rl_pairs == [p for p in pairs if p in rl_pairs]  # ... each in file order
    assert pairs.index(rl_pairs[-1]) - pairs.index(rl_pairs[0]) > 16  # drawn across the file, not its tail
    # the same draw for every run, whatever the global random state (a run seeds it)
    random.seed(12345)
    assert [(p.src, p.ref) for p in TranslationTask(cfg, task.codec).train_prompts()] == rl_pairs
    # the tokenizer learned its merges from the 48 MLE pairs alone: the same as one trained on them
    alone = train_tokenizer([s for pair in mle_pairs for s in pair], "en", "de", cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
    assert task.codec.tokenizer.get_vocab() == alone.get_vocab() != synthetic_task.codec.tokenizer.get_vocab()
    capped = TranslationTask(cfg.model_copy(update={"rl_prompts": 5}), task.codec)
    assert [(p.src, p.ref) for p in capped.train_prompts()] == rl_pairs[:5]
    with pytest.raises(UserError, match="task.rl_holdout=64 holds out every one of the 64 training pairs"):
        TranslationTask(cfg.model_copy(update={"rl_holdout": 64})).corpus(0)


def test_step_rewards_sit_at_the_first_eos_or_the_budgets_last_token(synthetic_task):
    task = synthetic_task
    c, eos, pad = task.codec, task.eos_id, task.codec.pad_id
    ref = "Zwei Hund rennt ."
    good = c.encode_text(ref)
    half = c.encode_text("Zwei Hund")
    other = c.encode_text("Vier Frau lacht .")
    T = 12
    rows = [
        good + [eos],  # ends: reward at the <eos>
        half + [eos] + good + [eos],  # the first <eos> ends it
        other * 4,  # never ends within the budget: reward at its last token
        other + [eos],  # budget len(other): the <eos> after it lies outside this row's sample
    ]
    rows = [(r + [pad] * T)[:T] for r in rows]
    budgets = [T, T, T, len(other)]
    prompts = [TranslationPrompt(c.encode_prompt("Two dog runs ."), n, "Two dog runs .", ref) for n in budgets]
    tokens = torch.tensor(rows)
    lengths = eos_lengths(tokens, eos, torch.tensor(budgets)).tolist()  # as the rollout cuts them
    comps = Completions(prompts, tokens, length_mask(lengths, T), lengths, eos)
    r = task.reward(comps).per_step(comps)
    assert r.shape == (4, T)
    ends = [len(good), len(half), T - 1, len(other) - 1]
    hyps = ["Zwei Hund rennt .", "Zwei Hund", c.decode(rows[2]), c.decode(rows[3][: len(other)])]
    for i, (end, hyp) in enumerate(zip(ends, hyps)):
        assert torch.count_nonzero(r[i]) == 1 and r[i, end] > 0, i
        assert r[i, end].item() == pytest.approx(sacrebleu.sentence_bleu(hyp, [ref]).score / 100, abs=1e-6)
    assert r[0, ends[0]].item() == pytest.approx(1.0)
    assert r[1, ends[1]] < r[0, ends[0]]


@pytest.mark.parametrize("side", ["short", "both"])
def test_length_weight_subtracts_the_relative_length_error_and_logs_the_length_ratio(synthetic_task, side):
    """reward = sentence BLEU/100 − λ·err, err = max(0, 1 − c/r) (short) or |c/r − 1| (both), with c
    and r the word counts sacrebleu itself reports, and the batch's length ratio in the
    diagnostics (sacrebleu's corpus sys_len/ref_len)."""
    base = synthetic_task
    lam = 0.5
    reward_cfg = base.cfg.reward.model_copy(update={"length_weight": lam, "length_side": side})
    task = TranslationTask(base.cfg.model_copy(update={"reward": reward_cfg}), base.codec)
    c, eos, pad = task.codec, task.eos_id, task.codec.pad_id
    refs = ["Zwei Hund rennt .", "Drei Frau lacht .", "Ein Kind singt .", "Vier Mann schläft ."]
    hyps = ["Zwei Hund rennt .", "Drei Frau", "Ein Kind singt . singt singt", "Vier Mann schläft schläft ."]
    T = 40  # room for every hypothesis and its <eos>
    rows = [(c.encode_text(h) + [eos] + [pad] * T)[:T] for h in hyps]
    prompts = [TranslationPrompt(c.encode_prompt("x"), T, "x", r) for r in refs]
    tokens = torch.tensor(rows)
    lengths = eos_lengths(tokens, eos, torch.tensor([T] * 4)).tolist()
    comps = Completions(prompts, tokens, length_mask(lengths, T), lengths, eos)
    out = task.reward(comps)
    for i, (h, r) in enumerate(zip(hyps, refs)):
        s = sacrebleu.sentence_bleu(h, [r])
        err = abs(s.sys_len / s.ref_len - 1) if side == "both" or s.sys_len < s.ref_len else 0.0
        assert out.values[i].item() == pytest.approx(s.score / 100 - lam * err, abs=1e-6), i
    plain = base.reward(comps).values
    assert out.values[0].item() == pytest.approx(1.0)  # exact length: no penalty
    assert out.values[1] < plain[1] - 0.2  # half the words: 0.5 · 0.5 off
    assert (out.values[2:] < plain[2:] - 0.1).all() == (side == "both")  # too long: charged by "both" alone
    corpus = sacrebleu.corpus_bleu(hyps, [refs])
    assert out.diagnostics["length_ratio"] == pytest.approx(corpus.sys_len / corpus.ref_len)


def test_configs_load_and_fit_the_model():
    for quick in (False, True):
        cfg = load_run_config(REPO / "configs" / "translation.yaml", quick=quick)
        check_positions(cfg.task, cfg.model.max_positions)
    with pytest.raises(ValueError, match="model.max_positions"):
        check_positions(TranslationConfig(), 64)
    with pytest.raises(UserError, match="rloo.baseline=leave_one_out or task.reward.level=sentence"):
        load_run_config(REPO / "configs" / "translation.yaml", ["task.reward.level=corpus", "tune.rloo.baseline=greedy"])
    with pytest.raises(UserError, match="src_lang and data.tgt_lang are both 'de'"):
        load_config(TranslationConfig, None, ["data.src_lang=de"])


# ----- a tiny prior on a Multi30k slice -----------------------------------------------------


@pytest.fixture(scope="module", params=["gpt2", "marian"])
def tiny_prior(tmp_path_factory, request):
    """A decoder-only and an encoder–decoder prior, each trained briefly on the same slice."""
    d = resolve_data_dir(None)
    if not (d / "train.en.gz").is_file():
        pytest.skip(f"Multi30k not found in {d} (set {MULTI30K_ENV}); see docs/translation.md")
    root = tmp_path_factory.mktemp("prior")
    cfg = TranslationConfig.model_validate({"data": {"max_train_pairs": 1500, "max_eval_pairs": 60}, "tokenizer": {"vocab_size": 800},
                                            "eval": {"beam": 2, "examples": 3}})
    task = TranslationTask(cfg)
    train, val = task.corpus(0, run_dir=root)
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=request.param, n_layer=2, n_embd=64, n_head=2, max_positions=128), task.tokenizer)
    val_ex = task.examples(val)
    before = evaluate_lm(model, val_ex, task.codec.pad_id, torch.device("cpu"))["loss/val"]
    run = Run(root / "run")
    pcfg = PretrainConfig(steps=80, batch_size=32, lr=3e-3, warmup_steps=8, eval_every=40, checkpoint_every=100, length_chunks=4)
    final = pretrain(run, pcfg, model, task.tokenizer, task.examples(train), val_ex, seed=0, progress=False)
    task.codec.save(final)
    after = evaluate_lm(load_model(final), val_ex, task.codec.pad_id, torch.device("cpu"))["loss/val"]
    return task, final, before, after


def test_tiny_prior_lowers_the_validation_loss(tiny_prior):
    task, final, before, after = tiny_prior
    assert before > math.log(len(task.codec)) - 0.5  # untrained: about uniform over the vocabulary
    assert after < before - 1.5, (before, after)
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()


def _logprobs(model, prompt, completion, allowed):
    """[T, V] log-probabilities before each completion token, one unpadded sentence."""
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            start = [model.config.decoder_start_token_id]
            logits = model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([start + completion[:-1]])).logits[0]
        else:
            logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : len(prompt) + len(completion) - 1]
    return torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), -1)


def test_batched_decoding_matches_one_sentence_at_a_time(tiny_prior):
    """Left-padded batches decode as each sentence would alone: greedy picks the unpadded
    argmax at every step and beam search finds an equally good beam (exact ties between
    near-equal logits may break either way and change the rest of a beam, so beam scores are
    compared, not token lists)."""
    task, final, _, _ = tiny_prior
    model = load_model(final).eval()
    prompts = [task.prompt(p) for p in task.split("val")[:6]]
    ids, n_new = [p.ids for p in prompts], [p.n_new for p in prompts]
    assert len({len(i) for i in ids}) > 1  # mixed lengths, so the batch is padded
    suppress = torch.nonzero(~task.allowed).flatten().tolist()
    kw = dict(eos_id=task.eos_id, pad_id=task.codec.pad_id, suppress=suppress)
    greedy = generate(model, ids, n_new, beam=1, batch_size=6, **kw)
    for p, c, n in zip(ids, greedy, n_new):
        assert 0 < len(c) <= n
        lp = _logprobs(model, p, c, task.allowed)
        chosen = lp.gather(1, torch.tensor(c)[:, None]).squeeze(1)
        assert torch.all(chosen >= lp.max(-1).values - 1e-3), (c, lp.argmax(-1).tolist())
    beams = generate(model, ids, n_new, beam=2, batch_size=6, **kw)
    alone = [generate(model, [i], [n], beam=2, **kw)[0] for i, n in zip(ids, n_new)]
    score = lambda p, c: float(_logprobs(model, p, c, task.allowed).gather(1, torch.tensor(c)[:, None]).sum()) / len(c)  # noqa: E731
    for p, b, a in zip(ids, beams, alone):  # wrong positions under padding cost far more than 0.01 nats/token
        assert b == a or abs(score(p, b) - score(p, a)) < 1e-2


def test_evaluate_reports_bleu_ratio_and_zero_kl_for_the_prior(tiny_prior):
    task, final, _, _ = tiny_prior
    model = load_model(final)
    ev = task.evaluate({"prior": model}, model, seed=0)
    assert set(ev["splits"]) == {"val", "test"}
    row = ev["splits"]["test"]["rows"]["prior"]
    assert 0 <= row["bleu"] <= 100 and row["ratio"] > 0 and "bleu/beam" in row
    assert abs(row["kl/prior"]) < 1e-5
    assert ev["signature"].startswith("nrefs:1|") and len(ev["examples"]) == 3
    from tasks.translation.report import write_report

    run_dir = final.parent.parent
    report = write_report(run_dir, ev, task.data_stats(*task.corpus(0)))
    text = report.read_text()
    assert "BLEU greedy" in text and "## Examples" in text and "prior_loss.png" in text


def test_translate_file_keeps_line_alignment(tiny_prior, tmp_path):
    task, final, _, _ = tiny_prior
    src = [p.src for p in task.split("test")[:4]]
    inp = tmp_path / "in.en"
    inp.write_text(f"{src[0]}\n\n{src[1]}\n{src[2]}\n", encoding="utf-8")
    n = translate_file(final, inp, tmp_path / "out.de", beam=2, batch_size=2)
    out = (tmp_path / "out.de").read_text(encoding="utf-8").split("\n")
    assert n == 4 and len(out) == 5 and out[-1] == "" and out[1] == ""
    assert all(out[i] for i in (0, 2, 3))
    with pytest.raises(UserError, match="--beam must be at least 1"):
        translate_file(final, inp, tmp_path / "x", beam=0)


def test_tuner_accepts_the_task(tiny_prior, tmp_path):
    """The RL core runs on the task: rollouts, BLEU rewards, update, tokenizer saved with the
    policy; with length_decorrelate the fitted slope of the advantages on length is logged."""
    from rlhf.runs import read_metrics
    from rlhf.tune import tune

    task, final, _, _ = tiny_prior
    task.cfg.rl_prompts = 64
    task._train_prompts = None
    cfg = TuneConfig.model_validate({"algorithm": "rloo", "steps": 2, "batch_size": 8, "checkpoint_every": 1, "keep_checkpoints": 1,
                                     "rloo": {"k": 4, "length_decorrelate": True}})
    out = tune(Run(tmp_path / "rl"), cfg, task, final, seed=0, progress=False)
    rows = read_metrics(tmp_path / "rl" / "metrics.jsonl", "tune-rloo")
    assert len(rows) == 2 and all(0 <= r["reward/task"] <= 1 for r in rows)
    assert all(math.isfinite(r["adv/length_slope"]) for r in rows)
    assert sorted(p.name for p in (tmp_path / "rl" / "checkpoints" / "tune-rloo").iterdir()) == ["step-000002"]  # the default would keep two
    assert TranslationCodec.load(out).tgt_lang == "de"


# ----- a model trained elsewhere: an OPUS-MT-style Marian folder ----------------------------


@pytest.fixture(scope="module")
def opus_like(tmp_path_factory):
    """An OPUS-MT-style folder (``tests/opus_like.py``) whose SentencePiece vocabularies are
    trained on a Multi30k slice. The model is untrained: these tests check token layout and
    decoding, not quality."""
    pytest.importorskip("sentencepiece")
    import opus_like

    from tasks.translation.data import load_split

    d = resolve_data_dir(None)
    if not (d / "train.en.gz").is_file():
        pytest.skip(f"Multi30k not found in {d} (set {MULTI30K_ENV}); see docs/translation.md")
    pairs = load_split(d, "train", "text", "en", "de")[0][:2000]
    folder, tok = opus_like.build(tmp_path_factory.mktemp("opus"), [p.src for p in pairs], [p.tgt for p in pairs])
    assert not (folder / "tokenizer.json").exists()  # a slow SentencePiece tokenizer, as OPUS-MT ships
    return folder, tok, pairs


def test_an_opus_mt_folder_keeps_its_own_token_layout(opus_like):
    """Source ``x </s>`` as the tokenizer lays it out, targets in the target vocabulary, and
    ``rlhf translate`` (greedy and beam) equal to transformers' ``generate`` on the same
    tokenizer's batch, with pad (the decoder start) and unk never written. (OPUS-MT's config
    forces ``</s>`` as the last token of a translation cut by the length budget; ours leaves
    the cut translation as written, so ``generate`` is called without that rule.)"""
    from transformers import MarianMTModel

    from tasks.translation.decode import max_new_tokens
    from tasks.translation.tokenizer import ModelCodec

    folder, tok, pairs = opus_like
    codec = TranslationCodec.load(folder)
    assert isinstance(codec, ModelCodec) and (codec.src_lang, codec.tgt_lang) == ("en", "de")
    src, tgt = [p.src for p in pairs[:5]], [p.tgt for p in pairs[:5]]
    assert [codec.encode_prompt(s) for s in src] == tok(src)["input_ids"]  # ... </s>, as OPUS-MT was trained
    assert [codec.encode_target(t) for t in tgt] == tok(text_target=tgt)["input_ids"]
    assert codec.decode(codec.encode_target(tgt[0])) == tok.decode(tok(text_target=tgt[0])["input_ids"], skip_special_tokens=True)
    assert not codec.allowed()[[tok.pad_token_id, tok.unk_token_id]].any() and codec.allowed()[tok.eos_token_id]

    model = MarianMTModel.from_pretrained(str(folder)).eval()
    inp = tmp = folder.parent / "in.en"
    inp.write_text("".join(s + "\n" for s in src), encoding="utf-8")
    for beam in (1, 2):
        n = translate_file(folder, inp, tmp.with_suffix(f".b{beam}.de"), beam=beam, batch_size=1)  # unpadded, as generate below
        ours = tmp.with_suffix(f".b{beam}.de").read_text(encoding="utf-8").splitlines()
        theirs = []
        for s in src:  # one at a time: each source has its own budget
            enc = tok([s], return_tensors="pt")
            budget = max_new_tokens(enc["input_ids"].shape[1] - 1)
            out = model.generate(**enc, do_sample=False, num_beams=beam, max_new_tokens=budget, early_stopping=beam > 1,
                                 suppress_tokens=[tok.unk_token_id, tok.pad_token_id], forced_eos_token_id=None)  # ours never forces </s> at the budget's end
            theirs.append(tok.batch_decode(out, skip_special_tokens=True)[0].strip())
        assert n == 5 and ours == theirs, (beam, ours, theirs)


@pytest.mark.integration
def test_an_opus_mt_folder_is_prior_and_policy(opus_like, tmp_path):
    """``rlhf run`` with ``model.path`` = the folder and ``pretrain: null`` tunes it offline: the
    tuned model is saved with the same SentencePiece tokenizer and evaluates like the prior."""
    folder, tok, _ = opus_like
    run_dir = tmp_path / "run"
    cfg = load_run_config(REPO / "configs" / "translation.yaml", [
        f"model.path={folder}", "pretrain=null", f"run_dir={run_dir}", "progress=false", "task.data.max_train_pairs=200",
        "task.data.max_eval_pairs=20", "task.rl_prompts=64", "task.eval.beam=2", "task.eval.examples=2", "tune.steps=2", "tune.batch_size=8",
        "tune.checkpoint_every=2", "sweep.betas=[]"])
    from apps.pipeline import run_pipeline

    run_pipeline(cfg)
    tuned = run_dir / "models" / "rloo"
    assert (tuned / "source.spm").is_file() and (tuned / "target.spm").is_file()
    assert TranslationCodec.load(tuned).encode_prompt("A dog runs .") == tok(["A dog runs ."])["input_ids"][0]
    assert load_model(tuned).config.decoder_start_token_id == tok.pad_token_id
    import json

    ev = json.loads((run_dir / "eval.json").read_text())
    for split in ("val", "test"):
        rows = ev["splits"][split]["rows"]
        assert rows["prior"]["kl/prior"] == 0.0 and rows["rloo"]["kl/prior"] >= 0.0 and 0 <= rows["rloo"]["bleu"] <= 100
