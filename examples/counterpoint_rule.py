"""A new counterpoint rule in one file: no repeated note.

Fux allows the counterpoint to repeat a note only sparingly; this rule flags every note of the
counterpoint that repeats the one before it. Added to a run from YAML alone::

    task:
      extra_rules: [examples.counterpoint_rule:NO_REPEATED_NOTE]
      rule_weights: {repeated_note: 0.5}     # optional: its weight, like any rule's

It then counts everywhere a built-in rule does: the RL reward, the per-action rewards of
``rloo.credit: all_actions``, the clean share, the violations table and the report.

A rule is a ``tasks.counterpoint.rules.Rule(name, weight, doc, fn)``; ``fn`` maps a
``FirstSpeciesBatch`` (padded [B, N] pitch arrays) to a [B, N] bool array, True at the note that
breaks the rule. Flag a note from that note and the ones before it, never from later notes: the
per-action rewards rely on it (a note's reward must be known when the note is chosen).
"""

from __future__ import annotations

import numpy as np

from tasks.counterpoint.piece import FirstSpeciesBatch
from tasks.counterpoint.rules import Rule


def repeated_note(batch: FirstSpeciesBatch) -> np.ndarray:
    """[B, N] bool: note i of the counterpoint equals note i - 1 (padding never flagged)."""
    cp = np.asarray(batch.counterpoint)
    out = np.zeros(cp.shape, dtype=bool)
    out[:, 1:] = cp[:, 1:] == cp[:, :-1]
    return out & batch.mask


NO_REPEATED_NOTE = Rule("repeated_note", 1.0, "Fux: the counterpoint repeats a note only sparingly", repeated_note)
