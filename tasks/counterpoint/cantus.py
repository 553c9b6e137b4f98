"""Cantus firmi: note-name parsing, MusicXML loading, and Fux's own cantus firmi and solutions.

Fux's material (Gradus ad Parnassum, 1725; figure numbers of the Norton/Mann edition, 1965) is
in the public domain. The built-in strings below are the distinct cantus firmi of Part I as
listed in Mark Gotham's edition (MarkGotham/species, README "Cantus firmus" table and
``I/I-Distinct.mxl``), so evaluation works without the shared data directory; the tests check
them against the data when it is present.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Sequence

from rlhf.errors import UserError
from tasks.counterpoint.piece import FirstSpeciesPiece

STEP_PC = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
_ACCIDENTAL = {"": 0, "#": 1, "##": 2, "b": -1, "bb": -2, "-": -1, "--": -2}
_NOTE_RE = re.compile(r"^([A-Ga-g])(##|#|bb|b|--|-|)(-?\d)$")
_SEPARATORS = re.compile(r"[\s,;]+")

# Distinct cantus firmi of Fux, Part I, one per modal final, at the octave of the edition's
# README table (I-Distinct.mxl has each at this octave or an octave lower). "fux-c-fig88" is the
# second cantus on C, as encoded in figure 88 (the README lists a 10-note variant
# C4 D4 F4 E4 G4 E4 F4 E4 D4 C4; the score has the 9 notes below).
FUX_CANTUS_FIRMI: dict[str, str] = {
    "fux-d": "D4 F4 E4 D4 G4 F4 A4 G4 F4 E4 D4",
    "fux-e": "E4 C4 D4 C4 A3 A4 G4 E4 F4 E4",
    "fux-f": "F3 G3 A3 F3 D3 E3 F3 C4 A3 F3 G3 F3",
    "fux-g": "G3 C4 B3 G3 C4 E4 D4 G4 E4 C4 D4 B3 A3 G3",
    "fux-a": "A3 C4 B3 D4 C4 E4 F4 E4 D4 C4 B3 A3",
    "fux-c": "C4 E4 F4 G4 E4 A4 G4 E4 F4 E4 D4 C4",
    "fux-c-fig88": "C4 D4 F4 E4 G4 F4 E4 D4 C4",
}
_DISTINCT_FINALS = ("d", "e", "f", "g", "a", "c")  # the finals of I/I-Distinct.mxl, in order

FUX_FIRST_SPECIES_FIGURES = (5, 6, 11, 12, 13, 14, 15, 21, 22, 23)


def note_name_to_midi(name: str) -> int:
    """MIDI number of a scientific pitch name (``C4`` = 60; ``Bb3``/``B-3`` = 58; ``Cb4`` = 59).

    ``midi = 12 * (octave + 1) + pc(step) + alteration``, as in music21's ``Pitch.midi``.
    Raises ``ValueError`` for anything else.
    """
    m = _NOTE_RE.match(name)
    if m is None:
        raise ValueError(name)
    step, acc, octave = m.groups()
    midi = 12 * (int(octave) + 1) + STEP_PC[step.upper()] + _ACCIDENTAL[acc]
    if not 0 <= midi <= 127:
        raise ValueError(name)
    return midi


def parse_note_names(text: str) -> tuple[int, ...]:
    """Parse ``"D4 F4 E4 ..."`` (spaces, commas or semicolons between notes) into MIDI numbers.

    Accepts sharps and flats as ``F#4``, ``Bb3``, ``B-3`` (and doubles ``##``, ``bb``, ``--``).
    """
    tokens = [t for t in _SEPARATORS.split(text.strip()) if t]
    if not tokens:
        raise UserError(
            f"no notes in {text!r}: give note names separated by spaces or commas, e.g. 'D4 F4 E4 D4'"
        )
    out = []
    for i, tok in enumerate(tokens):
        try:
            out.append(note_name_to_midi(tok))
        except ValueError:
            raise UserError(
                f"cannot read note {i + 1} ({tok!r}) of {text!r}: expected a letter A-G, an optional "
                "accidental (#, ##, b, bb, - or --) and an octave digit, e.g. D4, F#4, Bb3 or B-3, "
                "within MIDI 0..127"
            ) from None
    return tuple(out)


def _parse_score(path: Path):
    """music21 parse of ``path`` or a UserError naming the file."""
    from music21 import converter

    path = Path(path)
    if not path.is_file():
        raise UserError(f"score file {path} does not exist; check the path")
    try:
        return converter.parse(str(path))
    except Exception as e:  # music21 raises many unrelated types for unreadable input
        raise UserError(
            f"cannot read {path} as a score ({type(e).__name__}: {e}); "
            "give a MusicXML file (.xml, .mxl or .musicxml)"
        ) from e


def _parts(score) -> list:
    from music21 import stream

    parts = list(score.parts) if isinstance(score, stream.Score) else [score]
    return parts or [score]


def load_cantus_musicxml(path: str | Path) -> list[tuple[int, ...]]:
    """Each part of a MusicXML file as one cantus firmus (MIDI pitches in order; durations ignored).

    Tied notes count once. Leading and trailing rests are ignored (empty first/last bars are
    common in exported files); a rest between notes or a chord is an error.
    """
    path = Path(path)
    return _score_lines(_parse_score(path), path)


def _score_lines(score, path: Path) -> list[tuple[int, ...]]:
    """The note sequence of each part of a parsed ``score`` (see :func:`load_cantus_musicxml`)."""
    out = []
    for k, part in enumerate(_parts(score)):
        elems = [e for e in part.stripTies().flatten().notesAndRests if e.quarterLength > 0]
        notes_at = [i for i, e in enumerate(elems) if not e.isRest]
        if not notes_at:
            raise UserError(f"{path}: part {k + 1} has no notes; remove it or add the cantus firmus")
        pitches = []
        for e in elems[notes_at[0] : notes_at[-1] + 1]:
            if e.isRest or e.isChord or getattr(e, "pitch", None) is None:
                what = "a rest" if e.isRest else "a chord" if e.isChord else "an unpitched (percussion) note"
                raise UserError(
                    f"{path}: part {k + 1}, measure {e.measureNumber} has {what}; a cantus firmus "
                    "must be single notes without rests in between"
                )
            pitches.append(int(e.pitch.midi))
        out.append(tuple(pitches))
    return out


def fux_data_dir() -> Path | None:
    """The Fux data directory: ``$RLHF_FUX_DIR``, else ``<repo>/../shared/data/fux-species``, else None."""
    env = os.environ.get("RLHF_FUX_DIR")
    if env:
        path = Path(env)
        if not path.is_dir():
            raise UserError(
                f"RLHF_FUX_DIR={env} is not a directory; point it at the fux-species data "
                "(containing I/data.tsv and 1x1/) or unset it"
            )
        return path
    default = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fux-species"
    return default if default.is_dir() else None


def _distinct_segments(data_dir: Path) -> list[tuple[str, str, tuple[int, ...]]]:
    """(final, "Lower"/"Upper", pitches) for each cantus of ``I/I-Distinct.mxl``.

    The file holds one cantus per segment, in whichever of its two parts is not resting; each
    segment starts with a text "Modal final: d; Cantus firmus: Lower".
    """
    from music21 import expressions

    path = Path(data_dir) / "I" / "I-Distinct.mxl"
    score = _parse_score(path)
    labels: dict[int, tuple[str, str]] = {}
    for te in score.recurse().getElementsByClass(expressions.TextExpression):
        m = re.search(r"Modal final:\s*(\w+);\s*Cantus firmus:\s*(\w+)", te.content or "")
        if m:
            labels[te.measureNumber] = (m.group(1).lower(), m.group(2))
    starts = sorted(labels)
    segments: dict[int, list[tuple[float, int]]] = {s: [] for s in starts}
    for part in score.parts:
        for n in part.stripTies().flatten().notes:
            seg = max((s for s in starts if s <= n.measureNumber), default=None)
            if seg is None:
                raise UserError(f"{path}: note in measure {n.measureNumber} precedes the first label")
            segments[seg].append((n.offset, int(n.pitch.midi)))
    return [(*labels[s], tuple(p for _, p in sorted(segments[s]))) for s in starts]


def fux_cantus_firmi(data_dir: Path | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """Fux's distinct cantus firmi as ``(name, pitches)``, e.g. ``("fux-d", (62, 65, ...))``.

    Without ``data_dir``: the built-in :data:`FUX_CANTUS_FIRMI`. With it: the cantus firmi as
    placed in ``I/I-Distinct.mxl``, one per segment, named ``fux-<final>-<below|above>`` after
    where the cantus lies (the same melody appears at two octaves).
    """
    if data_dir is None:
        return [(name, parse_note_names(text)) for name, text in FUX_CANTUS_FIRMI.items()]
    return [
        (f"fux-{final}-{'below' if pos == 'Lower' else 'above'}", pitches)
        for final, pos, pitches in _distinct_segments(Path(data_dir))
    ]


def default_eval_cantus(transpositions: Sequence[int] = (0,)) -> list[tuple[str, tuple[int, ...], int]]:
    """``(name, pitches, final pitch class)`` for each built-in Fux cantus and transposition.

    The final is the cantus's last note (Fux's cantus firmi end on the modal final). Names get a
    ``+k``/``-k`` suffix for ``k != 0``.
    """
    out = []
    for name, pitches in fux_cantus_firmi(None):
        for t in transpositions:
            shifted = tuple(p + t for p in pitches)
            out.append((name if t == 0 else f"{name}{t:+d}", shifted, shifted[-1] % 12))
    return out


# Octave slips in the encoding of Fux's solutions (the .krn files and I/I-Solutions.mxl have
# the same notes; the readings below are the only ones consistent with Fux's rules and his other
# figures). figure -> (first note, stop note, semitones added to the counterpoint, why).
FUX_ERRATA: dict[int, tuple[int, int, int, str]] = {
    14: (0, 12, -12, "the lower counterpoint is encoded in the cantus's octave and crosses above "
         "it at notes 3-6 (A3 B-3 G3 A3 over a cantus F3 D3 E3 F3); Fux's bass lies an octave lower"),
    22: (5, 10, +12, "notes 5-9 of the upper counterpoint (C4 A3 B3 B3 A3) are an octave low: they "
         "cross under the cantus, make a fourth B3 under E4 and a major-seventh leap A3-G#4 into the cadence"),
}


def apply_fux_errata(piece: FirstSpeciesPiece, figure: int) -> FirstSpeciesPiece:
    if figure not in FUX_ERRATA:
        return piece
    start, stop, shift, _ = FUX_ERRATA[figure]
    cp = tuple(m + shift if start <= i < stop else m for i, m in enumerate(piece.counterpoint))
    return FirstSpeciesPiece(piece.cantus, cp, piece.cantus_position, piece.final, piece.source)


def load_fux_first_species(data_dir: Path, corrected: bool = True) -> list[FirstSpeciesPiece]:
    """Fux's first-species two-voice solutions (figures 5..23), from ``1x1/NNN.mxl``.

    Part 0 is the upper voice, part 1 the lower; ``I/data.tsv`` gives each figure's modal final
    and whether the cantus firmus is the Lower or Upper voice. ``corrected`` applies
    :data:`FUX_ERRATA` (two octave slips of the encoding); ``False`` gives the files as they are.
    """
    data_dir = Path(data_dir)
    tsv = data_dir / "I" / "data.tsv"
    if not tsv.is_file():
        raise UserError(f"{tsv} not found; set RLHF_FUX_DIR to the fux-species data directory")
    with tsv.open(newline="") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if r["Species"].strip() == "1"]
    pieces = []
    for row in rows:
        figure = int(re.match(r"\d+", row["Figure"]).group())
        path = data_dir / "1x1" / f"{figure:03d}.mxl"
        lines = _score_lines(_parse_score(path), path)
        if len(lines) != 2:
            raise UserError(f"{path}: expected 2 parts (upper, lower), found {len(lines)}")
        upper, lower = lines
        final = STEP_PC[row["Modal final"].strip().upper()]
        if row["Cantus firmus"].strip() == "Lower":
            piece = FirstSpeciesPiece(lower, upper, "below", final, f"fux/fig{figure}")
        else:
            piece = FirstSpeciesPiece(upper, lower, "above", final, f"fux/fig{figure}")
        pieces.append(apply_fux_errata(piece, figure) if corrected else piece)
    return pieces
