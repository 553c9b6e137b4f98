"""Tiny tasks, data and models for the multi-process tests (no corpus, nothing downloaded).

Shared by ``tests/test_distributed.py`` (the one-process reference runs, in the pytest
process) and ``tests/dist_scripts/train.py`` (the same runs under ``accelerate launch``), so
both sides train on exactly the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reward_models.backbone import build_reward_model
from reward_models.bradley_terry import BTConfig
from reward_models.data import Preference, build_word_tokenizer
from reward_models.vpl import VPLTrainConfig
from rlhf.interfaces import Completions, Rewards
from rlhf.models import ModelConfig, build_model
from rlhf.pretrain import PretrainConfig
from rlhf.tune import TuneConfig
from tasks.counterpoint.tokens import Codec, build_codec

TINY = ModelConfig(n_layer=1, n_embd=32, n_head=2, dropout=0.0, max_positions=48)
SEED = 0


@dataclass(frozen=True)
class ToyPrompt:
    ids: list[int]
    n_new: int


class ToyTask:
    """What ``Tuner`` needs: melody tokens as actions (EOS included, so rows end at different
    lengths), prompts of 1-3 tokens with 4-8 new tokens (mixed padding), reward 1 per
    even-numbered token."""

    def __init__(self, codec: Codec | None = None):
        self.codec = codec or build_codec("melody")
        self.allowed = torch.zeros(len(self.codec.tokenizer), dtype=torch.bool)
        self.allowed[self.codec.completion_token_ids] = True
        self.allowed[self.codec.eos_id] = True
        self.eos_id = self.codec.eos_id

    @property
    def tokenizer(self):
        return self.codec.tokenizer

    def train_prompts(self) -> list[ToyPrompt]:
        bos, ids = self.codec.encode_prompt(None), self.codec.completion_token_ids
        return [ToyPrompt(bos + list(ids[3 * k : 3 * k + k % 3]), 4 + (k % 3) * 2) for k in range(6)]

    def reward(self, completions: Completions) -> Rewards:
        return Rewards((completions.tokens % 2 == 0).float())  # [B, T]: per step

    def save(self, path: Path) -> None:
        self.codec.save(path)


def save_prior(folder: Path, arch: str = "gpt2") -> Path:
    """A randomly initialised tiny GPT-2 (or Marian encoder–decoder) with the melody tokenizer
    (what `tune` loads)."""
    codec = build_codec("melody")
    torch.manual_seed(SEED)
    model = build_model(TINY.model_copy(update={"arch": arch}), codec.tokenizer)
    model.save_pretrained(folder)
    codec.save(folder)
    return folder


def tune_config(algorithm: str, **over) -> TuneConfig:
    """Few, small iterations; per-sequence rollout seeds (what makes 1 and N processes sample
    the same rows); no PPO early stop (a threshold turns float noise into a different number
    of steps)."""
    base = {"algorithm": algorithm, "steps": 3, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 100, "rollout_seeds": "sequence",
            "kl": {"beta": 0.05, "adaptive": True, "horizon": 100.0},
            "ppo": {"epochs": 2, "minibatches": 2, "target_kl": None},
            "rloo": {"k": 2},
            "kl_control": {"minibatch": 8, "updates_per_step": 2, "buffer_size": 64}}
    for k, v in over.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) else v
    section = {"q": "kl_control", "psi": "kl_control", "g": "kl_control"}.get(base["algorithm"], base["algorithm"])
    return TuneConfig.model_validate({k: v for k, v in base.items() if k not in {"ppo", "rloo", "kl_control", "mrt"} or k == section})


def bt_records(n: int = 96, seed: int = 0) -> list[Preference]:
    """Sentences of w0..w7; the preferred one has more w0/w1; four raters (for VPL)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = (" ".join(f"w{k}" for k in rng.integers(0, 8, size=5)) for _ in range(2))
        score = lambda s: sum(w in ("w0", "w1") for w in s.split())  # noqa: E731
        if score(a) != score(b):
            c, r = (a, b) if score(a) > score(b) else (b, a)
            out.append(Preference("", c, r, rater_id=f"r{i % 4}", pair_id=str(i)))
    return out


def word_tokenizer():
    return build_word_tokenizer([f"w{k}" for k in range(8)])


def bt_model(tok):
    torch.manual_seed(SEED)
    return build_reward_model(TINY, tok)


# center_coef: without it BT is blind to a constant added to every reward, so Adam turns float-noise
# gradients of that direction (e.g. ln_f.bias) into ±lr steps that differ between any two runs
BT = BTConfig(steps=4, batch_size=16, lr=3e-3, warmup_steps=1, center_coef=0.01, eval_every=100, checkpoint_every=2)
VPL = VPLTrainConfig(steps=3, raters_per_batch=4, targets_per_rater=4, context_sizes=[0, 2], latent_dim=4, pair_hidden=8, head_hidden=8,
                     beta_warmup_steps=0, free_bits=0.0, eval_every=100, checkpoint_every=100)
PRETRAIN = PretrainConfig(steps=3, batch_size=8, lr=3e-3, warmup_steps=1, eval_every=100, checkpoint_every=100)


def pretrain_examples(codec: Codec, n: int = 32) -> list[tuple[list[int], list[int]]]:
    """Ascending fragments of varied length (so ranks hold different token counts)."""
    bos, ids = codec.encode_prompt(None), codec.completion_token_ids
    return [(bos, [ids[(i + t) % len(ids)] for t in range(4 + i % 5)] + [codec.eos_id]) for i in range(n)]


PARTS = ("bt", "vpl", "pretrain", "ppo", "rloo", "q", "psi", "g", "pretrain-s2s", "ppo-s2s", "rloo-s2s")
"""``<part>-s2s``: the same run with an encoder–decoder (Marian) model, whose prior lies in
``prior.parent / "prior-s2s"`` (:func:`save_priors` writes both)."""


def save_priors(folder: Path) -> Path:
    """The GPT-2 prior in ``folder`` and the Marian one beside it (``prior-s2s``)."""
    save_prior(folder.parent / "prior-s2s", arch="marian")
    return save_prior(folder)


def run_part(part: str, root: Path, prior: Path, **over) -> Path:
    """Train one toy run (``part`` in PARTS) into ``root/part``; returns its final model folder.
    Called alike by one process (the reference) and by every rank of a launched job."""
    from reward_models.backbone import build_backbone
    from reward_models.bradley_terry import train_bt
    from reward_models.vpl import build_vpl, train_vpl
    from rlhf import distributed
    from rlhf.pretrain import pretrain
    from rlhf.runs import Run
    from rlhf.tune import tune

    run = Run(root / part, is_main=distributed.env_rank() == 0)
    arch = "gpt2"
    if part.endswith("-s2s"):
        part, arch, prior = part[: -len("-s2s")], "marian", prior.parent / "prior-s2s"
    if part == "bt":
        tok = word_tokenizer()
        return train_bt(run, BT.model_copy(update=over), bt_model(tok), tok, bt_records(), seed=SEED, progress=False)
    if part == "vpl":
        tok = word_tokenizer()
        torch.manual_seed(SEED)
        v = VPL.model_copy(update=over)
        model = build_vpl(build_backbone(TINY, tok), v.latent_dim, v.pair_hidden, v.head_hidden, v.pooling)
        return train_vpl(run, v, model, tok, bt_records(), seed=SEED, progress=False)
    if part == "pretrain":
        codec = build_codec("melody")
        torch.manual_seed(SEED)
        model = build_model(TINY.model_copy(update={"arch": arch}), codec.tokenizer)
        return pretrain(run, PRETRAIN.model_copy(update=over), model, codec.tokenizer, pretrain_examples(codec), [], seed=SEED, progress=False)
    return tune(run, tune_config(part, **over), ToyTask(), prior, seed=SEED, progress=False)


def probe_batch(tok) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of sentences to compare a model's rewards before and after reloading."""
    sents = [" ".join(f"w{(i * 3 + k) % 8}" for k in range(5)) for i in range(6)]
    enc = tok(sents, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]
