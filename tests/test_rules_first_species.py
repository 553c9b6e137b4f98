"""Tests of the batched first-species rules (tasks/counterpoint/rules.py).

Oracles: music21's ``voiceLeading.VoiceLeadingQuartet`` and ``interval.Interval`` on random
diatonic quartets and on Bach chorale soprano/bass pairs; Fux's own solutions (Gradus ad
Parnassum, figs. 5-23, encoded by Mark Gotham); hand-made pieces that break one rule each;
a naive per-piece reference loop written from the rule texts.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
from music21 import corpus, interval, key, pitch, voiceLeading

from tasks.counterpoint import rules as R
from tasks.counterpoint.cantus import apply_fux_errata, load_fux_first_species
from tasks.counterpoint.piece import FirstSpeciesBatch, FirstSpeciesPiece

HARD_RULES = frozenset(R.RULES_BY_NAME) - R.SOFT_RULES


# --- Fux's own solutions --------------------------------------------------------------------


def fux_dir() -> Path:
    """$RLHF_FUX_DIR, default <repo>/../shared/data/fux-species."""
    env = os.environ.get("RLHF_FUX_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "fux-species"


# Fux's licences: (figure, rule, position) -> why. The rules stay strict; these are the
# places where Fux's own solutions (after the encoding errata, cantus.FUX_ERRATA) break them.
FUX_LICENCES: dict[tuple[int, str, int], str] = {
    (6, "unrecovered_leap", 3): "D3-A3 (fifth up) turns back by a third (F3), not by step",
    (6, "unrecovered_leap", 8): "F3-C4 (fifth up) continues up by step to D4",
    (12, "unrecovered_leap", 2): "E3-A3 (fourth up) is answered by a fifth down (D3)",
    (12, "unrecovered_leap", 7): "F3-C4 (fifth up) is followed by a repeated C4",
    (13, "unrecovered_leap", 4): "C4-F4 (fourth up) is followed by a repeated F4",
    (13, "unrecovered_leap", 9): "G4-C4 (fifth down) is answered by a fourth up (F4)",
    (14, "voice_range", 7): "the bass F2 under the cantus's climax C4 is a twelfth apart, two "
    "semitones past the tenth Fux otherwise keeps",
    (15, "unrecovered_leap", 4): "D4-G4 (fourth up) is followed by a repeated G4",
    (15, "unrecovered_leap", 10): "G4-C5 (fourth up) turns back by a third (A4)",
    (21, "voice_overlap", 1): "leaving the opening unison G3, the lower voice steps to A3, above "
    "the cantus's previous G3, while the cantus leaps to C4",
    (21, "unrecovered_leap", 7): "C3-G3 (fifth up) continues up by a third (B3)",
    (22, "unrecovered_leap", 2): "A4-E4 (fourth down) turns back by a third (G4)",
    (22, "forbidden_leap", 5): "E4-C5 is an ascending minor sixth, a leap the Palestrina style "
    "admits upward only, and Fux uses it here",
    (22, "unrecovered_leap", 6): "after that sixth the line falls a third (A4), not a step",
    (23, "unrecovered_leap", 9): "C3-G3 (fifth up) continues up by step to A3",
}


def _figure(p: FirstSpeciesPiece) -> int:
    return int(p.source.removeprefix("fux/fig"))


@pytest.fixture(scope="module")
def fux_pieces() -> list[FirstSpeciesPiece]:
    data = fux_dir()
    if not (data / "I" / "data.tsv").is_file():
        pytest.skip(f"Fux data not found at {data}; set RLHF_FUX_DIR to the fux-species directory")
    return load_fux_first_species(data, corrected=False)


def _hard(report: R.RuleReport) -> set[tuple[str, int]]:
    return {(name, i) for name, i in report.violations if name in HARD_RULES}


def test_fux_loader_reads_ten_first_species_solutions(fux_pieces):
    assert [_figure(p) for p in fux_pieces] == [5, 6, 11, 12, 13, 14, 15, 21, 22, 23]
    for p in fux_pieces:
        assert p.cantus[-1] % 12 == p.final, p.source  # the cantus ends on the mode's final
        assert p.counterpoint[-1] % 12 == p.final, p.source


def test_fux_solutions_break_only_the_listed_licences(fux_pieces):
    pieces = [apply_fux_errata(p, _figure(p)) for p in fux_pieces]
    reports = R.reports(FirstSpeciesBatch.from_pieces(pieces))
    found = {(_figure(p), name, i) for p, rep in zip(pieces, reports) for name, i in _hard(rep)}
    assert found == set(FUX_LICENCES)


def test_fux_encoding_errors_show_as_crossings(fux_pieces):
    """The raw encodings of figs. 14 and 22 break exactly the rules an octave displacement
    explains, which is why cantus.FUX_ERRATA moves them."""
    raw = {_figure(p): p for p in fux_pieces}
    reports = R.reports(FirstSpeciesBatch.from_pieces([raw[14], raw[22]]))
    assert _hard(reports[0]) == {
        ("voice_crossing", 3), ("voice_crossing", 4), ("voice_crossing", 5), ("voice_crossing", 6),
        ("voice_overlap", 4), ("voice_overlap", 5), ("voice_overlap", 6),
    }
    assert _hard(reports[1]) == {
        ("unrecovered_leap", 2),  # Fux's licence, as in the fixed version
        *{("voice_crossing", i) for i in range(5, 10)},
        *{("voice_overlap", i) for i in range(6, 11)},
        ("dissonance", 7),  # B3 under the cantus E4: a fourth
        ("forbidden_leap", 10),  # A3-G#4, a major seventh
        ("unrecovered_leap", 11),  # G#4 after the seventh continues up to A4
    }


# --- music21 VoiceLeadingQuartet oracle -----------------------------------------------------


def _quartet_piece(
    u1: pitch.Pitch, u2: pitch.Pitch, l1: pitch.Pitch, l2: pitch.Pitch, below: bool
) -> FirstSpeciesPiece:
    """A two-note piece with upper voice u1 -> u2 and lower voice l1 -> l2."""
    upper, lower = (u1.midi, u2.midi), (l1.midi, l2.midi)
    return FirstSpeciesPiece(
        cantus=lower if below else upper,
        counterpoint=upper if below else lower,
        cantus_position="below" if below else "above",
        final=0,
    )


def _random_diatonic_quartets(n: int, seed: int) -> list[tuple[pitch.Pitch, ...]]:
    """(v1n1, v1n2, v2n1, v2n2) with v1 the upper voice, all four notes from one diatonic
    collection (random key), so that semitones fix the generic interval except A4/d5."""
    rng = np.random.default_rng(seed)
    scales = [key.Key(t).getScale().getPitches("C2", "C7") for t in ("C", "G", "D", "A", "E", "F", "B-", "E-", "A-")]
    out = []
    for _ in range(n):
        sc = scales[rng.integers(len(scales))]
        lo1 = int(rng.integers(7, len(sc) - 20))
        up1 = lo1 + int(rng.choice([0, 0, 2, 4, 4, 5, 7, 7, 9, 11, 14, -1, -2, 3, 6]))  # degrees
        du = int(rng.integers(-5, 6))
        r = rng.random()
        dl = du if r < 0.35 else 0 if r < 0.45 else -du if r < 0.55 else int(rng.integers(-5, 6))
        out.append(tuple(pitch.Pitch(sc[i].nameWithOctave) for i in (up1, up1 + du, lo1, lo1 + dl)))
    return out


def _motion_name(vlq: voiceLeading.VoiceLeadingQuartet) -> str:
    if vlq.noMotion():
        return "no_motion"
    if vlq.obliqueMotion():
        return "oblique"
    if vlq.contraryMotion():
        return "contrary"
    return "parallel" if vlq.parallelMotion() else "similar"


def _compare_with_vlq(quartets, below_flags) -> dict[str, int]:
    """Assert our rules agree with VoiceLeadingQuartet on every quartet; return how often each
    VLQ predicate was True (so callers can check the sample was not vacuous).

    Where the definitions differ, the common core is compared:
    - music21's parallelFifth/parallelOctave/parallelUnison also count *antiparallel* perfect
      intervals (P5 -> P12 in contrary motion); Fux's first rule of motion allows those, so we
      compare against VLQ's value only in non-contrary motion and require ours False there.
    - music21's hiddenFifth is False for d5 -> P5 in similar motion (it calls it parallel
      motion of generic fifths); we flag every P5 approached in similar motion. Quartets
      starting from a tritone are compared against that naive definition instead.
    - Parallel vs similar motion needs generic intervals; MIDI numbers cannot tell A4 from d5,
      so for quartets with a vertical tritone only similarMotion() (parallel or not) is compared.
    """
    pieces = [_quartet_piece(*q, below=b) for q, b in zip(quartets, below_flags)]
    batch = FirstSpeciesBatch.from_pieces(pieces)
    v = R.violations(batch)
    motion = R.motion_types(batch)[:, 1]
    counts: dict[str, int] = {}
    for k, (u1, u2, l1, l2) in enumerate(quartets):
        vlq = voiceLeading.VoiceLeadingQuartet(u1, u2, l1, l2)
        where = f"quartet {k}: {u1.nameWithOctave}->{u2.nameWithOctave} over {l1.nameWithOctave}->{l2.nameWithOctave}"
        contrary = vlq.contraryMotion()
        tritone = any(abs(a.midi - b.midi) % 12 == 6 for a, b in ((u1, l1), (u2, l2)))
        ours = R.MOTION_NAMES[int(motion[k])]
        if tritone:
            assert (ours in ("similar", "parallel")) == vlq.similarMotion(), where
        else:
            assert ours == _motion_name(vlq), where
        assert (ours == "contrary") == contrary, where
        assert (ours == "oblique") == vlq.obliqueMotion(), where
        assert (ours == "no_motion") == vlq.noMotion(), where
        pf, po = vlq.parallelFifth(), vlq.parallelOctave() or vlq.parallelUnison()
        assert bool(v["parallel_fifths"][k, 1]) == (pf and not contrary), where
        assert bool(v["parallel_octaves"][k, 1]) == (po and not contrary), where
        from_tritone = abs(u1.midi - l1.midi) % 12 == 6
        if from_tritone:
            naive = vlq.similarMotion() and abs(u2.midi - l2.midi) % 12 == 7
            assert bool(v["hidden_fifths"][k, 1]) == naive, where
        else:
            assert bool(v["hidden_fifths"][k, 1]) == vlq.hiddenFifth(), where
        assert bool(v["hidden_octaves"][k, 1]) == vlq.hiddenOctave(), where
        assert bool(v["voice_crossing"][k].any()) == vlq.voiceCrossing(), where
        assert bool(v["voice_overlap"][k, 1]) == vlq.voiceOverlap(), where
        for i, (a, b) in enumerate(((l1, u1), (l2, u2))):
            assert bool(v["dissonance"][k, i]) == (not interval.Interval(a, b).isConsonant()), where
        cp = (u1, u2) if below_flags[k] else (l1, l2)
        leap = interval.Interval(*cp)
        forbidden = leap.name.startswith(("A", "d")) or (leap.generic.undirected > 5 and leap.name != "P8")
        assert bool(v["forbidden_leap"][k, 1]) == forbidden, where
        for name, flag in (
            ("parallelFifth", pf and not contrary), ("antiparallel", (pf or po) and contrary),
            ("parallelOctave", po and not contrary), ("hiddenFifth", vlq.hiddenFifth()),
            ("tritone", tritone), ("tritone_to_fifth", from_tritone and bool(v["hidden_fifths"][k, 1])),
            ("hiddenOctave", vlq.hiddenOctave()), ("voiceCrossing", vlq.voiceCrossing()),
            ("voiceOverlap", vlq.voiceOverlap()), ("forbidden_leap", forbidden),
            *((m, ours == m) for m in ("no_motion", "oblique", "contrary", "similar", "parallel")),
        ):
            counts[name] = counts.get(name, 0) + int(flag)
    return counts


def test_agrees_with_music21_voice_leading_on_random_diatonic_quartets():
    quartets = _random_diatonic_quartets(1200, seed=7)
    below = list(np.random.default_rng(8).random(len(quartets)) < 0.5)
    counts = _compare_with_vlq(quartets, below)
    for name, c in counts.items():
        assert c >= 10, f"sample has only {c} cases of {name}; the comparison would be vacuous"


def _beat_pitches(part) -> dict[int, pitch.Pitch]:
    """The pitch sounding at each integer quarter-note offset (one note per beat)."""
    out: dict[int, pitch.Pitch] = {}
    for n in part.flatten().notes:
        start, end = float(n.offset), float(n.offset + n.quarterLength)
        for t in range(math.ceil(start), math.ceil(end)):
            out[t] = n.pitch
    return out


def _spelled_diatonically(a: pitch.Pitch, b: pitch.Pitch) -> bool:
    """True when the interval's generic size is the one its semitones imply in a diatonic
    collection (so d4, A2, d7, ... spelled chromatically in Bach are excluded)."""
    semis = abs(b.midi - a.midi)
    iv = interval.Interval(a, b)
    sizes = {0: (1,), 1: (2,), 2: (2,), 3: (3,), 4: (3,), 5: (4,), 6: (4, 5),
             7: (5,), 8: (6,), 9: (6,), 10: (7,), 11: (7,)}
    return iv.generic.undirected in {g + 7 * (semis // 12) for g in sizes[semis % 12]}


def test_agrees_with_music21_voice_leading_on_bach_chorales():
    quartets = []
    skipped = 0
    for name in ("bach/bwv66.6", "bach/bwv269", "bach/bwv347", "bach/bwv153.1", "bach/bwv86.6"):
        score = corpus.parse(name)
        sop, bass = _beat_pitches(score.parts[0]), _beat_pitches(score.parts[-1])
        for t in sorted(set(sop) & set(bass)):
            if t + 1 in sop and t + 1 in bass:
                q = (sop[t], sop[t + 1], bass[t], bass[t + 1])
                pairs = ((q[0], q[2]), (q[1], q[3]), (q[0], q[1]), (q[2], q[3]))
                if all(_spelled_diatonically(a, b) for a, b in pairs):
                    quartets.append(q)
                else:
                    skipped += 1
    assert len(quartets) >= 200 and skipped < len(quartets) // 10
    # Alternate which voice is the counterpoint, so leaps are checked in soprano and bass.
    counts = _compare_with_vlq(quartets, [k % 2 == 0 for k in range(len(quartets))])
    assert counts["contrary"] > 20 and counts["similar"] + counts["parallel"] > 20


# --- hand-made pieces: each breaks one rule ---------------------------------------------------


def _piece(cantus: str, cp: str, position: str = "below") -> FirstSpeciesPiece:
    cf = tuple(pitch.Pitch(n).midi for n in cantus.split())
    return FirstSpeciesPiece(cf, tuple(pitch.Pitch(n).midi for n in cp.split()), position, cf[-1] % 12)


CF_D = "D4 F4 E4 D4 G4 F4 A4 G4 F4 E4 D4"  # Fux's dorian cantus (fig. 5)
CF_E = "E4 C4 D4 C4 A3 A4 G4 E4 F4 E4"  # Fux's phrygian cantus (fig. 11)
CF_F = "F3 G3 A3 F3 D3 E3 F3 C4 A3 F3 G3 F3"  # Fux's lydian cantus (fig. 14, above the cp)

HAND_MADE: list[tuple[str, FirstSpeciesPiece, set[tuple[str, int]]]] = [
    ("Fux fig. 5, faultless", _piece(CF_D, "A4 A4 G4 A4 B4 C5 C5 B4 D5 C#5 D5"), set()),
    ("major second over F4", _piece(CF_D, "A4 G4 G4 A4 B4 C5 C5 B4 D5 C#5 D5"), {("dissonance", 1)}),
    ("fourth over G4", _piece(CF_D, "A4 A4 G4 A4 C5 C5 C5 B4 D5 C#5 D5"), {("dissonance", 4)}),
    ("P5 D4/A4 -> P5 F4/C5, both up", _piece(CF_D, "A4 C5 G4 A4 B4 C5 C5 B4 D5 C#5 D5"), {("parallel_fifths", 1)}),
    ("P8 F3/F2 -> P8 G3/G2, both up", _piece(CF_F, "F2 G2 F2 A2 B-2 G2 D3 C3 D3 D2 E2 F2", "above"),
     {("parallel_octaves", 1)}),
    # Unisons moving in parallel are always also a middle unison and an overlap.
    ("unison D4 -> unison E4, both up", _piece("D4 E4 C4 D4", "D4 E4 E4 D4"),
     {("parallel_octaves", 1), ("middle_unison", 1), ("voice_overlap", 1)}),
    ("m6 E4/C5 -> P5 D4/A4, both down", _piece(CF_D, "A4 A4 C5 A4 B4 C5 C5 B4 D5 C#5 D5"), {("hidden_fifths", 3)}),
    ("m6 F3/A2 -> P8 C4/C3, both up", _piece(CF_F, "F2 E2 F2 A2 B-2 G2 A2 C3 D3 D2 E2 F2", "above"),
     {("hidden_octaves", 7)}),
    ("cp dips a third under the cantus", _piece("D4 F4 E4 G4 E4 F4 E4 D4", "A4 A4 G4 E4 G4 A4 C#5 D5"),
     {("voice_crossing", 3)}),
    ("cantus leaps A3-A4 past the cp's F4", _piece(CF_E, "B4 C5 F4 G4 F4 C5 B4 E5 D5 E5"), {("voice_overlap", 5)}),
    ("starts on a third", _piece(CF_D, "F4 A4 G4 A4 B4 C5 C5 B4 D5 C#5 D5"), {("bad_start", 0)}),
    ("cp below starts a fifth under", _piece("D4 F4 E4 D4", "G3 A3 C#4 D4", "above"), {("bad_start", 0)}),
    ("ends on a fifth", _piece("D4 F4 E4 D4", "A4 A4 G4 A4"), {("bad_end", 3)}),
    ("final reached by a leap of a fifth", _piece("D4 F4 E4 D4", "A4 A4 G4 D5"), {("bad_cadence", 3)}),
    # A step in similar motion into the final octave is always a hidden (or parallel) octave.
    ("final octave reached in similar motion", _piece("D4 F4 A3 D4", "A4 A4 C5 D5"),
     {("bad_cadence", 3), ("hidden_octaves", 3)}),
    ("tritone leap B-4 to E5", _piece(CF_E, "B4 C5 F4 G4 A4 C5 B-4 E5 D5 E5"), {("forbidden_leap", 7)}),
    # A5 over D4 is a twelfth: no m7 leap fits this cantus without breaking a second rule.
    ("minor seventh leap F5 down to G4", _piece(CF_D, "A5 F5 G4 A4 B4 C5 C5 B4 D5 C#5 D5"),
     {("forbidden_leap", 2), ("voice_range", 0)}),
    ("major seventh leap F2 up to E3", _piece(CF_F, "F2 E3 D3 A2 B-2 G2 D3 C3 D3 D2 E2 F2", "above"),
     {("forbidden_leap", 1)}),
    ("fourth down D5-A4 continued down to G4", _piece(CF_D, "D5 A4 G4 A4 B4 C5 C5 B4 D5 C#5 D5"),
     {("unrecovered_leap", 2)}),
    ("unison F4 in the middle", _piece(CF_D, "A4 F4 G4 A4 B4 C5 C5 B4 D5 C#5 D5"), {("middle_unison", 1)}),
    ("four thirds in a row", _piece(CF_D, "A4 A4 G4 A4 B4 A4 C5 B4 D5 C#5 D5"), {("parallel_run", 7)}),
    ("raised leading tone before the cadence", _piece(CF_D, "A4 A4 G4 A4 B4 C5 C5 B4 C#5 C#5 D5"),
     {("outside_mode", 8)}),
    ("opens a twelfth apart, A4 over D3", _piece("D3 F3 E3 D3", "A4 F4 C#4 D4"), {("voice_range", 0)}),
    ("E-flat in dorian", _piece(CF_D, "A4 A4 G4 A4 B4 C5 C5 E-5 D5 C#5 D5"), {("outside_mode", 7)}),
]


@pytest.mark.parametrize("label,piece,expected", HAND_MADE, ids=[h[0] for h in HAND_MADE])
def test_hand_made_piece_breaks_exactly_the_intended_rule(label, piece, expected):
    (report,) = R.reports(FirstSpeciesBatch.from_pieces([piece]))
    assert _hard(report) == expected, label


def test_soft_rules_on_hand_made_pieces():
    cf = "D4 E4 F4 G4 F4 E4 D4"
    similar = _piece(cf, "D5 C5 A4 B4 D5 C#5 D5")  # thirds F4/A4 -> G4/B4, sixths F4/D5 -> E4/C#5
    perfect = _piece("D4 E4 F4 E4 D4", "D5 C5 C5 C5 D5")  # P5 C5 over F4, entered obliquely
    reps = R.reports(FirstSpeciesBatch.from_pieces([similar, perfect]))
    assert reps[0].violations == (("similar_motion", 3), ("similar_motion", 5))
    assert reps[1].violations == (("middle_perfect", 2),)


def test_mode_collections_of_fux_cantus_firmi():
    """The cantus's diatonic collections: Fux's D and F cantus omit B, so B-flat is allowed
    beside B; his G cantus omits F, so F-sharp is allowed; the A and E cantus fix one set."""
    white = {0, 2, 4, 5, 7, 9, 11}
    assert R.mode_pitch_classes(_piece(CF_D, CF_D).cantus) == white | {10}
    assert R.mode_pitch_classes(_piece(CF_F, CF_F).cantus) == white | {10}
    assert R.mode_pitch_classes(_piece(CF_E, CF_E).cantus) == white | {10}  # E cantus omits B too
    g = "G3 C4 B3 G3 C4 E4 D4 G4 E4 C4 D4 B3 A3 G3"
    assert R.mode_pitch_classes(_piece(g, g).cantus) == white | {6}
    a = "A3 C4 B3 D4 C4 E4 F4 E4 D4 C4 B3 A3"
    assert R.mode_pitch_classes(_piece(a, a).cantus) == white
    assert R.mode_pitch_classes((60, 61, 62)) == {0, 1, 2}  # fits no diatonic set: itself


def test_invalid_pitch_is_rejected_but_padding_is_ignored():
    batch = FirstSpeciesBatch.from_pieces([_piece("D4 E4 D4", "D5 C#5 D5"), _piece("D4 D4", "D5 D5")])
    batch.counterpoint[1, 2] = -1  # padding: ignored
    R.violations(batch)
    batch.counterpoint[0, 1] = 200
    with pytest.raises(ValueError, match=r"counterpoint\[0, 1\] = 200"):
        R.violations(batch)


def test_motion_types_of_a_hand_made_piece():
    p = _piece("D4 D4 E4 F4 E4 D4", "A4 A4 G4 A4 C#5 D5")  # none, contrary, similar/parallel, contrary x2
    codes = R.motion_types(FirstSpeciesBatch.from_pieces([p]))[0].tolist()
    assert codes == [R.UNDEFINED, R.NO_MOTION, R.CONTRARY, R.PARALLEL, R.CONTRARY, R.CONTRARY]
    p = _piece("D4 E4 F4 D4", "A4 A4 C5 D5")  # oblique, similar (P4 -> P5), contrary
    codes = R.motion_types(FirstSpeciesBatch.from_pieces([p]))[0].tolist()
    assert codes == [R.UNDEFINED, R.OBLIQUE, R.SIMILAR, R.CONTRARY]


# --- naive reference, batched vs per piece, padding -------------------------------------------

_MAJOR = (0, 2, 4, 5, 7, 9, 11)


def _reference(p: FirstSpeciesPiece) -> set[tuple[str, int]]:
    """Every rule as a plain loop over one piece, written from the rule texts."""
    up, lo, cp, cf = p.upper, p.lower, p.counterpoint, p.cantus
    n = len(cp)
    out: set[tuple[str, int]] = set()

    def dist(i: int) -> int:
        return abs(up[i] - lo[i])

    def motion(i: int) -> str:
        a, b = up[i] - up[i - 1], lo[i] - lo[i - 1]
        if a == 0 and b == 0:
            return "none"
        if a == 0 or b == 0:
            return "oblique"
        return "similar" if (a > 0) == (b > 0) else "contrary"

    def third_or_sixth(i: int) -> str:
        return {3: "3", 4: "3", 8: "6", 9: "6"}.get(dist(i) % 12, "")

    collections = [{(t + s) % 12 for s in _MAJOR} for t in range(12)]
    cantus_pcs = {m % 12 for m in cf}
    fits = [c for c in collections if cantus_pcs <= c]
    allowed = set().union(*fits) if fits else cantus_pcs
    for i in range(n):
        d = dist(i)
        if d % 12 not in (0, 3, 4, 7, 8, 9):
            out.add(("dissonance", i))
        if up[i] < lo[i]:
            out.add(("voice_crossing", i))
        if d > 16:
            out.add(("voice_range", i))
        if 0 < i < n - 1 and d == 0:
            out.add(("middle_unison", i))
        if 0 < i < n - 1 and d % 12 in (0, 7):
            out.add(("middle_perfect", i))
        if i == n - 1 and d % 12 != 0:
            out.add(("bad_end", i))
        if cp[i] % 12 not in allowed and not (i == n - 2 and cp[i] % 12 == (p.final - 1) % 12):
            out.add(("outside_mode", i))
        if i == 0:
            rel = cp[0] - cf[0]
            if not (rel % 12 == 0 or (p.cantus_position == "below" and rel >= 0 and rel % 12 == 7)):
                out.add(("bad_start", 0))
            continue
        similar = motion(i) == "similar"
        pd = dist(i - 1)
        if similar:
            out.add(("similar_motion", i))
            if d % 12 == 7:
                out.add(("parallel_fifths" if pd % 12 == 7 else "hidden_fifths", i))
            if d % 12 == 0:
                same_kind = pd % 12 == 0 and (pd == 0) == (d == 0)
                out.add(("parallel_octaves" if same_kind else "hidden_octaves", i))
        if up[i] < lo[i - 1] or lo[i] > up[i - 1]:
            out.add(("voice_overlap", i))
        leap = abs(cp[i] - cp[i - 1])
        if leap == 6 or (leap > 7 and leap != 12):
            out.add(("forbidden_leap", i))
        if i >= 2 and abs(cp[i - 1] - cp[i - 2]) > 4:
            before, after = cp[i - 1] - cp[i - 2], cp[i] - cp[i - 1]
            if not (1 <= abs(after) <= 2 and (after > 0) != (before > 0)):
                out.add(("unrecovered_leap", i))
        if i == n - 1 and not (1 <= leap <= 2 and motion(i) == "contrary"):
            out.add(("bad_cadence", i))
        if i >= 3 and all(
            motion(j) == "similar" and third_or_sixth(j) and third_or_sixth(j) == third_or_sixth(j - 1)
            for j in (i - 2, i - 1, i)
        ):
            out.add(("parallel_run", i))
    return out


def _random_pieces(n: int, seed: int) -> list[FirstSpeciesPiece]:
    """Mixed-length pieces (1..14 notes): a diatonic cantus walk and a counterpoint that mostly
    moves by small intervals around consonances, with some chromatic notes and crossings."""
    rng = np.random.default_rng(seed)
    pieces = []
    for _ in range(n):
        length = int(rng.integers(1, 15))
        tonic = int(rng.integers(12))
        degrees = np.clip(np.cumsum(rng.integers(-3, 4, size=length)) + 14, 0, 27)
        cf = [48 + tonic + 12 * (d // 7) + _MAJOR[d % 7] for d in degrees]
        offsets = rng.choice([-12, -9, -8, -7, -4, -3, 0, 3, 4, 5, 7, 8, 9, 12, 16], size=length)
        keep = rng.random(length) < 0.4  # parallel-ish runs: reuse the previous offset
        for i in range(1, length):
            if keep[i]:
                offsets[i] = offsets[i - 1]
        chroma = np.where(rng.random(length) < 0.08, rng.choice([-1, 1], size=length), 0)
        cp = [c + int(o) + int(x) for c, o, x in zip(cf, offsets, chroma)]
        below = bool(rng.random() < 0.5)
        pieces.append(FirstSpeciesPiece(tuple(cf), tuple(cp), "below" if below else "above", cf[-1] % 12))
    return pieces


@pytest.fixture(scope="module")
def random_pieces() -> list[FirstSpeciesPiece]:
    return _random_pieces(400, seed=11)


def test_batched_rules_match_naive_reference(random_pieces):
    batch = FirstSpeciesBatch.from_pieces(random_pieces)
    reports = R.reports(batch)
    fired: set[str] = set()
    for p, rep in zip(random_pieces, reports):
        assert set(rep.violations) == _reference(p), p
        fired |= {name for name, _ in rep.violations}
    assert fired == set(R.RULES_BY_NAME)  # every rule was exercised


def test_padded_batch_equals_piece_by_piece(random_pieces):
    batch = FirstSpeciesBatch.from_pieces(random_pieces)
    mask = batch.mask
    # Padding content must not matter: fill it with random pitches.
    rng = np.random.default_rng(3)
    batch.cantus[~mask] = rng.integers(30, 90, size=int((~mask).sum()))
    batch.counterpoint[~mask] = rng.integers(30, 90, size=int((~mask).sum()))
    together = R.violations(batch)
    steps = R.step_rewards(batch)
    for b, p in enumerate(random_pieces):
        alone = R.violations(FirstSpeciesBatch.from_pieces([p]))
        n = len(p.cantus)
        for name, v in together.items():
            assert not v[b, n:].any(), (name, p)
            np.testing.assert_array_equal(v[b, :n], alone[name][0], err_msg=f"{name} {p}")
        assert not steps[b, n:].any()


def test_rule_fn_alone_equals_shared_violations(random_pieces):
    batch = FirstSpeciesBatch.from_pieces(random_pieces[:50])
    shared = R.violations(batch)
    for rule in R.FIRST_SPECIES_RULES:
        np.testing.assert_array_equal(rule.fn(batch), shared[rule.name], err_msg=rule.name)
    custom = R.Rule("high_cp", 2.0, "counterpoint above C6", lambda b: b.counterpoint > 84)
    v = R.violations(batch, [custom])["high_cp"]
    np.testing.assert_array_equal(v, (batch.counterpoint > 84) & batch.mask)


# --- rewards and reports ----------------------------------------------------------------------


def test_rewards_weights_and_reports(random_pieces):
    batch = FirstSpeciesBatch.from_pieces(random_pieces[:60])
    v = R.violations(batch)
    expected = -sum(R.RULES_BY_NAME[n].weight * v[n].astype(float) for n in v)
    np.testing.assert_allclose(R.step_rewards(batch), expected)
    np.testing.assert_allclose(R.total_rewards(batch), expected.sum(axis=1))
    only_fifths = R.step_rewards(batch, {n: 0.0 for n in v} | {"parallel_fifths": 3.0})
    np.testing.assert_allclose(only_fifths, -3.0 * v["parallel_fifths"])
    reps = R.reports(batch, {"similar_motion": 0.0})
    totals = R.total_rewards(batch, {"similar_motion": 0.0})
    for b, rep in enumerate(reps):
        assert rep.reward == pytest.approx(totals[b])
        assert [i for _, i in rep.violations] == sorted(i for _, i in rep.violations)
        assert rep.counts() == {n: int(v[n][b].sum()) for n in v if v[n][b].any()}


def test_unknown_weight_name_is_rejected():
    batch = FirstSpeciesBatch.from_pieces([_piece("D4 E4 D4", "D5 C#5 D5")])
    with pytest.raises(ValueError, match="parallel_fifth.*valid names.*parallel_fifths"):
        R.step_rewards(batch, {"parallel_fifth": 1.0})


def test_rule_table_is_documented():
    assert len(R.FIRST_SPECIES_RULES) == len(R.RULES_BY_NAME)
    for rule in R.FIRST_SPECIES_RULES:
        assert re.fullmatch(r"[a-z][a-z_]*", rule.name) and rule.doc and rule.weight > 0


def test_counterfactual_rewards_match_scoring_each_changed_piece(random_pieces):
    """r[b, i, a] against the naive reference: piece b with note i set to cantus[i] + values[a],
    scored from the rule texts at note i; plus the bonus at the last note when the changed
    piece breaks no hard rule. At the piece's own interval it is step_rewards."""
    pieces = [p for p in random_pieces if len(p.cantus) >= 2 and 36 <= min(p.cantus) and max(p.cantus) <= 84][:40]  # the cantus tokens' range
    values = np.arange(-24, 25)
    batch = FirstSpeciesBatch.from_pieces(pieces)
    weights = {r.name: r.weight for r in R.FIRST_SPECIES_RULES}
    got = R.counterfactual_step_rewards(batch, values, clean_bonus=0.5)
    own = R.step_rewards(batch)
    for b, p in enumerate(pieces):
        n = len(p.cantus)
        for i in range(n):
            for a in range(0, len(values), 3):
                cp = p.counterpoint[:i] + (p.cantus[i] + int(values[a]),) + p.counterpoint[i + 1 :]
                found = _reference(FirstSpeciesPiece(p.cantus, cp, p.cantus_position, p.final))
                want = -sum(weights[name] for name, j in found if j == i)
                later = cp[: i + 1] + tuple(c + 7 for c in p.cantus[i + 1 :])  # other notes after i: note i's rules do not look ahead
                assert {v for v in _reference(FirstSpeciesPiece(p.cantus, later, p.cantus_position, p.final)) if v[1] == i} == {v for v in found if v[1] == i}
                if i == n - 1 and not any(name in HARD_RULES for name, _ in found):
                    want += 0.5
                assert got[b, i, a] == pytest.approx(want), (p, i, values[a])
            assert got[b, i, int(np.flatnonzero(values == p.counterpoint[i] - p.cantus[i])[0])] == pytest.approx(
                own[b, i] + (0.5 if i == n - 1 and not any(name in HARD_RULES for name, _ in _reference(p)) else 0.0))
        assert (got[b, n:] == 0).all()
