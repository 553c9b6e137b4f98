"""Active labelling: serve each rater the pair whose label says most about their taste.

With ``rlhf label serve --active MODEL`` (a VPL reward model folder), the next pair for a rater
is the unlabelled pair with the largest expected information gain about their latent z under
q(z | their labels so far) (``reward_models/active.py``); without it, pairs come in file order.
A rater's A/B labels are their context C (ties and skips tell nothing about the direction and
are left out of C, but are not asked again). The pairs are embedded once at start-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from apps.labelling.pairs import CandidatePair
from apps.labelling.store import Label
from reward_models.active import information_gains, posterior
from reward_models.backbone import PairTensors
from reward_models.data import Preference, encode_pairs
from reward_models.vpl import VPLRewardModel
from rlhf.errors import UserError


class ActiveChooser:
    """``chooser(labels) -> pair_id | None``: the most informative unlabelled pair for a rater."""

    def __init__(self, model_dir: str | Path, pairs: Sequence[CandidatePair], *, samples: int = 64, seed: int = 0):
        from transformers import AutoTokenizer

        from reward_models.reward_source import load_reward_model

        self.model = load_reward_model(model_dir)
        if not isinstance(self.model, VPLRewardModel):
            raise UserError(f"{model_dir}: --active needs a VPL reward model (models/reward-vpl of `rlhf train-reward`); this one has no rater latent.")
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        chosen, rejected = encode_pairs([Preference(p.prompt, p.a, p.b, where=f"pair {p.pair_id}") for p in pairs], tok)
        table = PairTensors.build(chosen, rejected, tok.pad_token_id)
        with torch.no_grad():
            b, inverse = table.unique_batch(torch.arange(len(table)))
            self.h_a, self.h_b = self.model.embed(b["input_ids"], b["attention_mask"])[inverse].chunk(2)  # [N, H] each
        self.pairs, self.samples, self.seed = list(pairs), samples, seed
        self.index = {p.pair_id: i for i, p in enumerate(self.pairs)}

    def __call__(self, labels: Sequence[Label]) -> str | None:
        done = {lb.pair_id for lb in labels}
        left = [i for i, p in enumerate(self.pairs) if p.pair_id not in done]
        if not left:
            return None
        ctx = [(self.index[lb.pair_id], lb.choice == "A") for lb in labels if lb.pair_id in self.index and lb.choice in ("A", "B")]
        won = torch.stack([self.h_a[i] if a else self.h_b[i] for i, a in ctx]) if ctx else self.h_a[:0]
        lost = torch.stack([self.h_b[i] if a else self.h_a[i] for i, a in ctx]) if ctx else self.h_b[:0]
        mu, logvar = posterior(self.model, won, lost)
        gen = torch.Generator().manual_seed(self.seed + len(labels))  # the same state gets the same pair
        idx = torch.as_tensor(left)
        gains = information_gains(self.model, self.h_a[idx], self.h_b[idx], mu, logvar, self.samples, gen)
        return self.pairs[left[int(gains.argmax())]].pair_id
