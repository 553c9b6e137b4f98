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
from reward_models.active import next_query
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
        with torch.no_grad():
            self.h_a, self.h_b = self.model.embed_pairs(PairTensors.build(chosen, rejected, tok.pad_token_id), range(len(pairs)))  # [N, H] each
        self.pairs, self.samples, self.seed = list(pairs), samples, seed
        self.index = {p.pair_id: i for i, p in enumerate(self.pairs)}

    def __call__(self, labels: Sequence[Label]) -> str | None:
        done = {lb.pair_id for lb in labels}
        left = [i for i, p in enumerate(self.pairs) if p.pair_id not in done]
        if not left:
            return None
        answered = [(self.index[lb.pair_id], lb.choice == "A") for lb in labels if lb.pair_id in self.index and lb.choice in ("A", "B")]
        gen = torch.Generator().manual_seed(self.seed + len(labels))  # the same state gets the same pair
        return self.pairs[next_query(self.model, self.h_a, self.h_b, answered, left, self.samples, gen)].pair_id
