"""First-species counterpoint rules (Fux, *Gradus ad Parnassum*, 1725, Part I ch. 1) as
batched numpy rewards over :class:`FirstSpeciesBatch`.

Each rule is a named, weighted function ``[B, N] pitches -> [B, N] bool`` that is True at the
note position where the rule is broken (a motion rule at the second note of the motion, a
leap rule at the note the leap or its continuation arrives on). Padding is never True.
The step reward is ``r[b, i] = -sum_r w_r * violated_r[b, i]`` (0 = faultless note), the role
the music-theory reward ``r_MT`` plays in Jaques et al. 2017, "Sequence Tutor", sec. 5.

Conventions, shared by all rules:

- Intervals are counted in semitones from MIDI numbers, so they carry no spelling: an
  augmented fourth and a diminished fifth are both 6, an augmented second is 3. Vertical
  intervals are taken as absolute distances ``|upper - lower|`` (a fifth stays a fifth when
  the voices cross); their class is ``distance % 12``.
- Consonances (Fux ch. 1): P1, m3, M3, P5, m6, M6, P8 and their compounds; the fourth is a
  dissonance in two voices. Perfect consonances: P1, P5, P8 (and compounds).
- Motion (Fux ch. 1, the four rules of motion) between notes ``i-1`` and ``i``, see
  :func:`motion_types`: contrary, similar, parallel (similar motion keeping the same generic
  interval, as music21's ``VoiceLeadingQuartet.parallelMotion``), oblique, none.
- A *step* is 1 or 2 semitones; a *leap* is more than 4 semitones (a fourth or larger), so
  thirds move freely, as in Fux's own counterpoints.
- The mode (rule ``outside_mode``) is read from the cantus, not from ``final`` alone: see
  :func:`mode_pitch_classes`.

Hard rules weigh 1.0 (0.5 for ``unrecovered_leap`` and ``parallel_run``, which Fux treats as
strong preferences); the two soft rules in ``SOFT_RULES`` weigh 0.1. Fux's own solutions
break ``unrecovered_leap`` often (leaps answered by a third or a repeated note); the tests
list every such place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from tasks.counterpoint.piece import FirstSpeciesBatch

# Motion codes of motion_types(); the motion at position i is the move from note i-1 to note i.
UNDEFINED = -1  # position 0 (no previous note) and padding
NO_MOTION = 0  # both voices repeat their note
OBLIQUE = 1  # one voice holds, the other moves
CONTRARY = 2  # the voices move in opposite directions
SIMILAR = 3  # same direction, generic interval changes (e.g. third -> fifth)
PARALLEL = 4  # same direction, same generic interval (e.g. m3 -> M3)
MOTION_NAMES: dict[int, str] = {
    UNDEFINED: "undefined",
    NO_MOTION: "no_motion",
    OBLIQUE: "oblique",
    CONTRARY: "contrary",
    SIMILAR: "similar",
    PARALLEL: "parallel",
}

CONSONANT_CLASSES = frozenset({0, 3, 4, 7, 8, 9})  # P1/P8, m3, M3, P5, m6, M6 (mod 12)
PERFECT_CLASSES = frozenset({0, 7})
LEAP_THRESHOLD = 4  # semitones; a melodic move larger than this is a leap
MAX_VOICE_DISTANCE = 16  # semitones, a major tenth: the widest space between the voices (voice_range)
MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)
MAX_PITCH = 127  # MIDI

# Lookup tables indexed by a vertical distance |upper - lower| in semitones (0..127), so that
# each note costs one table lookup instead of several modulo operations (the hot path).
_CONSONANT, _PERFECT, _OCTAVE, _FIFTH, _THIRD, _SIXTH, _UNISON = (1 << k for k in range(7))
_GENERIC_SHIFT = 7  # bits 7.. hold the doubled generic size, see _interval_features


def _interval_features() -> np.ndarray:
    """[128] int16 bit flags of each vertical distance, plus its generic size above bit 7.

    The generic size (steps of the diatonic scale, compound: 7 per octave) is doubled so
    that the tritone, which is A4 or d5 depending on spelling, gets a class of its own.
    """
    d = np.arange(MAX_PITCH + 1)
    cls = d % 12
    generic2 = np.array([0, 2, 2, 4, 4, 6, 7, 8, 10, 10, 12, 12])[cls] + 14 * (d // 12)
    flags = (
        _CONSONANT * np.isin(cls, list(CONSONANT_CLASSES))
        + _PERFECT * np.isin(cls, list(PERFECT_CLASSES))
        + _OCTAVE * (cls == 0)
        + _FIFTH * (cls == 7)
        + _THIRD * np.isin(cls, (3, 4))
        + _SIXTH * np.isin(cls, (8, 9))
        + _UNISON * (d == 0)
    )
    return (flags + (generic2 << _GENERIC_SHIFT)).astype(np.int16)


def _collection_mask(pcs: Sequence[int]) -> int:
    """12-bit mask with bit p set for each pitch class p."""
    return sum(1 << pc for pc in {p % 12 for p in pcs})


_FEATURES = _interval_features()
_PC_BIT = (1 << (np.arange(MAX_PITCH + 1) % 12)).astype(np.int16)  # [128] pitch -> class bit
_DIATONIC = [_collection_mask(k + s for s in MAJOR_SCALE) for k in range(12)]  # 12 white-note sets


def _mode_masks() -> np.ndarray:
    """[4096] int16: cantus pitch-class mask -> mask of the pitch classes of its mode, the
    union of the diatonic collections that contain it (itself if none does)."""
    m = np.arange(1 << 12)[:, None]  # [4096, 1]
    d = np.array(_DIATONIC)[None, :]  # [1, 12]
    fits = (m & ~d & 0xFFF) == 0  # [4096, 12]
    union = np.bitwise_or.reduce(np.where(fits, d, 0), axis=1)
    return np.where(fits.any(axis=1), union, m[:, 0]).astype(np.int16)


_MODE_MASK = _mode_masks()


def mode_pitch_classes(cantus: Sequence[int]) -> frozenset[int]:
    """The pitch classes outside_mode allows a counterpoint to ``cantus`` (MIDI pitches),
    apart from the cadential leading tone: every diatonic collection containing the cantus."""
    mask = int(_MODE_MASK[_collection_mask(cantus)])
    return frozenset(p for p in range(12) if mask >> p & 1)


@dataclass(frozen=True)
class Rule:
    """A named, weighted first-species rule; ``fn`` returns [B, N] bool violations."""

    name: str  # snake_case, used as metric key rules/<name>
    weight: float  # default weight in the total reward
    doc: str  # one-line description (Fux's rule)
    fn: Callable[[FirstSpeciesBatch], np.ndarray]  # -> [B, N] bool, padding never True


@dataclass(frozen=True)
class RuleReport:
    """One piece's violations as (rule name, 0-based note position), sorted by position."""

    violations: tuple[tuple[str, int], ...]
    reward: float

    def counts(self) -> dict[str, int]:
        """Number of violations per rule name (rules without violations are absent)."""
        out: dict[str, int] = {}
        for name, _ in self.violations:
            out[name] = out.get(name, 0) + 1
        return out


@dataclass(frozen=True)
class _Context:
    """Arrays every rule needs, computed once per batch. All [B, N] unless noted."""

    mask: np.ndarray  # bool, real notes
    moved: np.ndarray  # bool, real notes with a previous note (positions 1..L-1)
    first: np.ndarray  # bool, position 0 of non-empty pieces
    last: np.ndarray  # bool, position L-1
    penultimate: np.ndarray  # bool, position L-2
    inner: np.ndarray  # bool, positions 1..L-2
    cp: np.ndarray  # int16, counterpoint pitches (0 on padding)
    cf: np.ndarray  # int16, cantus pitches (0 on padding)
    dist: np.ndarray  # int16, the vertical distance |upper - lower| (0 on padding)
    feat: np.ndarray  # int16, _FEATURES of the vertical distance |upper - lower|
    prev_feat: np.ndarray  # int16, feat of the previous note (own value at i = 0)
    crossed: np.ndarray  # bool, upper < lower
    overlap: np.ndarray  # bool, a voice passes the other voice's previous note
    motion: np.ndarray  # int8 motion codes
    similar: np.ndarray  # bool, similar or parallel motion (music21's similarMotion)
    contrary: np.ndarray  # bool, contrary motion
    cp_move: np.ndarray  # int16, signed melodic interval cp[i] - cp[i-1] (0 at i = 0, padding)
    cantus_below: np.ndarray  # [B] bool
    final: np.ndarray  # [B] int pitch class


def _previous(x: np.ndarray) -> np.ndarray:
    """[B, N] -> [B, N] with column i holding column i-1 (column 0 repeats itself)."""
    out = np.empty_like(x)
    out[:, 1:] = x[:, :-1]
    out[:, :1] = x[:, :1]
    return out


def _has(x: np.ndarray, bits: int) -> np.ndarray:
    """[B, N] bool: any of ``bits`` set in the int16 flags ``x``."""
    return (x & bits) != 0


def _pitches(x: np.ndarray, mask: np.ndarray, what: str) -> np.ndarray:
    """[B, N] int16 MIDI pitches; padding set to 0; ValueError if a real note is not 0..127."""
    x = np.asarray(x)
    if x.size and (x.min() < 0 or x.max() > MAX_PITCH):
        bad = mask & ((x < 0) | (x > MAX_PITCH))
        if bad.any():
            b, i = map(int, np.argwhere(bad)[0])
            raise ValueError(f"{what}[{b}, {i}] = {x[b, i]} is not a MIDI pitch 0..{MAX_PITCH}")
        x = np.where(mask, x, 0)
    return x.astype(np.int16)


def _context(batch: FirstSpeciesBatch) -> _Context:
    """Derive positions, intervals and motion of ``batch`` once for all rules."""
    lengths = np.asarray(batch.lengths, dtype=np.int64)[:, None]  # [B, 1]
    pos = np.arange(np.shape(batch.cantus)[1])[None, :]  # [1, N]
    mask = pos < lengths
    moved = mask & (pos >= 1)
    cf = _pitches(batch.cantus, mask, "cantus")
    cp = _pitches(batch.counterpoint, mask, "counterpoint")
    below = np.asarray(batch.cantus_below, dtype=bool)
    up = np.where(below[:, None], cp, cf)
    lo = np.where(below[:, None], cf, cp)
    up_prev, lo_prev = _previous(up), _previous(lo)
    d = up - lo  # [B, N] signed vertical interval
    dist = np.abs(d)
    feat = _FEATURES.take(dist)
    prev_feat = _previous(feat)

    su, sl = np.sign(up - up_prev), np.sign(lo - lo_prev)
    together = su * sl  # 1 similar, -1 contrary, 0 oblique or no motion
    similar = moved & (together > 0)
    contrary = moved & (together < 0)
    oblique = moved & ((su == 0) != (sl == 0))
    # Parallel: the same signed generic interval before and after, as music21's
    # Interval(v1, v2).generic.directed (negative while the upper voice is above).
    same_generic = ((feat ^ prev_feat) >> _GENERIC_SHIFT) == 0
    parallel = similar & same_generic & ((d > 0) == (_previous(d) > 0))
    motion = (
        oblique.view(np.int8) * np.int8(OBLIQUE)
        + contrary.view(np.int8) * np.int8(CONTRARY)
        + similar.view(np.int8) * np.int8(SIMILAR)
        + parallel.view(np.int8)  # SIMILAR + 1 == PARALLEL
    )
    motion[~moved] = UNDEFINED
    return _Context(
        mask=mask,
        moved=moved,
        first=(pos == 0) & (lengths > 0),
        last=pos == lengths - 1,
        penultimate=pos == lengths - 2,
        inner=moved & (pos < lengths - 1),
        cp=cp,
        cf=cf,
        dist=dist,
        feat=feat,
        prev_feat=prev_feat,
        crossed=mask & (up < lo),
        overlap=moved & ((up < lo_prev) | (lo > up_prev)),
        motion=motion,
        similar=similar,
        contrary=contrary,
        cp_move=np.where(moved, cp - _previous(cp), np.int16(0)),
        cantus_below=below,
        final=np.asarray(batch.final, dtype=np.int64) % 12,
    )


def motion_types(batch: FirstSpeciesBatch) -> np.ndarray:
    """[B, N] int8 motion codes (UNDEFINED, NO_MOTION, OBLIQUE, CONTRARY, SIMILAR, PARALLEL).

    The code at position i classifies the move from note i-1 to note i, following music21's
    ``VoiceLeadingQuartet.motionType`` with v1 = upper voice: no motion (both repeat),
    oblique (one repeats), contrary (opposite directions), parallel (same direction and
    same signed generic interval, so M3 -> m3 is parallel but 3rd -> 10th is similar),
    similar (otherwise). The generic size comes from semitones, which is exact within one
    diatonic collection except for the tritone (A4 vs d5): two tritones count as parallel.
    Position 0 and padding are UNDEFINED.
    """
    return _context(batch).motion


# --- rules: each takes the shared _Context and returns [B, N] bool ---------------------------


def _dissonance(c: _Context) -> np.ndarray:
    """Fux: only consonances in first species; the fourth counts as a dissonance."""
    return c.mask & ~_has(c.feat, _CONSONANT)


def _parallel_fifths(c: _Context) -> np.ndarray:
    """Fux rule of motion 1: no perfect fifth (or twelfth) to fifth in similar motion."""
    return c.similar & _has(c.feat & c.prev_feat, _FIFTH)


def _parallel_octave_pairs(c: _Context) -> np.ndarray:
    """Similar motion from unison to unison, or from octave (compound) to octave (compound)."""
    same_unisonness = ~_has(c.feat ^ c.prev_feat, _UNISON)
    return c.similar & _has(c.feat & c.prev_feat, _OCTAVE) & same_unisonness


def _parallel_octaves(c: _Context) -> np.ndarray:
    """Fux rule of motion 1: no octave to octave, nor unison to unison, in similar motion."""
    return _parallel_octave_pairs(c)


def _hidden_fifths(c: _Context) -> np.ndarray:
    """Fux rules of motion 1 and 3: a fifth may not be approached in similar motion."""
    return c.similar & _has(c.feat & ~c.prev_feat, _FIFTH)


def _hidden_octaves(c: _Context) -> np.ndarray:
    """Fux rules of motion 1 and 3: an octave or unison may not be approached in similar
    motion (from any other interval, including unison <-> octave)."""
    return c.similar & _has(c.feat, _OCTAVE) & ~_parallel_octave_pairs(c)


def _voice_crossing(c: _Context) -> np.ndarray:
    """The lower voice may not sound above the upper voice."""
    return c.crossed


def _voice_overlap(c: _Context) -> np.ndarray:
    """No voice may move beyond the other voice's previous note (music21's voiceOverlap)."""
    return c.overlap


def _bad_start(c: _Context) -> np.ndarray:
    """Fux: begin with a perfect consonance, P1/P5/P8 above the cantus but only P1/P8 below
    it (a fifth below would put the counterpoint in another mode)."""
    if c.cp.shape[1] == 0:
        return c.first
    rel = c.cp[:, 0].astype(np.int64) - c.cf[:, 0]  # [B], signed: counterpoint minus cantus
    ok = (rel % 12 == 0) | (c.cantus_below & (rel >= 0) & (rel % 12 == 7))
    return c.first & ~ok[:, None]


def _bad_end(c: _Context) -> np.ndarray:
    """Fux: end on a unison or octave."""
    return c.last & ~_has(c.feat, _OCTAVE)


def _bad_cadence(c: _Context) -> np.ndarray:
    """Fux: the last counterpoint note is reached by step, in contrary motion to the cantus."""
    a = np.abs(c.cp_move)
    return c.last & c.moved & ~((a >= 1) & (a <= 2) & c.contrary)


def _forbidden_leap(c: _Context) -> np.ndarray:
    """Fux: no leap larger than a fifth except the octave, and no tritone; augmented seconds
    etc. are enharmonic to allowed intervals in MIDI numbers and are left to outside_mode."""
    a = np.abs(c.cp_move)
    return c.moved & ((a == 6) | ((a > 7) & (a != 12)))


def _unrecovered_leap(c: _Context) -> np.ndarray:
    """After a leap (> 4 semitones) the counterpoint turns back by step; flagged at the note
    after the leap when it does not."""
    move = c.cp_move
    prev = _previous(move)  # the move into note i-1; 0 at positions 0 and 1
    a = np.abs(move)
    step_back = (a >= 1) & (a <= 2) & ((move > 0) != (prev > 0))
    return c.moved & (np.abs(prev) > LEAP_THRESHOLD) & ~step_back


def _middle_unison(c: _Context) -> np.ndarray:
    """Fux: the unison only at the first and last note."""
    return c.inner & _has(c.feat, _UNISON)


def _parallel_run(c: _Context) -> np.ndarray:
    """Fux: at most three thirds (or three sixths) in a row in similar motion; flagged from
    the fourth one on."""
    same = c.similar & _has(c.feat & c.prev_feat, _THIRD | _SIXTH)  # i continues i-1's run
    return same & _previous(same) & _previous(_previous(same))


def _voice_range(c: _Context) -> np.ndarray:
    """Fux keeps the two voices within about a tenth: no vertical distance larger than a major
    tenth (16 semitones); a wider space leaves the voices unrelated and one of them out of its range."""
    return c.mask & (c.dist > MAX_VOICE_DISTANCE)


def _similar_motion(c: _Context) -> np.ndarray:
    """Soft (Fux: contrary motion is best): penalise similar and parallel motion."""
    return c.similar


def _middle_perfect(c: _Context) -> np.ndarray:
    """Soft (Fux: imperfect consonances between the ends): penalise inner P1/P5/P8."""
    return c.inner & _has(c.feat, _PERFECT)


def _outside_mode(c: _Context) -> np.ndarray:
    """Fux: stay in the mode. Allowed: the pitch classes of every diatonic collection that
    contains the whole cantus (Fux's cantus firmi omit degrees, so this admits his ficta:
    B-flat beside B in dorian and lydian, F-sharp beside F in mixolydian), plus the raised
    leading tone (final - 1) at the penultimate note."""
    cf_bits = np.where(c.mask, _PC_BIT.take(c.cf), np.int16(0))
    cantus_mask = np.bitwise_or.reduce(cf_bits, axis=1)  # [B] 12-bit pitch-class set
    allowed = _MODE_MASK.take(cantus_mask)[:, None]  # [B, 1]
    cp_bits = _PC_BIT.take(c.cp)
    leading_tone = (1 << ((c.final - 1) % 12)).astype(np.int16)[:, None]  # [B, 1]
    return c.mask & ((cp_bits & allowed) == 0) & ~(c.penultimate & (cp_bits == leading_tone))


def _rule(name: str, weight: float, impl: Callable[[_Context], np.ndarray]) -> Rule:
    """A Rule whose fn works on a batch; violations() shares one _Context via ``fn.from_context``."""

    def fn(batch: FirstSpeciesBatch) -> np.ndarray:
        return impl(_context(batch))

    fn.from_context = impl  # type: ignore[attr-defined]
    fn.__name__ = fn.__qualname__ = name
    doc = " ".join((impl.__doc__ or "").split())
    return Rule(name=name, weight=weight, doc=doc, fn=fn)


FIRST_SPECIES_RULES: tuple[Rule, ...] = (
    _rule("dissonance", 1.0, _dissonance),
    _rule("parallel_fifths", 1.0, _parallel_fifths),
    _rule("parallel_octaves", 1.0, _parallel_octaves),
    _rule("hidden_fifths", 1.0, _hidden_fifths),
    _rule("hidden_octaves", 1.0, _hidden_octaves),
    _rule("voice_crossing", 1.0, _voice_crossing),
    _rule("voice_overlap", 1.0, _voice_overlap),
    _rule("bad_start", 1.0, _bad_start),
    _rule("bad_end", 1.0, _bad_end),
    _rule("bad_cadence", 1.0, _bad_cadence),
    _rule("forbidden_leap", 1.0, _forbidden_leap),
    _rule("unrecovered_leap", 0.5, _unrecovered_leap),
    _rule("middle_unison", 1.0, _middle_unison),
    _rule("parallel_run", 0.5, _parallel_run),
    _rule("outside_mode", 1.0, _outside_mode),
    _rule("voice_range", 1.0, _voice_range),
    _rule("similar_motion", 0.1, _similar_motion),
    _rule("middle_perfect", 0.1, _middle_perfect),
)
RULES_BY_NAME: dict[str, Rule] = {r.name: r for r in FIRST_SPECIES_RULES}
SOFT_RULES: frozenset[str] = frozenset({"similar_motion", "middle_perfect"})
"""Preferences rather than prohibitions: Fux's own solutions break them routinely."""


def violations(
    batch: FirstSpeciesBatch, rules: Sequence[Rule] = FIRST_SPECIES_RULES
) -> dict[str, np.ndarray]:
    """Rule name -> [B, N] bool, True where the rule is broken; padding is never True."""
    ctx: _Context | None = None
    out: dict[str, np.ndarray] = {}
    for rule in rules:
        impl = getattr(rule.fn, "from_context", None)
        if impl is not None:
            ctx = ctx if ctx is not None else _context(batch)
            out[rule.name] = impl(ctx)
        else:
            v = np.asarray(rule.fn(batch), dtype=bool)
            if v.shape != batch.cantus.shape:
                raise ValueError(f"rule {rule.name!r} returned shape {v.shape}, expected {batch.cantus.shape}")
            out[rule.name] = v & batch.mask
    return out


def resolve_weights(weights: Mapping[str, float] | None, rules: Sequence[Rule]) -> dict[str, float]:
    """Default rule weights overridden by ``weights``; unknown names raise ValueError."""
    resolved = {r.name: float(r.weight) for r in rules}
    if len(resolved) != len(rules):
        raise ValueError(f"rule names must be unique, got {[r.name for r in rules]}")
    unknown = sorted(set(weights or {}) - set(resolved))
    if unknown:
        raise ValueError(
            f"unknown rule name(s) {unknown} in weights; valid names: {sorted(resolved)}"
        )
    resolved.update({k: float(w) for k, w in (weights or {}).items()})
    return resolved


def _step_rewards(viol: Mapping[str, np.ndarray], w: Mapping[str, float], shape: tuple[int, ...]) -> np.ndarray:
    """[B, N] float: -sum_r w_r * viol_r."""
    counts: dict[float, np.ndarray] = {}  # weight -> [B, N] int16 number of rules broken
    for name, v in viol.items():
        if w[name] != 0.0:
            c = v.view(np.int8).astype(np.int16)
            counts[w[name]] = counts[w[name]] + c if w[name] in counts else c
    out = np.zeros(shape, dtype=np.float64)
    for weight, c in counts.items():
        out -= weight * c
    return out


def weighted_step_rewards(viol: Mapping[str, np.ndarray], weights: Mapping[str, float] | None, rules: Sequence[Rule],
                          shape: tuple[int, ...]) -> np.ndarray:
    """[B, N] float from violations already computed: ``-sum_r w_r * viol_r``."""
    return _step_rewards(viol, resolve_weights(weights, rules), shape)


def step_rewards(
    batch: FirstSpeciesBatch,
    weights: Mapping[str, float] | None = None,
    rules: Sequence[Rule] = FIRST_SPECIES_RULES,
) -> np.ndarray:
    """[B, N] float reward per note, ``-sum_r w_r * violated_r`` (0 = perfect, 0 on padding).

    ``weights`` overrides the rules' default weights by name.
    """
    w = resolve_weights(weights, rules)
    return _step_rewards(violations(batch, rules), w, batch.cantus.shape)


def counterfactual_step_rewards(
    batch: FirstSpeciesBatch,
    values: np.ndarray,
    weights: Mapping[str, float] | None = None,
    clean_bonus: float = 0.0,
    rules: Sequence[Rule] = FIRST_SPECIES_RULES,
) -> np.ndarray:
    """[B, N, A] float: ``r[b, i, a]``, the step reward note i of piece b would get if the
    counterpoint there were ``cantus[b, i] + values[a]`` (a signed interval), after the piece's
    own notes 0..i-1; plus ``clean_bonus`` at the last note when the piece would then break no
    hard rule. 0 on padding.

    Every rule flags a note from that note and the ones before it (a motion at its second note,
    a leap at the note after it, the cadence at the last note), never from later notes, so
    ``r[b, i, a]`` is the immediate reward of action a in the state after i sampled notes: at the
    piece's own interval it equals :func:`step_rewards` (plus the bonus where it applies).
    """
    B, N = np.shape(batch.cantus)
    values = np.asarray(values, dtype=np.int64)
    A = len(values)
    cf = np.asarray(batch.cantus, dtype=np.int64)
    var = np.repeat(np.asarray(batch.counterpoint, dtype=np.int64)[:, None, None, :], N * A, axis=1).reshape(B, N, A, N)
    for i in range(N):  # variant (i, a) of piece b: its notes with note i replaced by cantus[b, i] + values[a]
        var[:, i, :, i] = cf[:, i, None] + values[None, :]
    rep = lambda x: np.repeat(np.asarray(x), N * A, axis=0)  # noqa: E731  [B, ...] -> [B*N*A, ...]
    flat = FirstSpeciesBatch(rep(cf), var.reshape(B * N * A, N), rep(batch.cantus_below), rep(batch.final), rep(batch.lengths))
    viol = violations(flat, rules)
    r = _step_rewards(viol, resolve_weights(weights, rules), (B * N * A, N)).reshape(B, N, A, N)
    own = np.arange(N)
    out = r[:, own, :, own].transpose(1, 0, 2).copy()  # [B, N, A]: each variant's reward at the note it changed
    if clean_bonus:
        hard = [v for name, v in viol.items() if name not in SOFT_RULES]
        clean = ~np.logical_or.reduce(hard).any(axis=1).reshape(B, N, A) if hard else np.ones((B, N, A), dtype=bool)
        last = own[None, :] == np.asarray(batch.lengths)[:, None] - 1  # [B, N]
        out += clean_bonus * (clean & last[:, :, None])
    return out


def total_rewards(
    batch: FirstSpeciesBatch,
    weights: Mapping[str, float] | None = None,
    rules: Sequence[Rule] = FIRST_SPECIES_RULES,
) -> np.ndarray:
    """[B] float: the step rewards summed over each piece's notes."""
    return step_rewards(batch, weights, rules).sum(axis=1)


def reports(
    batch: FirstSpeciesBatch,
    weights: Mapping[str, float] | None = None,
    rules: Sequence[Rule] = FIRST_SPECIES_RULES,
) -> list[RuleReport]:
    """One RuleReport per piece: its violations sorted by position (then rule order) and its
    total reward."""
    w = resolve_weights(weights, rules)
    viol = violations(batch, rules)
    totals = _step_rewards(viol, w, batch.cantus.shape).sum(axis=1)
    found: list[list[tuple[int, int, str]]] = [[] for _ in range(batch.cantus.shape[0])]
    for order, (name, v) in enumerate(viol.items()):
        for b, i in zip(*np.nonzero(v)):
            found[b].append((int(i), order, name))
    return [
        RuleReport(tuple((name, i) for i, _, name in sorted(f)), float(t))
        for f, t in zip(found, totals)
    ]
