"""Training data for the prior, extracted offline from music21's bundled corpus.

First species (note against note) -- Bach's four-part chorales (Riemenschneider's 371, i.e.
350 distinct files, via ``music21.corpus.chorales.Iterator``) reduced to two voices:

* every voice is sampled at each beat onset, one note per beat with the beat taken as the
  quarter note (the chorales' notated beat in 4/4 and 3/4, which is 97% of their bars), and the
  sample is the pitch sounding at that instant -- passing notes between beats drop out, a
  half note gives two equal samples. This is the classic "note-against-note reduction".
* the samples are cut into phrases at the soprano's fermatas (the end of the fermata note)
  and at beats where any voice rests (those beats are dropped: some chorales rest between
  phrases); phrases longer than ``max_notes`` are split into windows of near-equal length,
  shorter ones than ``min_notes`` dropped; a chorale without fermatas is cut into such
  windows whole.
* voice pairs: the bass as cantus under the soprano, alto and tenor (``"below"``), and the
  soprano as cantus over the bass (``"above"``). A pair is skipped in a phrase that does not
  fit the token ranges (intervals +-24 semitones -- this drops about half of the
  soprano-bass phrases, which often span more than two octaves; cantus MIDI 36..84 after
  transposition).
* ``final`` is the tonic pitch class of the chorale's key (``Score.analyze('key')``,
  Krumhansl-Schmuckler).
* transpositions augment the data; ``source`` is ``"bach/<bwv>#p<phrase>:<pair><shift>"``, e.g.
  ``"bach/bwv269#p3:BS+2"`` (pair letters: cantus voice, then counterpoint voice).

Melody (Sequence Tutor, Jaques et al. 2017) -- 4/4 folk songs of the Essen collection
(``essenFolksong/*.abc``, minus music21's test and variant files) and the 4/4 chorales'
soprano lines:

* every piece is transposed to C major, as in the paper, or -- for minor-mode pieces (by
  ``analyze('key')``) -- to A minor rather than C minor: A minor shares C major's pitch
  collection, so the paper's "stay in key" reward (C major scale) does not punish the natural
  minor, while C minor would make every Eb/Ab/Bb a violation. ``Melody.tonic`` is 0 or 9.
* the piece is then shifted by whole octaves into C3..B5 (MIDI 48..83) if its compass allows;
  otherwise it is skipped.
* onsets and ends are rounded to the 16th-note grid and the piece is cut into non-overlapping
  2-bar (32-step) windows aligned to full 4/4 bars; a note tied in from the previous window
  is re-struck at step 0. Events: ``note_on`` at an onset, ``NOTE_OFF`` where a rest starts,
  ``NO_EVENT`` elsewhere. Pieces with any time signature other than 4/4, or with chords, are
  skipped.

Parsing is slow (about 0.25 s per chorale and 0.07 s per folk song), so the extracted examples
are cached as JSON in ``cache_dir``, under a name that hashes the parameters, this module's
extraction version and music21's version.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from tasks.counterpoint.piece import (
    MELODY_LOWEST_PITCH,
    MELODY_N_PITCHES,
    MELODY_STEPS,
    NO_EVENT,
    NOTE_OFF,
    FirstSpeciesPiece,
    Melody,
    note_on,
)
from tasks.counterpoint.tokens import CANTUS_HIGH, CANTUS_LOW, MAX_INTERVAL, Codec

EXTRACTION_VERSION = 2  # bump when the extraction rules change, to invalidate caches

VOICES = ("Soprano", "Alto", "Tenor", "Bass")
# (cantus voice, counterpoint voice, cantus position)
VOICE_PAIRS = (("B", "S", "below"), ("B", "A", "below"), ("B", "T", "below"), ("S", "B", "above"))

STEPS_PER_QUARTER = 4
BAR_QUARTERS = 4.0
WINDOW_BARS = MELODY_STEPS // (STEPS_PER_QUARTER * int(BAR_QUARTERS))  # 2

REST = -1  # sample value of a beat where the voice rests

T = TypeVar("T", FirstSpeciesPiece, Melody)


# --------------------------------------------------------------------------- caching


def _cache_path(cache_dir: Path, kind: str, params: dict[str, Any]) -> Path:
    import music21

    key = json.dumps(
        {**params, "kind": kind, "music21": music21.__version__, "version": EXTRACTION_VERSION},
        sort_keys=True,
    )
    return Path(cache_dir) / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON via a temp file in the same directory and ``os.replace`` (no torn files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cached(
    cache_dir: Path | None,
    kind: str,
    params: dict[str, Any],
    build: Callable[[], list[T]],
    load_one: Callable[[dict], T],
) -> list[T]:
    if cache_dir is None:
        return build()
    path = _cache_path(cache_dir, kind, params)
    if path.is_file():
        return [load_one(d) for d in json.loads(path.read_text())]
    items = build()
    _write_json_atomic(path, [asdict(x) for x in items])
    return items


def _piece_from_json(d: dict) -> FirstSpeciesPiece:
    return FirstSpeciesPiece(
        tuple(d["cantus"]), tuple(d["counterpoint"]), d["cantus_position"], d["final"], d["source"]
    )


def _melody_from_json(d: dict) -> Melody:
    return Melody(tuple(d["events"]), d["tonic"], d["source"])


def _progress(it: Iterable, progress: bool, total: int | None, desc: str) -> Iterable:
    if not progress:
        return it
    from rlhf.progress import progress_bar

    return progress_bar(it, total=total, desc=desc, unit="piece")


# --------------------------------------------------------------------------- sampling


def _element_pitch(e, low: bool) -> int:
    if e.isRest:
        return REST
    if e.isChord:
        return int((min if low else max)(p.midi for p in e.pitches))
    return int(e.pitch.midi)


def _line_arrays(part, low: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(onsets [K], ends [K], pitch [K]) of a part's notes and rests, ties merged.

    Rests get ``REST``; a chord (divisi) gives its lowest pitch if ``low`` else its highest.
    """
    elems = [e for e in part.stripTies().flatten().notesAndRests if e.quarterLength > 0]
    onsets = np.array([float(e.offset) for e in elems])
    ends = onsets + np.array([float(e.quarterLength) for e in elems])
    pitch = np.array([_element_pitch(e, low) for e in elems], dtype=np.int64)
    return onsets, ends, pitch


def sounding_at(onsets: np.ndarray, ends: np.ndarray, pitch: np.ndarray, times: np.ndarray) -> np.ndarray:
    """[T] pitch sounding at each time (``REST`` where nothing sounds): onset <= t < end."""
    idx = np.searchsorted(onsets, times, side="right") - 1  # [T] last element starting at or before t
    ok = (idx >= 0) & (times < ends[np.maximum(idx, 0)])
    return np.where(ok, pitch[np.maximum(idx, 0)], REST)


def beat_times(part) -> np.ndarray:
    """[T] offsets of every quarter-note beat of ``part``, following its bar lines.

    In a pickup bar (``paddingLeft > 0``) the beats are counted from the bar's virtual start,
    so an eighth-note upbeat has no beat while a quarter-note upbeat has one.
    """
    times = []
    for m in part.getElementsByClass("Measure"):
        start, dur, pad = float(m.offset), float(m.duration.quarterLength), float(m.paddingLeft)
        k = np.arange(math.ceil(pad), pad + dur)  # beat numbers from the virtual bar start
        times.append(start + k - pad)
    return np.concatenate(times) if times else np.zeros(0)


def fermata_ends(part) -> np.ndarray:
    """Sorted offsets where a note with a fermata ends (phrase boundaries of a chorale)."""
    from music21 import expressions

    ends = {
        float(n.offset + n.quarterLength)
        for n in part.flatten().notes
        if any(isinstance(e, expressions.Fermata) for e in n.expressions)
    }
    return np.array(sorted(ends))


def phrase_windows(
    times: np.ndarray,
    boundaries: np.ndarray,
    min_notes: int,
    max_notes: int,
    valid: np.ndarray | None = None,
) -> list[tuple[int, int, str]]:
    """Index ranges ``[start, stop)`` of ``times`` for each phrase window, with a label.

    Phrases end at ``boundaries`` and at beats that are not ``valid`` (rests between phrases),
    which belong to no phrase. A phrase of ``n > max_notes`` beats becomes
    ``ceil(n / max_notes)`` windows whose sizes differ by at most one (``p<k>.<j>``); windows
    under ``min_notes`` are dropped. ``k`` counts phrases from 1.
    """
    valid = np.ones(len(times), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    phrase = np.searchsorted(boundaries, times, side="right")  # [T] fermata phrase of each beat
    starts_new = np.r_[True, (phrase[1:] != phrase[:-1]) | ~valid[:-1]]  # [T] a run may start here
    run = np.cumsum(starts_new & valid)  # [T] id of the valid run (phrase) of each beat
    out = []
    for k, rid in enumerate(np.unique(run[valid])):
        idx = np.flatnonzero(valid & (run == rid))
        start, n = int(idx[0]), len(idx)
        n_win = math.ceil(n / max_notes)
        cuts = start + np.arange(n_win + 1) * n // n_win
        for j, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
            if b - a >= min_notes:
                out.append((int(a), int(b), f"p{k + 1}" if n_win == 1 else f"p{k + 1}.{j + 1}"))
    return out


def _satb_parts(score) -> dict[str, Any] | None:
    """Parts keyed S/A/T/B: the first part whose id or name starts with the voice's name
    (e.g. "Bass Continuo"); failing that, the parts in score order if there are exactly 4."""
    parts = list(score.parts)

    def first_word(text: str | None) -> str:
        words = (text or "").split()
        return words[0].lower() if words else ""

    found = {}
    for voice in VOICES:
        match = [p for p in parts if voice.lower() in (first_word(p.id), first_word(p.partName))]
        if match:
            found[voice[0]] = match[0]
    if len(found) == 4:
        return found
    if len(parts) == 4:
        return dict(zip("SATB", parts))
    return None


def chorale_first_species(
    score,
    name: str,
    transpositions: Sequence[int],
    min_notes: int,
    max_notes: int,
) -> list[FirstSpeciesPiece]:
    """The note-against-note two-voice examples of one parsed chorale (see module docstring)."""
    parts = _satb_parts(score)
    if parts is None:
        return []
    times = beat_times(parts["S"])
    samples = {v: sounding_at(*_line_arrays(p, low=v == "B"), times) for v, p in parts.items()}  # v: [T]
    bounds = fermata_ends(parts["S"])
    all_sound = np.all([x != REST for x in samples.values()], axis=0)  # [T]
    final = int(score.analyze("key").tonic.pitchClass)
    out = []
    for a, b, label in phrase_windows(times, bounds, min_notes, max_notes, all_sound):
        for cf_voice, cp_voice, position in VOICE_PAIRS:
            cf, cp = samples[cf_voice][a:b], samples[cp_voice][a:b]
            if (np.abs(cp - cf) > MAX_INTERVAL).any():
                continue
            base = FirstSpeciesPiece(
                tuple(int(x) for x in cf),
                tuple(int(x) for x in cp),
                position,
                final,
                f"{name}#{label}:{cf_voice}{cp_voice}",
            )
            for t in transpositions:
                if CANTUS_LOW <= cf.min() + t and cf.max() + t <= CANTUS_HIGH:
                    out.append(base.transposed(t))
    return out


def _chorale_names(max_pieces: int | None) -> list[str]:
    from music21.corpus import chorales

    # the Riemenschneider numbering lists 21 harmonisations twice (371 numbers, 350 files)
    names = list(dict.fromkeys(chorales.Iterator(returnType="filename")))
    return names if max_pieces is None else names[:max_pieces]


def extract_first_species(
    max_pieces: int | None = None,
    transpositions: Sequence[int] = tuple(range(-5, 7)),
    min_notes: int = 8,
    max_notes: int = 16,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> list[FirstSpeciesPiece]:
    """Two-voice note-against-note examples from the first ``max_pieces`` Bach chorales."""
    if not 1 <= min_notes <= max_notes:
        raise ValueError(f"need 1 <= min_notes <= max_notes, got {min_notes}, {max_notes}")

    def build() -> list[FirstSpeciesPiece]:
        from music21 import corpus

        names = _chorale_names(max_pieces)
        out: list[FirstSpeciesPiece] = []
        for name in _progress(names, progress, len(names), "chorales"):
            out += chorale_first_species(corpus.parse(name), name, transpositions, min_notes, max_notes)
        return out

    params = dict(
        max_pieces=max_pieces, transpositions=list(transpositions), min_notes=min_notes, max_notes=max_notes
    )
    return _cached(cache_dir, "first_species", params, build, _piece_from_json)


# --------------------------------------------------------------------------- melodies


def _only_4_4(score) -> bool:
    from music21 import meter

    sigs = list(score.recurse().getElementsByClass(meter.TimeSignature))
    return bool(sigs) and all(ts.ratioString == "4/4" for ts in sigs)


def key_shift(tonic_pc: int, mode: str) -> tuple[int, int]:
    """(semitones in -6..+5, target tonic) taking a key to C major, or A minor if ``mode`` is minor."""
    target = 9 if mode == "minor" else 0
    return (target - tonic_pc + 6) % 12 - 6, target


def octave_fit(low: int, high: int) -> int | None:
    """The whole-octave shift of smallest size putting ``low..high`` into C3..B5, or None."""
    top = MELODY_LOWEST_PITCH + MELODY_N_PITCHES - 1
    for k in (0, -12, 12, -24, 24, -36, 36):
        if MELODY_LOWEST_PITCH <= low + k and high + k <= top:
            return k
    return None


def window_events(onsets: np.ndarray, ends: np.ndarray, pitch: np.ndarray, start: float) -> tuple[int, ...]:
    """The 32 Sequence Tutor events of the 2-bar window from ``start`` (quarter-note offsets).

    Notes (``pitch`` >= 0; rests excluded by the caller) are snapped to the 16th grid; a note
    sounding into the window from before starts at step 0; ``NOTE_OFF`` where a note ends and
    no other starts; later notes win on the same step.
    """
    on = np.round((onsets - start) * STEPS_PER_QUARTER).astype(int)  # [K] onset steps
    off = np.round((ends - start) * STEPS_PER_QUARTER).astype(int)  # [K] end steps
    inside = (on < MELODY_STEPS) & (off > 0) & (off > on)
    events = np.full(MELODY_STEPS, NO_EVENT, dtype=np.int64)
    offs = off[inside]
    events[offs[offs < MELODY_STEPS]] = NOTE_OFF
    for s, p in zip(np.maximum(on[inside], 0), pitch[inside]):  # in onset order: later wins
        events[s] = note_on(int(p))
    return tuple(int(e) for e in events)


def melody_windows(part, shift: int, tonic: int, source: str) -> list[Melody]:
    """Non-overlapping 2-bar windows of a 4/4 ``part`` shifted by ``shift`` semitones."""
    onsets, ends, pitch = _line_arrays(part, low=False)
    notes = pitch != REST
    onsets, ends, pitch = onsets[notes], ends[notes], pitch[notes] + shift
    bars = [
        float(m.offset)
        for m in part.getElementsByClass("Measure")
        if float(m.duration.quarterLength) == BAR_QUARTERS and float(m.paddingLeft) == 0
    ]
    out, i = [], 0
    while i + 1 < len(bars):
        if bars[i + 1] != bars[i] + BAR_QUARTERS:
            i += 1
            continue
        events = window_events(onsets, ends, pitch, bars[i])
        if any(e >= 2 for e in events):
            out.append(Melody(events, tonic, f"{source}#w{len(out) + 1}"))
        i += WINDOW_BARS
    return out


def piece_melodies(part, key, source: str, transpositions: Sequence[int]) -> list[Melody]:
    """Melody windows of a monophonic 4/4 ``part`` in ``key`` (a music21 Key), or [] if unusable."""
    notes = [n for n in part.flatten().notes if n.quarterLength > 0]
    if not notes or any(n.isChord for n in notes):
        return []
    shift, tonic = key_shift(key.tonic.pitchClass, key.mode)
    low, high = min(n.pitch.midi for n in notes) + shift, max(n.pitch.midi for n in notes) + shift
    octave = octave_fit(low, high)
    if octave is None:
        return []
    top = MELODY_LOWEST_PITCH + MELODY_N_PITCHES - 1
    out = []
    for t in transpositions:
        if MELODY_LOWEST_PITCH <= low + octave + t and high + octave + t <= top:
            suffix = "" if t == 0 else f"{t:+d}"
            out += melody_windows(part, shift + octave + t, (tonic + t) % 12, source + suffix)
    return out


_ESSEN_SKIP = re.compile(r"^(test|variant)")
_METER_4_4 = re.compile(r"^M:\s*(4/4|C)\s*$", re.MULTILINE)


def essen_tunes() -> Iterator[tuple[str, str]]:
    """(piece id ``essen/<file>/<X>``, abc text) of the 4/4 tunes of music21's Essen collection."""
    from music21 import corpus

    files = sorted(
        Path(str(p)) for p in corpus.getCorePaths() if "essenFolksong" in str(p) and str(p).endswith(".abc")
    )
    for path in files:
        if _ESSEN_SKIP.match(path.stem):
            continue
        for tune in re.split(r"\n(?=X:)", path.read_text(encoding="utf-8")):
            x = re.search(r"^X:\s*(\d+)", tune, re.MULTILINE)
            if x and _METER_4_4.search(tune):
                yield f"essen/{path.stem}/{x.group(1)}", tune


def extract_melodies(
    max_pieces: int | None = None,
    transpositions: Sequence[int] = (0,),
    cache_dir: Path | None = None,
    progress: bool = False,
) -> list[Melody]:
    """2-bar Sequence Tutor melodies from Essen 4/4 folk songs and 4/4 chorale sopranos.

    ``max_pieces`` caps the pieces parsed from each source (Essen tunes, chorales).
    ``transpositions`` are applied after the shift to C major / A minor (0 keeps the paper's
    setting; other shifts move the key and ``Melody.tonic`` with it).
    """

    def build() -> list[Melody]:
        from music21 import converter, corpus

        out: list[Melody] = []
        tunes = essen_tunes()
        if max_pieces is not None:
            tunes = (t for _, t in zip(range(max_pieces), tunes))
        for source, abc in _progress(tunes, progress, max_pieces, "essen tunes"):
            try:
                score = converter.parseData(abc, format="abc")
            except Exception:  # a handful of Essen tunes are not valid for music21's abc parser
                continue
            if _only_4_4(score):
                out += piece_melodies(score.parts[0], score.analyze("key"), source, transpositions)
        names = _chorale_names(max_pieces)
        for name in _progress(names, progress, len(names), "chorale sopranos"):
            score = corpus.parse(name)
            parts = _satb_parts(score)
            if parts is not None and _only_4_4(score):
                out += piece_melodies(parts["S"], score.analyze("key"), name, transpositions)
        return out

    params = dict(max_pieces=max_pieces, transpositions=list(transpositions))
    return _cached(cache_dir, "melody", params, build, _melody_from_json)


# --------------------------------------------------------------------------- splits and stats


def split_by_piece(items: Sequence[T], val_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, val) with every piece (``item.piece_id``) on one side only.

    ``round(val_fraction * n_pieces)`` randomly chosen pieces (at least one if
    ``val_fraction > 0`` and there are two or more pieces) go to validation.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    pieces = sorted({x.piece_id for x in items})
    n_val = round(val_fraction * len(pieces))
    if val_fraction > 0 and len(pieces) >= 2:
        n_val = min(max(n_val, 1), len(pieces) - 1)
    val_ids = set(random.Random(seed).sample(pieces, n_val))
    return [x for x in items if x.piece_id not in val_ids], [x for x in items if x.piece_id in val_ids]


def corpus_stats(items: Sequence[FirstSpeciesPiece | Melody], codec: Codec) -> dict[str, float]:
    """Examples, distinct pieces, total tokens (prompt + completion), mean completion length."""
    lengths = [(len(p), len(c)) for p, c in map(codec.encode, items)]
    total = sum(a + b for a, b in lengths)
    return {
        "examples": len(items),
        "pieces": len({x.piece_id for x in items}),
        "tokens": total,
        "mean_completion_tokens": (sum(b for _, b in lengths) / len(items)) if items else 0.0,
    }
