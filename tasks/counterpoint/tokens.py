"""Token scheme of the counterpoint task, as a Hugging Face tokenizer saved with the model.

Every token is a whitespace-free word, so the tokenizer is a ``tokenizers`` ``WordLevel`` model
behind a ``WhitespaceSplit`` pre-tokenizer, wrapped in ``PreTrainedTokenizerFast``; it is saved
with ``save_pretrained`` next to the model and reloads with ``PreTrainedTokenizerFast.from_pretrained``.
The mode is stored in ``tokenizer_config.json`` as the init kwarg ``codec_mode``.

Special tokens (both modes): ``<pad>`` (id 0), ``<bos>``, ``<eos>``, ``<unk>``.

Mode ``"melody"`` -- Sequence Tutor (Jaques et al. 2017, sec. 5): one event per 16th note.

    prompt      <bos>
    completion  e_1 ... e_32 <eos>        e_t in {off, hold, on_48 .. on_83}

``off`` = ``NOTE_OFF`` (ends the sounding note), ``hold`` = ``NO_EVENT`` (holds the note or the
rest), ``on_<midi>`` = note-on of MIDI pitch 48..83 (C3..B5). Event code ``e`` (see
``piece.py``) has token id ``4 + e``, so the 38 event classes keep the paper's order.

Mode ``"first_species"`` -- note against note, the cantus firmus given:

    prompt      <bos> <cf_below>|<cf_above> cf_<m_1> ... cf_<m_N> <sep> [<sep> x (S - N)]
    completion  iv_<d_1> ... iv_<d_N> <eos>

The cantus is padded with ``<sep>`` to ``S`` slots (``cantus_slots``, 16 by default, stored in
``tokenizer_config.json`` as ``codec_cantus_slots``), so every prompt of up to S notes has the
same length and the token that predicts ``d_i`` sits a FIXED distance (S) after ``cf_i``:
whatever a rule needs from the cantus at note i (its pitch for the mode and the melodic
motion, whether i is the last note for the cadence) is one fixed-offset attention away. Without
the padding that offset is N + 1 and varies per cantus; the prior and the policy then had to
count, and tuning stalled on exactly the rules that need ``cf_i`` (outside_mode,
unrecovered_leap, parallel_run, bad_end: see README). Tokenizers saved before the padding
existed load with S = 0 (the old layout). A cantus longer than S is written unpadded.

``<cf_below>`` means the cantus is the lower voice. ``cf_<m>`` is a cantus note, MIDI 36..84
(C2..C6). The counterpoint note ``i`` is written as the SIGNED interval ``d_i = cp_i - cf_i``
in semitones, ``iv_-24`` .. ``iv_+24``, rather than as an absolute pitch, because

* the vertical interval is what first-species rules judge (consonance: unison, 3rds, 5th,
  6ths, octave; Fux, Gradus I.1), so consonance becomes a property of the token itself and
  the model does not have to learn it per pitch pair;
* intervals are transposition-invariant, so the transposed copies of the training corpus
  share completion tokens and the prior generalises across keys;
* the melodic line is still recoverable exactly: ``cp_i = cf_i + d_i``.

The sign also records voice crossing (a negative interval above a cantus that is below).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence, Union, get_args

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhf.errors import UserError
from tasks.counterpoint.piece import (
    MELODY_LOWEST_PITCH,
    MELODY_N_EVENTS,
    MELODY_STEPS,
    NO_EVENT,
    NOTE_OFF,
    CantusPosition,
    FirstSpeciesPiece,
    Melody,
)

Mode = Literal["melody", "first_species"]

PAD, BOS, EOS, UNK, SEP = "<pad>", "<bos>", "<eos>", "<unk>", "<sep>"
CF_BELOW, CF_ABOVE = "<cf_below>", "<cf_above>"
SPECIALS = (PAD, BOS, EOS, UNK)

CANTUS_LOW, CANTUS_HIGH = 36, 84  # C2..C6, inclusive: Fux's cantus firmi lie in A2..C5
MAX_INTERVAL = 24  # two octaves either way

CantusItem = Union[FirstSpeciesPiece, tuple[Sequence[int], CantusPosition]]


def event_token(event: int) -> str:
    """Token string of a Sequence Tutor event code (``NOTE_OFF``, ``NO_EVENT`` or a note-on)."""
    if event == NOTE_OFF:
        return "off"
    if event == NO_EVENT:
        return "hold"
    if not 2 <= event < MELODY_N_EVENTS:
        raise ValueError(f"melody event code {event} outside the allowed range 0..{MELODY_N_EVENTS - 1}")
    return f"on_{MELODY_LOWEST_PITCH + event - 2}"


def cantus_token(midi: int) -> str:
    return f"cf_{midi}"


def interval_token(semitones: int) -> str:
    return f"iv_{semitones:+d}"


def mode_vocab(mode: Mode) -> list[str]:
    """The tokens of ``mode`` in id order (specials first, then ``<sep>``/position/cantus/intervals)."""
    if mode == "melody":
        return [*SPECIALS, *(event_token(e) for e in range(MELODY_N_EVENTS))]
    if mode == "first_species":
        return [
            *SPECIALS,
            SEP,
            CF_BELOW,
            CF_ABOVE,
            *(cantus_token(m) for m in range(CANTUS_LOW, CANTUS_HIGH + 1)),
            *(interval_token(d) for d in range(-MAX_INTERVAL, MAX_INTERVAL + 1)),
        ]
    raise ValueError(f"unknown codec mode {mode!r}; expected one of {get_args(Mode)}")


DEFAULT_CANTUS_SLOTS = 16  # the default corpus's longest piece (task.data.max_notes); Fux's cantus firmi have 9..14 notes


def build_tokenizer(mode: Mode, cantus_slots: int | None = None) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over the whitespace-separated tokens of ``mode``; first species
    records its prompt layout (``cantus_slots``, default 16) in the tokenizer config."""
    vocab = {tok: i for i, tok in enumerate(mode_vocab(mode))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra: dict = {}
    if mode == "first_species":
        slots = DEFAULT_CANTUS_SLOTS if cantus_slots is None else int(cantus_slots)
        if slots < 0:
            raise ValueError(f"cantus_slots must be >= 0, got {slots}")
        extra = {"sep_token": SEP, "codec_cantus_slots": slots}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        codec_mode=mode,
        **extra,
    )


def _check_cantus(cantus: Sequence[int]) -> None:
    if len(cantus) == 0:
        raise ValueError("the cantus firmus is empty; give at least one note")
    for i, m in enumerate(cantus):
        if not CANTUS_LOW <= int(m) <= CANTUS_HIGH:
            raise ValueError(
                f"cantus note {i + 1} (MIDI {m}) outside the allowed range "
                f"{CANTUS_LOW}..{CANTUS_HIGH} (C2..C6)"
            )


def _check_intervals(cantus: Sequence[int], counterpoint: Sequence[int]) -> list[int]:
    out = []
    for i, (cf, cp) in enumerate(zip(cantus, counterpoint)):
        d = int(cp) - int(cf)
        if not -MAX_INTERVAL <= d <= MAX_INTERVAL:
            raise ValueError(
                f"counterpoint note {i + 1} (MIDI {cp}) is {d:+d} semitones from the cantus note "
                f"(MIDI {cf}); allowed range {-MAX_INTERVAL:+d}..{MAX_INTERVAL:+d}"
            )
        out.append(d)
    return out


@dataclass
class Codec:
    """Pieces <-> token ids for one mode; the tokenizer is the saved artefact."""

    mode: Mode
    tokenizer: PreTrainedTokenizerFast
    cantus_slots: int = 0  # first species: prompts pad the cantus with <sep> to this many notes (0: no padding)
    completion_token_ids: list[int] = field(init=False)
    _value_of_id: np.ndarray = field(init=False, repr=False)  # [V] event code / interval, or _NA

    _NA = np.iinfo(np.int64).min

    def __post_init__(self) -> None:
        expected = mode_vocab(self.mode)
        ids = self.tokenizer.convert_tokens_to_ids(expected)
        if ids != list(range(len(expected))):
            raise ValueError(f"tokenizer vocabulary does not match the {self.mode!r} token scheme")
        self._ids = dict(zip(expected, ids))
        values = np.full(len(expected), self._NA, dtype=np.int64)
        if self.mode == "melody":
            first = self._ids[event_token(0)]
            values[first : first + MELODY_N_EVENTS] = np.arange(MELODY_N_EVENTS)
        else:
            first = self._ids[interval_token(-MAX_INTERVAL)]
            values[first : first + 2 * MAX_INTERVAL + 1] = np.arange(-MAX_INTERVAL, MAX_INTERVAL + 1)
        self._value_of_id = values
        self.completion_token_ids = [int(i) for i in np.flatnonzero(values != self._NA)]

    @property
    def bos_id(self) -> int:
        return self._ids[BOS]

    @property
    def eos_id(self) -> int:
        return self._ids[EOS]

    @property
    def pad_id(self) -> int:
        return self._ids[PAD]

    def _cantus_of(self, item: CantusItem) -> tuple[tuple[int, ...], CantusPosition]:
        if isinstance(item, FirstSpeciesPiece):
            return item.cantus, item.cantus_position
        if isinstance(item, tuple) and len(item) == 2 and item[1] in ("below", "above"):
            return tuple(int(m) for m in item[0]), item[1]
        raise TypeError(
            f"first_species prompts need a FirstSpeciesPiece or (cantus, 'below'|'above'), got {item!r}"
        )

    def encode_prompt(self, item: CantusItem | Melody | None = None) -> list[int]:
        """``[<bos>]`` for melodies; ``<bos> <cf_pos> cf_... <sep>`` (+ <sep> padding to
        ``cantus_slots`` notes) for first species."""
        if self.mode == "melody":
            return [self.bos_id]
        cantus, position = self._cantus_of(item)
        _check_cantus(cantus)
        toks = [BOS, CF_BELOW if position == "below" else CF_ABOVE, *map(cantus_token, cantus), SEP]
        toks += [SEP] * max(0, self.cantus_slots - len(cantus))
        return [self._ids[t] for t in toks]

    def encode_completion(self, item: FirstSpeciesPiece | Melody) -> list[int]:
        """The completion ids of ``item``, ending with ``<eos>``."""
        if self.mode == "melody":
            if not isinstance(item, Melody):
                raise TypeError(f"melody completions need a Melody, got {type(item).__name__}")
            return [self._ids[event_token(int(e))] for e in item.events] + [self.eos_id]
        if not isinstance(item, FirstSpeciesPiece):
            raise TypeError(f"first_species completions need a FirstSpeciesPiece, got {type(item).__name__}")
        _check_cantus(item.cantus)
        deltas = _check_intervals(item.cantus, item.counterpoint)
        return [self._ids[interval_token(d)] for d in deltas] + [self.eos_id]

    def encode(self, item: FirstSpeciesPiece | Melody) -> tuple[list[int], list[int]]:
        return self.encode_prompt(item), self.encode_completion(item)

    def completion_length(self, prompt_ids: Sequence[int]) -> int:
        """Number of completion tokens before ``<eos>``: 32 events, or one per cantus note."""
        if self.mode == "melody":
            return MELODY_STEPS
        return len(self._parse_prompt(prompt_ids)[0])

    def completion_values(self, ids: np.ndarray) -> np.ndarray:
        """Vectorised id -> event code (melody) or signed interval (first species), any shape.

        Raises ``ValueError`` if an id is not a completion token (e.g. ``<eos>`` or a cantus token).
        """
        ids = np.asarray(ids, dtype=np.int64)
        bad = (ids < 0) | (ids >= len(self._value_of_id))
        values = self._value_of_id[np.where(bad, 0, ids)]
        bad |= values == self._NA
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"id {int(ids[first])} at position {first} is not a {self.mode} completion token"
            )
        return values

    def _parse_prompt(self, prompt_ids: Sequence[int]) -> tuple[tuple[int, ...], CantusPosition]:
        toks = self.tokenizer.convert_ids_to_tokens([int(i) for i in prompt_ids])
        if len(toks) < 4 or toks[0] != BOS or toks[1] not in (CF_BELOW, CF_ABOVE) or toks[-1] != SEP:
            raise ValueError(f"not a first_species prompt (<bos> <cf_below|cf_above> cf_... <sep>): {toks}")
        end = len(toks) - 1
        while end > 2 and toks[end - 1] == SEP:  # the padding after the cantus
            end -= 1
        body = toks[2:end]
        if not all(t.startswith("cf_") for t in body):
            raise ValueError(f"first_species prompt has non-cantus tokens between position and <sep>: {toks}")
        return tuple(int(t[3:]) for t in body), ("below" if toks[1] == CF_BELOW else "above")

    def _strip_eos(self, completion_ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray([int(i) for i in completion_ids], dtype=np.int64)
        stop = np.flatnonzero(ids == self.eos_id)
        return ids[: stop[0]] if len(stop) else ids

    def decode(
        self,
        prompt_ids: Sequence[int],
        completion_ids: Sequence[int],
        final: int | None = None,
        source: str = "",
    ) -> FirstSpeciesPiece | Melody:
        """Rebuild the piece; the completion may lack ``<eos>`` (everything after it is ignored).

        First species: ``cp_i = cf_i + d_i``; ``final`` defaults to the last cantus note's
        pitch class (a Fux cantus firmus ends on the mode's final). Melody: ``final`` is the
        tonic, default 0 (C, the corpus key).
        """
        values = self.completion_values(self._strip_eos(completion_ids))
        if self.mode == "melody":
            tonic = 0 if final is None else int(final) % 12
            return Melody(tuple(int(v) for v in values), tonic=tonic, source=source)
        cantus, position = self._parse_prompt(prompt_ids)
        if len(values) != len(cantus):
            raise ValueError(f"completion has {len(values)} intervals but the cantus has {len(cantus)} notes")
        counterpoint = tuple(int(c) for c in np.asarray(cantus) + values)
        return FirstSpeciesPiece(
            cantus,
            counterpoint,
            position,
            cantus[-1] % 12 if final is None else int(final) % 12,
            source,
        )

    def save(self, path: str | Path) -> None:
        """Write the tokenizer (with ``codec_mode`` in its config) to the directory ``path``."""
        self.tokenizer.save_pretrained(str(path))

    @classmethod
    def load(cls, path: str | Path) -> "Codec":
        """Reload a codec saved by :meth:`save` (or alongside a model). The codec is always a
        fast tokenizer: loading it as one skips AutoTokenizer's look at the model's config.json,
        which warns about any model type transformers does not know (counterpoint_columns)."""
        try:
            tok = PreTrainedTokenizerFast.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise UserError(
                f"cannot load a counterpoint tokenizer from {path}: {e}. "
                "Point to a directory written by Codec.save / save_pretrained."
            ) from e
        mode = tok.init_kwargs.get("codec_mode")
        if mode not in get_args(Mode):
            raise UserError(
                f"{path}/tokenizer_config.json has codec_mode={mode!r}; expected one of "
                f"{get_args(Mode)}. Was this tokenizer written by tasks.counterpoint.tokens?"
            )
        slots = tok.init_kwargs.get("codec_cantus_slots", 0)  # absent: saved before the padding existed
        if not isinstance(slots, int) or slots < 0:
            raise UserError(f"{path}/tokenizer_config.json has codec_cantus_slots={slots!r}; expected an integer >= 0")
        return cls(mode, tok, slots if mode == "first_species" else 0)


def build_codec(mode: Mode, cantus_slots: int | None = None) -> Codec:
    """A fresh codec (and tokenizer) for ``mode``; first species pads prompts to
    ``cantus_slots`` cantus notes (default 16, see the module docstring)."""
    tok = build_tokenizer(mode, cantus_slots)
    return Codec(mode, tok, int(tok.init_kwargs.get("codec_cantus_slots", 0)))
