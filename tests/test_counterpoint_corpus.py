"""Corpus extraction from real music21 chorales / folk songs, splits, caching, and cantus firmi."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from music21 import converter, corpus, expressions, interval, meter, note, pitch, stream

import tasks.counterpoint.corpus as corpus_mod
from rlhf.errors import UserError
from tasks.counterpoint.cantus import (
    FUX_CANTUS_FIRMI,
    default_eval_cantus,
    fux_cantus_firmi,
    fux_data_dir,
    load_cantus_musicxml,
    load_fux_first_species,
    parse_note_names,
)
from tasks.counterpoint.corpus import (
    REST,
    corpus_stats,
    extract_first_species,
    extract_melodies,
    phrase_windows,
    sounding_at,
    split_by_piece,
)
from tasks.counterpoint.piece import MELODY_STEPS, NO_EVENT, NOTE_OFF, event_pitch
from tasks.counterpoint.tokens import build_codec

N_CHORALES = 3


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("corpus-cache")


@pytest.fixture(scope="module")
def chorale_examples(cache_dir):
    return extract_first_species(
        max_pieces=N_CHORALES, transpositions=(0, 2, -3), min_notes=6, max_notes=12, cache_dir=cache_dir
    )


@pytest.fixture(scope="module")
def melodies(cache_dir):
    return extract_melodies(max_pieces=N_CHORALES, cache_dir=cache_dir)


def _fux_dir() -> Path:
    d = fux_data_dir()
    if d is None:
        pytest.skip("Fux data not found: set RLHF_FUX_DIR or place it at <repo>/../shared/data/fux-species")
    return d


# --------------------------------------------------------------------------- first species


def test_first_species_examples_are_valid(chorale_examples) -> None:
    codec = build_codec("first_species")
    assert chorale_examples
    pairs = set()
    for p in chorale_examples:
        assert 6 <= len(p.cantus) <= 12
        assert all(36 <= m <= 84 for m in p.cantus)
        assert all(abs(cp - cf) <= 24 for cf, cp in zip(p.cantus, p.counterpoint))
        m = re.fullmatch(r"(bach/bwv[\w.]+)#p[\d.]+:(BS|BA|BT|SB)([+-]\d+)", p.source)
        assert m, p.source
        assert p.piece_id == m.group(1)
        assert p.cantus_position == ("above" if m.group(2) == "SB" else "below")
        pairs.add(m.group(2))
        prompt, completion = codec.encode(p)
        assert codec.decode(prompt, completion, p.final, p.source) == p
    assert pairs == {"BS", "BA", "BT", "SB"}
    assert len({p.piece_id for p in chorale_examples}) == N_CHORALES


def test_transpositions_are_shifted_copies(chorale_examples) -> None:
    by_source = {p.source: p for p in chorale_examples}
    n_checked = 0
    for src, p in by_source.items():
        if src.endswith("+0") and src[:-2] + "+2" in by_source:
            assert by_source[src[:-2] + "+2"] == replace(p.transposed(2), source=src[:-2] + "+2")
            n_checked += 1
    assert n_checked > 0


def _music21_pitch_at(part: stream.Part, t: float) -> int | None:
    """music21's own lookup of the note sounding at offset ``t`` (None for a rest)."""
    el = part.flatten().notesAndRests.stream().getElementAtOrBefore(t)
    if el is None or el.isRest or el.offset + el.quarterLength <= t:
        return None
    return el.pitch.midi


def test_first_phrase_matches_the_chorale(chorale_examples) -> None:
    """bwv269 (G major, quarter-note upbeat): phrase 1 runs to the end of the first fermata."""
    name = "bach/bwv269"
    score = corpus.parse(name)
    soprano = score.parts["Soprano"]
    fermata = next(
        n for n in soprano.flatten().notes if any(isinstance(e, expressions.Fermata) for e in n.expressions)
    )
    beats = np.arange(0.0, float(fermata.offset + fermata.quarterLength))  # the upbeat is a whole beat
    assert len(beats) == 12  # <= max_notes, so phrase 1 is one window, "p1"
    voices = {
        v[0]: [_music21_pitch_at(score.parts[v], t) for t in beats]
        for v in ("Soprano", "Alto", "Tenor", "Bass")
    }
    by_source = {p.source: p for p in chorale_examples}
    for cf, cp in ("BS", "BA", "BT", "SB"):
        example = by_source.get(f"{name}#p1:{cf}{cp}+0")
        too_wide = max(abs(a - b) for a, b in zip(voices[cf], voices[cp])) > 24
        assert (example is None) == too_wide, (cf, cp)
        if example is not None:
            assert list(example.cantus) == voices[cf] and list(example.counterpoint) == voices[cp]
            assert example.final == score.analyze("key").tonic.pitchClass == 7  # G major
    assert f"{name}#p1:BT+0" in by_source and f"{name}#p1:BS+0" not in by_source  # S-B spans 28 here


def test_sounding_at_matches_naive_loop() -> None:
    rng = np.random.default_rng(0)
    durs = rng.choice([0.5, 1.0, 1.5, 2.0], size=40)
    onsets = np.r_[0.0, np.cumsum(durs)[:-1]]
    gaps = rng.random(40) < 0.2
    ends = np.where(gaps, onsets + durs / 2, onsets + durs)  # some notes leave a gap after them
    pitches = rng.integers(40, 80, size=40)
    times = np.arange(0, onsets[-1] + 3, 0.5)
    ref = []
    for t in times:
        hit = [p for o, e, p in zip(onsets, ends, pitches) if o <= t < e]
        ref.append(hit[0] if hit else REST)
    assert sounding_at(onsets, ends, pitches, times).tolist() == ref


def test_phrase_windows_matches_naive_reference() -> None:
    rng = np.random.default_rng(2)
    for _ in range(100):
        times = np.arange(rng.integers(1, 80), dtype=float)
        bounds = np.sort(rng.choice(times, size=min(len(times), rng.integers(0, 6)), replace=False) + 1.0)
        valid = rng.random(len(times)) > 0.05
        lo, hi = sorted(rng.integers(2, 20, size=2))
        # reference: walk the beats, closing a phrase at each boundary and each invalid beat
        phrases, current = [], []
        for i, t in enumerate(times):
            if current and any(times[current[-1]] < b <= t for b in bounds):
                phrases.append(current)
                current = []
            if valid[i]:
                current.append(i)
            elif current:
                phrases.append(current)
                current = []
        phrases += [current] if current else []
        expected = []
        for idx in phrases:
            k = -(-len(idx) // hi)  # fewest windows of at most `hi` beats
            for j in range(k):
                a, b = idx[0] + j * len(idx) // k, idx[0] + (j + 1) * len(idx) // k
                if b - a >= lo:
                    expected.append((a, b))
        got = [(a, b) for a, b, _ in phrase_windows(times, bounds, lo, hi, valid)]
        assert got == expected
        assert all(valid[a:b].all() and b - a <= hi for a, b in got)


def test_cache_hit_returns_identical_data(chorale_examples, cache_dir, monkeypatch) -> None:
    files = sorted(cache_dir.glob("first_species-*.json"))
    assert len(files) == 1

    def fail(*args, **kwargs):
        raise AssertionError("cache miss: chorales were parsed again")

    monkeypatch.setattr(corpus_mod, "chorale_first_species", fail)
    again = extract_first_species(
        max_pieces=N_CHORALES, transpositions=(0, 2, -3), min_notes=6, max_notes=12, cache_dir=cache_dir
    )
    assert again == chorale_examples
    with pytest.raises(AssertionError, match="cache miss"):  # other parameters: another file
        extract_first_species(
            max_pieces=1, transpositions=(0,), min_notes=6, max_notes=12, cache_dir=cache_dir
        )
    assert not list(cache_dir.glob("*.tmp"))


def test_split_by_piece_has_no_shared_piece(chorale_examples, melodies) -> None:
    for items in (chorale_examples, melodies):
        train, val = split_by_piece(items, val_fraction=0.34, seed=0)
        assert train and val
        assert not {x.piece_id for x in train} & {x.piece_id for x in val}
        assert sorted(map(repr, train + val)) == sorted(map(repr, items))
        assert split_by_piece(items, 0.34, 0) == (train, val)


def test_corpus_stats(chorale_examples) -> None:
    codec = build_codec("first_species")
    stats = corpus_stats(chorale_examples, codec)
    assert stats["examples"] == len(chorale_examples)
    assert stats["pieces"] == N_CHORALES
    # prompt: bos, position, N cantus, sep, (16 - N) padding seps; completion: N intervals, eos
    assert stats["tokens"] == sum(max(len(p.cantus), 16) + len(p.cantus) + 4 for p in chorale_examples)


# --------------------------------------------------------------------------- melodies


def _naive_notes(events) -> list[tuple[int, int]]:
    """(step, midi) of each note-on."""
    return [(i, event_pitch(e)) for i, e in enumerate(events) if e >= 2]


def test_melodies_are_valid(melodies) -> None:
    assert melodies
    sources = {m.piece_id.split("/")[0] for m in melodies}
    assert sources == {"essen", "bach"}
    for m in melodies:
        assert len(m.events) == MELODY_STEPS
        assert all(0 <= e < 38 for e in m.events)
        assert m.tonic in (0, 9)
        assert any(e >= 2 for e in m.events)
        # a NOTE_OFF never follows silence
        sounding = False
        for e in m.events:
            assert not (e == NOTE_OFF and not sounding)
            sounding = e >= 2 or (sounding and e == NO_EVENT)


def test_melody_window_matches_the_folk_song(melodies) -> None:
    """The first window of the first Essen tune, against music21's notes of that tune."""
    m = next(x for x in melodies if x.source.startswith("essen/") and x.source.endswith("#w1"))
    tune = dict(corpus_mod.essen_tunes())[m.piece_id]
    score = converter.parseData(tune, format="abc")
    part = score.parts[0]
    key = score.analyze("key")
    start = next(
        float(b.offset)
        for b in part.getElementsByClass("Measure")
        if b.duration.quarterLength == 4.0 and b.paddingLeft == 0
    )
    merged = part.stripTies().flatten().notes
    notes = [n for n in merged if start <= n.offset < start + 8]
    tied_in = [n for n in merged if n.offset < start < n.offset + n.quarterLength]
    notes = tied_in + notes  # a note tied into the window is re-struck at step 0
    expected_steps = [max(0, int(round((n.offset - start) * 4))) for n in notes]
    got = _naive_notes(m.events)
    assert [s for s, _ in got] == expected_steps
    shifts = {midi - n.pitch.midi for (_, midi), n in zip(got, notes)}
    assert len(shifts) == 1
    target = 9 if key.mode == "minor" else 0
    assert (key.tonic.pitchClass + shifts.pop()) % 12 == target == m.tonic


# --------------------------------------------------------------------------- cantus firmi


@pytest.mark.parametrize(
    "text, names",
    [
        ("D4 F4 E4 D4 G4 F4 A4 G4 F4 E4 D4", "D4 F4 E4 D4 G4 F4 A4 G4 F4 E4 D4"),
        ("Bb3, B-3,F#4 ,  c5", "B-3 B-3 F#4 C5"),
        ("C##4 Cb4 Ebb2 B#3; g2", "C##4 C-4 E--2 B#3 G2"),
    ],
)
def test_parse_note_names_against_music21(text: str, names: str) -> None:
    assert parse_note_names(text) == tuple(pitch.Pitch(n).midi for n in names.split())


@pytest.mark.parametrize(
    "text, position, token",
    [("D4 H4 E4", 2, "H4"), ("D4, F4, E", 3, "E"), ("C4 D#x4", 2, "D#x4"), ("C10", 1, "C10")],
)
def test_parse_note_names_errors(text: str, position: int, token: str) -> None:
    with pytest.raises(UserError, match=rf"note {position} \('{re.escape(token)}'\).*F#4, Bb3"):
        parse_note_names(text)


def test_parse_note_names_empty() -> None:
    with pytest.raises(UserError, match="no notes"):
        parse_note_names(" , ")


def _write_score(path: Path, lines: list[list]) -> Path:
    score = stream.Score()
    for line in lines:
        part = stream.Part()
        part.append(meter.TimeSignature("4/4"))
        for x in line:
            part.append(x)
        score.insert(0, part.makeMeasures())
    score.write("musicxml", fp=str(path))
    return path


def test_load_cantus_musicxml(tmp_path) -> None:
    upper, lower = parse_note_names("D5 C5 B4 A4"), parse_note_names("D3 E3 F3 D3")
    rest = note.Rest(quarterLength=4.0)
    path = _write_score(
        tmp_path / "cf.musicxml",
        [
            [note.Note(m, quarterLength=4.0) for m in upper] + [rest],
            [note.Note(m, quarterLength=2.0) for m in lower],
        ],
    )
    assert load_cantus_musicxml(path) == [upper, lower]


def test_load_cantus_musicxml_errors(tmp_path) -> None:
    from music21 import chord

    bad_rest = _write_score(
        tmp_path / "rest.musicxml",
        [[note.Note(60, quarterLength=4.0), note.Rest(quarterLength=4.0), note.Note(62, quarterLength=4.0)]],
    )
    with pytest.raises(UserError, match=r"rest\.musicxml: part 1, measure 2 has a rest"):
        load_cantus_musicxml(bad_rest)
    bad_chord = _write_score(
        tmp_path / "chord.musicxml",
        [[note.Note(60, quarterLength=4.0), chord.Chord([60, 64], quarterLength=4.0)]],
    )
    with pytest.raises(UserError, match=r"chord\.musicxml: part 1, measure 2 has a chord"):
        load_cantus_musicxml(bad_chord)
    with pytest.raises(UserError, match=r"nope\.mxl does not exist"):
        load_cantus_musicxml(tmp_path / "nope.mxl")
    garbage = tmp_path / "garbage.musicxml"
    garbage.write_text("<score-partwise><part id='P1'><measure")
    with pytest.raises(UserError, match=r"cannot read .*garbage\.musicxml"):
        load_cantus_musicxml(garbage)


def test_fux_builtins_equal_i_distinct() -> None:
    data = _fux_dir()
    builtin = dict(fux_cantus_firmi(None))
    from_file = fux_cantus_firmi(data)
    assert len(from_file) == 12  # six finals, each with the cantus below and above
    exact = set()
    for name, pitches in from_file:
        final = name.split("-")[1]
        ref = builtin[f"fux-{final}"]
        shift = pitches[0] - ref[0]
        assert shift in (0, -12, 12) and pitches == tuple(p + shift for p in ref), name
        if shift == 0:
            exact.add(final)
        assert pitches[-1] % 12 == pitch.Pitch(final.upper()).pitchClass  # ends on its final
    assert exact == {"d", "e", "f", "g", "a", "c"}
    # the second cantus on C, from figure 88a (cantus in the lower part)
    assert load_cantus_musicxml(data / "1x1" / "088a.mxl")[1] == builtin["fux-c-fig88"]


def test_default_eval_cantus() -> None:
    out = default_eval_cantus((0, -2, 3))
    assert len(out) == 3 * len(FUX_CANTUS_FIRMI)
    by_name = {name: (p, f) for name, p, f in out}
    d = parse_note_names(FUX_CANTUS_FIRMI["fux-d"])
    assert by_name["fux-d"] == (d, 2)
    assert by_name["fux-d-2"] == (tuple(x - 2 for x in d), 0)
    assert by_name["fux-g+3"][1] == 10


def test_fux_first_species_solutions() -> None:
    pieces = load_fux_first_species(_fux_dir(), corrected=False)
    assert [p.source for p in pieces] == [f"fux/fig{n}" for n in (5, 6, 11, 12, 13, 14, 15, 21, 22, 23)]
    builtin = dict(fux_cantus_firmi(None))
    finals = {"d": 2, "e": 4, "f": 5, "g": 7, "a": 9}
    dissonances = []
    for p, (final, pos) in zip(pieces, [(f, pos) for f in "defga" for pos in ("below", "above")]):
        ref = builtin[f"fux-{final}"]
        shift = p.cantus[0] - ref[0]
        assert shift % 12 == 0 and p.cantus == tuple(x + shift for x in ref), p.source
        assert p.final == finals[final] and p.cantus_position == pos
        # Fux's first species uses consonances only (Gradus I.1), by music21's judgement
        for i, (lo, hi) in enumerate(zip(p.lower, p.upper)):
            if not interval.Interval(note.Note(lo), note.Note(hi)).isConsonant():
                dissonances.append((p.source, i))
    # the one exception: fig. 22 note 8, counterpoint B3 under the cantus E4 (a fourth) -- the
    # encoding has the counterpoint an octave below the cantus in notes 6-10, probably an
    # octave slip of the transcription (B4 would be a fifth above)
    assert dissonances == [("fux/fig22", 7)]
    # ... which FUX_ERRATA mends: the corrected solutions are all consonant
    fixed = load_fux_first_species(_fux_dir())
    assert all(interval.Interval(note.Note(lo), note.Note(hi)).isConsonant() for p in fixed for lo, hi in zip(p.lower, p.upper))


def test_fux_data_dir_env(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLHF_FUX_DIR", str(tmp_path))
    assert fux_data_dir() == tmp_path
    monkeypatch.setenv("RLHF_FUX_DIR", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="RLHF_FUX_DIR"):
        fux_data_dir()
    monkeypatch.setenv("RLHF_FUX_DIR", str(tmp_path))
    with pytest.raises(UserError, match="data.tsv not found"):
        load_fux_first_species(tmp_path)
