"""Sequence Tutor's KL-control (Jaques et al., ICML 2017): off-policy Q-, Ψ- and G-learning
with a replay buffer and a soft-updated target network.

The network is a causal LM initialised from the prior; its logits ℓ(s, ·) at position t give
the values of the actions at s_t (the prefix so far), measured from the frozen prior's logits
ℓ_p so that learning starts at a fixed point of the backup instead of at arbitrary per-state
offsets of raw logits (which otherwise wreck the policy in the first updates):

- ``q``:   Q(s, a) = ℓ(s, a) − log Σ_a' exp ℓ_p(s, a') (= log p(a|s) at the start); reward
           r/c + log p(a|s); target r + γ max Q⁻(s', ·); acts ε-greedy or Boltzmann.
- ``psi``: Ψ(s, a), measured as Q; same reward; target r + γ logsumexp Ψ⁻(s', ·); π = softmax(Ψ).
- ``g``:   G(s, a) = ℓ(s, a) − ℓ_p(s, a) (= 0 at the start); reward r/c; target
           r + γ logsumexp(G⁻(s', ·) + log p(·|s')); π ∝ p·exp G.

In all three the policy is softmax(ℓ), so sampling and evaluation read the network as an LM.
With no task reward, Ψ = log p and G = 0 are exact fixed points of their backups.
An update takes whole sequences from the buffer: one forward pass scores every step of a
sequence, and s_{t+1}'s values are position t+1's (``td.next_state``).
"""

from __future__ import annotations

import copy
import random
from collections import deque
from typing import Literal

import torch
from pydantic import Field

from rlhf import distributed
from rlhf.algorithms.common import AlgorithmSettings, BuildContext, KLConfig, Rollout, rl_metrics
from rlhf.interfaces import Step
from rlhf.kl import masked_log_softmax
from rlhf.rollout import left_pad, sequence_forward
from rlhf.td import TDKind, action_values, g_target, next_state, psi_target, q_policy_probs, q_target, soft_update, td_loss, td_reward


class KLControlConfig(AlgorithmSettings):
    gamma: float = Field(0.5, ge=0, le=1, description="Discount γ (Sequence Tutor used 0.5).")
    tau: float = Field(0.05, gt=0, le=1, description="Soft target-network update rate θ⁻ ← (1−τ)θ⁻ + τθ after each gradient step.")
    buffer_size: int = Field(4096, ge=1, description="Replay buffer capacity in sequences.")
    minibatch: int = Field(64, ge=1, description="Sequences per gradient step.")
    updates_per_step: int = Field(4, ge=1, description="Gradient steps per rollout batch.")
    exploration: Literal["epsilon", "boltzmann"] = Field("boltzmann", description="How q explores: ε-greedy on Q or sampling softmax(Q) (psi and g always sample their own policy).")
    epsilon: float = Field(0.1, ge=0, le=1, description="ε of ε-greedy exploration (q with exploration=epsilon).")
    loss: Literal["huber", "mse"] = Field("huber", description="TD loss.")
    values: Literal["centred", "raw"] = Field(
        "centred",
        description="centred: values measured from the prior's logits (Ψ = log p, G = 0 at the start; then Ψ- and G-learning "
        "take identical steps, as Ψ = G + log p); raw: the logits are the values, as in Sequence Tutor's networks.",
    )


class KLControl:
    def __init__(self, kind: TDKind, cfg: KLControlConfig, kl: KLConfig, model, prior, allowed: torch.Tensor | None):
        self.kind, self.cfg, self.kl_cfg, self.model, self.prior, self.allowed = kind, cfg, kl, model, prior, allowed
        self.policy = model
        self.target = copy.deepcopy(model).eval()
        for p in self.target.parameters():
            p.requires_grad_(False)
        self.buffer: deque[dict] = deque(maxlen=cfg.buffer_size)

    group = 1
    needs_action_rewards = False

    @classmethod
    def build(cls, ctx: BuildContext) -> tuple["KLControl", torch.nn.Module]:
        return cls(ctx.name, ctx.settings, ctx.kl, ctx.policy, ctx.prior, ctx.allowed), ctx.policy

    def rollout(self, sampling, prompts) -> Rollout:
        return sampling.sample(self.model, prompts, probs_fn=self.probs_fn())  # ε-greedy or Boltzmann exploration

    def probs_fn(self):
        """Exploration policy over the network's logits, or None for softmax(logits)."""
        if self.kind == "q" and self.cfg.exploration == "epsilon":
            return lambda logits: q_policy_probs(logits, self.cfg.epsilon, self.allowed)
        return None

    def _store(self, ro: Rollout, task_reward: torch.Tensor) -> None:
        # Under a launcher each rank keeps its own rollouts: buffer_size is the global capacity.
        cap = max(1, self.cfg.buffer_size // distributed.world_size())
        if self.buffer.maxlen != cap:
            self.buffer = deque(self.buffer, maxlen=cap)
        pm = ro.prompt_mask.bool()
        for i, n in enumerate(ro.lengths):
            self.buffer.append({"prompt": ro.prompts[i][pm[i]].tolist(), "tokens": ro.tokens[i, :n].cpu(), "reward": task_reward[i, :n].cpu()})

    def _batch(self, rows: list[dict], device) -> tuple[torch.Tensor, ...]:
        ids, pmask = left_pad([r["prompt"] for r in rows], 0, device)
        t = max(len(r["tokens"]) for r in rows)
        tokens = torch.zeros((len(rows), t), dtype=torch.long)
        reward = torch.zeros((len(rows), t))
        mask = torch.zeros((len(rows), t))
        for i, r in enumerate(rows):
            n = len(r["tokens"])
            tokens[i, :n], reward[i, :n], mask[i, :n] = r["tokens"], r["reward"], 1.0
        return ids, pmask, tokens.to(device), reward.to(device), mask.to(device)

    def _offset(self, prior_logits: torch.Tensor, logp_prior_all: torch.Tensor) -> torch.Tensor:
        """What is subtracted from logits to get values: ℓ_p for G, log Σ exp ℓ_p (over the
        allowed actions) for Q and Ψ; 0 with ``values: raw``.  [b, T, V] or [b, T, 1]."""
        if self.cfg.values == "raw":
            return torch.zeros_like(prior_logits[..., :1])
        if self.kind == "g":
            return prior_logits
        restricted = prior_logits if self.allowed is None else prior_logits.masked_fill(~self.allowed, float("-inf"))
        return torch.logsumexp(restricted, dim=-1, keepdim=True)

    def td_step(self, loop, rows: list[dict]) -> float:
        device = next(self.model.parameters()).device
        ids, pmask, tokens, task_reward, mask = self._batch(rows, device)
        logits, _ = sequence_forward(distributed.training_forward(loop, self.model), ids, pmask, tokens)  # [b, T, V], synchronised gradients
        with torch.no_grad():
            prior_logits = sequence_forward(self.prior, ids, pmask, tokens)[0].float() / self.kl_cfg.prior_temperature  # the anchor p_T
            logp_prior_all = masked_log_softmax(prior_logits, self.allowed)  # [b, T, V]
            offset = self._offset(prior_logits, logp_prior_all)
            target_values = sequence_forward(self.target, ids, pmask, tokens)[0].float() - offset
            reward = td_reward(self.kind, task_reward, action_values(logp_prior_all, tokens), self.kl_cfg.c)
            nxt, done = next_state(target_values, mask)
            if self.kind == "g":
                nxt_prior, _ = next_state(logp_prior_all, mask)
                y = g_target(reward, nxt, nxt_prior, done, self.cfg.gamma, self.allowed)
            else:
                y = (q_target if self.kind == "q" else psi_target)(reward, nxt, done, self.cfg.gamma, self.allowed)
        values = logits.float() - offset
        loss = td_loss(action_values(values, tokens), y, mask, self.cfg.loss)
        if distributed.world_size() > 1:
            loss = loss * distributed.token_share(mask)[0]  # rank means → the global minibatch's token mean
        loop.optimizer_step(loss)
        with distributed.gathered(self.model):  # ZeRO-3 keeps only a shard of θ on each rank
            soft_update(self.target, self.model, self.cfg.tau)
        return float(loss.detach())

    def update(self, loop, step: Step) -> dict[str, float]:
        ro, task_reward = step.rollout, step.task_reward
        self._store(ro, task_reward)
        pool = list(self.buffer)  # one copy per iteration, not per gradient step
        # each rank draws its share of the global minibatch from its own buffer
        minibatch = max(1, self.cfg.minibatch // distributed.world_size())
        losses = [self.td_step(loop, random.sample(pool, min(minibatch, len(pool)))) for _ in range(self.cfg.updates_per_step)]
        kl = ro.kl(self.kl_cfg.estimator, self.allowed)
        shaped = td_reward(self.kind, task_reward, ro.logp_prior, self.kl_cfg.c) * ro.mask
        size = float(len(self.buffer)) if distributed.world_size() == 1 else float(distributed.all_sum(torch.tensor(float(len(self.buffer)))))
        out = {"loss/td": sum(losses) / len(losses), "buffer/size": size}
        out.update(rl_metrics(ro, task_reward, kl, shaped))
        return out

    def state_dict(self) -> dict:
        """Target network and replay buffer; under a launcher every rank's buffer (a collective:
        call it on all ranks), since each holds different rollouts."""
        if distributed.world_size() > 1:
            return {"target": self.target.state_dict(), "buffers": distributed.gather_objects(list(self.buffer))}
        return {"target": self.target.state_dict(), "buffer": list(self.buffer)}

    def load_state_dict(self, state: dict) -> None:
        self.target.load_state_dict(state["target"])
        if "buffers" in state and len(state["buffers"]) != distributed.world_size():
            raise ValueError(f"the checkpoint holds the replay buffers of {len(state['buffers'])} processes; resume with that many")
        rows = state["buffers"][distributed.rank()] if "buffers" in state else state["buffer"]
        self.buffer.clear()
        self.buffer.extend(rows)
