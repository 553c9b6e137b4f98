"""A reward of one's own in one file: a penalty on repeated words.

Small language models stutter ("sun sun owl"); this reward gives each completion minus
``per_word`` for every word that repeats a word already said in it. It joins the task's own
reward (sentence BLEU for the text task) in a run's ``rewards:``, from YAML alone::

    rewards:
      - fn: task                                  # the task's BLEU
      - fn: examples.text_reward:RepeatedWords    # a class is called once with args
        args: {per_word: 0.5}
        weight: 0.2

Each term is logged as ``reward/<name>`` (here ``reward/RepeatedWords`` and ``reward/task``) and
the RL reward is r = Σ w_i r_i. A reward is any callable ``Completions -> Rewards`` (or a tensor
or list of one float per completion): ``Completions.texts`` are the decoded completions,
``Completions.prompts`` the task's prompts (the text task's carry ``.text`` and ``.reference``).
Return ``Rewards(values, diagnostics)`` to log more: each diagnostic appears as
``reward/<name>/<key>``.
"""

from __future__ import annotations

import torch

from rlhf.interfaces import Completions, Rewards


def repeats(text: str) -> int:
    """How many words of ``text`` repeat an earlier word of it (case-insensitive)."""
    seen: set[str] = set()
    n = 0
    for w in text.lower().split():
        n += w in seen
        seen.add(w)
    return n


class RepeatedWords:
    """r = -per_word · (number of repeated words), one value per completion ([B])."""

    def __init__(self, per_word: float = 1.0):
        if per_word < 0:
            raise ValueError(f"per_word is a penalty's size and must be >= 0, got {per_word}")
        self.per_word = per_word

    def __call__(self, completions: Completions) -> Rewards:
        counts = torch.tensor([repeats(t) for t in completions.texts], dtype=torch.float32)  # [B]
        return Rewards(-self.per_word * counts, {"stutter_share": float((counts > 0).float().mean())})
