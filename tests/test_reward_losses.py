"""Reward-model math against naive loops: BT loss, VPL KL / pooling / loss, win probability,
active units, and the evaluation metrics (accuracy, log-loss, ECE)."""

import math

import numpy as np
import pytest
import torch

from reward_models.bradley_terry import bt_loss, fit_linear_bt
from reward_models.metrics import accuracy_by, expected_calibration_error, log_loss, pairwise_accuracy
from reward_models.vpl import (
    active_units,
    attention_pool,
    kl_standard_normal,
    masked_mean,
    reparameterize,
    vpl_loss,
    win_probability,
)


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


@pytest.mark.parametrize("use_margin, center", [(False, None), (True, None), (True, 0.01)])
def test_bt_loss_matches_naive_loop(use_margin, center):
    g = torch.Generator().manual_seed(0)
    rc, rr, m = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64), torch.rand(7, generator=g, dtype=torch.float64)
    loss = bt_loss(rc, rr, m if use_margin else None, center)
    naive = 0.0
    for i in range(7):
        naive += -math.log(sig(rc[i].item() - rr[i].item() - (m[i].item() if use_margin else 0.0))) / 7
        if center:
            naive += center * (rc[i].item() + rr[i].item()) ** 2 / 7
    assert loss.item() == pytest.approx(naive, rel=1e-12)


def test_linear_bt_fit_is_the_likelihood_maximum_a_naive_loop_finds():
    """Newton's answer against plain gradient ascent on the BT log-likelihood, one pair at a time;
    labels drawn from a known w recover it, and the gradient vanishes at the fit."""
    g = torch.Generator().manual_seed(0)
    w_true = torch.tensor([1.5, -0.5, 0.8], dtype=torch.float64)
    x = torch.randn(3000, 3, generator=g, dtype=torch.float64)
    flip = torch.rand(3000, generator=g, dtype=torch.float64) > torch.sigmoid(x @ w_true)
    gaps = torch.where(flip[:, None], -x, x)  # chosen − rejected: the loser's gap is negated
    w = fit_linear_bt(gaps, ridge=0.0)
    naive = [0.0, 0.0, 0.0]
    for _ in range(400):
        grad = [0.0, 0.0, 0.0]
        for row in gaps.tolist():
            p = sig(sum(a * b for a, b in zip(naive, row)))
            for f in range(3):
                grad[f] += (1 - p) * row[f] / len(gaps)
        naive = [a + 2.0 * b for a, b in zip(naive, grad)]
    assert torch.allclose(w, torch.tensor(naive, dtype=torch.float64), atol=2e-3), (w, naive)
    assert torch.allclose(w, w_true, atol=0.15), w
    p = torch.sigmoid(gaps @ w)
    assert float(((1 - p)[:, None] * gaps).mean(0).abs().max()) < 1e-8


def test_kl_and_reparameterisation_match_loops():
    g = torch.Generator().manual_seed(1)
    mu, lv, eps = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    kl = kl_standard_normal(mu, lv)
    for b in range(3):
        naive = sum(0.5 * (mu[b, j] ** 2 + math.exp(lv[b, j]) - lv[b, j] - 1) for j in range(4))
        assert kl[b].item() == pytest.approx(float(naive), rel=1e-12)
    assert kl_standard_normal(torch.zeros(2, 3), torch.zeros(2, 3)).tolist() == [0.0, 0.0]  # q = prior
    z = reparameterize(mu, lv, eps)
    for b in range(3):
        for j in range(4):
            assert z[b, j].item() == pytest.approx(mu[b, j].item() + math.exp(0.5 * lv[b, j].item()) * eps[b, j].item(), rel=1e-12)


def test_pooling_matches_loops_and_is_permutation_invariant():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    s = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    mean, att = masked_mean(x, mask), attention_pool(x, mask, s)
    for b in range(3):
        idx = [k for k in range(5) if mask[b, k]]
        if not idx:
            assert mean[b].abs().sum() == 0 and att[b].abs().sum() == 0
            continue
        naive_mean = sum(x[b, k] for k in idx) / len(idx)
        w = [math.exp(s[b, k].item()) for k in idx]
        naive_att = sum(wk / sum(w) * x[b, k] for wk, k in zip(w, idx))
        torch.testing.assert_close(mean[b], naive_mean)
        torch.testing.assert_close(att[b], naive_att)
    perm = torch.tensor([4, 2, 0, 3, 1])
    torch.testing.assert_close(attention_pool(x[:, perm], mask[:, perm], s[:, perm]), att)
    torch.testing.assert_close(masked_mean(x[:, perm], mask[:, perm]), mean)


@pytest.mark.parametrize("free_bits", [0.0, 0.3])
def test_vpl_loss_matches_naive_loop(free_bits):
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(3, 4, generator=g, dtype=torch.float64)
    margin = torch.rand(3, 4, generator=g, dtype=torch.float64)
    tmask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    mu, lv = torch.randn(3, 2, generator=g, dtype=torch.float64) * 0.3, torch.randn(3, 2, generator=g, dtype=torch.float64) * 0.1
    beta = 0.2
    loss, nll, kl = vpl_loss(delta, tmask, mu, lv, beta, margin, free_bits)
    per_rater = []
    for u in range(3):
        ts = [t for t in range(4) if tmask[u, t]]
        if ts:
            per_rater.append(sum(-math.log(sig(delta[u, t].item() - margin[u, t].item())) for t in ts) / len(ts))
    naive_nll = sum(per_rater) / len(per_rater)
    kl_dims = [sum(0.5 * (mu[u, j].item() ** 2 + math.exp(lv[u, j].item()) - lv[u, j].item() - 1) for u in range(3)) / 3 for j in range(2)]
    naive_kl = sum(kl_dims)
    penalty = sum(max(k, free_bits) for k in kl_dims)
    assert nll.item() == pytest.approx(naive_nll, rel=1e-12)
    assert kl.item() == pytest.approx(naive_kl, rel=1e-12)
    assert loss.item() == pytest.approx(naive_nll + beta * penalty, rel=1e-12)


def test_win_probability_matches_loop_and_is_bounded():
    rx, ref = torch.tensor([0.0, 3.0, -2.0], dtype=torch.float64), torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    s = win_probability(rx, ref)
    for i in range(3):
        assert s[i].item() == pytest.approx(sum(sig(rx[i].item() - y) for y in ref.tolist()) / 4, rel=1e-12)
    assert ((s > 0) & (s < 1)).all()
    # invariant to a constant added to every reward (so each rater's scale is comparable)
    torch.testing.assert_close(win_probability(rx + 5, ref + 5), s)


def test_active_units_matches_loop():
    rng = np.random.default_rng(0)
    mu = np.stack([rng.normal(0, 1, 50), rng.normal(0, 0.05, 50), np.full(50, 3.0)], axis=1)
    naive = sum(1 for j in range(3) if np.mean((mu[:, j] - mu[:, j].mean()) ** 2) > 0.01)
    assert active_units(mu) == naive == 1


def test_metrics_match_naive_loops():
    rng = np.random.default_rng(1)
    d = rng.normal(0.5, 2.0, 500)
    d[:3] = 0.0
    assert pairwise_accuracy(d) == pytest.approx(np.mean([1.0 if x > 0 else 0.5 if x == 0 else 0.0 for x in d]))
    m = rng.random(500)
    assert log_loss(d, m) == pytest.approx(np.mean([-math.log(sig(x - y)) for x, y in zip(d, m)]))
    # ECE: each pair as (p, 1) and (1 - p, 0), 10 equal bins over [0, 1]
    preds = [(sig(x), 1.0) for x in d] + [(1 - sig(x), 0.0) for x in d]
    bins = [[] for _ in range(10)]
    for p, y in preds:
        bins[min(int(p * 10), 9)].append((p, y))
    naive = sum(len(b) / len(preds) * abs(np.mean([y for _, y in b]) - np.mean([p for p, _ in b])) for b in bins if b)
    assert expected_calibration_error(d) == pytest.approx(naive)
    assert accuracy_by(np.array([1.0, -1.0, 2.0]), ["a", "b", "a"]) == {"a": 1.0, "b": 0.0}


def test_ece_is_small_for_calibrated_predictions():
    rng = np.random.default_rng(2)
    d = rng.normal(0, 2, 20000)
    # labels drawn from the model itself: orient each pair so that "chosen" won with p = σ(d)
    won = rng.random(20000) < 1 / (1 + np.exp(-d))
    oriented = np.where(won, d, -d)
    assert expected_calibration_error(oriented) < 0.02
    assert expected_calibration_error(oriented * 5) > 0.1  # the same ranking, overconfident


def test_bayesian_aggregation_is_the_gaussian_posterior():
    """Prior N(0, 1) times N(r_k, σ_k²) per unmasked pair, per latent dim, by a naive loop; no
    context gives the prior; a pair with huge σ_k² changes nothing."""
    from reward_models.vpl import bayesian_aggregation

    g = torch.Generator().manual_seed(0)
    r, lv = torch.randn(3, 5, 2, generator=g, dtype=torch.float64), torch.randn(3, 5, 2, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    mu, logvar = bayesian_aggregation(r, lv, mask)
    for b in range(3):
        for d in range(2):
            prec, weighted = 1.0, 0.0  # the prior N(0, 1)
            for k in range(5):
                if mask[b, k]:
                    prec += math.exp(-float(lv[b, k, d]))
                    weighted += math.exp(-float(lv[b, k, d])) * float(r[b, k, d])
            assert float(mu[b, d]) == pytest.approx(weighted / prec)
            assert float(logvar[b, d]) == pytest.approx(-math.log(prec))
    assert torch.all(mu[2] == 0) and torch.all(logvar[2] == 0)
    lv2 = lv.clone()
    lv2[0, 2] = 60.0  # σ² = e^60: no information
    mask2 = mask.clone()
    mask2[0, 2] = False
    assert torch.allclose(bayesian_aggregation(r, lv2, mask)[0][0], bayesian_aggregation(r, lv, mask2)[0][0])


def test_bank_posterior_is_the_normalised_likelihood_a_naive_loop_computes():
    """w_j ∝ Π_k σ(Δ_jk) over the unmasked context pairs, per rater; no context: uniform; a pair
    every latent labels alike leaves the weights unchanged."""
    from reward_models.vpl import bank_posterior

    g = torch.Generator().manual_seed(0)
    delta = torch.randn(3, 6, 4, generator=g, dtype=torch.float64) * 3
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    w = bank_posterior(delta, mask)
    for b in range(3):
        lik = [math.prod(1 / (1 + math.exp(-float(delta[b, j, k]))) for k in range(4) if mask[b, k]) for j in range(6)]
        for j in range(6):
            assert float(w[b, j]) == pytest.approx(lik[j] / sum(lik))
    assert torch.allclose(w[2], torch.full((6,), 1 / 6, dtype=torch.float64))
    same = delta.clone()
    same[0, :, 3] = 1.7  # one more pair, labelled alike under every latent
    mask2 = mask.clone()
    mask2[0, 3] = True
    assert torch.allclose(bank_posterior(same, mask2)[0], w[0])


@pytest.mark.parametrize("head", ["bilinear", "mlp"])
def test_bank_inference_weighs_the_bank_and_survives_save_load(tmp_path, head):
    """With ``inference: bank`` a rater's z is Σ_j w_j z_j with w from a naive loop over the bank
    and the context pairs (the bilinear head's shortcut and the general path alike); the bank is
    saved with the weights; the encoder's μ is used otherwise."""
    from reward_models.backbone import PairTensors, build_backbone
    from reward_models.reward_source import load_reward_model
    from reward_models.vpl import build_bank, build_vpl
    from rlhf.models import ModelConfig
    from tasks.counterpoint.tokens import build_codec

    tok = build_codec("first_species").tokenizer
    torch.manual_seed(0)
    vpl = build_vpl(build_backbone(ModelConfig(n_layer=1, n_embd=32, n_head=2, dropout=0.0, max_positions=48), tok), 3, 16, 16, "mean",
                    head=head, encoder="reward" if head == "bilinear" else "pair").eval()
    with torch.no_grad():
        (vpl.directions if head == "bilinear" else vpl.head[0]).weight.mul_(20)
    ids = [tok.convert_tokens_to_ids(t) for t in ("cf_60", "cf_62", "cf_64", "iv_7", "iv_3", "iv_4", "iv_12", "iv_-3")]
    seqs = [[ids[i % 3], ids[(i + 1) % 3], ids[3 + i % 5], ids[3 + (i * 2) % 5]] for i in range(12)]
    pairs = PairTensors.build(seqs[:6], seqs[6:], tok.pad_token_id)
    enc_z = vpl.infer_z(pairs)  # no bank yet: the encoder's μ
    assert "z_bank" not in vpl.state_dict()
    hc, hr = vpl.embed_pairs(pairs, range(6))
    torch.testing.assert_close(enc_z, vpl.encode(hc[None], hr[None], torch.ones(1, 6, dtype=torch.bool))[0][0])
    bank = build_bank(vpl, pairs, [np.arange(3), np.arange(3, 6)], [0, 1, 2], seed=0)
    assert bank.shape == (6, 3)  # 2 raters × (sizes 1, 2 and all 3)
    vpl.set_bank(bank)
    z = vpl.infer_z(pairs)
    with torch.no_grad():
        lik = torch.tensor([math.prod(float(torch.sigmoid(vpl.reward(hc[k], bank[j]) - vpl.reward(hr[k], bank[j]))) for k in range(6))
                            for j in range(6)])
    torch.testing.assert_close(z, (lik / lik.sum()) @ bank, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vpl.infer_z(None), bank.mean(0))
    vpl.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    back = load_reward_model(tmp_path / "m")
    torch.testing.assert_close(back.z_bank, bank)
    torch.testing.assert_close(back.infer_z(pairs), z)
