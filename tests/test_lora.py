"""LoRA (rlhf/lora.py) on the toy RL task (tests/dist_scripts/toy.py) and on a Bradley-Terry
reward model: the LoRA policy starts as the prior, whose weights it shares (one copy); a LoRA
tune raises the reward and moves no base weight; a tune resumes exactly; the final folder's
adapters load back onto a fresh base and its merged weights give the adapter model's outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from reward_models.backbone import build_backbone, build_reward_model
from reward_models.bradley_terry import rewards, train_bt
from reward_models.reward_source import load_reward_model
from reward_models.vpl import build_vpl, train_vpl
from rlhf import fast_gpt2
from rlhf.errors import UserError
from rlhf.lora import ADAPTER_DIR, ADAPTER_FILE, AdaptersOff, LoraSettings, adapter_parameters
from rlhf.models import ModelConfig, build_model, load_model
from rlhf.rollout import decode, left_pad, sequence_forward
from rlhf.algorithms.common import make_rollout
from rlhf.runs import Run, read_metrics
from rlhf.tune import TuneConfig, Tuner, build_algorithm, tune

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
from toy import BT, TINY, VPL, ToyTask, bt_records, probe_batch, save_prior, word_tokenizer  # noqa: E402

LORA = LoraSettings(r=8, alpha=16, target_modules=["c_attn", "c_proj", "c_fc"])
RLOO = {"algorithm": "rloo", "steps": 24, "batch_size": 32, "lr": 1e-2, "checkpoint_every": 12, "kl": {"beta": 0.01}, "rloo": {"k": 4}}


@pytest.fixture(scope="module")
def prior(tmp_path_factory) -> Path:
    """The toy prior with its embeddings scaled ×25. A random tiny GPT-2's logits span a fraction
    of a nat (unit-scale hidden states read by embeddings of std 0.02), which no adapter on the
    transformer's layers can widen (full fine-tuning moves the embeddings themselves); a trained
    prior's logits span several nats, and so do these."""
    folder = save_prior(tmp_path_factory.mktemp("toy") / "prior")
    model = load_model(folder)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(25.0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def seq2seq_prior(tmp_path_factory) -> Path:
    return save_prior(tmp_path_factory.mktemp("toy-s2s") / "prior", arch="marian")


def probe(task: ToyTask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts of mixed lengths [3, P], their mask, and completions [3, 5] of allowed tokens."""
    prompts = [p.ids for p in task.train_prompts()[:3]]
    ids, mask = left_pad(prompts, task.tokenizer.pad_token_id)
    allowed = task.allowed.nonzero().flatten()
    tokens = allowed[torch.arange(15).view(3, 5) * 7 % len(allowed)]
    return ids, mask, tokens


def logits(model, task: ToyTask) -> torch.Tensor:
    with torch.no_grad():
        return sequence_forward(model, *probe(task))[0]  # [3, 5, V]


def base_state(policy) -> dict[str, torch.Tensor]:
    """The policy's base weights under the plain model's own names."""
    return {n.removeprefix("base_model.model.").replace(".base_layer.", "."): p for n, p in policy.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("arch", ["gpt2", "marian"])
def test_at_initialisation_the_lora_policy_is_the_prior_and_shares_its_weights(prior, seq2seq_prior, arch):
    folder = prior if arch == "gpt2" else seq2seq_prior
    task = ToyTask()
    cfg = TuneConfig.model_validate(RLOO)
    _, policy, frozen_prior = build_algorithm(cfg, folder, task.allowed, LoraSettings() if arch == "marian" else LORA)
    assert isinstance(frozen_prior, AdaptersOff)
    plain = load_model(folder).eval()
    # log-probs (through sequence_forward, what every update scores with): policy = prior = the plain model
    torch.testing.assert_close(logits(policy, task), logits(frozen_prior, task), rtol=0, atol=0)
    torch.testing.assert_close(logits(policy, task), logits(plain, task), rtol=1e-5, atol=1e-5)  # plain GPT-2: the fast path
    # the algorithm's rollout: sampled by the policy with a KV cache, scored by the prior: KL 0
    ro = make_rollout(policy, frozen_prior, [p.ids for p in task.train_prompts()[:4]], [6] * 4, pad_id=task.tokenizer.pad_token_id,
                      allowed=task.allowed, generator=torch.Generator().manual_seed(0), eos_id=task.eos_id)
    torch.testing.assert_close(ro.logp, ro.logp_prior, rtol=1e-5, atol=1e-5)
    # the prior samples with a KV cache as the plain model does
    ids, mask, _ = probe(task)
    a, b = (decode(m, ids, mask, 6, allowed=task.allowed, generator=torch.Generator().manual_seed(1), keep_logits=True) for m in (frozen_prior, plain))
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    # one copy of the weights: the prior's parameters are the policy's base tensors, and it saves none of its own
    assert [p.data_ptr() for p in frozen_prior.parameters()] == [p.data_ptr() for p in base_state(policy).values()]
    assert frozen_prior.state_dict() == {}
    assert not any(p.requires_grad for p in frozen_prior.parameters())
    assert all(p.requires_grad for _, p in adapter_parameters(policy)) and any(True for _ in adapter_parameters(policy))


@pytest.fixture(scope="module")
def tuned(prior, tmp_path_factory):
    """A short LoRA RLOO tune of the toy: (tuner, metric rows, final model folder)."""
    run = Run(tmp_path_factory.mktemp("lora-run"))
    tuner = Tuner(run, TuneConfig.model_validate(RLOO), ToyTask(), prior, seed=0, progress=False, lora=LORA)
    rows = []
    for step in tuner.loop.steps():
        rows.append(tuner.iteration(step))
        tuner.loop.advance()
    final = tuner.loop.finish(run.final_model_dir("rloo"))
    return tuner, rows, final


def test_a_lora_tune_raises_the_reward_and_trains_only_the_adapters(tuned, prior):
    tuner, rows, _ = tuned
    # as tests/test_engine.py: reward/task per sequence, the first six iterations against the last six
    first = sum(r["reward/task"] for r in rows[:6]) / 6
    last = sum(r["reward/task"] for r in rows[-6:]) / 6
    assert last > first + 0.5, (first, last)
    policy = tuner.loop.unwrapped
    plain = load_model(prior).eval()
    original = plain.state_dict()
    assert all(torch.equal(p, original[n]) for n, p in base_state(policy).items())  # bit-identical base weights
    assert any(n.endswith("lora_B.default.weight") and bool(p.abs().sum() > 0) for n, p in adapter_parameters(policy))
    # the prior is still the base: the adapters off, whatever they learned
    task = ToyTask()
    torch.testing.assert_close(logits(tuner.prior, task), logits(plain, task), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(policy, task), logits(plain, task), atol=1e-3)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft asks transformers 5 a deprecated question
def test_checkpoints_hold_the_adapters_and_the_saved_adapters_load_back(tuned, prior):
    tuner, _, final = tuned
    ckpt = tuner.loop.run.latest_checkpoint(tuner.loop.stage)
    assert (ckpt / ADAPTER_FILE).is_file() and not (ckpt / "model.safetensors").exists()  # no second copy of the base per checkpoint
    task = ToyTask()
    again = PeftModel.from_pretrained(load_model(prior), str(final / ADAPTER_DIR)).eval()
    torch.testing.assert_close(logits(again, task), logits(tuner.loop.unwrapped, task), rtol=0, atol=0)


def test_the_merged_weights_give_the_adapter_models_outputs(tuned):
    tuner, _, final = tuned
    merged = load_model(final).eval()  # what evaluate / sample / report load: a plain HF folder
    assert type(merged).__name__ == "GPT2LMHeadModel" and fast_gpt2.supports(merged)
    task = ToyTask()
    torch.testing.assert_close(logits(merged, task), logits(tuner.loop.unwrapped, task), rtol=1e-5, atol=1e-5)


def test_a_lora_ppo_tune_resumes_exactly(prior, tmp_path):
    """PPO's value head beside the adapters: the checkpoint holds both and the optimizer state;
    the final folder the merged LM, the value head and adapter/."""
    cfg = TuneConfig.model_validate({"algorithm": "ppo", "steps": 4, "batch_size": 8, "lr": 1e-2, "checkpoint_every": 2,
                                     "ppo": {"epochs": 1, "minibatches": 2, "target_kl": None}})
    kw = dict(seed=1, progress=False, lora=LORA)
    whole = tune(Run(tmp_path / "whole"), cfg, ToyTask(), prior, **kw)
    tune(Run(tmp_path / "cut"), cfg.model_copy(update={"steps": 2}), ToyTask(), prior, **kw)
    cut = tune(Run(tmp_path / "cut"), cfg, ToyTask(), prior, resume=True, **kw)
    a, b = (read_metrics(tmp_path / r / "metrics.jsonl", "tune-ppo") for r in ("whole", "cut"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["loss/policy"] == pytest.approx(y["loss/policy"], rel=1e-5, abs=1e-7)
        assert x["loss/value"] == pytest.approx(y["loss/value"], rel=1e-5, abs=1e-7)
    for name in ("model.safetensors", "value_head.safetensors", f"{ADAPTER_DIR}/{ADAPTER_FILE}"):
        assert (whole / name).is_file(), name
        torch.testing.assert_close(load_file(str(whole / name)), load_file(str(cut / name)), rtol=1e-5, atol=1e-6)


def test_a_lora_bt_reward_model_trains_only_its_adapters_and_head(tmp_path):
    tok = word_tokenizer()
    torch.manual_seed(0)
    build_model(TINY, tok).save_pretrained(tmp_path / "lm")  # stands in for a pre-trained backbone (model.path)
    cfg = TINY.model_copy(update={"path": str(tmp_path / "lm"), "lora": LoraSettings(r=4, alpha=8)})  # default targets: c_attn
    model = build_reward_model(cfg, tok)
    base = {k: v.clone() for k, v in base_state(model).items() if not k.startswith("score.")}
    final = train_bt(Run(tmp_path / "run"), BT.model_copy(update={"steps": 30, "checkpoint_every": 15, "lr": 1e-2}), model, tok, bt_records(),
                     seed=0, progress=False)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl", "reward-bt")
    assert sum(r["loss/bt"] for r in rows[-5:]) < sum(r["loss/bt"] for r in rows[:5]) - 0.1 * 5, [r["loss/bt"] for r in rows]
    now = base_state(model)
    assert all(torch.equal(v, now[k]) for k, v in base.items())
    # the final folder: a plain sequence-classification model (merged) that scores as the adapter model does
    merged = load_reward_model(final)
    ids, mask = probe_batch(tok)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(rewards(merged, ids, mask), rewards(model, ids, mask), rtol=1e-5, atol=1e-5)


def test_lora_on_a_backbone_built_from_scratch_is_refused(tmp_path):
    tok = word_tokenizer()
    with pytest.raises(UserError, match="model.path"):
        build_reward_model(TINY.model_copy(update={"lora": LoraSettings()}), tok)
    with pytest.raises(UserError, match="model.path"):
        build_backbone(TINY.model_copy(update={"lora": LoraSettings()}), tok)


def test_lora_settings_are_checked_at_load(prior):
    cfg = ModelConfig.model_validate({"lora": {}})
    assert cfg.lora == LoraSettings() and ModelConfig().lora is None
    with pytest.raises(ValueError, match="adapts nothing"):
        ModelConfig.model_validate({"lora": {"target_modules": []}})
    with pytest.raises(ValueError):
        ModelConfig.model_validate({"lora": {"r": 0}})
    task = ToyTask()
    with pytest.raises(UserError, match="c_attn"):  # an unknown layer: the message lists the model's linear layers
        build_algorithm(TuneConfig.model_validate(RLOO), prior, task.allowed, LoraSettings(target_modules=["q_proj"]))
    with pytest.raises(UserError, match="tied"):
        build_algorithm(TuneConfig.model_validate(RLOO), prior, task.allowed, LoraSettings(target_modules=["lm_head"]))


@pytest.mark.parametrize("algorithm, arch", [("q", "gpt2"), ("psi", "gpt2"), ("g", "gpt2"), ("mrt", "gpt2"), ("rloo", "marian"), ("ppo", "marian")])
def test_every_algorithm_tunes_a_lora_policy_into_a_merged_folder(prior, seq2seq_prior, tmp_path, algorithm, arch):
    """Two iterations of each other algorithm (Q/Ψ/G copy the policy into a target network; MRT
    ranks beams with ``generate``), and an encoder–decoder (the prior's encoder runs with the
    adapters off too): the merged folder scores as the adapter model does."""
    settings = {"mrt": {"mrt": {"k": 2, "candidates": "beam"}}, "rloo": {"rloo": {"k": 2}}}.get(algorithm, {})
    if algorithm in ("q", "psi", "g"):
        settings = {"kl_control": {"minibatch": 8}}
    cfg = TuneConfig.model_validate({"algorithm": algorithm, "steps": 2, "batch_size": 8, "checkpoint_every": 100, **settings})
    run = Run(tmp_path)
    tuner = Tuner(run, cfg, ToyTask(), prior if arch == "gpt2" else seq2seq_prior, seed=0, progress=False, lora=LoraSettings())
    for step in tuner.loop.steps():
        tuner.iteration(step)
        tuner.loop.advance()
    final = tuner.loop.finish(run.final_model_dir(algorithm))
    task = ToyTask()
    torch.testing.assert_close(logits(load_model(final).eval(), task), logits(tuner.algo.policy, task), rtol=1e-5, atol=1e-5)


def test_a_lora_vpl_model_saves_merged_and_resumes(tmp_path):
    tok = word_tokenizer()
    torch.manual_seed(0)
    build_model(TINY, tok).save_pretrained(tmp_path / "lm")
    cfg = TINY.model_copy(update={"path": str(tmp_path / "lm"), "lora": LoraSettings(r=4)})
    v = VPL.model_copy(update={"steps": 4, "checkpoint_every": 2})

    def build():
        return build_vpl(build_backbone(cfg, tok), v.latent_dim, v.pair_hidden, v.head_hidden, v.pooling, lora=cfg.lora)

    model = build()
    final = train_vpl(Run(tmp_path / "run"), v, model, tok, bt_records(), seed=0, progress=False)
    ids, mask = probe_batch(tok)
    model.eval()
    with torch.no_grad():  # the heads train whole (modules_to_save) and are merged back under their own names
        torch.testing.assert_close(load_reward_model(final)(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
    train_vpl(Run(tmp_path / "run"), v.model_copy(update={"steps": 6}), build(), tok, bt_records(), seed=0, progress=False, resume=True)
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl", "reward-vpl")] == [1, 2, 3, 4, 5, 6]
