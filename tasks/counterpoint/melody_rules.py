"""Sequence Tutor's music-theory melody rewards r_MT(s, a) and its Table 1 metrics, batched.

Source: Jaques, Gu, Bahdanau, Hernández-Lobato, Turner, Eck, "Sequence Tutor: Conservative
fine-tuning of sequence generation models with KL-control", ICML 2017, sec. 5 and appendix.
The paper states the rules in words; their exact form and numbers are those of the authors'
code, magenta's ``rl_tuner`` (``RLTuner.reward_music_theory`` and the ``detect_*`` helpers it
calls; Table 1 from ``rl_tuner_eval_metrics.compute_composition_stats``). This module
re-implements them over numpy arrays of shape [B, T] (B melodies, T steps of Sequence Tutor
events, see ``piece.py``), looping only over the T time steps where a rule is a state machine.

Per-step credit. ``rl_tuner`` computes each rule when it chooses the action at step t, from the
prefix ``events[:t + 1]``; each rule here puts its reward on that same step, so the sum over
rules is a causal per-step reward r_MT(s_t, a_t), usable as the reward of an MDP. Rules that
judge the whole melody (unique highest/lowest note) therefore pay at the last step.

Each ``MelodyRule.fn`` returns the rule's reward in units of its ``weight``; ``weight`` is the
amount ``rl_tuner`` used, so ``weight * fn`` is ``rl_tuner``'s reward. Where this module
departs from ``rl_tuner`` it says so in the rule's doc; the departures are:

* the key is the major scale on the melody's tonic pitch class (``rl_tuner``: C major only);
* "the tonic" is the tonic pitch class in any octave (``rl_tuner``: only C4, event 14);
* a melody with no notes has no unique highest note (``rl_tuner`` took ``max`` over raw event
  codes, so an all-rest melody could have a "unique highest" NO_EVENT).

"Note", in ``rl_tuner``'s metrics, means one time step (event), so the per-note fractions of
Table 1 divide by B * T, rests and holds included.

Caveat (measured, see tests/test_melody_rules.py): on the 16th-note grid three rules judge
rhythm more than pitch. excessive_repeat counts held steps as repeats (-100 per step a note
is held past 6 sixteenths, so every half note pays), motif pays for 3 distinct notes within
8 sixteenths, and the autocorrelation is taken over event codes, holds included. With the
default weights, 2-bar Bach chorale soprano lines score below uniformly random events; the
pitch rules (key, tonic, intervals, leaps) rank them well above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from rlhf.errors import UserError
from tasks.counterpoint.piece import MELODY_LOWEST_PITCH, MELODY_N_EVENTS, NO_EVENT, NOTE_OFF

MAJOR_SCALE_DEGREES = (0, 2, 4, 5, 7, 9, 11)  # semitones above the tonic
MOTIF_STEPS = 8  # rl_tuner's ``bar_length`` default: 8 steps, half a 4/4 bar of 16ths here
MOTIF_MIN_NOTES = 3  # distinct pitches that make a window a motif
LEAP_SEMITONES = 7  # rl_tuner: an interval of a fifth or more is a leap
STEPS_BEFORE_LEAP_BACK = 6  # a leap back resolves a leap only after more steps than this
AUTOCORR_LAGS = (1, 2, 3)
AUTOCORR_THRESHOLD = 0.15  # rl_tuner penalises |r_lag| above this
END_TONIC_STEPS = 4  # rl_tuner's "final bar": the last 4 steps

# rl_tuner's reward_preferred_intervals, by absolute interval in semitones (0..12); > 12 -> -1.
# Unisons, semitones, minor thirds, tritones, minor sixths/sevenths and octaves get 0.
_INTERVAL_REWARD = np.array([0.0, 0.0, 0.08, 0.0, 0.09, 0.07, 0.0, 0.02, 0.0, 0.05, 0.0, -0.3, 0.0])
_BEYOND_OCTAVE_REWARD = -1.0
_IN_KEY_THIRD_REWARD = 0.15  # major third up/down from the tonic or the third degree
_IN_KEY_FIFTH_REWARD = 0.1  # perfect fifth up/down from the tonic or the fifth degree
_HOLD_REWARD, _HOLD_AFTER_TONIC_OR_FIFTH_REWARD = 0.075, 0.3
_REST_REWARD, _REST_AFTER_TONIC_OR_FIFTH_REWARD = 0.05, 0.15


class UnknownRuleError(UserError, ValueError):
    """A rule name (e.g. in a ``weights`` mapping from a config) that is not a melody rule."""


@dataclass(frozen=True)
class MelodyRule:
    """One music-theory reward term: ``weight * fn(events, tonic)`` is its [B, T] reward."""

    name: str
    weight: float
    doc: str
    fn: Callable[[np.ndarray, np.ndarray], np.ndarray]


# --------------------------------------------------------------------------- event helpers


def _check_events(events: np.ndarray, tonic: np.ndarray | int | None) -> tuple[np.ndarray, np.ndarray]:
    """Validate a [B, T] event batch and broadcast the tonic to [B] pitch classes (default C)."""
    ev = np.asarray(events)
    if ev.ndim != 2:
        raise ValueError(f"events must be a [B, T] array of melody events, got shape {ev.shape}; "
                         "wrap a single melody as events[None]")
    if ev.size and not np.issubdtype(ev.dtype, np.integer):
        raise ValueError(f"events must be integers, got dtype {ev.dtype}")
    if ev.size and (ev.min() < 0 or ev.max() >= MELODY_N_EVENTS):
        raise ValueError(f"events must lie in 0..{MELODY_N_EVENTS - 1}, got {ev.min()}..{ev.max()}")
    if ev.shape[1] == 0:
        raise ValueError("events must have at least one time step")
    ev = ev.astype(np.int64, copy=False)
    if tonic is None:
        tonic = 0
    ton = np.asarray(tonic, dtype=np.int64)
    if ton.ndim > 1 or (ton.ndim == 1 and ton.shape[0] != ev.shape[0]):
        raise ValueError(f"tonic must be a pitch class or a [B={ev.shape[0]}] array, got shape {ton.shape}")
    return ev, np.broadcast_to(ton % 12, (ev.shape[0],))


def event_pitches(events: np.ndarray) -> np.ndarray:
    """[..., T] MIDI pitch of each note-on event, -1 for NOTE_OFF / NO_EVENT."""
    ev = np.asarray(events, dtype=np.int64)
    return np.where(ev >= 2, ev - 2 + MELODY_LOWEST_PITCH, -1)


def _last_index(mask: np.ndarray) -> np.ndarray:
    """[B, T] index of the last True at or before each step, -1 if none."""
    idx = np.where(mask, np.arange(mask.shape[-1]), -1)
    return np.maximum.accumulate(idx, axis=-1)


def current_pitch(events: np.ndarray, through_rests: bool = False) -> np.ndarray:
    """[B, T] MIDI pitch sounding at each step (forward-filled through NO_EVENT holds), -1 if none.

    A NOTE_OFF ends the note, so the steps after it hold -1 until the next note-on. With
    ``through_rests=True`` it gives instead the pitch of the most recent note-on, ignoring
    rests: the "previous note" that ``rl_tuner`` measures melodic intervals from. A single
    melody [T] comes back as [1, T].
    """
    ev = np.atleast_2d(np.asarray(events, dtype=np.int64))
    pitch = event_pitches(ev)
    on = _last_index(ev >= 2)  # [B, T]
    filled = np.where(on >= 0, np.take_along_axis(pitch, np.maximum(on, 0), axis=-1), -1)
    if through_rests:
        return filled
    off = _last_index(ev == NOTE_OFF)
    return np.where(on > off, filled, -1)


def _previous_note(ev: np.ndarray) -> np.ndarray:
    """[B, T] pitch of the last note-on strictly before each step (rests skipped), -1 if none."""
    filled = current_pitch(ev, through_rests=True)
    return np.concatenate([np.full((ev.shape[0], 1), -1), filled[:, :-1]], axis=1)


def melody_notes(events: np.ndarray) -> list[tuple[int, int, int]]:
    """The notes of one melody as (onset_step, duration_steps, midi).

    A note-on starts a note; NO_EVENT steps extend it; it ends at the next note-on, the next
    NOTE_OFF or the end of the melody.
    """
    ev = np.asarray(events, dtype=np.int64)
    if ev.ndim != 1:
        raise ValueError(f"melody_notes takes one melody [T], got shape {ev.shape}")
    onsets = np.flatnonzero(ev >= 2)
    stops = np.flatnonzero(ev != NO_EVENT)  # a note ends at the first later non-hold event
    ends = [int(stops[np.searchsorted(stops, o, side="right")]) if o < stops[-1] else len(ev)
            for o in onsets]
    return [(int(o), e - int(o), int(ev[o]) - 2 + MELODY_LOWEST_PITCH) for o, e in zip(onsets, ends)]


# --------------------------------------------------------------------------- detectors


def _out_of_key(ev: np.ndarray, tonic: np.ndarray) -> np.ndarray:
    """[B, T] bool: a note-on whose pitch class is not in the major scale on ``tonic``."""
    degree = (event_pitches(ev) - tonic[:, None]) % 12
    return (ev >= 2) & ~np.isin(degree, MAJOR_SCALE_DEGREES)


def _is_tonic_note(ev: np.ndarray, tonic: np.ndarray) -> np.ndarray:
    """[B, T] bool: a note-on of the tonic pitch class (any octave)."""
    return (ev >= 2) & (event_pitches(ev) % 12 == tonic[:, None])


def _excessive_repeats(ev: np.ndarray) -> np.ndarray:
    """[B, T] bool: rl_tuner's ``detect_repeating_notes`` at each step.

    Scanning back from the step before t over the run of events that equal a_t or are
    NOTE_OFF / NO_EVENT, count the events equal to a_t (k); the run has "breaks" if it holds a
    NOTE_OFF other than a_t, "holds" if it holds a NO_EVENT other than a_t. Excessive if
    a_t = NOTE_OFF and k > 1, or k > 4 with neither breaks nor holds, or k > 6 with either.
    So a note held (NO_EVENT) for more than 5 steps after its onset, or struck a 6th time in a
    row, is excessive, as is a third NOTE_OFF in one run of rests.
    """
    t = ev.shape[1]
    a = ev[:, :, None]  # [B, T, 1] the action at step t
    e = ev[:, None, :]  # [B, 1, T] the earlier event at step i
    before = np.arange(t)[None, :] < np.arange(t)[:, None]  # [T, T] i < t
    stop = before & (e != a) & (e > NO_EVENT)  # a different note-on ends the scan
    last_stop = np.where(stop, np.arange(t), -1).max(axis=-1)  # [B, T]
    run = before & (np.arange(t) > last_stop[..., None])  # [B, T, T]
    count = (run & (e == a)).sum(-1)
    breaks = (run & (e == NOTE_OFF) & (a != NOTE_OFF)).any(-1)
    holds = (run & (e == NO_EVENT) & (a != NO_EVENT)).any(-1)
    return (((ev == NOTE_OFF) & (count > 1))
            | (~breaks & ~holds & (count > 4))
            | ((breaks | holds) & (count > 6)))


def _prefix_autocorrelation(ev: np.ndarray, lag: int) -> np.ndarray:
    """[B, T] rl_tuner's ``autocorrelate(events[:t + 1], lag)`` at each step t, NaN if constant.

    r = sum_{i >= lag} (x_i - m)(x_{i-lag} - m) / n / var(x) over the n = t + 1 event codes x
    (note-ons, NOTE_OFF = 0 and NO_EVENT = 1 alike, as rl_tuner did). Computed from exact
    integer prefix sums, S1 = sum x_i, S2 = sum x_i^2: r = N / (n (n S2 - S1^2)) with the
    n^2-scaled numerator
    N = n^2 P - n S1 (A + B) + max(n - lag, 0) S1^2, P = sum x_i x_{i-lag}, A = sum_{i >= lag} x_i,
    B = sum_{i < n - lag} x_i. Being exact, |r| = 0.15 exactly is never above the threshold
    (rl_tuner's float arithmetic could round such a tie either way).
    """
    b, t = ev.shape
    zero = np.zeros((b, 1), dtype=np.int64)
    c1 = np.concatenate([zero, np.cumsum(ev, axis=1)], axis=1)  # [B, T+1] sum of x_i, i < k
    c2 = np.concatenate([zero, np.cumsum(ev * ev, axis=1)], axis=1)
    prod = np.zeros_like(ev)
    prod[:, lag:] = ev[:, lag:] * ev[:, :-lag] if lag < t else 0
    cp = np.concatenate([zero, np.cumsum(prod, axis=1)], axis=1)
    n = np.arange(1, t + 1)  # prefix lengths
    s1, s2, p = c1[:, 1:], c2[:, 1:], cp[:, 1:]
    a_sum = np.where(n > lag, s1 - c1[:, [min(lag, t)]], 0)
    b_sum = c1[:, np.maximum(n - lag, 0)]
    num = n * n * p - n * s1 * (a_sum + b_sum) + np.maximum(n - lag, 0) * s1 * s1
    den = n * (n * s2 - s1 * s1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den != 0, num / np.where(den != 0, den, 1), np.nan)


def _motif_notes(ev: np.ndarray) -> np.ndarray:
    """[B, T] number of distinct note-on events in the MOTIF_STEPS window ending at each step.

    0 before the first full window (rl_tuner's ``detect_last_motif`` needs a full bar).
    """
    b, t = ev.shape
    out = np.zeros((b, t), dtype=np.int64)
    if t < MOTIF_STEPS:
        return out
    # Sorted with non-notes as -1 first, each change of value starts a new distinct note.
    win = np.sort(sliding_window_view(np.where(ev >= 2, ev, -1), MOTIF_STEPS, axis=1), axis=-1)
    out[:, MOTIF_STEPS - 1:] = (win[..., 0] >= 2) + (win[..., 1:] != win[..., :-1]).sum(-1)
    return out


def _repeated_motif(ev: np.ndarray) -> np.ndarray:
    """[B, T] bool: rl_tuner's ``detect_repeated_motif``.

    The MOTIF_STEPS window ending at t is a motif and occurs, event for event, as a window that
    ends before it starts (``composition[:-(bar_length - 1)]`` in rl_tuner).
    """
    b, t = ev.shape
    out = np.zeros((b, t), dtype=bool)
    if t < MOTIF_STEPS:
        return out
    win = sliding_window_view(ev, MOTIF_STEPS, axis=1)  # [B, W, 8], window u = steps u..u+7
    same = (win[:, :, None, :] == win[:, None, :, :]).all(-1)  # [B, W(earlier), W(current)]
    w = win.shape[1]
    earlier = np.arange(w)[:, None] <= np.arange(w)[None, :] - MOTIF_STEPS  # [W, W]
    repeated = (same & earlier).any(axis=1)  # [B, W]
    out[:, MOTIF_STEPS - 1:] = repeated
    return out & (_motif_notes(ev) >= MOTIF_MIN_NOTES)


def _leap_outcomes(ev: np.ndarray) -> np.ndarray:
    """[B, T] int: +1 where a leap is resolved, -1 where a leap doubles one, 0 otherwise.

    rl_tuner's ``detect_leap_up_back`` state machine, run over the batch step by step. A leap
    is a move of >= 7 semitones (a fifth or more) from the previous note-on (rests skipped).
    A leap with no pending leap becomes pending (its direction and start pitch are stored).
    With a leap pending: a leap the same way is a double leap (-1; the pending leap stays); a
    leap the other way clears it and counts as resolved (+1) only if more than 6 steps have
    passed since the last leap; a non-leap note that returns to or beyond the pending leap's
    start pitch resolves it (+1). Steps since the last leap count every step after step 0.
    """
    b, t = ev.shape
    pitch, prev = event_pitches(ev), _previous_note(ev)
    direction = np.zeros(b, dtype=np.int64)  # +1 ascending, -1 descending, 0 no pending leap
    leapt_from = np.zeros(b, dtype=np.int64)
    since = np.zeros(b, dtype=np.int64)
    out = np.zeros((b, t), dtype=np.int64)
    for s in range(1, t):
        note = ev[:, s] >= 2
        moved = note & (prev[:, s] >= 0)
        leap = moved & (np.abs(pitch[:, s] - prev[:, s]) >= LEAP_SEMITONES)
        leap_dir = np.sign(pitch[:, s] - prev[:, s])
        pending = direction != 0
        doubled = leap & pending & (direction == leap_dir)
        back = leap & pending & (direction != leap_dir)
        fresh = leap & ~pending
        gradual = note & ~leap & (((direction == 1) & (pitch[:, s] <= leapt_from))
                                  | ((direction == -1) & (pitch[:, s] >= leapt_from)))
        out[:, s] = np.where((back & (since > STEPS_BEFORE_LEAP_BACK)) | gradual, 1, 0) - doubled
        leapt_from = np.where(fresh, prev[:, s], leapt_from)
        direction = np.where(fresh, leap_dir, np.where(back | gradual, 0, direction))
        since = np.where(leap, 0, since + 1)
    return out


def _unique_extreme(ev: np.ndarray, highest: bool) -> np.ndarray:
    """[B] bool: the highest (lowest) note-on pitch occurs at exactly one step."""
    notes = ev >= 2
    key = np.where(notes, ev, -1 if highest else MELODY_N_EVENTS)
    extreme = key.max(1) if highest else key.min(1)
    return notes.any(1) & ((ev == extreme[:, None]).sum(1) == 1)


# --------------------------------------------------------------------------- rules


def _rule_in_key(events: np.ndarray, tonic: np.ndarray) -> np.ndarray:
    ev, ton = _check_events(events, tonic)
    return -_out_of_key(ev, ton).astype(float)


def _rule_start_tonic(events: np.ndarray, tonic: np.ndarray) -> np.ndarray:
    ev, ton = _check_events(events, tonic)
    out = np.zeros(ev.shape)
    out[:, 0] = _is_tonic_note(ev[:, :1], ton)[:, 0]
    return out


def _rule_end_tonic(events: np.ndarray, tonic: np.ndarray) -> np.ndarray:
    ev, ton = _check_events(events, tonic)
    t = ev.shape[1]
    start = t - END_TONIC_STEPS
    out = np.zeros(ev.shape)
    if start < 1:  # step 0 belongs to start_tonic
        return out
    out[:, start] = _is_tonic_note(ev[:, start:start + 1], ton)[:, 0]
    out[:, start + 1] = ev[:, start + 1] == NO_EVENT
    out[:, start + 2:] = ev[:, start + 2:] <= NO_EVENT
    return out


def _rule_excessive_repeat(events: np.ndarray, tonic: np.ndarray) -> np.ndarray:
    ev, _ = _check_events(events, tonic)
    return -_excessive_repeats(ev).astype(float)


def _rule_autocorrelation(events: np.ndarray, tonic: np.ndarray) -> np.ndarray:
    ev, _ = _check_events(events, tonic)
    out = np.zeros(ev.shape)
    for lag in AUTOCORR_LAGS:
        r = np.abs(_prefix_autocorrelation(ev, lag))
        out -= np.where(r > AUTOCORR_THRESHOLD, r, 0.0)  # NaN > x is False: constant prefix is free
    return out


def _rule_motif(events: np.ndarray, tonic: np.ndarray) -> np.ndarray:
    ev, _ = _check_events(events, tonic)
    n = _motif_notes(ev)
    return np.where(n >= MOTIF_MIN_NOTES, 1.0 + 0.1 * (n - MOTIF_MIN_NOTES), 0.0)


def _rule_repeated_motif(events: np.ndarray, tonic: np.ndarray) -> np.ndarray:
    ev, _ = _check_events(events, tonic)
    n = _motif_notes(ev)
    return np.where(_repeated_motif(ev), 1.0 + 0.25 * (n - MOTIF_MIN_NOTES), 0.0)


def _rule_preferred_intervals(events: np.ndarray, tonic: np.ndarray) -> np.ndarray:
    ev, ton = _check_events(events, tonic)
    pitch, prev = event_pitches(ev), _previous_note(ev)
    prev_degree = (prev - ton[:, None]) % 12  # [B, T]
    tonic_or_fifth = np.isin(prev_degree, (0, 7))
    size = np.abs(pitch - prev)
    table = np.where(size <= 12, _INTERVAL_REWARD[np.minimum(size, 12)], _BEYOND_OCTAVE_REWARD)
    table = np.where((size == 4) & np.isin(prev_degree, (0, 4)), _IN_KEY_THIRD_REWARD, table)
    table = np.where((size == 7) & tonic_or_fifth, _IN_KEY_FIFTH_REWARD, table)
    hold = np.where(tonic_or_fifth, _HOLD_AFTER_TONIC_OR_FIFTH_REWARD, _HOLD_REWARD)
    rest = np.where(tonic_or_fifth, _REST_AFTER_TONIC_OR_FIFTH_REWARD, _REST_REWARD)
    out = np.select([ev == NO_EVENT, ev == NOTE_OFF], [hold, rest], table)
    return np.where(prev >= 0, out, 0.0)


def _rule_leap_resolution(events: np.ndarray, tonic: np.ndarray) -> np.ndarray:
    ev, _ = _check_events(events, tonic)
    return _leap_outcomes(ev).astype(float)


def _final_step(flag: np.ndarray, t: int) -> np.ndarray:
    out = np.zeros((flag.shape[0], t))
    out[:, -1] = flag
    return out


def _rule_unique_max(events: np.ndarray, tonic: np.ndarray) -> np.ndarray:
    ev, _ = _check_events(events, tonic)
    return _final_step(_unique_extreme(ev, highest=True), ev.shape[1])


def _rule_unique_min(events: np.ndarray, tonic: np.ndarray) -> np.ndarray:
    ev, _ = _check_events(events, tonic)
    return _final_step(_unique_extreme(ev, highest=False), ev.shape[1])


MELODY_RULES: tuple[MelodyRule, ...] = (
    MelodyRule("in_key", 1.0,
               "Stay in key: -1 at each note-on outside the major scale on the tonic "
               "(rl_tuner reward_key, penalty 1; rests and holds are in key).", _rule_in_key),
    MelodyRule("start_tonic", 3.0,
               "Start on the tonic: +1 if step 0 is a note-on of the tonic pitch class "
               "(rl_tuner reward_tonic, 3; rl_tuner accepted only C4).", _rule_start_tonic),
    MelodyRule("end_tonic", 3.0,
               "End on the tonic, held: +1 for a tonic note-on at step T-4, +1 for NO_EVENT at "
               "T-3, +1 for each NO_EVENT or NOTE_OFF at T-2 and T-1 (rl_tuner reward_tonic's "
               "final-bar terms, 3 each).", _rule_end_tonic),
    MelodyRule("excessive_repeat", 100.0,
               "Don't repeat a note excessively: -1 where rl_tuner's detect_repeating_notes "
               "fires (more than 4 consecutive repeats, or more than 6 with holds/rests "
               "between; a note held beyond 5 NO_EVENTs counts) (reward_penalize_repeating, "
               "100).", _rule_excessive_repeat),
    MelodyRule("autocorrelation", 3.0,
               "Low autocorrelation: -sum over lags 1..3 of |r_lag| where |r_lag| > 0.15, r "
               "computed on the event codes of the prefix events[:t+1] "
               "(rl_tuner reward_penalize_autocorrelation, weight 3).", _rule_autocorrelation),
    MelodyRule("motif", 3.0,
               "Play motifs: +1 + 0.1 (n - 3) where the last 8 steps hold n >= 3 distinct "
               "note-ons (rl_tuner reward_motif: 3 + 0.3 (n - 3)).", _rule_motif),
    MelodyRule("repeated_motif", 4.0,
               "Repeat motifs: +1 + 0.25 (n - 3) where the last-8-step motif (n distinct notes) "
               "already occurred, event for event, wholly before it (rl_tuner "
               "reward_repeated_motif: 4 + (n - 3)).", _rule_repeated_motif),
    MelodyRule("preferred_intervals", 5.0,
               "Preferred melodic intervals from the previous note-on, by semitones: 2: .08, "
               "4: .09 (.15 from tonic or 3rd degree), 5: .07, 7: .02 (.1 from tonic or 5th "
               "degree), 9: .05, 11: -.3, >12: -1, else 0 (unison, semitone, minor 3rd, "
               "tritone, minor 6th/7th and octave are neither rewarded nor penalised); a hold "
               ".075 (.3 after tonic/5th), a rest .05 (.15 after tonic/5th) "
               "(rl_tuner reward_preferred_intervals, scaler 5).", _rule_preferred_intervals),
    MelodyRule("leap_resolution", 5.0,
               "Leap up, leap back: +1 where a leap (>= a fifth) is resolved, -1 where a second "
               "leap goes the same way (rl_tuner reward_leap_up_back, +-5; see "
               "_leap_outcomes).", _rule_leap_resolution),
    MelodyRule("unique_max", 3.0,
               "A unique highest note: +1 at the last step if the highest pitch is struck once "
               "(rl_tuner reward_high_low_unique, 3).", _rule_unique_max),
    MelodyRule("unique_min", 3.0,
               "A unique lowest note: +1 at the last step if the lowest pitch is struck once "
               "(rl_tuner reward_high_low_unique, 3).", _rule_unique_min),
)

PENALTY_RULES: tuple[str, ...] = (
    "in_key", "excessive_repeat", "autocorrelation", "preferred_intervals", "leap_resolution",
)
"""The rules whose reward can be negative: the keys of ``melody_violations``."""

_RULES_BY_NAME = {r.name: r for r in MELODY_RULES}


def _check_rule_names(names: Mapping[str, float] | tuple[str, ...], what: str) -> None:
    unknown = sorted(set(names) - set(_RULES_BY_NAME))
    if unknown:
        raise UnknownRuleError(f"unknown melody rule(s) {unknown} in {what}; valid names are "
                               f"{[r.name for r in MELODY_RULES]}")


def melody_step_rewards(events: np.ndarray, tonic: np.ndarray | int | None = None,
                        weights: Mapping[str, float] | None = None) -> np.ndarray:
    """[B, T] Sequence Tutor's music-theory reward r_MT(s_t, a_t): sum of weight * rule.fn.

    ``weights`` overrides the default weights (rl_tuner's amounts) of the rules it names; a
    weight of 0 drops a rule. Unknown names raise ``UnknownRuleError`` (a ``ValueError``).
    """
    weights = dict(weights or {})
    _check_rule_names(weights, "weights")
    ev, ton = _check_events(events, tonic)
    total = np.zeros(ev.shape)
    for rule in MELODY_RULES:
        w = float(weights.get(rule.name, rule.weight))
        if w != 0.0:
            total += w * rule.fn(ev, ton)
    return total


def melody_violations(events: np.ndarray, tonic: np.ndarray | int | None = None) -> dict[str, np.ndarray]:
    """name -> [B, T] bool, True at the steps where a penalty rule (``PENALTY_RULES``) fired."""
    ev, ton = _check_events(events, tonic)
    return {name: _RULES_BY_NAME[name].fn(ev, ton) < 0 for name in PENALTY_RULES}


def table1_metrics(events: np.ndarray, tonic: np.ndarray | int | None = None) -> dict[str, float]:
    """Sequence Tutor's Table 1 statistics of a batch of compositions, as fractions.

    As rl_tuner's ``compute_composition_stats`` / ``get_stat_dict_string``, with N = B * T
    steps ("notes") and B compositions:

    * notes_not_in_key: note-ons outside the key / N;
    * notes_excessively_repeated: steps where ``detect_repeating_notes`` fires / N;
    * mean_autocorr_lag{1,2,3}: NaN-mean over compositions of the (signed) autocorrelation of
      the whole event-code sequence (NaN for a constant sequence);
    * compositions_starting_with_tonic: step 0 is a tonic note-on / B;
    * leaps_resolved: resolved / (resolved + doubled) leaps over the batch, NaN with no leaps;
    * compositions_unique_max_note, compositions_unique_min_note: / B;
    * notes_in_motif: steps ending a motif window / N;
    * notes_in_repeated_motif: steps ending a repeated motif / N.
    """
    ev, ton = _check_events(events, tonic)
    if ev.size == 0:
        raise ValueError("table1_metrics needs at least one composition with at least one step")
    b, n = ev.shape[0], ev.size
    leaps = _leap_outcomes(ev)
    resolved, doubled = int((leaps > 0).sum()), int((leaps < 0).sum())
    out = {
        "notes_not_in_key": _out_of_key(ev, ton).sum() / n,
        "notes_excessively_repeated": _excessive_repeats(ev).sum() / n,
    }
    for lag in AUTOCORR_LAGS:
        r = _prefix_autocorrelation(ev, lag)[:, -1]
        out[f"mean_autocorr_lag{lag}"] = float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")
    out.update({
        "compositions_starting_with_tonic": _is_tonic_note(ev[:, :1], ton).sum() / b,
        "leaps_resolved": resolved / (resolved + doubled) if resolved + doubled else float("nan"),
        "compositions_unique_max_note": _unique_extreme(ev, highest=True).sum() / b,
        "compositions_unique_min_note": _unique_extreme(ev, highest=False).sum() / b,
        "notes_in_motif": (_motif_notes(ev) >= MOTIF_MIN_NOTES).sum() / n,
        "notes_in_repeated_motif": _repeated_motif(ev).sum() / n,
    })
    return {k: float(v) for k, v in out.items()}
