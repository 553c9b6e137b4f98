"""Generated cantus firmi: thousands of distinct valid melodies for RL prompts, none of them Fux's.

Fux's own cantus firmi (:data:`tasks.counterpoint.cantus.FUX_CANTUS_FIRMI`) are held out for
evaluation, so training needs other prompts. :func:`generate_melodies` writes them by a
randomized depth-first search over the notes of a mode, pruning every partial melody by the
local rules below and backtracking from dead ends, so each search ends in a valid melody
(or proves that none is left) without blind rejection sampling.

The cantus rules (the names :func:`cantus_violations` returns), from the usual cantus-firmus
sources: Fux, *Gradus ad Parnassum* (1725), Part I ch. 1; Jeppesen, *Counterpoint* (1939),
the melodic rules of the Palestrina style; Salzer & Schachter, *Counterpoint in Composition*
(1969), ch. 1, "the cantus firmus". Intervals are counted in semitones, as in ``rules.py``: a
*step* is 1 or 2 semitones, a *leap* more than 4 (``LEAP_THRESHOLD``: a fourth or larger).

1. ``length``: 8 to 16 notes (the usual textbook bounds; Fux's own have 9 to 14).
2. ``in_mode``: every note is in the mode's diatonic collection on the final, the last note's
   pitch class; no chromatic notes (Fux's cantus firmi have no accidentals).
3. ``starts_on_final``: the first note is the final (same pitch class) (Fux, Jeppesen).
   ``ends_on_final``: the last note is reached by step, from the 2nd degree above (descending)
   or from the 7th degree below when that is 1-2 semitones away (ascending) (Fux, Jeppesen).
   (The final *is* the last note's pitch class, so this rule judges the approach.)
4. ``bad_interval``: melodic intervals are steps, thirds, the perfect fourth and fifth, the
   ascending minor sixth and the octave. No repeated note, tritone, descending or major sixth,
   seventh, or anything beyond the octave (Jeppesen; Fux ch. 1).
5. ``mostly_stepwise``: at least 60% of the moves are steps (Salzer & Schachter, Jeppesen:
   mainly conjunct motion, leaps the exception; the 60% is this module's threshold).
6. ``unrecovered_leap``: a leap is followed by a step in the opposite direction (Jeppesen;
   the rule ``rules.py`` applies to the counterpoint). A leap into the last note has no
   next move; rule 3 already forbids it.
7. ``climax``: a single climax: the highest note occurs once and is neither the first nor the
   last note (Salzer & Schachter).
8. ``range``: highest minus lowest is at most 16 semitones (a tenth, the usual textbook limit;
   Fux's own span at most an octave) and at least 5 (a fourth, so that the melody goes
   somewhere).
9. ``same_direction``: at most 4 consecutive moves in the same direction (a longer run is a
   scale passage, not a cantus line).
10. ``consecutive_leaps``: no two leaps in a row. Rule 6 implies it (the move after a leap is
    a step), so it never breaks alone; it names what is wrong with e.g. D A E.

The generator also keeps every note between a fifth below and an octave above the final (the
bounds of Fux's own: fux-e dips a fifth below its final, fux-g spans the octave above). That
is a register choice, not a rule: at the home registers of :data:`HOME_FINAL` it bounds every
generated pitch, transposed by -5..+6 semitones, to MIDI 42..82.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from tasks.counterpoint.cantus import FUX_CANTUS_FIRMI, parse_note_names
from tasks.counterpoint.rules import LEAP_THRESHOLD

# Semitones above the final of each mode's seven degrees: the six modes of Fux's cantus firmi,
# on the white-note finals D E F G A C (there is none on B, whose fifth is a tritone).
MODES: dict[str, tuple[int, ...]] = {
    "dorian": (0, 2, 3, 5, 7, 9, 10),
    "phrygian": (0, 1, 3, 5, 7, 8, 10),
    "lydian": (0, 2, 4, 6, 7, 9, 11),
    "mixolydian": (0, 2, 4, 5, 7, 9, 10),
    "aeolian": (0, 2, 3, 5, 7, 8, 10),
    "ionian": (0, 2, 4, 5, 7, 9, 11),
}
# Each mode's final at the octave of Fux's cantus firmus on it (FUX_CANTUS_FIRMI): D4, E4, F3,
# G3, A3, C4. All six are white notes, so every generated melody is too at home register.
HOME_FINAL: dict[str, int] = {
    "dorian": 62,
    "phrygian": 64,
    "lydian": 53,
    "mixolydian": 55,
    "aeolian": 57,
    "ionian": 60,
}

CANTUS_RULES: tuple[str, ...] = (
    "length",
    "in_mode",
    "starts_on_final",
    "ends_on_final",
    "bad_interval",
    "mostly_stepwise",
    "unrecovered_leap",
    "climax",
    "range",
    "same_direction",
    "consecutive_leaps",
)

MIN_NOTES, MAX_NOTES = 8, 16
ALLOWED_MOVES = frozenset({1, 2, 3, 4, 5, 7, 12, -1, -2, -3, -4, -5, -7, -12, 8})  # +8: m6 up only
MIN_STEP_FRACTION = (3, 5)  # at least 3/5 = 60% of the moves are steps (exact integer test)
MAX_RANGE, MIN_RANGE = 16, 5  # a tenth, a fourth
MAX_SAME_DIRECTION = 4
BELOW_FINAL, ABOVE_FINAL = 7, 12  # the generator's register around the final (not a rule)
# How much more readily the generator tries each move size (absolute semitones) than a leap of
# a fourth. With all moves alike the search spends its whole leap allowance: of 6000 melodies,
# 42% had an octave leap, and 65% of the moves were steps and 12% thirds. With these weights:
# 19%, 69% and 18%, nearer Fux's own cantus firmi (mostly steps, then thirds, rare big leaps).
MOVE_WEIGHT: dict[int, float] = {1: 4.0, 2: 4.0, 3: 2.0, 4: 2.0, 5: 1.0, 7: 0.7, 8: 0.5, 12: 0.3}


@dataclass(frozen=True)
class Cantus:
    """A cantus firmus: a unique ``name``, MIDI ``pitches`` and its ``mode`` (a key of MODES)."""

    name: str
    pitches: tuple[int, ...]
    mode: str

    @property
    def final(self) -> int:
        """Pitch class of the last note, the modal final."""
        return self.pitches[-1] % 12

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"{self.name}: unknown mode {self.mode!r}; expected one of {sorted(MODES)}")
        if not self.pitches:
            raise ValueError(f"{self.name}: a cantus needs at least one note")

    @property
    def intervals(self) -> tuple[int, ...]:
        """Signed melodic intervals in semitones: the melody up to transposition."""
        return _intervals(self.pitches)


def _intervals(pitches: Sequence[int]) -> tuple[int, ...]:
    return tuple(b - a for a, b in zip(pitches, pitches[1:]))


def _is_step(d: np.ndarray) -> np.ndarray:
    return (np.abs(d) >= 1) & (np.abs(d) <= 2)


def _min_steps(moves: int) -> int:
    """Fewest steps among ``moves`` moves that make at least 60%: ceil(3 * moves / 5)."""
    num, den = MIN_STEP_FRACTION
    return (num * moves + den - 1) // den


def _penultimate_moves(mode: str) -> tuple[int, ...]:
    """Moves (penultimate -> final) that end a cantus by step: down from the 2nd degree, or up
    from the 7th degree below when it lies a step below the final (in all six modes it does)."""
    degrees = MODES[mode]
    below = 12 - degrees[6]
    return (-degrees[1],) + ((below,) if 1 <= below <= 2 else ())


def cantus_violations(
    pitches: Sequence[int], mode: str, *, min_notes: int = MIN_NOTES, max_notes: int = MAX_NOTES
) -> list[str]:
    """Names of the cantus rules (module docstring) that ``pitches`` breaks; [] for a valid cantus.

    Names come in the order of :data:`CANTUS_RULES`. An empty melody breaks only ``length``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(MODES)}")
    p = np.asarray(pitches, dtype=np.int64)
    n = len(p)
    if n == 0:
        return ["length"]
    d = np.diff(p)
    a = np.abs(d)
    leap = a > LEAP_THRESHOLD
    final = int(p[-1]) % 12
    out = []
    if not min_notes <= n <= max_notes:
        out.append("length")
    if not np.isin((p - final) % 12, MODES[mode]).all():
        out.append("in_mode")
    if p[0] % 12 != final:
        out.append("starts_on_final")
    if n < 2 or int(d[-1]) not in _penultimate_moves(mode):
        out.append("ends_on_final")
    if not all(int(x) in ALLOWED_MOVES for x in d):
        out.append("bad_interval")
    if int(_is_step(d).sum()) < _min_steps(len(d)):
        out.append("mostly_stepwise")
    # The move after a leap must be a step with the other sign (a leap into the last note
    # has no next move and is left to ends_on_final).
    recovered = _is_step(d[1:]) & (np.sign(d[1:]) == -np.sign(d[:-1]))
    if (leap[:-1] & ~recovered).any():
        out.append("unrecovered_leap")
    hi = p.max()
    if (p == hi).sum() != 1 or p[0] == hi or p[-1] == hi:
        out.append("climax")
    if not MIN_RANGE <= hi - p.min() <= MAX_RANGE:
        out.append("range")
    if _longest_run(np.sign(d)) > MAX_SAME_DIRECTION:
        out.append("same_direction")
    if (leap[:-1] & leap[1:]).any():
        out.append("consecutive_leaps")
    return out


def _longest_run(signs: np.ndarray) -> int:
    """Length of the longest run of equal non-zero signs (a repeated note breaks a run)."""
    best = run = 0
    prev = 0
    for s in signs.tolist():
        run = run + 1 if s != 0 and s == prev else (1 if s != 0 else 0)
        prev = s
        best = max(best, run)
    return best


# ------------------------------------------------------------------------------- generator


@dataclass(frozen=True)
class _ModeGraph:
    """The moves a cantus in one mode may make, at its home register, for melodies of up to
    ``max_notes`` notes.

    ``nexts[p]``: the pitches reachable from ``p`` by an allowed interval (all in the mode and
    in the generator's register), each with the inverse of its :data:`MOVE_WEIGHT`.
    ``peak[k][b]``: for each pitch ``p`` from which the final can be reached in exactly ``k``
    allowed moves with at most ``b`` of them other than steps, the last by the cadential step,
    the highest note such a path can visit after ``p`` (-1 for ``k = 0``); pitches with no such
    path are absent.
    """

    final: int
    nexts: dict[int, tuple[tuple[int, float], ...]]  # p -> ((q, 1 / weight of q - p), ...)
    peak: tuple[tuple[dict[int, int], ...], ...]


def _mode_graph(mode: str, max_notes: int) -> _ModeGraph:
    final = HOME_FINAL[mode]
    pcs = {(final + s) % 12 for s in MODES[mode]}
    notes = [q for q in range(final - BELOW_FINAL, final + ABOVE_FINAL + 1) if q % 12 in pcs]
    nexts = {
        p: tuple((q, 1.0 / MOVE_WEIGHT[abs(q - p)]) for q in notes if q - p in ALLOWED_MOVES) for p in notes
    }
    budgets = range(max_notes)  # more non-steps than moves never matters
    cadence = {final - m: final for m in _penultimate_moves(mode)}
    peak = [tuple({final: -1} for _ in budgets), tuple(dict(cadence) for _ in budgets)]
    for _ in range(2, max_notes):
        prev, level = peak[-1], []
        for b in budgets:
            best: dict[int, int] = {}
            for p in notes:
                for q, _ in nexts[p]:
                    cost = abs(q - p) > 2
                    if b >= cost and q in prev[b - cost]:
                        best[p] = max(best.get(p, -1), q, prev[b - cost][q])
            level.append(best)
        peak.append(tuple(level))
    return _ModeGraph(final, nexts, tuple(peak))


def _walk(
    g: _ModeGraph, n: int, rng: random.Random, taken: set[tuple[int, ...]], skipped: list[int]
) -> Iterator[tuple[int, ...]]:
    """Every valid melody of ``n`` notes from the final to the final whose intervals are not in
    ``taken``, in randomized depth-first order; ``skipped[0]`` counts the taken ones passed.

    Each partial melody is checked by the rules that a prefix can already break (intervals,
    leap recovery and consecutive leaps, direction runs, range so far) and by what the rest
    must still do: reach the cadence within the step quota (``g.peak``), and, while the highest
    note so far is not unique (or is the final, which returns at the end), still climb above it.
    Without that last test the search can spend seconds below a doubled peak it cannot undo.
    The lower range bound and the intervals' novelty are checked on the whole melody.
    """
    max_nonsteps = (n - 1) - _min_steps(n - 1)
    notes = [g.final]

    def extend(
        prev: int, run: int, nonsteps: int, lo: int, hi: int, hi_count: int
    ) -> Iterator[tuple[int, ...]]:
        # prev: the last move (0 before the first); run: moves in its direction so far;
        # lo, hi: lowest and highest note so far; hi_count: how often hi occurs
        i = len(notes)  # index of the note to place
        p = notes[-1]
        if i == n:
            # first == last == final, so a unique highest note is neither first nor last
            if hi_count == 1 and hi - lo >= MIN_RANGE:
                if _intervals(notes) in taken:
                    skipped[0] += 1
                else:
                    yield tuple(notes)
            return
        # weighted random order without replacement (Efraimidis & Spirakis 2006): sort by u**(1/w)
        order = sorted(g.nexts[p], key=lambda qw: rng.random() ** qw[1], reverse=True)
        for q, _ in order:
            d = q - p
            big = abs(d) > 2
            if abs(prev) > LEAP_THRESHOLD and (big or (d > 0) == (prev > 0)):
                continue  # a leap must be answered by a step back (also: no two leaps)
            r = run + 1 if (d > 0) == (prev > 0) and prev != 0 else 1
            budget = max_nonsteps - nonsteps - big
            if r > MAX_SAME_DIRECTION or budget < 0:
                continue
            future = g.peak[n - 1 - i][budget].get(q)
            if future is None:
                continue  # the cadence is out of reach
            nlo, nhi = min(lo, q), max(hi, q)
            count = 1 if q > hi else hi_count + (q == hi)
            if nhi - nlo > MAX_RANGE or ((count > 1 or nhi == g.final) and future <= nhi):
                continue
            notes.append(q)
            yield from extend(d, r, nonsteps + big, nlo, nhi, count)
            notes.pop()

    return extend(0, 0, 0, g.final, g.final, 1)


def _fux_intervals() -> frozenset[tuple[int, ...]]:
    """The intervals of every Fux cantus firmus: a melody with these is Fux's, transposed."""
    return frozenset(_intervals(parse_note_names(text)) for text in FUX_CANTUS_FIRMI.values())


class _Cell:
    """The source of new melodies of one mode and length.

    Each draw is a fresh randomized search (a restart, so consecutive melodies share no
    prefix). Once a draw has to pass ``POOL_AFTER`` taken melodies the cell is nearly used up
    and restarts would each walk most of its tree, so it lists all its remaining melodies once,
    shuffled, and serves them from that pool.
    """

    POOL_AFTER = 20

    def __init__(self, mode: str, graph: _ModeGraph, n: int, taken: set[tuple[int, ...]]):
        self.mode, self.graph, self.n, self.taken = mode, graph, n, taken
        self.pool: list[tuple[int, ...]] | None = None

    def draw(self, rng: random.Random) -> tuple[int, ...] | None:
        if self.pool is None:
            skipped = [0]
            pitches = next(_walk(self.graph, self.n, rng, self.taken, skipped), None)
            if pitches is None or skipped[0] < self.POOL_AFTER:
                return pitches
            self.taken.add(_intervals(pitches))
            self.pool = list(_walk(self.graph, self.n, rng, self.taken, [0]))
            rng.shuffle(self.pool)
            return pitches
        while self.pool:  # another mode's cell may have taken a melody since the pool was listed
            pitches = self.pool.pop()
            if _intervals(pitches) not in self.taken:
                return pitches
        return None


def generate_melodies(
    n: int, seed: int, *, min_notes: int = MIN_NOTES, max_notes: int = MAX_NOTES
) -> list[Cantus]:
    """``n`` distinct valid melodies (distinct: different intervals, so no melody is a
    transposition of another, even in another mode), deterministic
    from ``seed``.

    Melodies take the (mode, length) cells in turn: the six modes for ``min_notes`` notes, the
    six for ``min_notes + 1``, ... up to ``max_notes``, then round again; a cell with no new
    melody left is skipped from then on. Each starts and ends on its mode's
    :data:`HOME_FINAL`. None has the intervals of a Fux cantus firmus (so none is a
    transposition of one). The list for a smaller ``n`` is a prefix of the list for a larger
    one. Names are ``gen-<mode>-<k>``, ``k`` counting within the mode. Raises ``ValueError``
    when fewer than ``n`` melodies exist with these lengths.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 2 <= min_notes <= max_notes:
        raise ValueError(f"need 2 <= min_notes <= max_notes, got {min_notes}, {max_notes}")
    rng = random.Random(seed)
    fux = _fux_intervals()
    # the intervals already used, shared by all modes: the same intervals in two modes are one
    # melody transposed (its notes fit both collections); Fux's are excluded from the start
    shared = set(fux)
    taken = dict.fromkeys(MODES, shared)
    graphs = {m: _mode_graph(m, max_notes) for m in MODES}
    cells = [_Cell(m, graphs[m], k, taken[m]) for k in range(min_notes, max_notes + 1) for m in MODES]
    count = dict.fromkeys(MODES, 0)
    out: list[Cantus] = []
    i = 0
    while len(out) < n:
        if not cells:
            raise ValueError(
                f"only {len(out)} distinct valid melodies of {min_notes}..{max_notes} notes "
                f"exist (excluding Fux's); asked for {n}: widen the length range or ask for fewer"
            )
        i %= len(cells)
        mode, pitches = cells[i].mode, cells[i].draw(rng)
        if pitches is None:
            del cells[i]  # exhausted; the next cell moves into slot i
            continue
        taken[mode].add(_intervals(pitches))
        out.append(Cantus(f"gen-{mode}-{count[mode]:04d}", pitches, mode))
        count[mode] += 1
        i += 1
    return out


def transpose(c: Cantus, semitones: int) -> Cantus:
    """``c`` moved by ``semitones``; the name gets a ``+k``/``-k`` suffix for ``k != 0``
    (appended, so transposing twice gives e.g. ``gen-dorian-0007+3-1``)."""
    if semitones == 0:
        return c
    pitches = tuple(p + semitones for p in c.pitches)
    if min(pitches) < 0 or max(pitches) > 127:
        raise ValueError(f"{c.name} transposed by {semitones:+d} leaves MIDI 0..127")
    return Cantus(f"{c.name}{semitones:+d}", pitches, c.mode)


def _unit_hash(c: Cantus, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, intervals), the same in every process (unlike
    Python's salted ``hash``). Not the mode: the same intervals in two modes are one melody."""
    key = f"{seed}|{','.join(map(str, c.intervals))}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2.0**64


def split_melodies(
    melodies: Sequence[Cantus], heldout_fraction: float, seed: int
) -> tuple[list[Cantus], list[Cantus]]:
    """(train, heldout), split by melody: a melody is held out when the hash of (seed,
    intervals) falls below ``heldout_fraction``.

    A melody's side depends on nothing else, so its transpositions go with it, and growing the
    pool keeps every earlier melody on its side. Order within each side is the input order.
    """
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    train, heldout = [], []
    for c in melodies:
        (heldout if _unit_hash(c, seed) < heldout_fraction else train).append(c)
    return train, heldout
