"""Tests of the cantus-firmus generator (tasks/counterpoint/cantus_gen.py).

Oracles: a naive reference of the cantus rules written here from the rule texts, with music21
naming each melodic interval and listing each mode's pitches (never ``cantus_violations`` on
the generator's own output); hand-made melodies that break one rule each; a brute-force
enumeration of every valid 8-note melody, which the generator must find exactly; and Fux's
cantus firmi, which must never come out of the generator.
"""

from __future__ import annotations

import random
import re
import time
from fractions import Fraction
from functools import lru_cache

import numpy as np
import pytest
from music21 import interval, pitch, scale

from tasks.counterpoint.cantus import FUX_CANTUS_FIRMI, parse_note_names
from tasks.counterpoint.cantus_gen import (
    CANTUS_RULES,
    HOME_FINAL,
    MODES,
    Cantus,
    cantus_violations,
    generate_melodies,
    split_melodies,
    transpose,
)

N = 6000
M21_SCALE = {
    "dorian": scale.DorianScale,
    "phrygian": scale.PhrygianScale,
    "lydian": scale.LydianScale,
    "mixolydian": scale.MixolydianScale,
    "aeolian": scale.MinorScale,
    "ionian": scale.MajorScale,
}
WHITE = {0, 2, 4, 5, 7, 9, 11}
SHARPS, FLATS = {1, 6, 8}, {3, 10}  # music21's default spellings of the black keys
FUX_MODE = {"d": "dorian", "e": "phrygian", "f": "lydian", "g": "mixolydian", "a": "aeolian", "c": "ionian"}


@pytest.fixture(scope="module")
def melodies() -> list[Cantus]:
    return generate_melodies(N, seed=0)


# ------------------------------------------------------------------ naive reference (music21)


@lru_cache(maxsize=None)
def move(a: int, b: int) -> tuple[str, int, int]:
    """music21's (name, direction, generic size) of the melodic interval from MIDI a to b.

    MIDI numbers carry no spelling: music21 spells black keys C# E- F# G# B-, so names are
    right as long as a melody does not mix those sharps and flats (E-4 to F#4 would be an
    augmented second); every melody checked here is white-note but for at most a B- or an F#.
    """
    iv = interval.Interval(pitch.Pitch(midi=a), pitch.Pitch(midi=b))
    return iv.name, int(iv.direction.value), iv.generic.undirected


@lru_cache(maxsize=None)
def m21_scale(mode: str, final_pc: int):
    return M21_SCALE[mode](pitch.Pitch(midi=60 + final_pc))


@lru_cache(maxsize=None)
def pc(midi: int) -> int:
    return pitch.Pitch(midi=midi).pitchClass


@lru_cache(maxsize=None)
def mode_pcs(mode: str, final_pc: int) -> frozenset[int]:
    return frozenset(q.pitchClass for q in m21_scale(mode, final_pc).pitches)


@lru_cache(maxsize=None)
def degree(mode: str, final_pc: int, midi: int) -> int | None:
    """music21's scale degree of ``midi`` in the mode on ``final_pc`` (None: not in it)."""
    sc = m21_scale(mode, final_pc)
    return sc.getScaleDegreeFromPitch(pitch.Pitch(midi=midi), comparisonAttribute="pitchClass")


@lru_cache(maxsize=None)
def semitones(a: int, b: int) -> int:
    return interval.Interval(pitch.Pitch(midi=a), pitch.Pitch(midi=b)).semitones


def is_step(a: int, b: int) -> bool:
    return move(a, b)[0] in ("m2", "M2")


def is_leap(a: int, b: int) -> bool:
    return move(a, b)[2] >= 4  # "a leap is a fourth or larger" (more than 4 semitones)


def reference_violations(p: tuple[int, ...], mode: str, lo_n: int = 8, hi_n: int = 16) -> set[str]:
    """The rules of the cantus_gen docstring, written out note by note."""
    black = {x % 12 for x in p} - WHITE
    assert not (black & SHARPS and black & FLATS), "music21's names need one spelling direction"
    out = set()
    moves = list(zip(p, p[1:]))
    final_pc = pc(p[-1])
    if not lo_n <= len(p) <= hi_n:
        out.add("length")
    if any(pc(x) not in mode_pcs(mode, final_pc) for x in p):
        out.add("in_mode")
    if pc(p[0]) != final_pc:
        out.add("starts_on_final")
    pen, last = p[-2], p[-1]
    deg, direction = degree(mode, final_pc, pen), move(pen, last)[1]
    if not ((deg == 2 and direction == -1 or deg == 7 and direction == 1) and is_step(pen, last)):
        out.add("ends_on_final")
    for a, b in moves:
        name, direction, _ = move(a, b)
        if name not in ("m2", "M2", "m3", "M3", "P4", "P5", "P8") and (name, direction) != ("m6", 1):
            out.add("bad_interval")
    if Fraction(sum(is_step(a, b) for a, b in moves), len(moves)) < Fraction(3, 5):
        out.add("mostly_stepwise")
    for (a, b), (c, d) in zip(moves, moves[1:]):
        if is_leap(a, b) and not (is_step(c, d) and move(a, b)[1] == -move(c, d)[1]):
            out.add("unrecovered_leap")
        if is_leap(a, b) and is_leap(c, d):
            out.add("consecutive_leaps")
    top = max(p)
    if p.count(top) != 1 or p[0] == top or p[-1] == top:
        out.add("climax")
    if not 5 <= semitones(min(p), top) <= 16:
        out.add("range")
    directions = [move(a, b)[1] for a, b in moves]
    for i in range(len(directions) - 4):
        if len(set(directions[i : i + 5])) == 1 and directions[i] != 0:
            out.add("same_direction")
    return out


# ---------------------------------------------------------------------- generated melodies


def test_every_generated_melody_obeys_every_rule(melodies):
    for c in melodies:
        assert reference_violations(c.pitches, c.mode) == set(), c
        assert pitch.Pitch(midi=c.pitches[0]).midi == HOME_FINAL[c.mode] == c.pitches[-1], c
        assert c.final == HOME_FINAL[c.mode] % 12


def test_count_distinct_and_named(melodies):
    assert len(melodies) == N
    assert len({c.intervals for c in melodies}) == N  # no melody is a transposition of another, even across modes
    assert len({c.name for c in melodies}) == N
    assert all(c.name.startswith(f"gen-{c.mode}-") for c in melodies)


def test_modes_even_and_lengths_cover_the_range(melodies):
    by_mode = {m: sum(c.mode == m for c in melodies) for m in MODES}
    assert by_mode == dict.fromkeys(MODES, N // 6)
    lengths = [len(c.pitches) for c in melodies]
    assert set(lengths) == set(range(8, 17))
    counts = np.bincount(lengths)[8:]
    assert counts.min() >= N // 9 - 6 and counts.max() <= N // 9 + 6, counts  # dealt in turn


def test_deterministic_and_seeded(melodies):
    assert generate_melodies(N, seed=0) == melodies
    assert generate_melodies(300, seed=0) == melodies[:300]  # drawn in sequence: a prefix
    other = generate_melodies(300, seed=1)
    assert [c.pitches for c in other] != [c.pitches for c in melodies[:300]]


def test_fast(melodies):
    t = time.perf_counter()
    generate_melodies(N, seed=7)
    assert time.perf_counter() - t < 5.0  # about 0.35 s measured on one core


def test_none_is_a_fux_cantus_firmus(melodies):
    fux = {Cantus(k, parse_note_names(v), FUX_MODE[k[4]]).intervals for k, v in FUX_CANTUS_FIRMI.items()}
    assert len(fux) == 7
    assert not fux & {c.intervals for c in melodies}


def test_midi_range_after_transposition(melodies):
    lo = min(min(c.pitches) for c in melodies)
    hi = max(max(c.pitches) for c in melodies)
    assert 36 <= lo - 5 and hi + 6 <= 84, (lo, hi)
    for c in melodies[:60]:
        for k in range(-5, 7):
            t = transpose(c, k)
            assert 36 <= min(t.pitches) and max(t.pitches) <= 84


def test_custom_lengths_and_errors():
    out = generate_melodies(60, seed=3, min_notes=10, max_notes=12)
    assert {len(c.pitches) for c in out} == {10, 11, 12}
    for c in out:
        assert reference_violations(c.pitches, c.mode, 10, 12) == set()
        assert cantus_violations(c.pitches, c.mode, min_notes=10, max_notes=12) == []
    assert generate_melodies(0, seed=0) == []
    with pytest.raises(ValueError, match="min_notes"):
        generate_melodies(5, seed=0, min_notes=12, max_notes=10)
    with pytest.raises(ValueError):
        generate_melodies(-1, seed=0)


# ---------------------------------------------------- brute force: every valid 8-note melody


def brute_force(mode: str, n: int) -> set[tuple[int, ...]]:
    """Intervals of every valid n-note melody from the mode's HOME_FINAL to itself, notes from a
    fifth below to an octave above the final (the generator's register): all candidate
    sequences, cut only by rules that no continuation can repair, then the naive reference."""
    final = HOME_FINAL[mode]
    pcs = mode_pcs(mode, final % 12)
    notes = np.array([q for q in range(final - 7, final + 13) if q % 12 in pcs])
    allowed = {1, 2, 3, 4, 5, 7, 12, -1, -2, -3, -4, -5, -7, -12, 8}
    paths = np.full((1, 1), final)
    for _ in range(n - 1):
        paths = np.concatenate(
            [np.repeat(paths, len(notes), axis=0), np.tile(notes, len(paths))[:, None]], axis=1
        )
        d = np.diff(paths, axis=1)
        keep = np.isin(d[:, -1], list(allowed))  # rule 4
        keep &= paths.max(1) - paths.min(1) <= 16  # rule 8's upper bound
        keep &= (np.abs(d) > 2).sum(1) <= (n - 1) - -(-3 * (n - 1) // 5)  # rule 5: non-step quota
        if d.shape[1] >= 2:
            leap = np.abs(d[:, -2]) > 4
            back = (np.abs(d[:, -1]) <= 2) & (np.sign(d[:, -1]) == -np.sign(d[:, -2]))
            keep &= ~leap | back  # rules 6 and 10
        if d.shape[1] >= 5:
            keep &= np.abs(np.sign(d[:, -5:]).sum(1)) < 5  # rule 9
        paths = paths[keep]
    paths = paths[paths[:, -1] == final]
    valid = {tuple(p) for p in paths.tolist() if not reference_violations(tuple(p), mode)}
    return {tuple(np.diff(p).tolist()) for p in valid}


def test_generator_finds_every_valid_8_note_melody():
    # the same intervals in two modes are one melody, transposed; no Fux cantus has 8 notes
    expected = {iv for m in MODES for iv in brute_force(m, 8)}
    got = generate_melodies(len(expected), seed=5, min_notes=8, max_notes=8)
    assert {c.intervals for c in got} == expected
    print(f"{len(expected)} valid 8-note melodies")  # 1,947 distinct up to transposition
    with pytest.raises(ValueError, match=f"only {len(expected)} distinct"):
        generate_melodies(len(expected) + 1, seed=5, min_notes=8, max_notes=8)


# ------------------------------------------------------- cantus_violations: hand-made melodies

VALID = {
    "leap up, recovered; cadence 2-1": "D4 A4 G4 F4 G4 E4 F4 D4 E4 D4",
    "cadence 7-1 from below": "D4 F4 E4 G4 A4 G4 F4 E4 C4 D4",
}
# Each breaks exactly the rule named (all dorian on D).
BREAKS_ONE = [
    ("length", "D4 E4 F4 G4 F4 E4 D4"),  # 7 notes
    ("length", "D4 E4 F4 E4 D4 C4 D4 F4 E4 G4 F4 A4 G4 F4 G4 E4 D4"),  # 17 notes
    ("in_mode", "D4 F4 E4 G4 A4 B-4 A4 F4 G4 E4 F4 E4 D4"),  # B-flat is not in D dorian
    ("starts_on_final", "E4 F4 G4 A4 G4 F4 E4 D4"),
    ("ends_on_final", "D4 E4 F4 G4 A4 G4 F4 D4"),  # the final reached by a third
    ("bad_interval", "D4 E4 F4 B4 A4 G4 A4 F4 E4 D4"),  # tritone F-B
    ("bad_interval", "D4 E4 F4 F4 G4 A4 G4 F4 E4 D4"),  # repeated note
    ("bad_interval", "D4 E4 F4 A4 C5 E4 F4 E4 D4"),  # descending minor sixth
    ("bad_interval", "D4 B4 A4 G4 F4 G4 E4 F4 E4 D4"),  # major sixth
    ("bad_interval", "D4 C5 B4 A4 G4 A4 F4 E4 D4"),  # minor seventh
    ("bad_interval", "D4 E5 D5 C5 A4 B4 G4 A4 F4 E4 D4"),  # ninth
    ("mostly_stepwise", "D4 F4 A4 G4 E4 C4 D4 F4 E4 D4"),  # 4 steps in 9 moves
    ("unrecovered_leap", "D4 A4 F4 G4 F4 E4 D4 E4 D4"),  # fifth up, third down
    ("unrecovered_leap", "D4 A4 B4 G4 F4 G4 E4 F4 E4 D4"),  # fifth up, step up
    ("climax", "D4 E4 F4 A4 G4 A4 G4 F4 E4 D4"),  # A4 twice
    ("climax", "D3 E3 F3 G3 E3 F3 A3 G3 B3 A3 C4 D4"),  # highest note last
    ("range", "D4 E4 D4 E4 F4 E4 D4 E4 D4"),  # a minor third
    ("range", "D4 A4 G4 E4 D4 G3 A3 F3 E3 F3 C4 B3 A3 D4 C4 D4"),  # E3-A4, an eleventh
    ("same_direction", "D4 C4 D4 E4 F4 G4 A4 G4 F4 E4 D4"),  # 5 moves up
]


@pytest.mark.parametrize("text", VALID.values(), ids=list(VALID))
def test_valid_hand_made(text):
    p = parse_note_names(text)
    assert cantus_violations(p, "dorian") == []
    assert reference_violations(p, "dorian") == set()


@pytest.mark.parametrize("rule,text", BREAKS_ONE, ids=[f"{r}-{i}" for i, (r, _) in enumerate(BREAKS_ONE)])
def test_breaks_exactly_one_rule(rule, text):
    p = parse_note_names(text)
    assert cantus_violations(p, "dorian") == [rule]
    assert reference_violations(p, "dorian") == {rule}


def test_every_rule_has_a_hand_made_breach():
    # consecutive_leaps cannot break alone: the move after a leap must be a step back
    # (unrecovered_leap), so a second leap always breaks that too.
    assert {r for r, _ in BREAKS_ONE} == set(CANTUS_RULES) - {"consecutive_leaps"}
    p = parse_note_names("D4 A4 E4 F4 G4 F4 E4 D4")  # fifth up, fourth down
    assert cantus_violations(p, "dorian") == ["unrecovered_leap", "consecutive_leaps"]
    assert reference_violations(p, "dorian") == {"unrecovered_leap", "consecutive_leaps"}


def test_names_in_rule_order_and_edge_cases():
    p = parse_note_names("E4 C4 D4 F#4 E4 F#4 F#4 B4 E4")  # several rules broken at once
    got = cantus_violations(p, "dorian")
    assert got == [r for r in CANTUS_RULES if r in got]
    assert cantus_violations((), "dorian") == ["length"]
    with pytest.raises(ValueError, match="mode"):
        cantus_violations((62, 64), "locrian")


def test_agrees_with_reference_on_random_melodies(melodies):
    """Random white-note melodies and one-note edits of generated ones, all modes."""
    rng = random.Random(0)
    cases = []
    for c in melodies[:1500]:
        p = list(c.pitches)
        i = rng.randrange(len(p))
        p[i] = rng.choice([q for q in range(p[i] - 12, p[i] + 13) if q % 12 in WHITE])
        cases.append((tuple(p), c.mode))
    white = [q for q in range(45, 80) if q % 12 in WHITE]
    for _ in range(1500):
        n = rng.randint(3, 18)
        start = rng.choice(white)
        p = [start]
        for _ in range(n - 2):
            p.append(rng.choice([q for q in white if 0 < abs(q - p[-1]) <= 7 or q - p[-1] in (8, 12)]))
        p.append(start if rng.random() < 0.7 else rng.choice(white))
        cases.append((tuple(p), rng.choice(list(MODES))))
    seen = set()
    for p, mode in cases:
        got = cantus_violations(p, mode)
        assert set(got) == reference_violations(p, mode), (p, mode)
        seen.update(got)
    assert seen == set(CANTUS_RULES)


# ----------------------------------------------------------------------------- Fux's cantus firmi

# cantus_violations accepts 3 of Fux's 7 cantus firmi (fux-d, fux-c, fux-c-fig88). The other
# four take licences that the textbook rules (written after Fux) do not grant:
FUX_LICENCES = {
    "fux-d": [],
    # E C D C A A G E F E: his phrygian line moves by thirds (5 steps in 9 moves); its octave
    # leap A3-A4 is allowed and recovered by step.
    "fux-e": ["mostly_stepwise"],
    # F G A F D E F C A F G F: 6 steps in 11 moves; the fifth F3-C4 is answered by a third (C-A),
    # as Fux's own counterpoints often answer leaps (see rules.py, unrecovered_leap).
    "fux-f": ["mostly_stepwise", "unrecovered_leap"],
    # G C B G C E D G E C D B A G: arpeggiates the triad (5 steps in 13 moves); the fourths G-C
    # and D-G go on by a third (C-E, G-E).
    "fux-g": ["mostly_stepwise", "unrecovered_leap"],
    # A C B D C E F E D C B A: the line closes with a five-step scale descent F-E-D-C-B-A.
    "fux-a": ["same_direction"],
    "fux-c": [],
    "fux-c-fig88": [],
}


@pytest.mark.parametrize("name", list(FUX_CANTUS_FIRMI))
def test_fux_cantus_firmi(name):
    p = parse_note_names(FUX_CANTUS_FIRMI[name])
    mode = FUX_MODE[name[4]]
    assert cantus_violations(p, mode) == FUX_LICENCES[name]
    assert reference_violations(p, mode) == set(FUX_LICENCES[name])


def test_fux_valid_ones_would_otherwise_be_generated():
    """fux-c-fig88 (9 notes) obeys every rule and lies in the generator's register, and so does
    its transposition to G mixolydian: only the exclusion keeps them out of the complete list
    of 9-note melodies."""
    fig88 = parse_note_names(FUX_CANTUS_FIRMI["fux-c-fig88"])
    assert cantus_violations(fig88, "ionian") == []
    assert cantus_violations(tuple(q - 5 for q in fig88), "mixolydian") == []
    with pytest.raises(ValueError, match=r"only \d+ distinct") as err:
        generate_melodies(10**6, seed=0, min_notes=9, max_notes=9)
    total = int(re.search(r"only (\d+)", str(err.value)).group(1))
    every = generate_melodies(total, seed=0, min_notes=9, max_notes=9)  # all of them
    assert total > 15000 and len({c.intervals for c in every}) == total  # 17,438 distinct 9-note melodies
    assert Cantus("fig88", fig88, "ionian").intervals not in {c.intervals for c in every}


# ---------------------------------------------------------------------------------- transpose


def test_transpose(melodies):
    c = melodies[0]
    up, down = transpose(c, 3), transpose(c, -2)
    assert up.name == f"{c.name}+3" and down.name == f"{c.name}-2"
    assert up.pitches == tuple(p + 3 for p in c.pitches) and up.intervals == c.intervals
    assert up.mode == c.mode and up.final == (c.final + 3) % 12
    assert transpose(c, 0) is c
    assert cantus_violations(up.pitches, up.mode) == []  # the rules are transposition-invariant
    with pytest.raises(ValueError):
        transpose(c, 100)


# ------------------------------------------------------------------------------------- split


def test_split_by_melody_stable_and_sized(melodies):
    pool = [transpose(c, k) for c in melodies for k in (0, -2, 3)]
    train, heldout = split_melodies(pool, 0.1, seed=0)
    assert len(train) + len(heldout) == len(pool)
    ids = lambda cs: {(c.mode, c.intervals) for c in cs}  # noqa: E731
    assert not ids(train) & ids(heldout)  # a melody's transpositions stay together
    frac = len(ids(heldout)) / N
    assert abs(frac - 0.1) < 0.015, frac  # 3.8 sigma for 6000 melodies
    # a smaller pool puts each of its melodies on the same side
    train_s, heldout_s = split_melodies(melodies[:1000], 0.1, seed=0)
    assert ids(train_s) <= ids(train) and ids(heldout_s) <= ids(heldout)
    assert split_melodies(pool, 0.1, seed=0) == (train, heldout)
    assert ids(split_melodies(melodies, 0.1, seed=1)[1]) != ids(heldout)
    assert split_melodies(melodies, 0.0, seed=0) == (list(melodies), [])
    assert split_melodies(melodies, 1.0, seed=0) == ([], list(melodies))
    with pytest.raises(ValueError):
        split_melodies(melodies, 1.5, seed=0)
