"""Which partial counterpoints can still be finished without breaking a hard rule, and the
reward shaping that tells every note about it.

Many of the hard rules are met or broken by the notes *after* a choice: after a leap the next
note must turn back by step, the penultimate note must allow a cadence by step onto the final
octave, a third run must end before its fourth third. A note's own rule reward does not see
this; the tuned policy learns it only from sampled returns. The first-species rules read at
most four notes, a flag at note j depends on the counterpoint's notes j-3..j (and the cantus)
(``parallel_run``: three thirds or sixths in similar motion arriving at j), so whether notes
t+1.. can still be written clean depends on the last three notes only. :func:`solve` answers
that for every such window by dynamic programming backwards over the cantus, with the rules
themselves (``rules.violations`` on the four-note windows, or on whole pieces for rules of the
user's) as the oracle.

:func:`shaped_rewards` adds potential-based shaping (Ng, Harada & Russell 1999,
"Policy invariance under reward transformations"): r'_t = r_t + Φ(s_{t+1}) − Φ(s_t) with
Φ(s) = −κ·[no clean completion exists from s] and Φ = 0 once the piece is complete. A piece's
shaped return differs from its rule return by −Φ(s_0), a constant of its prompt, so the
objective and its optimum are unchanged (the KL-regularised one too); what changes is that a
note that leads into a dead end is charged κ at that note, where ``credit: all_actions`` sees it
for every candidate note without sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tasks.counterpoint.piece import FirstSpeciesBatch
from tasks.counterpoint.rules import RULES_BY_NAME, SOFT_RULES, Rule, violations

WINDOW = 4  # a flag at note j reads the counterpoint's notes j-3..j
# Rules whose flag at note j reads the counterpoint's note j alone (with the cantus and the piece's
# length): a clean piece uses at note j only pitches that pass them, so the search starts there.
VERTICAL = frozenset({"dissonance", "voice_crossing", "voice_range", "outside_mode", "middle_unison", "bad_start", "bad_end"})


@dataclass(frozen=True)
class Lookahead:
    """The solved cantus: ``cands[i]`` [k_i] the counterpoint pitches note i may take (those that
    pass the vertical rules there); ``feasible[i]`` bool [k_{i-2}, k_{i-1}, k_i] (axes of size 1
    before note 0): notes i+1.. can be written breaking no hard rule after these three notes;
    ``start``: a clean piece exists at all; ``slots`` [N, 129]: row i each MIDI pitch's position in
    ``cands[i]`` (-1 where it is not one; entry 128 stands for anything out of range).
    ``flat``, ``offsets`` and ``dims`` hold the same ``feasible`` tables raveled into one array
    (table i at ``offsets[i]``, shape ``dims[i]``) for :func:`shaped_rewards`, which reads every
    note of a piece in one gather."""

    cands: tuple[np.ndarray, ...]
    feasible: tuple[np.ndarray, ...]
    start: bool
    slots: np.ndarray  # [N, 129] int64
    flat: np.ndarray  # [Σ_i |feasible[i]|] bool
    offsets: np.ndarray  # [N] int64
    dims: np.ndarray  # [N, 3] int64

    def index(self, i: int, pitches: np.ndarray) -> np.ndarray:
        """Position of each pitch in ``cands[i]`` (-1 where it is not a candidate); index 0 before note 0."""
        if i < 0:
            return np.zeros(np.shape(pitches), dtype=np.int64)
        return self.slots[i][np.clip(pitches, 0, 128)]

    def potential_after(self, i: int, prev2: int, prev1: int, pitches: np.ndarray) -> np.ndarray:
        """[A] bool: notes i+1.. can be written clean after notes i-2, i-1 = prev2, prev1 and note i = each of ``pitches``."""
        if i == len(self.cands) - 1:
            return np.ones(len(pitches), dtype=bool)  # the piece is complete
        x, y, z = self.index(i - 2, np.array(prev2)), self.index(i - 1, np.array(prev1)), self.index(i, pitches)
        if x < 0 or y < 0:
            return np.zeros(len(pitches), dtype=bool)
        out = np.zeros(len(pitches), dtype=bool)
        ok = z >= 0
        out[ok] = self.feasible[i][x, y, z[ok]]
        return out


def _hard(rules: Sequence[Rule]) -> list[Rule]:
    return [r for r in rules if r.name not in SOFT_RULES]


def _flags(cantus: np.ndarray, cps: np.ndarray, below: bool, final: int, rules: Sequence[Rule], after: int | np.ndarray = 0) -> np.ndarray:
    """[P, n] bool: any of ``rules`` broken at each note of the pieces ``cps`` [P, n] over ``cantus``
    ([n], or [P, n] one per piece); ``after``: how many notes each piece has past its n columns
    (0: the pieces are whole), so that the rules reading the end of a piece see where it is."""
    P, n = cps.shape
    if P == 0:
        return np.zeros((0, n), dtype=bool)
    lengths = n + np.broadcast_to(np.asarray(after, dtype=np.int64), (P,))
    batch = FirstSpeciesBatch(np.broadcast_to(cantus, (P, n)).copy(), cps, np.full(P, below), np.full(P, final % 12), lengths)
    v = violations(batch, rules)
    return np.logical_or.reduce(list(v.values())) if v else np.zeros((P, n), dtype=bool)


def _valid_windows(cf: np.ndarray, cands: tuple[np.ndarray, ...], fill: np.ndarray, below: bool, final: int, hard: Sequence[Rule]) -> list[np.ndarray]:
    """valid[j]: bool [k_{j-3}, k_{j-2}, k_{j-1}, k_j] (axes of size 1 before note 0): note j breaks
    no hard rule after the window of notes j-3..j (``cands`` pass the VERTICAL rules at their note
    by construction, so only the others are evaluated).

    The built-in rules of the others read, at note j, the notes j-3..j of both voices, whether j is
    the first, second-to-last or last note, and nothing else: they are evaluated on the four-note
    window alone (a window piece whose length puts its last column at note j's distance from the
    end), all windows of the cantus in one batch. Rules of yours (``task.extra_rules``) may read
    the whole cantus: they see whole pieces, the window filled in from ``fill``."""
    N = len(cf)
    rest = [r for r in hard if r.name not in VERTICAL]
    own = [r for r in rest if RULES_BY_NAME.get(r.name) is r]  # the built-in ones
    extra = [r for r in rest if RULES_BY_NAME.get(r.name) is not r]
    axes = [[cands[i] if i >= 0 else np.array([0]) for i in range(j - WINDOW + 1, j + 1)] for j in range(N)]
    grids = [np.stack(np.meshgrid(*a, indexing="ij"), -1).reshape(-1, WINDOW) for a in axes]  # [P_j, 4]
    ok = [np.ones(len(g), dtype=bool) for g in grids]
    for j in range(min(WINDOW - 1, N)):  # the first notes' windows are the pieces' own beginnings
        ok[j] &= ~_flags(cf[: j + 1], grids[j][:, WINDOW - 1 - j :], below, final, own, N - j - 1)[:, j]
    late = list(range(WINDOW - 1, N))  # the other windows, four notes each, in one batch
    if late and own:
        P = [len(grids[j]) for j in late]
        cps = np.concatenate([grids[j] for j in late])  # [Σ P_j, 4]
        cfs = np.repeat(np.stack([cf[j - WINDOW + 1 : j + 1] for j in late]), P, axis=0)
        after = np.repeat(np.array([N - 1 - j for j in late]), P)
        flags = _flags(cfs, cps, below, final, own, after)[:, WINDOW - 1]
        for j, part in zip(late, np.split(~flags, np.cumsum(P)[:-1])):
            ok[j] &= part
    for j in range(N if extra else 0):
        cps = np.repeat(fill[None, :], len(grids[j]), axis=0)
        for w in range(WINDOW):
            if j - WINDOW + 1 + w >= 0:
                cps[:, j - WINDOW + 1 + w] = grids[j][:, w]
        ok[j] &= ~_flags(cf, cps, below, final, extra)[:, j]
    return [o.reshape([len(x) for x in a]) for o, a in zip(ok, axes)]


def solve(cantus: Sequence[int], below: bool, final: int, intervals: Sequence[int], rules: Sequence[Rule]) -> Lookahead:
    """Solve one cantus firmus: candidates per note, then ``feasible`` backwards from the last note.

    ``intervals`` are the counterpoint's possible signed distances to the cantus (the action
    space); ``rules`` the task's rules (soft ones are ignored)."""
    cf = np.asarray(cantus, dtype=np.int64)
    N = len(cf)
    hard = _hard(rules)
    iv = np.asarray(intervals, dtype=np.int64)
    pitches = cf[None, :] + iv[:, None]  # [A, N]: the same interval at every note
    inside = (pitches >= 0) & (pitches <= 127)
    vert = [r for r in hard if r.name in VERTICAL]
    bad = _flags(cf, np.clip(pitches, 0, 127), below, final, vert) | ~inside
    cands = tuple(np.unique(pitches[~bad[:, i], i]) for i in range(N))
    fill = np.array([c[0] if len(c) else cf[i] for i, c in enumerate(cands)])
    valid = _valid_windows(cf, cands, fill, below, final, hard)
    feasible: list[np.ndarray] = [np.zeros(0, dtype=bool)] * N
    shape = lambda i: [len(cands[k]) if k >= 0 else 1 for k in (i - 2, i - 1, i)]  # noqa: E731
    feasible[N - 1] = np.ones(shape(N - 1), dtype=bool)
    for j in range(N - 1, 0, -1):  # notes j.. clean after the window ending at j-1
        feasible[j - 1] = (valid[j] & feasible[j][None]).any(-1).reshape(shape(j - 1))
    start = bool((valid[0].reshape(-1) & feasible[0].reshape(-1)).any())
    slots = np.full((N, 129), -1, dtype=np.int64)
    for slot, c in zip(slots, cands):
        slot[c] = np.arange(len(c))
    sizes = np.array([f.size for f in feasible], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    dims = np.array([f.shape for f in feasible], dtype=np.int64)
    flat = np.concatenate([f.ravel() for f in feasible])
    views = tuple(flat[o : o + n].reshape(tuple(d)) for o, n, d in zip(offsets, sizes, dims))  # the tables, sharing flat's memory (a solve is cached per cantus)
    return Lookahead(cands, views, start, slots, flat, offsets, dims)


def shaped_rewards(la: Lookahead, cp: Sequence[int], action_pitches: np.ndarray, kappa: float) -> tuple[np.ndarray, np.ndarray]:
    """The shaping terms of one piece: ``Φ(s_{t+1}(a)) − Φ(s_t)`` for every note t and action a
    ([N, A], ``action_pitches`` [N, A] the pitch action a writes at note t), and for the piece's
    own notes ([N]); Φ(s) = −κ·[no clean completion from s], 0 at the end of the piece.
    Every note at once: ``Lookahead.potential_after`` of each (t, pitch) is one gather from
    ``la.flat`` (tests/test_lookahead.py compares the two)."""
    N = len(la.cands)
    cp = np.asarray(cp, dtype=np.int64)
    t = np.arange(N)
    slots = la.slots  # [N, 129]
    own_slot = slots[t, np.clip(cp, 0, 128)]  # [N] each note's position among its candidates
    # notes t-2 and t-1 as indices into feasible[t] (0 before the first note: axes of size 1)
    x = np.where(t >= 2, np.concatenate([[0, 0], own_slot[: N - 2]])[:N], 0)
    y = np.where(t >= 1, np.concatenate([[0], own_slot[: N - 1]])[:N], 0)
    z = slots[t[:, None], np.clip(np.concatenate([action_pitches, cp[:, None]], 1), 0, 128)]  # [N, A + 1]
    d1, d2 = la.dims[:, 1:2], la.dims[:, 2:3]  # [N, 1]
    idx = la.offsets[:, None] + (x[:, None] * d1 + y[:, None]) * d2 + np.maximum(z, 0)
    ok = (x >= 0)[:, None] & (y >= 0)[:, None] & (z >= 0) & la.flat[np.clip(idx, 0, len(la.flat) - 1)]
    ok[N - 1] = True  # the piece is complete
    phi = np.where(ok, 0.0, -kappa)  # [N, A + 1]: Φ(s_{t+1}) after each action, then after the piece's own note
    phi_before = np.concatenate([[0.0 if la.start else -kappa], phi[: N - 1, -1]])  # Φ(s_t)
    return phi[:, :-1] - phi_before[:, None], phi[:, -1] - phi_before
