"""Reference-based rewards of a completion: sacrebleu's sentence BLEU and chrF, divided by 100.

Both are :class:`~rlhf.interfaces.RewardFn` classes, registered as the rewards ``bleu`` and
``chrf`` (``rlhf.rewards`` entry points), so any task whose prompts carry a reference can use
them in a run's ``rewards:``::

    rewards:
      - fn: bleu                         # prompt.reference, 13a tokenizer
      - fn: chrf
        args: {column: ref}              # the translation task's prompts keep it in .ref
        weight: 0.5

A completion's text is ``Completions.texts`` (decoded, special tokens skipped) stripped of
surrounding whitespace. The scores are exactly sacrebleu's ``sentence_bleu(hyp, [ref])`` (exp
smoothing, effective order) and ``sentence_chrf(hyp, [ref])``, on the 0–1 scale.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from sacrebleu.metrics import BLEU, CHRF

from rlhf.errors import UserError
from rlhf.interfaces import Completions, Rewards


class _ReferenceReward:
    """Shared part: the references of a batch and the completions' texts."""

    name = "reference"

    def __init__(self, column: str = "reference"):
        self.column = column

    def references(self, prompts: Sequence[Any]) -> list[str]:
        refs = []
        for i, p in enumerate(prompts):
            ref = getattr(p, self.column, None)
            if ref is None:
                text = getattr(p, "text", None)
                what = f"prompt {i}" + (f" ({text!r})" if text is not None else f" ({type(p).__name__})")
                raise UserError(
                    f"the {self.name} reward scores each completion against its prompt's {self.column!r}, but {what} has none; give every "
                    f"row of the data a reference (task.data.reference_key), pass args: {{column: <attribute>}} naming where the prompts keep "
                    f"it, or drop this reward"
                )
            refs.append(str(ref))
        return refs

    def texts(self, completions: Completions) -> list[str]:
        if completions.tokenizer is None:
            raise UserError(f"the {self.name} reward needs text, but these completions have no tokenizer (the task has none)")
        return [t.strip() for t in completions.texts]

    def score(self, hyp: str, ref: str) -> float:  # 0–100
        raise NotImplementedError

    def scores(self, hyps: Sequence[str], refs: Sequence[str]) -> list[float]:
        """Sentence scores on sacrebleu's 0–100 scale."""
        if len(hyps) != len(refs):
            raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
        return [self.score(h, r) for h, r in zip(hyps, refs)]

    def __call__(self, completions: Completions) -> Rewards:
        """[B] the sentence score / 100 of each completion against its prompt's reference."""
        refs = self.references(completions.prompts)
        values = torch.tensor(self.scores(self.texts(completions), refs), dtype=torch.float32) / 100.0
        return Rewards(values)


class SentenceBLEUReward(_ReferenceReward):
    """Sentence BLEU / 100 (sacrebleu: exp smoothing, effective order), in [0, 1]."""

    name = "bleu"

    def __init__(self, column: str = "reference", tokenize: str = "13a", lowercase: bool = False):
        super().__init__(column)
        self.metric = BLEU(tokenize=tokenize, lowercase=lowercase, effective_order=True)

    def score(self, hyp: str, ref: str) -> float:
        return float(self.metric.sentence_score(hyp, [ref]).score)


class SentenceCHRFReward(_ReferenceReward):
    """Sentence chrF / 100 (sacrebleu's defaults: character 6-grams, β = 2; ``word_order=2`` is chrF++), in [0, 1]."""

    name = "chrf"

    def __init__(self, column: str = "reference", word_order: int = 0):
        super().__init__(column)
        self.metric = CHRF(word_order=word_order)

    def score(self, hyp: str, ref: str) -> float:
        return float(self.metric.sentence_score(hyp, [ref]).score)
