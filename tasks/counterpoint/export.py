"""Pieces as music21 scores, MusicXML and MIDI files (for listening, engraving and checks).

First species: two parts (upper voice first), one whole note per 4/4 bar, the cantus firmus
and the counterpoint named as such. Melody: one part on the 16th-note grid of Sequence Tutor's
events (a note lasts from its note-on to the next note-on or ``NOTE_OFF``; a leading
``NO_EVENT`` is a rest). Files are written atomically: a temp file in the target directory,
then ``os.replace``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from rlhf.errors import UserError
from tasks.counterpoint.piece import NO_EVENT, NOTE_OFF, FirstSpeciesPiece, Melody, event_pitch

SIXTEENTH = 0.25  # quarter lengths per melody step


def melody_notes(events: tuple[int, ...]) -> list[tuple[int | None, int]]:
    """Run-length form of Sequence Tutor events: ``(midi or None for a rest, steps)``.

    A note-on starts a note; ``NO_EVENT`` extends whatever sounds (or the rest); ``NOTE_OFF``
    starts a rest (and extends a rest already running).
    """
    runs: list[list] = []
    for e in events:
        if e == NO_EVENT or (e == NOTE_OFF and runs and runs[-1][0] is None):
            if runs:
                runs[-1][1] += 1
            else:
                runs.append([None, 1])
        elif e == NOTE_OFF:
            runs.append([None, 1])
        else:
            runs.append([event_pitch(e), 1])
    return [(p, n) for p, n in runs]


def _part(name: str, abbreviation: str):
    from music21 import instrument, stream

    part = stream.Part(id=abbreviation)
    inst = instrument.Piano()  # a neutral timbre; MIDI programs of voices are not standard
    inst.partName, inst.partAbbreviation = name, abbreviation
    part.insert(0, inst)
    part.partName = name
    return part


def _first_species_score(item: FirstSpeciesPiece):
    from music21 import clef, meter, note, stream

    upper_is_cantus = item.cantus_position == "above"
    score = stream.Score()
    for pitches, is_cantus in ((item.upper, upper_is_cantus), (item.lower, not upper_is_cantus)):
        part = _part("Cantus firmus" if is_cantus else "Counterpoint", "CF" if is_cantus else "CP")
        line = stream.Stream([note.Note(p, quarterLength=4.0) for p in pitches])
        part.insert(0, clef.bestClef(line, recurse=True))
        part.insert(0, meter.TimeSignature("4/4"))
        for i, p in enumerate(pitches):
            part.insert(4.0 * i, note.Note(p, quarterLength=4.0))
        score.insert(0, part.makeMeasures())
    return score


def _melody_score(item: Melody):
    from music21 import meter, note, stream

    part = _part("Melody", "M")
    part.insert(0, meter.TimeSignature("4/4"))
    offset = 0.0
    for pitch, steps in melody_notes(item.events):
        ql = steps * SIXTEENTH
        part.insert(
            offset, note.Rest(quarterLength=ql) if pitch is None else note.Note(pitch, quarterLength=ql)
        )
        offset += ql
    score = stream.Score()
    score.insert(0, part.makeMeasures().makeNotation())
    return score


def to_score(item: FirstSpeciesPiece | Melody):
    """A ``music21.stream.Score`` of a first-species piece or a melody, titled by its source."""
    from music21 import metadata

    if isinstance(item, FirstSpeciesPiece):
        score = _first_species_score(item)
    elif isinstance(item, Melody):
        score = _melody_score(item)
    else:
        raise TypeError(f"to_score needs a FirstSpeciesPiece or Melody, got {type(item).__name__}")
    score.metadata = metadata.Metadata(title=item.source or "untitled")
    return score


def _write_atomic(item: FirstSpeciesPiece | Melody, path: str | Path, fmt: str) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: directory {path.parent} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        written = to_score(item).write(fmt, fp=tmp)
        os.replace(written, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def write_musicxml(item: FirstSpeciesPiece | Melody, path: str | Path) -> Path:
    """Write ``item`` as MusicXML (uncompressed; use a .musicxml or .xml name)."""
    return _write_atomic(item, path, "musicxml")


def write_midi(item: FirstSpeciesPiece | Melody, path: str | Path) -> Path:
    """Write ``item`` as a standard MIDI file (one track per part)."""
    return _write_atomic(item, path, "midi")


def read_back(path: str | Path) -> list[list[int]]:
    """MIDI pitches of each part of a score file, in order (ties merged, rests skipped)."""
    from music21 import converter

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; check the path")
    try:
        score = converter.parse(str(path))
    except Exception as e:  # music21 raises many unrelated types for unreadable input
        raise UserError(f"cannot read {path} as a score ({type(e).__name__}: {e})") from e
    return [[int(n.pitch.midi) for n in part.stripTies().flatten().notes] for part in score.parts]
