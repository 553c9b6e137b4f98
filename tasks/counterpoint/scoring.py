"""One entry point for the rule rewards of both modes: per-step rewards and violation masks.

This is the counterpoint task's ``RewardFn``: pieces in, a per-step reward [B, T] out
(a note's reward sits on the step that wrote it), plus the violations behind it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import numpy as np

from tasks.counterpoint.piece import FirstSpeciesBatch, FirstSpeciesPiece, Melody

Mode = Literal["first_species", "melody"]


def soft_rule_names(mode: Mode) -> frozenset[str]:
    """Rules that express a preference (always somewhat violated), not a prohibition."""
    if mode == "first_species":
        from tasks.counterpoint.rules import SOFT_RULES

        return frozenset(SOFT_RULES)
    return frozenset()


def rule_names(mode: Mode) -> list[str]:
    if mode == "first_species":
        from tasks.counterpoint.rules import FIRST_SPECIES_RULES

        return [r.name for r in FIRST_SPECIES_RULES]
    from tasks.counterpoint.melody_rules import MELODY_RULES

    return [r.name for r in MELODY_RULES]


@dataclass
class RuleScores:
    rewards: np.ndarray  # [B, T] float, weighted rule reward per step (0 on padding)
    violations: dict[str, np.ndarray]  # rule -> [B, T] bool
    notes: np.ndarray  # [B] number of notes per piece (normaliser of "violations per note")
    soft: frozenset[str] = frozenset()  # preference rules, left out of clean()

    @property
    def totals(self) -> np.ndarray:
        """[B] reward of each piece (sum over steps)."""
        return self.rewards.sum(axis=1)

    def per_note(self) -> dict[str, float]:
        """Violations per note of each rule, over all pieces."""
        n = max(float(self.notes.sum()), 1.0)
        return {name: float(v.sum()) / n for name, v in self.violations.items()}

    def clean(self, rules: Sequence[str] | None = None) -> np.ndarray:
        """[B] bool: pieces with no violation of ``rules`` (default: every hard rule)."""
        names = [n for n in self.violations if n not in self.soft] if rules is None else list(rules)
        bad = np.zeros(len(self.notes), dtype=bool)
        for name in names:
            bad |= self.violations[name].any(axis=1)
        return ~bad


def melody_array(melodies: Sequence[Melody]) -> tuple[np.ndarray, np.ndarray]:
    """([B, T] events, [B] tonic) of equal-length melodies."""
    events = np.array([m.events for m in melodies], dtype=np.int64)
    tonic = np.array([m.tonic for m in melodies], dtype=np.int64)
    return events, tonic


def score(mode: Mode, items: Sequence[FirstSpeciesPiece] | Sequence[Melody], weights: Mapping[str, float] | None = None) -> RuleScores:
    if mode == "first_species":
        from tasks.counterpoint import rules

        batch = FirstSpeciesBatch.from_pieces(items)  # type: ignore[arg-type]
        return RuleScores(rules.step_rewards(batch, weights), rules.violations(batch), batch.lengths.copy(), soft_rule_names(mode))
    from tasks.counterpoint import melody_rules

    events, tonic = melody_array(items)  # type: ignore[arg-type]
    return RuleScores(
        melody_rules.melody_step_rewards(events, tonic, weights),
        melody_rules.melody_violations(events, tonic),
        (events >= 2).sum(axis=1),
    )
