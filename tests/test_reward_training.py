"""Reward models train and plug in: our BT loss equals TRL's RewardTrainer loss on the same
batch, BT learns a known reward, VPL beats BT on a divergent (Pets-style) set through the CLI
entry points, models round-trip through save_pretrained, and the RL reward source follows the
task's step_rewards protocol."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from conftest import simulate_and_train_rewards

from reward_models.backbone import PairTensors, build_backbone, build_reward_model
from reward_models.reward_source import load_reward_model
from reward_models.bradley_terry import BTConfig, BTTrainer, bt_loss, pair_rewards, pair_tensors, score_pairs, train_bt
from reward_models.data import Preference, build_word_tokenizer, to_hf_dataset
from reward_models.reward_source import LearnedRewardConfig, RewardSource, context_records, learned_reward
from rlhf.interfaces import Completions
from rlhf.rollout import length_mask
from reward_models.vpl import build_vpl
from rlhf.errors import UserError
from rlhf.models import ModelConfig
from rlhf.runs import Run, read_metrics
from tasks.counterpoint.config import CounterpointConfig
from tasks.counterpoint.task import CounterpointTask
from tasks.counterpoint.tokens import build_codec

TINY = ModelConfig(n_layer=1, n_embd=32, n_head=2, dropout=0.0, max_positions=48)


def music_records(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        cf = [int(x) for x in 55 + rng.integers(-3, 4, size=6)]
        prompt = "<bos> <cf_below> " + " ".join(f"cf_{m}" for m in cf) + " <sep>"
        a, b = ([" " + " ".join(f"iv_+{int(x)}" for x in rng.choice([3, 4, 7, 8, 9, 12], size=6)) + " <eos>" for _ in range(2)])
        if a != b:
            out.append(Preference(prompt, a, b, margin=float(rng.random()), rater_id=f"r{i % 3}", pair_id=str(i)))
    return out


def test_bt_loss_equals_trl_reward_trainer_loss(tmp_path):
    from trl import RewardConfig, RewardTrainer

    tok = build_codec("first_species").tokenizer
    recs = music_records(6)
    torch.manual_seed(0)
    model = build_reward_model(TINY, tok)
    ds = to_hf_dataset(recs).select_columns(["prompt", "chosen", "rejected", "margin"])
    args = RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, center_rewards_coefficient=0.01,
                        per_device_train_batch_size=len(recs), disable_dropout=True, dataloader_num_workers=0)
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(recs))])
    model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, dict(batch))
        ours = pair_tensors(recs, tok)
        b = ours.batch(range(len(recs)))
        assert torch.equal(b["input_ids"], batch["input_ids"]) and torch.equal(b["attention_mask"], batch["attention_mask"])
        rc, rr = pair_rewards(model, b)
        loss = bt_loss(rc, rr, b["margin"], 0.01)
        # the training path runs each distinct sequence once: same loss
        rc2, rr2 = pair_rewards(model, *ours.unique_batch(range(len(recs))))
        loss2 = bt_loss(rc2, rr2, b["margin"], 0.01)
    torch.testing.assert_close(loss, trl_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss2, trl_loss, rtol=1e-6, atol=1e-6)


def known_reward_data(n, seed):
    """Sentences of 6 words from w0..w7 with true reward #w0 + #w1 − #w2 − #w3; pairs labelled by it."""
    rng = np.random.default_rng(seed)
    sents = [" ".join(f"w{k}" for k in rng.integers(0, 8, size=6)) for _ in range(3 * n)]

    def true_r(s):
        w = s.split()
        return w.count("w0") + w.count("w1") - w.count("w2") - w.count("w3")

    recs = []
    for i in range(n):
        a, b = sents[2 * i], sents[2 * i + 1]
        if true_r(a) != true_r(b):
            recs.append(Preference("", a, b) if true_r(a) > true_r(b) else Preference("", b, a))
    return recs, sents, true_r


def test_bt_learns_a_known_reward(tmp_path):
    train, sents, true_r = known_reward_data(700, 0)
    val, _, _ = known_reward_data(200, 1)
    tok = build_word_tokenizer(sents)
    torch.manual_seed(0)
    model = build_reward_model(TINY, tok)
    cfg = BTConfig(steps=250, batch_size=32, lr=3e-3, warmup_steps=10, eval_every=125, checkpoint_every=125)
    run = Run(tmp_path / "bt")
    final = train_bt(run, cfg, model, tok, train, val, seed=0, progress=False)
    rows = [r for r in read_metrics(run.root / "metrics.jsonl") if "acc/val" in r]
    assert rows[-1]["acc/val"] >= 0.9, rows
    # the learned reward ranks unseen sentences like the true one
    loaded = load_reward_model(final)
    test = [" ".join(f"w{k}" for k in np.random.default_rng(5).integers(0, 8, size=6)) for _ in range(200)]
    src = RewardSource(loaded, tok)
    r = src.sequence_rewards(tok(test)["input_ids"]).numpy()
    truth = np.array([true_r(s) for s in test])
    rank = lambda x: np.argsort(np.argsort(x))
    assert np.corrcoef(rank(r), rank(truth))[0, 1] > 0.85
    assert (final / "tokenizer.json").is_file() and (run.checkpoints / "reward-bt" / "step-000250").is_dir()


def test_weight_averaging_is_the_naive_ema_of_the_trajectory_and_resumes_exactly(tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file

    train, sents, _ = known_reward_data(200, 0)
    tok = build_word_tokenizer(sents)
    cfg = BTConfig(steps=12, batch_size=16, lr=3e-3, warmup_steps=2, eval_every=100, checkpoint_every=5, ema=0.8)

    def fresh():
        torch.manual_seed(0)
        return build_reward_model(TINY, tok)

    # the raw trajectory θ_1..θ_T (averaging does not change it) and e_1 = θ_1, e_t = d·e_{t-1} + (1 − d)·θ_t by hand
    raw = BTTrainer(Run(tmp_path / "raw"), cfg.model_copy(update={"ema": None}), fresh(), tok, pair_tensors(train, tok), None, seed=0, progress=False)
    raw.loop.model.train()
    ema = None
    for step in raw.loop.steps():
        raw.step(step)
        theta = {k: v.detach().clone() for k, v in raw.loop.unwrapped.named_parameters()}
        ema = theta if ema is None else {k: 0.8 * ema[k] + 0.2 * theta[k] for k in ema}
    final = load_file(str(train_bt(Run(tmp_path / "ema"), cfg, fresh(), tok, train, seed=0, progress=False) / "model.safetensors"))
    for k, v in ema.items():
        torch.testing.assert_close(final[k], v, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(final[k], theta[k], atol=1e-4) for k in ema)  # the saved model is the average, not θ_T

    # killed during step 8 (after the step-5 checkpoint), resumed in a fresh process: the same average
    real_step = BTTrainer.step

    def dies_at_8(self, step):
        if step == 7:
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(BTTrainer, "step", dies_at_8)
    run = Run(tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        train_bt(run, cfg, fresh(), tok, train, seed=0, progress=False)
    monkeypatch.setattr(BTTrainer, "step", real_step)
    resumed = load_file(str(train_bt(run, cfg, fresh(), tok, train, seed=0, resume=True, progress=False) / "model.safetensors"))
    for k in final:
        torch.testing.assert_close(resumed[k], final[k], rtol=1e-5, atol=1e-6)
    # a checkpoint written without the average cannot continue one
    plain = Run(tmp_path / "plain")
    train_bt(plain, cfg.model_copy(update={"ema": None, "steps": 6}), fresh(), tok, train, seed=0, progress=False)
    shutil.rmtree(plain.checkpoints / "reward-bt" / "step-000006")  # back to the step-5 checkpoint
    with pytest.raises(UserError, match="written without ema"):
        train_bt(plain, cfg.model_copy(update={"steps": 6}), fresh(), tok, train, seed=0, resume=True, progress=False)


@pytest.fixture(scope="module")
def pets_run(tmp_path_factory):
    """simulate_main + train_reward_main on the Pets config, small: BT then VPL (from BT's
    backbone), on one thread (the brittleness of VPL's phase change is a known open problem)."""
    root = tmp_path_factory.mktemp("pets")
    over = [f"data.path={root / 'pets.jsonl'}", f"run_dir={root / 'run'}", "progress=false", "simulate.raters=50", "simulate.pairs_per_rater=24",
            "bt.steps=150", "bt.eval_every=150", "vpl.steps=450", "vpl.eval_every=150", "vpl.checkpoint_every=225"]
    run_dir = simulate_and_train_rewards("configs/reward-pets.yaml", over)
    assert (root / "pets.jsonl").is_file()
    return run_dir, over


def test_vpl_beats_bt_on_divergent_raters(pets_run):
    run_dir, _ = pets_run
    ev = json.loads((run_dir / "eval.json").read_text())
    bt, vpl = ev["methods"]["bt"], ev["methods"]["vpl"]["by_context"]
    ceiling = ev["ceilings"]["bt_ceiling_disputed"]
    assert bt["by_kind"]["disputed"] <= ceiling + 0.05  # BT cannot serve both groups
    # BT's likelihood on the simulator's own features (Newton fit on the training pairs): the best
    # BT reward; it gets the agreed pairs right and cannot beat following the majority.
    best = ev["ceilings"]["bt_features"]
    assert best["agreed"] >= 0.95 and best["disputed"] <= ceiling + 0.02 and best["pairs"] > 0, best
    # BT's disputed accuracy is set by the held-out raters' group mix (its ceiling: 0.7 at 70/30,
    # 0.91 when one group holds 91% of the disputed targets), so a fixed margin over BT can be out
    # of reach of a perfect model. VPL must win back at least half of the disputed pairs BT gets wrong.
    wrong = 1.0 - bt["by_kind"]["disputed"]
    assert vpl["8"]["by_kind"]["disputed"] >= 0.85 and vpl["8"]["by_kind"]["disputed"] - bt["by_kind"]["disputed"] >= 0.5 * wrong, (bt, vpl["8"])
    # "VPL must recover each" rater group, whatever the mix: BT follows one group and fails the
    # other on disputed pairs; VPL with 8 context pairs gets every group's disputed pairs right.
    groups = sorted({k.split("/")[0] for k in bt["by_group_kind"]})
    worst = min(groups, key=lambda g: bt["by_group_kind"][f"{g}/disputed"])
    assert bt["by_group_kind"][f"{worst}/disputed"] <= 0.5, bt["by_group_kind"]
    assert all(vpl["8"]["by_group_kind"][f"{g}/disputed"] >= 0.85 for g in groups), vpl["8"]["by_group_kind"]
    assert vpl["8"]["by_kind"]["agreed"] >= 0.95 and bt["by_kind"]["agreed"] >= 0.95
    assert vpl["8"]["active_units"] >= 1 and vpl["0"]["active_units"] == 0
    report = (run_dir / "report.md").read_text()
    assert "BT ceiling on disputed pairs" in report and (run_dir / "plots" / "accuracy_vs_context.png").is_file()
    kl = [r["vpl/kl"] for r in read_metrics(run_dir / "metrics.jsonl", "reward-vpl")]
    assert len(kl) == 450


def test_active_queries_ask_disputed_pairs_first(pets_run):
    """With no context, the pair whose label says most about z is one the two groups dispute; the
    choice is the argmax of a naive loop over the candidate pairs (EIG from sampled z)."""
    from reward_models.active import active_order, expected_information_gain
    from reward_models.data import load_preferences
    from apps.simulate import load_sidecar

    run_dir, over = pets_run
    model = load_reward_model(run_dir / "models" / "reward-vpl")
    tok = AutoTokenizer.from_pretrained(str(run_dir / "models" / "reward-vpl"))
    recs = [r for r in load_preferences(run_dir / "data" / "test.jsonl") if not r.is_tie][:40]
    disputed = load_sidecar(over[0].split("=", 1)[1])["pairs"]
    kinds = [disputed[r.pair_id]["disputed"] for r in recs]
    assert 0 < sum(kinds) < len(kinds)
    pairs = pair_tensors(recs, tok)
    order = active_order(model, pairs, range(len(recs)), 4, samples=2048, generator=torch.Generator().manual_seed(0))
    assert len(set(order)) == 4 and kinds[order[0]]
    z = torch.randn(2048, model.latent_dim, generator=torch.Generator().manual_seed(1))  # q(z | {}) = N(0, I)
    naive = []
    with torch.no_grad():
        for i in range(len(recs)):
            b = pairs.batch([i])
            h = model.embed(b["input_ids"], b["attention_mask"])
            p = torch.sigmoid(model.reward(h[0:1].expand(len(z), -1), z) - model.reward(h[1:2].expand(len(z), -1), z))
            naive.append(float(expected_information_gain(p[:, None])[0]))
    naive = np.array(naive)
    assert naive[order[0]] >= naive.max() - 0.02
    assert naive[np.array(kinds)].mean() > 3 * naive[~np.array(kinds)].mean()


def test_train_reward_run_folder_resume_and_errors(pets_run, tmp_path):
    from apps.reward_cli import simulate_main, train_reward_main

    run_dir, over = pets_run
    with pytest.raises(UserError, match="already exists"):
        train_reward_main("configs/reward-pets.yaml", over)
    assert train_reward_main("configs/reward-pets.yaml", over, resume=True) == run_dir  # both stages done: evaluation only
    assert (run_dir / "data" / "train.jsonl").is_file() and (run_dir / "models" / "reward-vpl" / "config.json").is_file()
    with pytest.raises(UserError, match="vpl.beta"):
        train_reward_main("configs/reward-pets.yaml", [*over, "vpl.beta=-1"])
    with pytest.raises(UserError, match="preference file not found"):
        train_reward_main("configs/reward-pets.yaml", [f"data.path={tmp_path / 'none.jsonl'}"])
    with pytest.raises(UserError, match="no `simulate:` section"):
        simulate_main("configs/reward-pets.yaml", ["simulate=null"])


def test_vpl_roundtrip_and_context(pets_run):
    run_dir, _ = pets_run
    from reward_models.data import load_preferences

    test = load_preferences(run_dir / "data" / "test.jsonl")
    a = RewardSource.from_pretrained(run_dir / "models" / "reward-vpl", context=context_records(test, group="A", n=8))
    b = RewardSource.from_pretrained(run_dir / "models" / "reward-vpl", context=context_records(test, group="B", n=8))
    none = RewardSource.from_pretrained(run_dir / "models" / "reward-vpl")
    assert torch.count_nonzero(none.z) == 0 and not torch.allclose(a.z, b.z)
    seqs = a.tokenizer(["which pet should i get ? you should get a calm dog , it is fun .",
                        "which pet should i get ? you should get a calm cat , it is fun ."])["input_ids"]
    ra, rb = a.sequence_rewards(seqs), b.sequence_rewards(seqs)
    assert ra[0] > ra[1] and rb[1] > rb[0]  # group A's z prefers the dog, group B's the cat
    with pytest.raises(UserError, match="Bradley-Terry"):
        RewardSource.from_pretrained(run_dir / "models" / "reward-bt", context=test[:2])


def completions_of(prompts, tokens):
    """The Completions a rollout of fixed-length completions gives (no EOS: music)."""
    lengths = [min(p.n_new, tokens.shape[1]) for p in prompts]
    return Completions(prompts, tokens, length_mask(lengths, tokens.shape[1]), lengths)


def test_reward_source_is_a_sequence_reward_on_the_last_step(tmp_path):
    task = CounterpointTask(CounterpointConfig())
    tok = task.tokenizer
    torch.manual_seed(0)
    bt = build_reward_model(TINY, tok).eval()
    prompts = task.train_prompts()[:3]
    g = torch.Generator().manual_seed(0)
    T = max(p.n_new for p in prompts)
    ids = torch.tensor(task.codec.completion_token_ids)
    tokens = ids[torch.randint(len(ids), (3, T), generator=g)]
    src = RewardSource(bt, tok)
    comps = completions_of(prompts, tokens)
    out = src(comps).per_step(comps)
    assert out.shape == tokens.shape
    for i, p in enumerate(prompts):
        seq = torch.tensor([list(p.ids) + tokens[i, : p.n_new].tolist() + [tok.eos_token_id]])
        expect = bt(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0, 0]
        assert out[i, p.n_new - 1].item() == pytest.approx(expect.item(), abs=1e-5)
        assert torch.count_nonzero(out[i]) == 1
    # win-probability scaling against reference samples: in (0, 1)
    ref = {tuple(p.ids): [list(p.ids) + tokens[(i + 1) % 3, : p.n_new].tolist()] for i, p in enumerate(prompts)}
    vals = RewardSource(bt, tok, scale="win_prob", reference=ref)(comps).values
    assert ((vals > 0) & (vals < 1)).all()
    # a VPL model with z
    vpl = build_vpl(build_backbone(TINY, tok), 4, 16, 16, "attention").eval()
    z = torch.tensor([1.0, -1.0, 0.5, 0.0])
    r = RewardSource(vpl, tok, z=z)(comps).values
    seq = torch.tensor([list(prompts[0].ids) + tokens[0, : prompts[0].n_new].tolist() + [tok.eos_token_id]])
    assert r[0].item() == pytest.approx(vpl(input_ids=seq, z=z).logits[0, 0].item(), abs=1e-5)
    bt.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    with pytest.raises(UserError, match="tokenizer differs"):
        learned_reward(LearnedRewardConfig(model=str(tmp_path / "rm"), scale="raw"), CounterpointTask(CounterpointConfig(mode="melody")), None)
    with pytest.raises(UserError, match="needs reference"):
        RewardSource(bt, tok, scale="win_prob")


def test_vpl_save_load_roundtrip(tmp_path):
    tok = build_codec("first_species").tokenizer
    torch.manual_seed(0)
    vpl = build_vpl(build_backbone(TINY, tok), 4, 16, 16, "mean").eval()
    recs = music_records(5)
    pairs = pair_tensors(recs, tok)
    z = vpl.infer_z(pairs)
    vpl.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    back = load_reward_model(tmp_path / "m")
    torch.testing.assert_close(back.infer_z(pairs), z)
    b = pairs.batch(range(len(pairs)))
    torch.testing.assert_close(back(**b, z=z).logits, vpl(**b, z=z).logits)
    assert torch.count_nonzero(vpl.infer_z(None)) == 0
    assert np.all(np.isfinite(score_pairs(back, pairs)))
    # the same tensors whether or not sequences repeat across pairs
    assert isinstance(PairTensors.build([[1, 2]], [[1, 3]], 0), PairTensors)


def test_learned_reward_config_is_checked_at_load():
    from apps.pipeline import load_run_config

    with pytest.raises(UserError, match="reward.context"):
        load_run_config(None, ["reward.model=some/reward-vpl", "reward.rater_group=A"])
    with pytest.raises(UserError, match="not both"):
        load_run_config(None, ["reward.model=m", "reward.context=d.jsonl", "reward.rater_group=A", "reward.rater_id=r001"])
    assert load_run_config(None, []).reward is None


def test_tune_against_a_learned_reward(quick_run, tmp_path):
    """`reward.model` swaps the rule reward for a reward model's: with win_prob scaling every
    sequence's reward is a probability in (0, 1), which no rule reward (≤ 0) can produce."""
    from apps.pipeline import load_run_config, stage_tune
    from tasks.counterpoint.tokens import Codec

    prior = quick_run / "models" / "prior"
    tok = Codec.load(prior).tokenizer
    torch.manual_seed(0)
    rm = build_reward_model(TINY, tok)
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    # a learned reward scores whole pieces: RLOO with per-token credit, not the default's tilt
    cfg = load_run_config(quick_run / "config.yaml", [f"run_dir={tmp_path / 'run'}", f"reward.model={tmp_path / 'rm'}", "rewards=[]",
                                                      "tune.algorithm=rloo", "tune.tilt=null", "tune.rloo.credit=token",
                                                      "reward.reference_per_prompt=2", "tune.steps=3", "tune.batch_size=8"])
    run = Run(tmp_path / "run")
    task = CounterpointTask(cfg.task, Codec.load(prior))
    final = stage_tune(cfg, run, task, prior, resume=False)
    rows = read_metrics(run.root / "metrics.jsonl", "tune-rloo")
    assert len(rows) == 3 and (final / "model.safetensors").is_file()
    assert all(0.0 < r["reward/task"] < 1.0 for r in rows), [r["reward/task"] for r in rows]


def test_preference_win_rates_pair_each_sample_with_the_priors():
    from apps.simulate import preference_win_rates
    from apps.simulate import prototype_from_sidecar, type_weights
    from tasks.counterpoint.cantus import fux_data_dir, load_fux_first_species
    from tasks.counterpoint.piece import to_json as _to_json

    data = fux_data_dir()
    if data is None:
        pytest.skip("Fux species data absent: set RLHF_FUX_DIR or put it at ../shared/data/fux-species")
    pieces = load_fux_first_species(data)[:10]
    meta = {"config": {"domain": "music", "temperature": 0.05, "groups": [{"name": "A", "type": "stepwise"}, {"name": "B", "type": "leaps"}]},
            "prototypes": {"A": list(type_weights("music", "stepwise")), "B": list(type_weights("music", "leaps"))}}
    shifted = pieces[1:] + pieces[:1]
    ev = {"samples": {"prior": [_to_json(p, 0.0) for p in pieces], "same": [_to_json(p, 0.0) for p in pieces],
                      "shifted": [_to_json(p, 0.0) for p in shifted]}}
    out = preference_win_rates(ev, meta)
    assert set(out) == {"same", "shifted"} and out["same"] == {"A": 0.5, "B": 0.5}
    for g in "AB":
        u = prototype_from_sidecar(meta, g).utility
        expect = np.mean([(a > b) + 0.5 * (a == b) for a, b in zip(u(shifted), u(pieces))])
        assert out["shifted"][g] == pytest.approx(expect)


def test_personalised_tuning_pleases_each_group(pets_run, tmp_path):
    """`rlhf personalise` at small scale: one VPL reward model, a policy per group tuned with z
    from that group's held-out pairs; each group's prototype prefers its own policy's answers to
    the prior's, and the animals named shift toward that group's favourite."""
    from apps.personal import PersonalConfig, personalise
    from rlhf.config import load_config
    from rlhf.runs import open_run

    run_dir, _ = pets_run
    cfg = load_config(PersonalConfig, "configs/personal-pets.yaml", [
        f"reward_run={run_dir}", f"run_dir={tmp_path / 'pers'}", "progress=false", "pretrain.steps=200", "tune.steps=40", "eval_samples=100"])
    report = personalise(cfg, open_run(cfg, resume=False, overwrite=False))
    ev = json.loads((report.parent / "eval.json").read_text())["rows"]
    assert ev["tuned-A"]["win"]["A"] > 0.65 and ev["tuned-B"]["win"]["B"] > 0.65, {k: v.get("win") for k, v in ev.items()}
    assert ev["tuned-A"]["animals"]["dog"] > ev["prior"]["animals"]["dog"] + 0.2
    assert ev["tuned-B"]["animals"]["cat"] > ev["prior"]["animals"]["cat"] + 0.2
    assert all(ev[n]["kl/prior"] < 2.0 for n in ("tuned-A", "tuned-B"))
    assert "Win rate against the prior" in report.read_text()
