"""What every RL algorithm shares: the rollout batch, the KL config, and the scoring of a batch."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Literal

import torch
from pydantic import Field

from rlhf import distributed
from rlhf.config import Section
from rlhf.advantages import masked_mean, masked_sum
from rlhf.kl import KLEstimator, kl_pathwise_loss, masked_log_softmax, per_token_kl, sequence_kl, shape_rewards
from rlhf.registry import Registry
from rlhf.rollout import decode, eos_lengths, left_pad, length_mask, sequence_forward


class KLConfig(Section):
    estimator: KLEstimator = Field("k1", description="Per-token KL in the shaped reward: k1 = log π/p (Ziegler et al. 2019; the reward alone gives the right gradient), k2, k3 (Schulman) or exact over the action space (these three also add their pathwise gradient to the loss: rlhf/kl.py kl_pathwise_loss).")
    beta: float = Field(0.1, ge=0, description="KL coefficient β (initial value when adaptive); 0 switches the KL term off.")
    adaptive: bool = Field(False, description="Adapt β toward target_kl (Ziegler et al. 2019).")
    target_kl: float = Field(2.0, gt=0, description="Adaptive β: target KL per sequence (nats).")
    horizon: float = Field(2000.0, gt=0, description="Adaptive β: controller horizon in sequences.")
    c: float = Field(1.0, gt=0, description="Reward scale: the task reward enters as r / c (Sequence Tutor's c).")
    prior_temperature: float = Field(
        1.0, gt=0,
        description="Temperature T of the KL anchor: the policy is held toward p_T ∝ p^(1/T) over the action space instead of the prior p "
        "itself, so the KL-regularised optimum is π ∝ p^(1/T)·exp(r/(βc)). T > 1 flattens the anchor: among equally good actions the "
        "policy keeps more variety than the prior's own odds would give (the same optimum as an entropy bonus of β(T−1) at KL weight βT). "
        "kl/* and logp/prior are then measured against p_T; the evaluation's KL is always to p.",
    )
    max: float | None = Field(None, gt=0, description="KL guard: when the KL to the prior, in nats per token (kl/mean) averaged over the last max_window iterations, exceeds this, do on_max; the last checkpoint stays as it was. null = no guard.")
    max_window: int = Field(10, ge=1, description="KL guard: iterations averaged before comparing with max.")
    on_max: Literal["stop", "rollback"] = Field(
        "stop",
        description="KL guard: stop = end the run with an error; rollback = reload the last checkpoint (weights, optimizer, step, random "
        "state), double β and go on, at most max_rollbacks times (then stop). The metrics rows of the undone steps are dropped.",
    )
    max_rollbacks: int = Field(3, ge=1, description="KL guard: rollbacks allowed before the run stops.")


@dataclass
class Rollout:
    """One batch of sampled completions with everything the updates need. Shapes: B rows, P
    prompt tokens (left-padded), T completion tokens (right-padded), V vocabulary, H hidden.
    T ≤ max(n_new): sampling stops early once every row has emitted EOS."""

    prompts: torch.Tensor  # [B, P]
    prompt_mask: torch.Tensor  # [B, P]
    tokens: torch.Tensor  # [B, T] (pad after a row's EOS)
    mask: torch.Tensor  # [B, T] float, 1 on the first lengths[b] tokens (an EOS counts)
    logits: torch.Tensor  # [B, T, V] policy logits at sampling time
    logits_prior: torch.Tensor  # [B, T, V]
    logp: torch.Tensor  # [B, T] log π(a_t|s_t), masked to the action space
    logp_prior: torch.Tensor  # [B, T] log p(a_t|s_t)
    lengths: list[int]  # completion lengths: min(n_new[b], first EOS + 1)
    hidden: torch.Tensor | None = None  # [B, T, H] policy's last hidden states at sampling time (make_rollout(hidden=True))

    def tempered(self, temperature: float, allowed: torch.Tensor | None) -> "Rollout":
        """The same samples seen as drawn from π_τ = softmax(logits / τ), scored against the
        prior tempered alike, p_τ: KL(π_τ‖p_τ) is 0 at the start and grows only as the policy
        moves (against the untempered prior, the tempering alone would count as KL).
        τ = 1: this rollout itself."""
        if temperature == 1.0:
            return self
        logits, logits_prior = self.logits / temperature, self.logits_prior / temperature
        return replace(self, logits=logits, logits_prior=logits_prior, logp=gather_logp(logits, self.tokens, allowed, self.mask),
                       logp_prior=gather_logp(logits_prior, self.tokens, allowed, self.mask))

    def take(self, rows: torch.Tensor) -> "Rollout":
        """Rows ``rows`` only, cut to their own longest completion and prompt (a micro-batch)."""
        lengths = [self.lengths[i] for i in rows.tolist()]
        t = max(lengths)
        pm = self.prompt_mask[rows]
        p0 = int((pm.sum(0) > 0).nonzero().min()) if bool(pm.any()) else 0  # prompts are left-padded
        cut = lambda x: None if x is None else x[rows, :t]  # noqa: E731
        return Rollout(self.prompts[rows, p0:], pm[:, p0:], cut(self.tokens), cut(self.mask), cut(self.logits), cut(self.logits_prior),
                       cut(self.logp), cut(self.logp_prior), lengths, cut(self.hidden))

    def kl(self, estimator: KLEstimator, allowed: torch.Tensor | None) -> torch.Tensor:
        """[B, T] per-token KL(π‖p) estimate, 0 on padding."""
        kl = per_token_kl(estimator, self.logp, self.logp_prior, self.logits, self.logits_prior, allowed)
        return kl * self.mask


def row_chunks(lengths: list[int], size: int | None) -> list[torch.Tensor]:
    """Row indices in micro-batches of at most ``size`` rows (None: one), sorted by length so
    each is padded only to its own longest row: with a few long samples in a large batch, most
    of a single padded pass is padding."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    size = size or len(order)
    return [torch.tensor(order[i : i + size]) for i in range(0, len(order), size)]


def gather_logp(logits: torch.Tensor, tokens: torch.Tensor, allowed: torch.Tensor | None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """log π(a_t|s_t) [B, T] from logits [B, T, V] over the masked action space; with ``mask``
    [B, T], computed at its real tokens only (0 on padding: most of a batch whose longest
    sample is far longer than the rest)."""
    if mask is None:
        return masked_log_softmax(logits.float(), allowed).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    keep = mask.bool()
    out = torch.zeros(tokens.shape, dtype=torch.float32, device=logits.device)
    out[keep] = masked_log_softmax(logits[keep].float(), allowed).gather(-1, tokens[keep].unsqueeze(-1)).squeeze(-1)  # [N] real tokens
    return out


SCORE_ROWS = 128  # rows per forward when the prior scores a rollout (sorted by length: each group padded to its own longest)


def score_logits(model, ids: torch.Tensor, pmask: torch.Tensor, tokens: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """[B, T, V] logits of ``model`` before each of ``tokens`` (0 past a row's length), in
    groups of :data:`SCORE_ROWS` rows of similar length: the same numbers as one padded
    forward, without computing the padding of a batch with a few long rows."""
    if len(lengths) <= SCORE_ROWS:
        return sequence_forward(model, ids, pmask, tokens)[0]
    out = None
    for rows in row_chunks(lengths, SCORE_ROWS):
        t = max(lengths[i] for i in rows.tolist())
        logits, _ = sequence_forward(model, ids[rows], pmask[rows], tokens[rows, :t])  # [b, t, V]
        if out is None:
            out = logits.new_zeros((*tokens.shape, logits.shape[-1]))
        out[rows, :t] = logits
    return out


@torch.no_grad()
def make_rollout(
    policy, prior, prompts: list[list[int]], n_new: list[int], *, pad_id: int, allowed: torch.Tensor | None,
    generator: torch.Generator | None, probs_fn=None, temperature: float = 1.0, eos_id: int | None = None,
    hidden: bool = False, prior_temperature: float = 1.0,
) -> Rollout:
    """Sample from ``policy`` (a causal LM) and score under it and the frozen ``prior``.

    Row b gets up to ``n_new[b]`` tokens; with ``eos_id`` it ends at its first EOS (included,
    mask 1; pad and mask 0 after it) and sampling stops once every row has ended. ``hidden``
    keeps the policy's last hidden states of every step (e.g. for a value head).
    ``prior_temperature`` T scores the rollout under p_T ∝ p^(1/T) (KLConfig.prior_temperature).
    """
    device = next(policy.parameters()).device
    ids, pmask = left_pad(prompts, pad_id, device)
    # The sampling loop's own logits score the sample: no second policy forward.
    d = decode(policy, ids, pmask, max(n_new), probs_fn=probs_fn, allowed=allowed, temperature=temperature,
               generator=generator, eos_id=eos_id, pad_id=pad_id, keep_logits=True, keep_hidden=hidden)
    lengths = eos_lengths(d.tokens, eos_id, torch.tensor(n_new, device=device)).tolist()
    mask = length_mask(lengths, d.tokens.shape[1], device)  # [B, T]
    logits_prior = score_logits(prior, ids, pmask, d.tokens, lengths)
    logits, logits_prior = d.logits.float(), logits_prior.float() / prior_temperature
    return Rollout(ids, pmask, d.tokens, mask, logits, logits_prior, gather_logp(logits, d.tokens, allowed, mask),
                   gather_logp(logits_prior, d.tokens, allowed, mask), lengths, d.hidden)


@torch.no_grad()
def beam_rollout(
    policy, prior, prompts: list[list[int]], n_new: list[int], k: int, *, pad_id: int, allowed: torch.Tensor | None,
    eos_id: int | None = None, prior_temperature: float = 1.0,
) -> Rollout:
    """The k best beam-search completions of each prompt (width k, transformers' ``generate``),
    scored like :func:`make_rollout`: rows k·g … k·g + k − 1 are prompt g's. Candidates for
    sequence-level risk (Edunov et al. 2018, "Classical Structured Prediction Losses for
    Sequence to Sequence Learning": beam candidates beat sampled ones), not samples of π."""
    device = next(policy.parameters()).device
    ids, pmask = left_pad(prompts, pad_id, device)
    suppress = None if allowed is None else (~allowed).nonzero().flatten().tolist()
    was_training = policy.training
    policy.eval()
    # renormalize_logits: rank beams by log π over the action space (as the rollout scores them),
    # not by log softmax over the whole vocabulary with the excluded tokens cut afterwards
    gen = policy.generate(input_ids=ids, attention_mask=pmask, max_new_tokens=max(n_new), do_sample=False, num_beams=k,
                          num_return_sequences=k, early_stopping=True, eos_token_id=eos_id, pad_token_id=pad_id,  # None: no EOS (not the config's)
                          suppress_tokens=suppress or None, renormalize_logits=True)  # [G·k, P + T']
    policy.train(was_training)
    ids, pmask = ids.repeat_interleave(k, 0), pmask.repeat_interleave(k, 0)  # [G·k, P]
    limits = torch.tensor(n_new, device=device).repeat_interleave(k)
    tokens = gen[:, ids.shape[1]:]
    lengths = eos_lengths(tokens, eos_id, limits)  # [G·k]
    tokens = tokens[:, : int(lengths.max())]
    mask = length_mask(lengths.tolist(), tokens.shape[1], device)  # [G·k, T]
    tokens = torch.where(mask.bool(), tokens, torch.full_like(tokens, pad_id))
    logits = sequence_forward(policy, ids, pmask, tokens)[0].float()
    logits_prior = sequence_forward(prior, ids, pmask, tokens)[0].float() / prior_temperature
    return Rollout(ids, pmask, tokens, mask, logits, logits_prior, gather_logp(logits, tokens, allowed),
                   gather_logp(logits_prior, tokens, allowed), lengths.tolist())


def rl_metrics(ro: Rollout, task_reward: torch.Tensor, kl: torch.Tensor, shaped: torch.Tensor) -> dict[str, float]:
    """The metrics every algorithm logs about its rollout batch (see docs/metrics.md), over
    the global batch: under a launcher each rank holds a shard, and ``kl/seq`` feeds the
    adaptive KL controller, which must see the same value on every rank."""
    m = ro.mask
    if distributed.world_size() > 1:
        return _global_rl_metrics(ro, task_reward, kl, shaped)
    return {
        "reward/task": float(masked_sum(task_reward, m, dim=-1).mean()),
        "reward/shaped": float(masked_sum(shaped, m, dim=-1).mean()),
        "kl/mean": float(masked_mean(kl, m)),
        "kl/seq": float(sequence_kl(kl, m).mean()),
        "logp/prior": float(masked_mean(ro.logp_prior, m)),
        "logp/policy": float(masked_mean(ro.logp, m)),
    }


def _global_rl_metrics(ro: Rollout, task_reward: torch.Tensor, kl: torch.Tensor, shaped: torch.Tensor) -> dict[str, float]:
    """:func:`rl_metrics` from sums over all ranks in one all-reduce: per-sequence means are
    Σ_rows / rows, per-token means Σ_tokens / tokens of the global batch."""
    m = ro.mask
    per_row = torch.stack([masked_sum(task_reward, m, dim=-1), masked_sum(shaped, m, dim=-1), sequence_kl(kl, m)]).double().sum(-1)  # [3]
    per_tok = torch.stack([masked_sum(kl, m), masked_sum(ro.logp_prior, m), masked_sum(ro.logp, m)]).double()  # [3]
    counts = torch.tensor([float(m.shape[0]), float(m.bool().sum())], dtype=torch.float64)
    s = distributed.all_sum(torch.cat([per_row, per_tok, counts]))
    rows, toks = s[6].clamp(min=1), s[7].clamp(min=1)
    return {"reward/task": float(s[0] / rows), "reward/shaped": float(s[1] / rows), "kl/seq": float(s[2] / rows),
            "kl/mean": float(s[3] / toks), "logp/prior": float(s[4] / toks), "logp/policy": float(s[5] / toks)}


class AlgorithmSettings(Section):
    """Base of an algorithm's settings section (tune.<algorithm>)."""

    @property
    def group(self) -> int:
        """Samples drawn per prompt in one iteration (1; RLOO's and MRT's k)."""
        return 1

    @property
    def needs_action_rewards(self) -> bool:
        """The update asks for the reward of every action at every step (ActionRewards)."""
        return False

    def check_tune(self, tune: Any) -> None:
        """Raise ValueError (cause and fix) when these settings clash with the shared tune settings."""


class OnPolicy:
    """What an on-policy algorithm with no state of its own beside the model shares (PPO, RLOO,
    MRT, tilt): it samples its policy, and a checkpoint holds nothing more (the optimizer and
    the model are the loop's)."""

    model: torch.nn.Module

    def rollout(self, sampling, prompts) -> Rollout:
        return sampling.sample(self.model, prompts)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TemperedScoring:
    """What the sequence-level algorithms (RLOO, MRT) share: they train the tempered policy
    π_τ = softmax(logits/τ) on its own samples, scored by the KL-shaped return.

    Rollouts sampled at τ ≠ 1 come from π_τ; scoring them with π_τ's log-probs keeps REINFORCE
    on-policy (E[∇ log π_τ] = 0, so a shared baseline shift cancels). With π's own log-probs
    instead, mostly-negative self-critical advantages push mass off the likely tokens and the
    policy flattens (KL 3.4 nats/token within 30 iterations on translation at τ = 0.6). The KL
    is then KL(π_τ‖p_τ)."""

    def __init__(self, kl: KLConfig, allowed: torch.Tensor | None, temperature: float):
        self.kl_cfg, self.allowed, self.temperature = kl, allowed, temperature

    def tempered(self, ro: Rollout) -> Rollout:
        return ro.tempered(self.temperature, self.allowed)

    def returns(self, ro: Rollout, task_reward: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-token KL [B, T], KL-shaped reward [B, T], its sum over each sequence [B])."""
        kl = ro.kl(self.kl_cfg.estimator, self.allowed)
        shaped = shape_rewards(task_reward, kl, ro.mask, beta, self.kl_cfg.c)  # [B, T]
        return kl, shaped, masked_sum(shaped, ro.mask, dim=-1)

    def fresh_logp(self, model, ro: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, T, V], log-probs [B, T]) of π_τ for the rollout's tokens, with gradient."""
        logits, _ = sequence_forward(model, ro.prompts, ro.prompt_mask, ro.tokens)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits, gather_logp(logits, ro.tokens, self.allowed)

    def kl_loss(self, logits: torch.Tensor, logp: torch.Tensor, ro: Rollout) -> torch.Tensor:
        """The pathwise part of the KL gradient (0 for k1; rlhf/kl.py: kl_pathwise_loss)."""
        return kl_pathwise_loss(self.kl_cfg.estimator, logp, ro.logp_prior, ro.mask, logits.float(), ro.logits_prior, self.allowed)


@dataclass
class BuildContext:
    """What an algorithm is built from: its settings section, the shared KL settings, and the
    models (a trainable copy of the prior, the frozen prior)."""

    name: str  # the registered name (q, psi and g share one class)
    settings: Section  # the algorithm's tune.<section>
    kl: KLConfig
    temperature: float  # tune.temperature
    policy: torch.nn.Module
    prior: torch.nn.Module
    allowed: torch.Tensor | None


@dataclass(frozen=True)
class AlgorithmSpec:
    """A registry entry: the algorithm's settings section and how to build it. ``build``
    returns (the algorithm, the module the optimizer trains)."""

    config: type[AlgorithmSettings]
    build: Callable[[BuildContext], tuple[Any, torch.nn.Module]]
    section: str | None = None  # the tune.<key> of its settings; None = its name
    doc: str = ""

    def key(self, name: str) -> str:
        return self.section or name


def _is_spec(obj: Any, name: str) -> AlgorithmSpec:
    if not isinstance(obj, AlgorithmSpec):
        raise TypeError(f"algorithm {name!r} must be registered as an rlhf.algorithms.common.AlgorithmSpec, got {type(obj).__name__}")
    return obj


ALGORITHMS: Registry[AlgorithmSpec] = Registry("algorithm", "rlhf.algorithms", _is_spec)
"""Algorithm name -> spec; the built-ins register in ``rlhf/algorithms/__init__.py``."""
