"""One entry point for the rule rewards of both modes: per-step rewards and violation masks.

This is the counterpoint task's ``RewardFn``: pieces in, a per-step reward [B, T] out
(a note's reward sits on the step that wrote it), plus the violations behind it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import numpy as np

from rlhf.errors import UserError
from rlhf.registry import load_object
from tasks.counterpoint.piece import FirstSpeciesBatch, FirstSpeciesPiece, Melody

Mode = Literal["first_species", "melody"]


def soft_rule_names(mode: Mode) -> frozenset[str]:
    """Rules that express a preference (always somewhat violated), not a prohibition."""
    if mode == "first_species":
        from tasks.counterpoint.rules import SOFT_RULES

        return frozenset(SOFT_RULES)
    return frozenset()


def rule_names(mode: Mode) -> list[str]:
    return [r.name for r in mode_rules(mode)]


def mode_rules(mode: Mode, extra: Sequence[str] = ()) -> list:
    """The rules of ``mode``; first species adds ``extra`` (import paths of Rule objects)."""
    if mode != "first_species":
        from tasks.counterpoint.melody_rules import MELODY_RULES

        return list(MELODY_RULES)
    from tasks.counterpoint.rules import FIRST_SPECIES_RULES, Rule

    out = list(FIRST_SPECIES_RULES)
    for path in extra:
        rule = load_object(path, "rule")
        if not isinstance(rule, Rule):
            raise UserError(f"{path} is a {type(rule).__name__}, not a tasks.counterpoint.rules.Rule(name, weight, doc, fn)")
        if rule.name in {r.name for r in out}:
            raise UserError(f"{path}: a rule named {rule.name!r} exists already; give yours another name")
        out.append(rule)
    return out


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


def score(mode: Mode, items: Sequence[FirstSpeciesPiece] | Sequence[Melody], weights: Mapping[str, float] | None = None,
          rules_: Sequence | None = None) -> RuleScores:
    """Rule scores of ``items``; ``rules_`` = the first-species rules to apply (default: the built-in ones)."""
    if mode == "first_species":
        from tasks.counterpoint import rules

        batch = FirstSpeciesBatch.from_pieces(items)  # type: ignore[arg-type]
        chosen = rules.FIRST_SPECIES_RULES if rules_ is None else rules_
        viol = rules.violations(batch, chosen)
        return RuleScores(rules.weighted_step_rewards(viol, weights, chosen, batch.cantus.shape), viol, batch.lengths.copy(), soft_rule_names(mode))
    from tasks.counterpoint import melody_rules

    events, tonic = melody_array(items)  # type: ignore[arg-type]
    return RuleScores(
        melody_rules.melody_step_rewards(events, tonic, weights),
        melody_rules.melody_violations(events, tonic),
        (events >= 2).sum(axis=1),
    )
