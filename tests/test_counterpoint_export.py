"""Export round trips: write MusicXML / MIDI, parse back with music21, compare the notes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from music21 import converter

from rlhf.errors import UserError
from tasks.counterpoint.cantus import default_eval_cantus
from tasks.counterpoint.export import read_back, to_score, write_midi, write_musicxml
from tasks.counterpoint.piece import MELODY_STEPS, NO_EVENT, NOTE_OFF, FirstSpeciesPiece, Melody, event_pitch

WRITERS = {".musicxml": write_musicxml, ".mid": write_midi}


def piece_above() -> FirstSpeciesPiece:
    name, cf, final = default_eval_cantus((0,))[0]  # fux-d, D4 F4 E4 ...
    return FirstSpeciesPiece(
        cf, tuple(p - 12 + (3 if i % 2 else 0) for i, p in enumerate(cf)), "above", final, name
    )


def piece_below() -> FirstSpeciesPiece:
    _, cf, final = default_eval_cantus((-5,))[3]  # fux-g down a fourth
    return FirstSpeciesPiece(cf, tuple(p + 7 for p in cf), "below", final, "test#below")


def random_melody(seed: int) -> Melody:
    """Random events; every step gets a note-on with prob. 0.3, an off with 0.1, else hold."""
    rng = np.random.default_rng(seed)
    r = rng.random(MELODY_STEPS)
    pitches = rng.integers(2, 38, MELODY_STEPS)
    events = np.where(r < 0.3, pitches, np.where(r < 0.4, NOTE_OFF, NO_EVENT))
    return Melody(tuple(int(e) for e in events), 0, f"random{seed}")


def expected_notes(events) -> list[tuple[float, float, int]]:
    """(onset, duration, midi) in quarter notes, by a direct reading of Sequence Tutor's rules."""
    out = []
    for i, e in enumerate(events):
        if e >= 2:
            j = i + 1
            while j < len(events) and events[j] == NO_EVENT:
                j += 1
            out.append((i / 4, (j - i) / 4, event_pitch(e)))
    return out


def parsed_notes(path: Path) -> list[tuple[float, float, int]]:
    part = converter.parse(str(path)).parts[0]
    return [(float(n.offset), float(n.quarterLength), n.pitch.midi) for n in part.stripTies().flatten().notes]


@pytest.mark.parametrize("suffix", list(WRITERS))
@pytest.mark.parametrize("make", [piece_above, piece_below])
def test_first_species_round_trip(tmp_path, suffix: str, make) -> None:
    piece = make()
    path = WRITERS[suffix](piece, tmp_path / f"piece{suffix}")
    assert path == tmp_path / f"piece{suffix}"
    score = converter.parse(str(path))
    assert len(score.parts) == 2
    for part, line in zip(score.parts, (piece.upper, piece.lower)):
        notes = list(part.stripTies().flatten().notes)
        assert [n.pitch.midi for n in notes] == list(line)
        assert all(n.quarterLength == 4.0 for n in notes)  # whole notes
    assert read_back(path) == [list(piece.upper), list(piece.lower)]
    if suffix == ".musicxml":
        cantus_part = 0 if piece.cantus_position == "above" else 1
        names = [p.partName for p in score.parts]
        assert names[cantus_part] == "Cantus firmus" and names[1 - cantus_part] == "Counterpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"piece{suffix}"]  # no temp files left


@pytest.mark.parametrize("suffix", list(WRITERS))
def test_melody_round_trip(tmp_path, suffix: str) -> None:
    for seed in range(4):
        melody = random_melody(seed)
        path = WRITERS[suffix](melody, tmp_path / f"m{seed}{suffix}")
        assert parsed_notes(path) == expected_notes(melody.events)
        assert read_back(path) == [[p for _, _, p in expected_notes(melody.events)]]


def test_melody_score_is_two_bars_of_4_4() -> None:
    melody = random_melody(7)
    score = to_score(melody)
    part = score.parts[0]
    assert part.getTimeSignatures()[0].ratioString == "4/4"
    assert part.duration.quarterLength == 8.0
    assert score.metadata.title == "random7"


def test_overwrite_and_errors(tmp_path) -> None:
    path = tmp_path / "x.musicxml"
    write_musicxml(piece_above(), path)
    write_musicxml(piece_below(), path)  # replaced atomically
    assert read_back(path) == [list(piece_below().upper), list(piece_below().lower)]
    with pytest.raises(UserError, match="does not exist"):
        write_midi(piece_above(), tmp_path / "no" / "x.mid")
    with pytest.raises(UserError, match=r"missing\.mid does not exist"):
        read_back(tmp_path / "missing.mid")
