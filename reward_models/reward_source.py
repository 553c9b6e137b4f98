"""A trained reward model as the reward of RL fine-tuning (``rlhf tune``).

:class:`RewardSource` wraps a BT or VPL model (plus, for VPL, a rater's context → z) as a
:class:`~rlhf.interfaces.RewardFn`: one reward per completion, which the tuner puts on its last
token, so the KL shaping applies unchanged (an end-of-sequence reward, as in Ziegler et al. 2019
and Ouyang et al. 2022).

The scored sequence is ``prompt ids + the n_new generated ids + <eos>``, which is exactly how
the training pairs were tokenized (``prompt + response``, eos appended as TRL does).

Scaling (``scale``):

* ``raw`` -- r(x) (BT) or r(x, z) (VPL).
* ``win_prob`` -- s(x) = (1/M) Σ_m σ(r(x, z) − r(y_m, z)) over reference samples y_m of the same
  prompt (default: all references): the expected probability of beating the reference set under
  that rater's model, in [0, 1] for every rater (Poddar et al. 2024, sec. 4.3).

``rlhf.tune.tune(run, cfg, task, prior, reward=source)`` tunes the task's policy against the
learned reward instead of the task's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
from pydantic import Field, model_validator
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from reward_models.backbone import PairTensors, pad_sequences
from reward_models.data import Preference, comparable, encode_pairs
from reward_models.vpl import VPLRewardModel, win_probability
from rlhf.config import Section
from rlhf.errors import UserError
from rlhf.interfaces import Completions, Rewards, Task
from rlhf.models import ensure_model_type
from rlhf.rollout import sample_many

Scale = Literal["raw", "win_prob"]


def model_type_of(path: str | Path) -> str:
    p = Path(path) / "config.json"
    if not p.is_file():
        raise UserError(f"{path}: not a reward model folder (no config.json); train one with `rlhf train-reward <config>`.")
    return str(json.loads(p.read_text()).get("model_type", ""))


def load_reward_model(path: str | Path) -> PreTrainedModel:
    """A trained BT (sequence classification) or VPL reward model from its folder, in eval mode."""
    kind = model_type_of(path)
    if kind == "vpl_reward":
        return VPLRewardModel.from_pretrained(str(path)).eval()
    ensure_model_type(kind)
    model = AutoModelForSequenceClassification.from_pretrained(str(path))
    if model.config.num_labels != 1:
        raise UserError(f"{path}: a reward model needs num_labels=1, this one has {model.config.num_labels}.")
    return model.eval()



def context_records(records: Sequence[Preference], *, rater_id: str | None = None, group: str | None = None,
                    n: int = 8, seed: int = 0) -> list[Preference]:
    """Up to ``n`` labelled pairs (no ties) of one rater, or drawn across one rater group, to
    infer a VPL z from (seeded random choice)."""
    recs = [r for r in comparable(records) if (rater_id is None or r.rater_id == rater_id) and (group is None or r.rater_group == group)]
    if not recs:
        raise UserError(f"no labelled pairs for rater_id={rater_id!r} group={group!r}; check the ids against the data (rater_id / rater_group columns).")
    idx = np.random.default_rng(seed).permutation(len(recs))[:n]
    return [recs[i] for i in sorted(idx)]


class RewardSource:
    """Scores generated sequences with a trained reward model (see module docstring)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, z: torch.Tensor | None = None,
                 scale: Scale = "raw", reference: Sequence[Sequence[int]] | Mapping[tuple[int, ...], Sequence[Sequence[int]]] | None = None,
                 batch_size: int = 256):
        if scale not in ("raw", "win_prob"):
            raise UserError(f"reward scale {scale!r}: use raw or win_prob.")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.is_vpl = isinstance(model, VPLRewardModel)
        if z is not None and not self.is_vpl:
            raise UserError("a rater latent z only applies to a VPL reward model; this one is Bradley-Terry.")
        self.device = next(model.parameters()).device
        self.z = (torch.as_tensor(z, dtype=torch.float32) if z is not None else torch.zeros(model.latent_dim) if self.is_vpl else None)
        if self.z is not None:
            self.z = self.z.to(self.device)
        self.scale = scale
        self.batch_size = batch_size
        self.eos_id = tokenizer.eos_token_id
        self._ref: dict[tuple[int, ...], torch.Tensor] = {}
        self._ref_all: torch.Tensor | None = None
        if reference is not None:
            self.set_reference(reference)
        elif scale == "win_prob":
            raise UserError("scale win_prob needs reference samples (e.g. prior samples per prompt): pass reference=... or use scale raw.")

    @classmethod
    def from_pretrained(cls, path: str | Path, *, context: Sequence[Preference] | None = None, z: torch.Tensor | None = None,
                        **kw: Any) -> "RewardSource":
        """Load a reward model folder (``runs/<run>/models/reward-bt`` or ``reward-vpl``) with its
        tokenizer; for VPL, z = μ(context) of a rater's labelled pairs (none: z = 0)."""
        model = load_reward_model(path)
        tok = AutoTokenizer.from_pretrained(str(path))
        if context is not None:
            if not isinstance(model, VPLRewardModel):
                raise UserError(f"{path}: rater context applies to a VPL reward model; this one is Bradley-Terry (drop the context).")
            c, r = encode_pairs(comparable(context), tok)
            z = model.infer_z(PairTensors.build(c, r, tok.pad_token_id))
        return cls(model, tok, z=z, **kw)

    # ----- scoring --------------------------------------------------------------------------
    @torch.no_grad()
    def raw_rewards(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """[N] r(x) or r(x, z) of token-id sequences (each already ending with eos)."""
        out = []
        for i in range(0, len(sequences), self.batch_size):
            ids, lens = pad_sequences(sequences[i : i + self.batch_size], self.tokenizer.pad_token_id)
            mask = (torch.arange(ids.shape[1])[None, :] < lens[:, None]).long()
            kw = {"z": self.z} if self.is_vpl else {}
            out.append(self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kw).logits.squeeze(-1).float())
        return torch.cat(out) if out else torch.zeros(0, device=self.device)

    def set_reference(self, reference: Sequence[Sequence[int]] | Mapping[tuple[int, ...], Sequence[Sequence[int]]]) -> None:
        """Reference sequences for ``win_prob``: a list, or a mapping prompt ids → sequences."""
        if isinstance(reference, Mapping):
            self._ref = {tuple(k): self.raw_rewards([self._with_eos(s) for s in v]) for k, v in reference.items() if len(v)}
            self._ref_all = torch.cat(list(self._ref.values())) if self._ref else None
        else:
            self._ref = {}
            self._ref_all = self.raw_rewards([self._with_eos(s) for s in reference])
        if self._ref_all is None or not len(self._ref_all):
            raise UserError("the reference set for win_prob scaling is empty; give at least one sequence.")

    def _with_eos(self, seq: Sequence[int]) -> list[int]:
        seq = [int(t) for t in seq]
        return seq if seq and seq[-1] == self.eos_id else seq + [self.eos_id]

    def sequence_rewards(self, sequences: Sequence[Sequence[int]], prompt_keys: Sequence[tuple[int, ...]] | None = None) -> torch.Tensor:
        """[N] rewards of full sequences (prompt + completion), scaled per ``scale``."""
        seqs = [self._with_eos(s) for s in sequences]
        r = self.raw_rewards(seqs)
        if self.scale == "raw":
            return r
        out = torch.empty_like(r)
        for i in range(len(seqs)):
            ref = self._ref.get(prompt_keys[i], self._ref_all) if prompt_keys is not None else self._ref_all
            out[i] = win_probability(r[i : i + 1], ref)[0]
        return out

    def __call__(self, completions: Completions) -> Rewards:
        """[B] the reward of each prompt + completion (its ``<eos>`` appended where the
        completion has none): a RewardFn; the tuner puts it on each row's last token."""
        seqs = [list(p.ids) + completions.tokens[b, : completions.lengths[b]].tolist() for b, p in enumerate(completions.prompts)]
        return Rewards(self.sequence_rewards(seqs, [tuple(p.ids) for p in completions.prompts]).float().cpu())


def prior_reference(task: Task, prior: PreTrainedModel, per_prompt: int = 8, seed: int = 0, temperature: float = 1.0) -> dict[tuple[int, ...], list[list[int]]]:
    """Reference sets for ``win_prob``: ``per_prompt`` samples of the prior for each training
    prompt of ``task`` (prompt ids → full sequences)."""
    rep = [p for p in task.train_prompts() for _ in range(per_prompt)]
    allowed = None if task.allowed is None else task.allowed.to(next(prior.parameters()).device)
    comps = sample_many(prior, [p.ids for p in rep], [p.n_new for p in rep], allowed=allowed, temperature=temperature,
                        generator=torch.Generator().manual_seed(seed))
    out: dict[tuple[int, ...], list[list[int]]] = {}
    for p, c in zip(rep, comps):
        out.setdefault(tuple(p.ids), []).append(list(p.ids) + list(c)[: p.n_new])
    return out


# --------------------------------------------------------------------------- tuning config


class LearnedRewardConfig(Section):
    """``reward:`` of a run config: tune against a trained reward model instead of the task's
    own reward (the rule reward, BLEU). The task still supplies prompts and evaluation."""

    model: str = Field(..., description="Folder of a reward model written by `rlhf train-reward` (<run>/models/reward-bt or reward-vpl).")
    context: str | None = Field(None, description="Preference data (JSONL/CSV/Parquet) holding the rater's labelled pairs: VPL infers z from them; null = z = 0 (VPL's prior mean) or BT.")
    rater_group: str | None = Field(None, description="Draw the context pairs from this rater group (e.g. A); needs context.")
    rater_id: str | None = Field(None, description="Draw the context pairs from this one rater; needs context.")
    context_size: int = Field(8, ge=1, le=64, description="Labelled pairs in the context set C (VPL).")
    scale: Scale = Field("win_prob", description="raw r(x, z), or win_prob: expected probability of beating the prior's samples of the same prompt (same range for every rater).")
    reference_per_prompt: int = Field(8, ge=1, description="Prior samples per training prompt forming the win_prob reference set.")
    seed: int = Field(0, ge=0, description="Seed of the context draw and of the reference samples.")

    @model_validator(mode="after")
    def _check(self) -> "LearnedRewardConfig":
        if (self.rater_group or self.rater_id) and self.context is None:
            raise ValueError("reward.rater_group / reward.rater_id select pairs from reward.context; set reward.context to the preference data file")
        if self.rater_group and self.rater_id:
            raise ValueError("set one of reward.rater_group and reward.rater_id, not both")
        return self


def learned_reward(cfg: LearnedRewardConfig, task: Task, prior: PreTrainedModel) -> RewardSource:
    """The reward model of ``cfg`` as the reward of ``task``'s completions (z from the context
    for VPL; win_prob references sampled from ``prior``)."""
    from reward_models.data import load_preferences

    context = None
    if cfg.context is not None:
        context = context_records(load_preferences(cfg.context), rater_id=cfg.rater_id, group=cfg.rater_group, n=cfg.context_size, seed=cfg.seed)
    reference = prior_reference(task, prior, cfg.reference_per_prompt, seed=cfg.seed) if cfg.scale == "win_prob" else None
    source = RewardSource.from_pretrained(cfg.model, context=context, scale=cfg.scale, reference=reference)
    if source.tokenizer.get_vocab() != task.tokenizer.get_vocab():
        raise UserError(f"{cfg.model}: the reward model's tokenizer differs from the task's; train the reward model with data.tokenizer "
                        "matching the task (e.g. first_species).")
    return source
