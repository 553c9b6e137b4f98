"""The counterpoint task's data: first-species pieces and monophonic melodies as integers.

Everything downstream (rules, tokens, export, evaluation) speaks these types, so that the
batched rule rewards can work on plain ``numpy`` arrays without music21 objects.

Pitches are MIDI numbers (60 = C4). A pitch class is ``pitch % 12`` (0 = C).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

CantusPosition = Literal["below", "above"]
"""Where the cantus firmus lies: ``"below"`` means the cantus is the lower voice and the
counterpoint is written above it; ``"above"`` means the counterpoint is the lower voice."""

# Sequence Tutor's melody encoding (Jaques et al. 2017, sec. 5): one event per 16th note.
MELODY_STEPS = 32  # 2 bars of 4/4 on a 16th-note grid
NOTE_OFF = 0  # ends the sounding note
NO_EVENT = 1  # holds the sounding note (or the rest)
MELODY_LOWEST_PITCH = 48  # C3; event 2 + k is note-on of MIDI pitch 48 + k
MELODY_N_PITCHES = 36  # three octaves: C3..B5
MELODY_N_EVENTS = 2 + MELODY_N_PITCHES  # 38 event classes, as in the paper


def note_on(midi: int) -> int:
    """Event code of a note-on for ``midi`` (must lie in C3..B5)."""
    if not MELODY_LOWEST_PITCH <= midi < MELODY_LOWEST_PITCH + MELODY_N_PITCHES:
        raise ValueError(f"pitch {midi} outside the melody range 48..83 (C3..B5)")
    return 2 + midi - MELODY_LOWEST_PITCH


def event_pitch(event: int) -> int | None:
    """MIDI pitch of a note-on event, ``None`` for note-off / no-event."""
    return MELODY_LOWEST_PITCH + event - 2 if event >= 2 else None


@dataclass(frozen=True)
class FirstSpeciesPiece:
    """Note against note: one counterpoint note per cantus note, all whole notes."""

    cantus: tuple[int, ...]  # MIDI pitches of the cantus firmus
    counterpoint: tuple[int, ...]  # MIDI pitches, same length as ``cantus``
    cantus_position: CantusPosition
    final: int  # pitch class (0..11) of the mode's final, e.g. 2 for D dorian
    source: str = ""  # provenance, e.g. "bach/bwv66.6#p3+2"; the part before '#' names the piece

    def __post_init__(self) -> None:
        if len(self.cantus) != len(self.counterpoint):
            raise ValueError(
                f"cantus has {len(self.cantus)} notes but counterpoint has {len(self.counterpoint)}"
            )
        if self.cantus_position not in ("below", "above"):
            raise ValueError(f"cantus_position must be 'below' or 'above', got {self.cantus_position!r}")

    @property
    def lower(self) -> tuple[int, ...]:
        return self.cantus if self.cantus_position == "below" else self.counterpoint

    @property
    def upper(self) -> tuple[int, ...]:
        return self.counterpoint if self.cantus_position == "below" else self.cantus

    @property
    def piece_id(self) -> str:
        """The source piece, without the phrase/transposition suffix: the unit of train/val splits."""
        return self.source.split("#", 1)[0]

    def transposed(self, semitones: int) -> "FirstSpeciesPiece":
        return FirstSpeciesPiece(
            tuple(p + semitones for p in self.cantus),
            tuple(p + semitones for p in self.counterpoint),
            self.cantus_position,
            (self.final + semitones) % 12,
            f"{self.source}{'' if '#' in self.source else '#'}{semitones:+d}",
        )


@dataclass(frozen=True)
class Melody:
    """A monophonic melody as Sequence Tutor events (see ``NOTE_OFF``, ``NO_EVENT``, ``note_on``)."""

    events: tuple[int, ...]  # length MELODY_STEPS for the paper's setting
    tonic: int = 0  # pitch class of the key's tonic; the corpus is transposed to C (0)
    source: str = ""

    @property
    def piece_id(self) -> str:
        return self.source.split("#", 1)[0]


@dataclass
class FirstSpeciesBatch:
    """Many first-species pieces as padded arrays, the input of the batched rule rewards.

    Positions ``>= lengths[b]`` are padding (pitch 0) and never count as violations.
    """

    cantus: np.ndarray  # [B, N] int
    counterpoint: np.ndarray  # [B, N] int
    cantus_below: np.ndarray  # [B] bool
    final: np.ndarray  # [B] int pitch class
    lengths: np.ndarray  # [B] int, number of notes of each piece

    @classmethod
    def from_pieces(cls, pieces: Sequence[FirstSpeciesPiece]) -> "FirstSpeciesBatch":
        n = max((len(p.cantus) for p in pieces), default=0)
        b = len(pieces)
        cf = np.zeros((b, n), dtype=np.int64)
        cp = np.zeros((b, n), dtype=np.int64)
        for i, p in enumerate(pieces):
            cf[i, : len(p.cantus)] = p.cantus
            cp[i, : len(p.counterpoint)] = p.counterpoint
        return cls(
            cantus=cf,
            counterpoint=cp,
            cantus_below=np.array([p.cantus_position == "below" for p in pieces], dtype=bool),
            final=np.array([p.final % 12 for p in pieces], dtype=np.int64),
            lengths=np.array([len(p.cantus) for p in pieces], dtype=np.int64),
        )

    @property
    def mask(self) -> np.ndarray:
        """[B, N] bool, True on real notes."""
        return np.arange(self.cantus.shape[1])[None, :] < self.lengths[:, None]

    @property
    def lower(self) -> np.ndarray:
        """[B, N] pitches of the lower voice."""
        return np.where(self.cantus_below[:, None], self.cantus, self.counterpoint)

    @property
    def upper(self) -> np.ndarray:
        """[B, N] pitches of the upper voice."""
        return np.where(self.cantus_below[:, None], self.counterpoint, self.cantus)


Item = FirstSpeciesPiece | Melody


def to_json(it: Item, reward: float) -> dict[str, Any]:
    """A piece and its reward as an evaluation record (eval.json's samples)."""
    if isinstance(it, FirstSpeciesPiece):
        return {"cantus": list(it.cantus), "counterpoint": list(it.counterpoint), "cantus_position": it.cantus_position, "final": it.final, "source": it.source, "reward": reward}
    return {"events": list(it.events), "tonic": it.tonic, "source": it.source, "reward": reward}


def from_json(d: dict[str, Any]) -> Item:
    """A piece back from its evaluation record (eval.json's samples)."""
    if "events" in d:
        return Melody(tuple(d["events"]), d.get("tonic", 0), d.get("source", ""))
    return FirstSpeciesPiece(tuple(d["cantus"]), tuple(d["counterpoint"]), d["cantus_position"], d["final"], d.get("source", ""))
