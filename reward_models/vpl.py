"""Variational preference learning (VPL): a reward conditioned on a latent z of the rater.

Poddar, Wan, Ivison, Gupta, Jaques, "Personalizing Reinforcement Learning from Human
Feedback with Variational Preference Learning", NeurIPS 2024 (sec. 4, eqs. 3-5).

* Encoder q(z | C) over a rater's context set C = {(c_k, r_k)} of labelled pairs: each pair is
  embedded as e_k = MLP([h(c_k); h(r_k)]) from the backbone's pooled representation h (the
  last real token's hidden state), the e_k are pooled permutation-invariantly (mean,
  sum, or attention with a learned query), and linear maps give μ and log σ²; or (``bayes``)
  linear maps give each pair's Gaussian observation of z, combined with the prior in closed
  form (:func:`bayesian_aggregation`).
* Reward r(x, z) = head([h(x); z]), an MLP (a linear head would add u·z to both rewards of a
  pair, which cancels in r_c − r_r: z could not change any preference); or, with
  ``head: bilinear``, r(x, z) = u(h(x)) + z · v(h(x)) with u an MLP and v a linear map to D
  reward directions: each latent dim weighs one learned reward, so the gradient of a pair's
  Δ with respect to z, v(c) − v(r), reaches the encoder from the first step (an MLP head can
  learn to ignore z before the encoder says anything; on the music set it did).
* With ``encoder: reward`` (bilinear head only) the encoder reads each context pair through
  those same rewards, e_k = MLP([v(c_k) − v(r_k); u(c_k) − u(r_k)]): how the rater's choice
  lines up with each learned reward direction, the sufficient statistic of a logistic model
  in z. What the head learns to tell raters apart, the encoder can read at once; from a
  backbone's pooled state alone (``encoder: pair``) it could not on the music set, where the
  groups differ in features the population reward hardly uses.
* Loss per rater u with targets T_u (disjoint from C_u), z = μ + σ ⊙ ε, ε ~ N(0, I):

      L_u = (1/|T_u|) Σ_{t ∈ T_u} −log σ(r(c_t, z) − r(r_t, z) − m_t)  +  β · KL(q(z|C_u) ‖ N(0, I))

  averaged over the raters of a batch; β·KL with the per-target mean NLL is the ELBO of the
  paper up to the scale of β (β = 1/|T_u| is the exact ELBO per target pair).
* Inference for a new rater: z = μ(C) from a handful of labelled pairs; with no context the
  encoder returns the prior (μ = 0, log σ² = 0), so z = 0. Or (``inference: bank``) the
  posterior mean over a bank of the training raters' latents, weighed by the decoder's own BT
  likelihood of the context pairs (:func:`bank_posterior`): every pair's evidence counts in
  full, where the mean-pooled encoder divides it by the context size.
* Training samples a context size per rater from ``context_sizes`` (0 included), so the model
  also learns the population reward at z = 0 and how to read 1, 2, 4 or 8 pairs.

The model is a Hugging Face ``PreTrainedModel`` (``save_pretrained`` / ``from_pretrained``,
``model_type: vpl_reward``) that runs in ``rlhf.trainer.TrainLoop`` like any other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import SequenceClassifierOutput

from reward_models.backbone import PairTensors, last_token_hidden
from reward_models.bradley_terry import PairTrainer
from reward_models.data import Preference, by_rater, comparable
from reward_models.metrics import summary
from rlhf.config import CheckpointEvery, EMADecay, EvalEvery, GradClip, KeepCheckpoints, LearningRate, Section, Steps, WarmupSteps, WeightDecay
from rlhf.lora import LoraSettings, with_lora
from rlhf.models import ensure_model_type
from rlhf.runs import Run

log = logging.getLogger("rlhf")


# --------------------------------------------------------------------------- math


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, diag σ²) ‖ N(0, I)) = ½ Σ_j (μ_j² + σ_j² − log σ_j² − 1), summed over the last dim
    (Kingma & Welling 2014, appendix B)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).sum(-1)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = μ + σ ⊙ ε with σ = exp(½ log σ²) (the reparameterisation trick)."""
    return mu + (0.5 * logvar).exp() * eps


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, C, P] → [B, P]: mean over the context slots where ``mask`` [B, C] is true (0 if none)."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


def attention_pool(x: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """[B, C, P] → [B, P]: Σ_k softmax_k(s_k) x_k over the unmasked slots (0 if none);
    ``scores`` [B, C] come from a learned query, so the pool is permutation invariant."""
    s = scores.masked_fill(~mask, float("-inf"))
    w = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows without context: all -inf → 0
    return (w.unsqueeze(-1) * x).sum(1)


def vpl_loss(delta: torch.Tensor, target_mask: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float,
             margin: torch.Tensor | None = None, free_bits: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, nll, kl): L = mean_u [ mean_{t ∈ T_u} −log σ(Δ_ut − m_ut) ] + β · Σ_j max(KL_j, λ)

    with KL_j = mean_u ½ (μ_uj² + σ_uj² − log σ_uj² − 1) the batch's KL in latent dim j, and λ =
    ``free_bits`` (Kingma et al. 2016, "Improved variational inference with inverse autoregressive
    flow", eq. 15): a dim's first λ nats are free, so the KL term cannot switch z off before the
    likelihood has learned to use it (λ = 0: the plain β · mean_u KL_u). ``delta`` [B, T] =
    r(c_t, z_u) − r(r_t, z_u) for rater u's targets, ``target_mask`` [B, T] marks real targets
    (raters without targets are left out of the NLL mean). Returns the plain mean KL as ``kl``."""
    d = delta - margin if margin is not None else delta
    m = target_mask.to(delta.dtype)
    per_rater = (-F.logsigmoid(d) * m).sum(1) / m.sum(1).clamp(min=1.0)
    has = (m.sum(1) > 0).to(delta.dtype)
    nll = (per_rater * has).sum() / has.sum().clamp(min=1.0)
    kl_dims = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).mean(0)  # [D]
    kl = kl_dims.sum()
    penalty = kl_dims.clamp(min=free_bits).sum() if free_bits > 0 else kl
    return nll + beta * penalty, nll, kl


def bayesian_aggregation(r: torch.Tensor, logvar_k: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, log σ²) [B, D] of q(z | C) from per-pair observations r_k ~ N(z, σ_k²) ([B, C, D] each,
    ``mask`` [B, C]) and the prior N(0, I): the Gaussian posterior (Volpp et al. 2021, "Bayesian
    context aggregation for neural processes", eq. 8), σ² = 1 / (1 + Σ_k σ_k⁻²),
    μ = σ² Σ_k σ_k⁻² r_k. A pair with large σ_k² adds nothing; no context gives the prior."""
    prec = torch.exp(-logvar_k) * mask.to(r.dtype).unsqueeze(-1)  # [B, C, D]
    total = 1.0 + prec.sum(1)
    return (prec * r).sum(1) / total, -torch.log(total)


def bank_posterior(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, J, C] → [B, J]: posterior weights of J bank latents z_j given a rater's C context pairs,

        w_j ∝ Π_k σ(Δ_jk),   Δ_jk = r(c_k, z_j) − r(r_k, z_j),

    under the empirical prior that puts mass 1/J on each z_j (``mask`` [B, C] marks real pairs;
    no context gives uniform weights). With the bank drawn from the encoder's posteriors of the
    training raters this is the aggregate posterior q(z) = E_u q(z | C_u) as the prior (Hoffman &
    Johnson 2016, "ELBO surgery"; Tomczak & Welling 2018, "VAE with a VampPrior") and the decoder's
    own BT likelihood as the evidence: every pair counts in full, where a pooled encoder averages."""
    ll = (F.logsigmoid(delta) * mask.to(delta.dtype)[:, None, :]).sum(-1)
    return torch.softmax(ll, dim=-1)


def win_probability(r_x: torch.Tensor, r_ref: torch.Tensor) -> torch.Tensor:
    """Reward scaled for RL: s(x) = (1/M) Σ_m σ(r(x, z) − r(y_m, z)), the expected probability
    that x beats a reference sample y under the rater's BT model; in [0, 1] for every rater."""
    return torch.sigmoid(r_x[:, None] - r_ref[None, :]).mean(-1)


def active_units(mu: np.ndarray, threshold: float = 0.01) -> int:
    """Active latent units (Burda et al. 2016): dims j with Var_raters(μ_j) > ``threshold``.
    Few active units with a small KL means posterior collapse (z carries nothing)."""
    mu = np.asarray(mu, dtype=np.float64)
    if mu.shape[0] < 2:
        return 0
    return int((mu.var(axis=0) > threshold).sum())


# --------------------------------------------------------------------------- model


class VPLConfig(PreTrainedConfig):
    """HF config of :class:`VPLRewardModel`; ``backbone`` is the backbone's config as a dict."""

    model_type = "vpl_reward"
    backbone: dict | None = None
    latent_dim: int = 8
    pair_hidden: int = 64
    head_hidden: int = 64
    pooling: str = "mean"
    logvar_init: float = 0.0
    head: str = "mlp"  # mlp: MLP([h; z]); bilinear: MLP(h) + z · Linear(h)
    encoder: str = "pair"  # pair: MLP([h_c; h_r]); reward: MLP([v(c) − v(r); u(c) − u(r)]) (bilinear head)
    readout: str = "last"  # h(x): last, the last real token's state; mean, the mean state over real tokens
    bank_size: int = 0  # rows of z_bank (set_bank); with a bank, a rater's z is the bank posterior's mean, else μ(C)


class VPLRewardModel(PreTrainedModel):
    config_class = VPLConfig
    base_model_prefix = "vpl"

    def __init__(self, config: VPLConfig):
        super().__init__(config)
        bcfg = dict(config.backbone or {})
        ensure_model_type(bcfg.get("model_type"))  # a task's own backbone registers on import
        self.backbone = AutoModel.from_config(AutoConfig.for_model(**bcfg))
        h, p, d = self.backbone.config.hidden_size, config.pair_hidden, config.latent_dim
        self.bilinear = getattr(config, "head", "mlp") == "bilinear"
        self.reward_encoder = getattr(config, "encoder", "pair") == "reward"
        if self.reward_encoder and not self.bilinear:
            raise ValueError("VPL encoder 'reward' reads the bilinear head's reward directions; set head: bilinear")
        self.pair_mlp = nn.Sequential(nn.Linear(d + 1 if self.reward_encoder else 2 * h, p), nn.GELU(), nn.Linear(p, p), nn.GELU())
        self.attn_score = nn.Linear(p, 1) if config.pooling == "attention" else None
        self.to_mu = nn.Linear(p, d)
        self.to_logvar = nn.Linear(p, d)
        self.head = nn.Sequential(nn.Linear(h if self.bilinear else h + d, config.head_hidden), nn.GELU(), nn.Linear(config.head_hidden, 1))
        self.directions = nn.Linear(h, d) if self.bilinear else None  # v(h): one reward per latent dim
        j = int(getattr(config, "bank_size", 0))
        self.register_buffer("z_bank", torch.zeros(j, d) if j else None)  # [J, D] (set_bank), saved with the weights
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # The backbone initialises itself; the heads keep PyTorch's default (Kaiming-uniform) init,
        # except that log σ² starts near 0 (σ ≈ 1) so that early samples of z are not huge.
        if module is self.to_logvar:
            nn.init.constant_(module.bias, float(getattr(self.config, "logvar_init", 0.0)))
            module.weight.data.mul_(0.1)

    @property
    def latent_dim(self) -> int:
        return int(self.config.latent_dim)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[N, H] pooled backbone representation h(x): the last real token's state, or (``readout:
        mean``) the mean over real tokens, a sum-of-local-terms reward's natural form."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        if getattr(self.config, "readout", "last") == "mean":
            return masked_mean(hidden, attention_mask.bool())
        return last_token_hidden(hidden, attention_mask)

    def encode(self, h_chosen: torch.Tensor, h_rejected: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, log σ²) [B, D] of q(z | C) from context pairs [B, C, H] (``mask`` [B, C]);
        raters with no context get the prior (0, 0)."""
        if self.reward_encoder:  # the pair through the reward's own directions: [B, C, D + 1]
            x = torch.cat([self.directions(h_chosen) - self.directions(h_rejected), self.head(h_chosen) - self.head(h_rejected)], dim=-1)
        else:
            x = torch.cat([h_chosen, h_rejected], dim=-1)
        e = self.pair_mlp(x)  # [B, C, P]
        if self.config.pooling == "bayes":
            return bayesian_aggregation(self.to_mu(e), self.to_logvar(e), mask)
        if self.attn_score is not None:
            pooled = attention_pool(e, mask, self.attn_score(e).squeeze(-1))
        elif self.config.pooling == "sum":  # evidence adds up, as natural parameters of a posterior do
            pooled = (e * mask.to(e.dtype).unsqueeze(-1)).sum(1)
        else:
            pooled = masked_mean(e, mask)
        has = mask.any(-1, keepdim=True)
        zero = torch.zeros((), dtype=pooled.dtype, device=pooled.device)
        return torch.where(has, self.to_mu(pooled), zero), torch.where(has, self.to_logvar(pooled), zero)

    @property
    def uses_bank(self) -> bool:
        return self.z_bank is not None

    def set_bank(self, z: torch.Tensor) -> None:
        """Store the latents [J, D] (:func:`build_bank`); from now on a rater's z is inferred over
        them (``inference: bank``)."""
        p = next(self.parameters())
        self.z_bank = z.detach().to(p.device, p.dtype).clone()
        self.config.bank_size = len(z)

    def bank_weights(self, h_chosen: torch.Tensor, h_rejected: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, J] :func:`bank_posterior` of context pairs [B, C, H] (``mask`` [B, C])."""
        if self.bilinear:  # Δ_jk = Δu_k + z_j · Δv_k: u and v once per pair, not once per latent
            du = (self.head(h_chosen) - self.head(h_rejected)).squeeze(-1)  # [B, C]
            dv = self.directions(h_chosen) - self.directions(h_rejected)  # [B, C, D]
            delta = du[:, None, :] + torch.einsum("jd,bcd->bjc", self.z_bank, dv)  # [B, J, C]
        else:
            B, C, H = h_chosen.shape
            shape = (B, len(self.z_bank), C, H)
            z = self.z_bank[None, :, None, :]
            delta = self.reward(h_chosen[:, None].expand(shape), z) - self.reward(h_rejected[:, None].expand(shape), z)
        return bank_posterior(delta, mask)

    def posterior_z(self, h_chosen: torch.Tensor, h_rejected: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, D] the z a rater's context pairs [B, C, H] give: μ(C) of the encoder, or with
        ``inference: bank`` the posterior mean Σ_j w_j z_j over the bank."""
        if self.uses_bank:
            return self.bank_weights(h_chosen, h_rejected, mask) @ self.z_bank
        return self.encode(h_chosen, h_rejected, mask)[0]

    def posterior_samples(self, h_chosen: torch.Tensor, h_rejected: torch.Tensor, samples: int,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(z [S, D], weights [S]) representing one rater's posterior given context pairs [C, H]:
        the bank with its posterior weights (``inference: bank``), or ``samples`` draws from
        q(z | C) = N(μ, σ²) with equal weights (None)."""
        mask = torch.ones(1, len(h_chosen), dtype=torch.bool, device=h_chosen.device)
        if self.uses_bank:
            return self.z_bank, self.bank_weights(h_chosen[None], h_rejected[None], mask)[0]
        mu, logvar = self.encode(h_chosen[None], h_rejected[None], mask)
        eps = torch.randn(samples, self.latent_dim, generator=generator).to(h_chosen.device)
        return reparameterize(mu, logvar, eps), None

    def reward(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """r(x, z) = head([h(x); z]), or u(h) + z · v(h) (bilinear), for h [..., H] and z
        broadcastable to [..., D]."""
        z = z.expand(*h.shape[:-1], z.shape[-1])
        if self.bilinear:
            return self.head(h).squeeze(-1) + (self.directions(h) * z).sum(-1)
        return self.head(torch.cat([h, z], dim=-1)).squeeze(-1)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, z: torch.Tensor | None = None,
                *, pairs: PairTensors | None = None, rater_batch: "RaterBatch | None" = None, eps: torch.Tensor | None = None,
                **_: object) -> SequenceClassifierOutput | dict[str, torch.Tensor]:
        """Rewards [N, 1] under ``z`` ([D] or [N, D]; default the prior mean 0), the
        ``*ForSequenceClassification`` interface; or, given ``pairs`` and ``rater_batch``, the
        training pass :func:`vpl_forward` (through ``forward`` so that a DDP wrapper sees it)."""
        if rater_batch is not None:
            return vpl_forward(self, pairs, rater_batch, next(self.parameters()).device, eps=eps)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.embed(input_ids, attention_mask)
        if z is None:
            z = torch.zeros(self.latent_dim, device=h.device, dtype=h.dtype)
        return SequenceClassifierOutput(logits=self.reward(h, z).unsqueeze(-1))

    def embed_pairs(self, pairs: PairTensors, rows: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h(chosen), h(rejected)) [R, H] each of pairs ``rows``; each distinct sequence is
        run through the backbone once."""
        b, inverse = pairs.unique_batch(torch.as_tensor(rows, dtype=torch.long), next(self.parameters()).device)
        hc, hr = self.embed(b["input_ids"], b["attention_mask"])[inverse].chunk(2)
        return hc, hr

    @torch.no_grad()
    def infer_z(self, context: PairTensors | None) -> torch.Tensor:
        """[D] z of one rater's context pairs (:meth:`posterior_z`; 0 for no context)."""
        device = next(self.parameters()).device
        if context is None or len(context) == 0:
            if self.uses_bank:  # the bank's mean: the aggregate posterior's
                return self.z_bank.mean(0)
            return torch.zeros(self.latent_dim, device=device)
        hc, hr = self.embed_pairs(context, range(len(context)))
        mask = torch.ones(1, len(context), dtype=torch.bool, device=device)
        return self.posterior_z(hc[None], hr[None], mask)[0]


AutoConfig.register(VPLConfig.model_type, VPLConfig, exist_ok=True)  # AutoTokenizer/AutoConfig can read a VPL folder
AutoModel.register(VPLConfig, VPLRewardModel, exist_ok=True)


def build_vpl(backbone: PreTrainedModel, latent_dim: int, pair_hidden: int, head_hidden: int, pooling: str,
              logvar_init: float = 0.0, head: str = "mlp", encoder: str = "pair", lora: LoraSettings | None = None,
              readout: str = "last") -> VPLRewardModel:
    """A VPL model around ``backbone`` (its weights are copied in); with ``lora`` (``model.lora``,
    a pre-trained backbone), adapters on the backbone while the new heads train whole."""
    config = VPLConfig(backbone=backbone.config.to_dict(), latent_dim=latent_dim, pair_hidden=pair_hidden, head_hidden=head_hidden,
                       pooling=pooling, logvar_init=logvar_init, head=head, encoder=encoder, readout=readout)
    model = VPLRewardModel(config)
    model.backbone.load_state_dict(backbone.state_dict())
    if lora is None:
        return model
    heads = [name for name, _ in model.named_children() if name != "backbone"]
    return with_lora(model, lora, task_type=None, modules_to_save=heads)


# --------------------------------------------------------------------------- batches


@dataclass
class RaterBatch:
    """Pair indices into one :class:`PairTensors`, per rater: context [B, C] and targets [B, T]
    (−1 = empty slot)."""

    context: torch.Tensor
    targets: torch.Tensor


def vpl_forward(model: VPLRewardModel, pairs: PairTensors, rb: RaterBatch, device: torch.device, *,
                eps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One backbone pass over all context and target sequences of a rater batch; returns
    ``delta`` [B, T], ``target_mask``, ``mu``, ``logvar``, ``z`` and ``margin`` (or absent).
    ``eps`` [B, D] samples z = μ + σ ε (training); None uses z = μ (inference)."""
    cmask, tmask = rb.context >= 0, rb.targets >= 0
    flat = torch.cat([rb.context[cmask], rb.targets[tmask]])
    b, inverse = pairs.unique_batch(flat, device)  # each distinct sequence through the backbone once
    h = model.embed(b["input_ids"], b["attention_mask"])[inverse]
    hc, hr = h.chunk(2)
    n_ctx = int(cmask.sum())
    B, C = rb.context.shape
    T = rb.targets.shape[1]
    H = h.shape[-1]
    cmask_d, tmask_d = cmask.to(device), tmask.to(device)

    def place(x: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
        out = x.new_zeros(B, width, H)
        out[mask] = x
        return out

    ctx_c, ctx_r = place(hc[:n_ctx], cmask_d, C), place(hr[:n_ctx], cmask_d, C)
    mu, logvar = model.encode(ctx_c, ctx_r, cmask_d)
    if eps is not None:  # training: the reparameterised sample
        z = reparameterize(mu, logvar, eps)
    elif model.uses_bank:  # inference over the bank (a row without context gets uniform weights: the bank's mean)
        z = model.posterior_z(ctx_c, ctx_r, cmask_d)
    else:
        z = mu
    rc = model.reward(place(hc[n_ctx:], tmask_d, T), z[:, None, :])
    rr = model.reward(place(hr[n_ctx:], tmask_d, T), z[:, None, :])
    out = {"delta": rc - rr, "target_mask": tmask_d, "mu": mu, "logvar": logvar, "z": z}
    if "margin" in b:
        m = b["margin"][n_ctx:]
        out["margin"] = place(m[:, None].expand(-1, H), tmask_d, T)[..., 0]
    return out


def sample_rater_batch(rater_pairs: Sequence[np.ndarray], n_raters: int, context_sizes: Sequence[int], n_targets: int,
                       rng: np.random.Generator) -> RaterBatch:
    """``n_raters`` raters drawn at random, each with a context of a size drawn from
    ``context_sizes`` and up to ``n_targets`` other pairs as targets (all without replacement)."""
    who = rng.choice(len(rater_pairs), size=n_raters, replace=len(rater_pairs) < n_raters)
    c_max = max(context_sizes)
    ctx = torch.full((n_raters, max(c_max, 1)), -1, dtype=torch.long)
    tgt = torch.full((n_raters, n_targets), -1, dtype=torch.long)
    for b, u in enumerate(who):
        own = rater_pairs[u][rng.permutation(len(rater_pairs[u]))]
        k = min(int(rng.choice(context_sizes)), len(own) - 1)
        ctx[b, :k] = torch.from_numpy(own[:k])
        t = own[k : k + n_targets]
        tgt[b, : len(t)] = torch.from_numpy(t)
    return RaterBatch(ctx, tgt)


@torch.no_grad()
def build_bank(model: VPLRewardModel, pairs: PairTensors, rater_pairs: Sequence[np.ndarray], context_sizes: Sequence[int],
               seed: int, chunk: int = 16) -> torch.Tensor:
    """[J, D] latents for ``inference: bank``: μ(C) of every training rater for one random context
    of each non-zero size in ``context_sizes`` and one of all their pairs: samples of the
    aggregate posterior E_u q(z | C_u), from contexts as large as the encoder was trained on and
    larger."""
    was = model.training
    model.eval()
    rng = np.random.default_rng([seed, 1])
    sizes = sorted({int(k) for k in context_sizes if k > 0})
    contexts = [own[rng.permutation(len(own))[: min(k, len(own))]] for own in rater_pairs for k in [*sizes, len(own)]]
    ctx = torch.full((len(contexts), max(len(c) for c in contexts)), -1, dtype=torch.long)
    for b, c in enumerate(contexts):
        ctx[b, : len(c)] = torch.from_numpy(c)
    device = next(model.parameters()).device
    mus = [vpl_forward(model, pairs, RaterBatch(part, torch.full((len(part), 1), -1, dtype=torch.long)), device)["mu"]  # no targets
           for part in ctx.split(chunk)]
    model.train(was)
    return torch.cat(mus)


# --------------------------------------------------------------------------- training


class VPLTrainConfig(Section):
    steps: Steps = 1500
    raters_per_batch: int = Field(16, ge=1, description="Raters per optimizer step (global, over all processes).")
    targets_per_rater: int = Field(8, ge=1, description="Target pairs per rater per step (the BT likelihood terms).")
    context_sizes: list[int] = Field(default_factory=lambda: [0, 1, 2, 4, 8], description="Context sizes drawn per rater during training (0 = prior).")
    latent_dim: int = Field(8, ge=1, le=256, description="Dimension of the rater latent z.")
    pair_hidden: int = Field(64, ge=4, description="Width of the pair-embedding MLP of the encoder.")
    head_hidden: int = Field(64, ge=4, description="Hidden width of the reward head MLP([h(x); z]).")
    pooling: Literal["mean", "sum", "attention", "bayes"] = Field("mean", description="Permutation-invariant pooling of the context pair embeddings: mean, sum (each pair adds its evidence; an uninformative pair can add nothing), attention, or bayes (each pair a Gaussian observation of z, combined with the prior in closed form: bayesian_aggregation).")
    head: Literal["mlp", "bilinear"] = Field("mlp", description="Reward head: mlp, r = MLP([h; z]); bilinear, r = MLP(h) + z · Linear(h) (z weighs D learned rewards).")
    encoder: Literal["pair", "reward"] = Field("pair", description="Context pair embedding: pair, MLP([h_c; h_r]); reward, MLP of the pair's reward differences along the bilinear head's directions (needs head: bilinear).")
    readout: Literal["last", "mean"] = Field("last", description="Sequence representation h(x) the heads read: last, the last real token's state (as *ForSequenceClassification); mean, the mean state over the real tokens.")
    inference: Literal["encoder", "bank"] = Field("encoder", description="z of a new rater: encoder, the encoder's μ(C); bank, the posterior mean over a bank of training raters' μ under the decoder's own BT likelihood of the context (bank_posterior), which also weighs the active queries.")
    beta: float = Field(0.003, ge=0, description="Weight β of KL(q(z|C) ‖ N(0, I)) against the mean target NLL.")
    beta_warmup_steps: int = Field(200, ge=0, description="Ramp β and the sampling noise of z linearly from 0 over this many steps (against posterior collapse).")
    free_bits: float = Field(0.25, ge=0, description="Free nats λ per latent dim: the KL term is β·Σ_j max(KL_j, λ) (0 = plain β·KL), against posterior collapse.")
    lr: LearningRate = 1e-3
    weight_decay: WeightDecay = 0.0
    warmup_steps: WarmupSteps = 20
    grad_clip: GradClip = 1.0
    ema: EMADecay = None
    init_from_bt: bool = Field(True, description="Start the backbone from the trained BT model of the same run (when methods include bt).")
    eval_every: EvalEvery = 250  # held-out: context 0 and the largest, active units
    checkpoint_every: CheckpointEvery = 500
    keep_checkpoints: KeepCheckpoints = 2

    @model_validator(mode="after")
    def _sizes(self) -> "VPLTrainConfig":
        if not self.context_sizes or min(self.context_sizes) < 0:
            raise ValueError(f"context_sizes must be non-negative and non-empty, got {self.context_sizes}")
        if self.encoder == "reward" and self.head != "bilinear":
            raise ValueError("vpl.encoder: reward reads the bilinear head's reward directions; set vpl.head: bilinear (or vpl.encoder: pair)")
        return self


def rater_index(records: Sequence[Preference]) -> tuple[list[str], list[np.ndarray]]:
    """(rater ids, per rater the indices of their comparable records in ``comparable(records)``)."""
    recs = comparable(records)
    pos = {id(r): i for i, r in enumerate(recs)}
    groups = by_rater(recs)
    ids = sorted(groups)
    return ids, [np.array([pos[id(r)] for r in groups[u]], dtype=np.int64) for u in ids]


@dataclass
class HeldOut:
    """Evaluation protocol for held-out raters: each rater's pairs are shuffled once (seeded);
    the first ``pool`` are its context pool (context of size k = the first k), the rest targets.
    Every method is scored on the same targets."""

    raters: list[str]
    context: list[np.ndarray]  # per rater, indices of the context pool (in comparable order)
    targets: list[np.ndarray]  # per rater, indices of the target pairs

    @classmethod
    def build(cls, records: Sequence[Preference], pool: int, seed: int) -> "HeldOut":
        ids, idx = rater_index(records)
        ctx, tgt, keep = [], [], []
        for i, (u, own) in enumerate(zip(ids, idx)):
            own = own[np.random.default_rng([seed, i]).permutation(len(own))]
            if len(own) <= pool:  # not enough pairs to keep any target
                continue
            keep.append(u)
            ctx.append(own[:pool])
            tgt.append(own[pool:])
        return cls(keep, ctx, tgt)

    def target_indices(self) -> np.ndarray:
        return np.concatenate(self.targets) if self.targets else np.zeros(0, dtype=np.int64)


@torch.no_grad()
def vpl_deltas(model: VPLRewardModel, pairs: PairTensors, held: HeldOut, k: int, chunk: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(Δ for every target pair of ``held`` in ``target_indices`` order with z = μ of the first
    ``k`` context pairs, μ [R, D] per rater)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    deltas, mus = [], []
    for s in range(0, len(held.raters), chunk):
        ctx_l = held.context[s : s + chunk]
        tgt_l = held.targets[s : s + chunk]
        B = len(ctx_l)
        ctx = torch.full((B, max(k, 1)), -1, dtype=torch.long)
        tgt = torch.full((B, max(len(t) for t in tgt_l)), -1, dtype=torch.long)
        for b in range(B):
            kk = min(k, len(ctx_l[b]))
            ctx[b, :kk] = torch.from_numpy(ctx_l[b][:kk])
            tgt[b, : len(tgt_l[b])] = torch.from_numpy(tgt_l[b])
        out = vpl_forward(model, pairs, RaterBatch(ctx, tgt), device)
        deltas.append(out["delta"][out["target_mask"]].float().cpu())
        mus.append(out["mu"].float().cpu())
    model.train(was)
    return torch.cat(deltas).numpy(), torch.cat(mus).numpy()


class VPLTrainer(PairTrainer):
    def __init__(self, run: Run, cfg: VPLTrainConfig, model: VPLRewardModel, tokenizer: PreTrainedTokenizerBase,
                 train: PairTensors, rater_pairs: list[np.ndarray], val: PairTensors | None = None, held: HeldOut | None = None,
                 *, seed: int, progress: bool = True, stage: str = "reward-vpl", eval_context: int = 8):
        if not rater_pairs:
            raise ValueError("VPL training: no raters")
        self.cfg, self.train, self.rater_pairs, self.val, self.held, self.seed = cfg, train, rater_pairs, val, held, seed
        self.eval_context = eval_context
        self._build_loop(run, stage, model, tokenizer, progress, cfg.raters_per_batch, "vpl.raters_per_batch")

    def ramp(self, step: int) -> float:
        """0 → 1 linearly over ``beta_warmup_steps`` (1 without warm-up)."""
        w = self.cfg.beta_warmup_steps
        return min(1.0, (step + 1) / w) if w else 1.0

    def beta(self, step: int) -> float:
        return self.cfg.beta * self.ramp(step)

    def step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        acc = self.loop.accelerator
        # the global batch of raters and their noise, drawn alike on every rank; each rank
        # trains on its contiguous share (so the run does not depend on the process count, except
        # that free_bits' max(KL_j, λ) is taken on each rank's raters before DDP averages)
        rng = np.random.default_rng([self.seed, step, 0])
        rb = sample_rater_batch(self.rater_pairs, cfg.raters_per_batch, cfg.context_sizes, cfg.targets_per_rater, rng)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        # KL annealing (Bowman et al. 2016) applied to the sampling noise too: while β ramps up,
        # z = μ + ramp·σ·ε, so the head first learns to read μ before the noise and the KL arrive
        eps = torch.randn(cfg.raters_per_batch, cfg.latent_dim, generator=gen).to(self.loop.device) * self.ramp(step)
        if acc.num_processes > 1:
            mine = self.shard
            rb, eps = RaterBatch(rb.context[mine], rb.targets[mine]), eps[mine]
        with self.loop.autocast():
            out = self.loop.model(pairs=self.train, rater_batch=rb, eps=eps)
        # the loss in float32 under mixed precision
        out = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in out.items()}
        beta = self.beta(step)
        loss, nll, kl = vpl_loss(out["delta"], out["target_mask"], out["mu"], out["logvar"], beta, out.get("margin"), cfg.free_bits)
        metrics = self.loop.update(loss)
        with torch.no_grad():
            d = out["delta"][out["target_mask"]]
            metrics.update({"loss/train": float(loss), "loss/bt": float(nll), "vpl/kl": float(kl), "vpl/beta": beta,
                            "acc/pairwise": float(((d > 0).float() + 0.5 * (d == 0).float()).mean())})
        return metrics

    def evaluate(self) -> dict[str, float]:
        if self.val is None or self.held is None or not self.held.raters:
            return {}
        m: dict[str, float] = {}
        for k in sorted({0, self.eval_context}):
            delta, mu = vpl_deltas(self.loop.unwrapped, self.val, self.held, k)
            m.update({f"{key}_ctx{k}": v for key, v in summary(delta, split="val").items() if not key.startswith("pairs/")})
            if k == self.eval_context:
                m["vpl/active_units"] = float(active_units(mu))
        return m


def train_vpl(run: Run, cfg: VPLTrainConfig, model: VPLRewardModel, tokenizer: PreTrainedTokenizerBase,
              train: Sequence[Preference], val: Sequence[Preference] = (), *, seed: int, resume: bool = False,
              progress: bool = True, stage: str = "reward-vpl", max_length: int | None = None, eval_context: int = 8) -> Path:
    """Train a VPL model on ``train`` (every record needs a rater_id; ties left out);
    ``val`` (held-out raters) is scored during training. Returns ``run/models/<stage>``."""
    from reward_models.bradley_terry import pair_tensors

    tr = pair_tensors(train, tokenizer, max_length)
    _, rater_pairs = rater_index(train)
    va = held = None
    if comparable(val):
        va = pair_tensors(val, tokenizer, max_length)
        held = HeldOut.build(val, eval_context, seed)
    trainer = VPLTrainer(run, cfg, model, tokenizer, tr, rater_pairs, va, held, seed=seed, progress=progress, stage=stage, eval_context=eval_context)
    trainer.fit(resume)
    if cfg.inference == "bank":
        final = trainer.loop.unwrapped
        final.set_bank(build_bank(final, tr, rater_pairs, cfg.context_sizes, seed))
    return trainer.loop.finish(run.final_model_dir(stage))
