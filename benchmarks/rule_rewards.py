"""Throughput of the batched first-species rule rewards vs. the same checks with music21 objects.

Scores random 12-note two-voice pieces (seeded) with ``tasks.counterpoint.rules.total_rewards``
(all rules, one numpy pass over the batch) and, on a subset, with music21's
``VoiceLeadingQuartet`` and ``interval.Interval`` (consonance, parallel and hidden fifths and
octaves, crossing, overlap, motion, melodic leaps: a subset of the rules, so the ratio is
conservative). Single thread. Prints one JSON line.

    python benchmarks/rule_rewards.py [--pieces 10000] [--music21-pieces 200] [--seed 0]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from music21 import interval, key, pitch, voiceLeading  # noqa: E402

from tasks.counterpoint import rules  # noqa: E402
from tasks.counterpoint.piece import FirstSpeciesBatch  # noqa: E402

KEYS = ("C", "G", "D", "A", "E", "B", "F#", "D-", "A-", "E-", "B-", "F")


def _scales() -> tuple[np.ndarray, list[list[str]]]:
    """[12, 49] MIDI pitches and names of the 12 major scales from C1 up (spelled in key)."""
    pitches = [key.Key(k).getScale().getPitches("C1", "C8")[:49] for k in KEYS]
    return np.array([[p.midi for p in ps] for ps in pitches]), [[p.nameWithOctave for p in ps] for ps in pitches]


def random_pieces(n_pieces: int, n_notes: int, seed: int) -> tuple[FirstSpeciesBatch, list[list[str]], list[list[str]]]:
    """Diatonic pieces in random keys: a cantus random walk and a counterpoint a random
    diatonic distance (unison .. twelfth) above or below it. Returns the batch and the
    spelled upper and lower voices for music21."""
    rng = np.random.default_rng(seed)
    midi, names = _scales()
    k = rng.integers(0, len(KEYS), size=n_pieces)
    cf_deg = np.clip(28 + np.cumsum(rng.integers(-2, 3, size=(n_pieces, n_notes)), axis=1), 21, 35)
    below = rng.random(n_pieces) < 0.5
    dist = rng.choice([0, 2, 3, 4, 5, 7, 9, 11], size=(n_pieces, n_notes))  # degrees
    cp_deg = cf_deg + np.where(below[:, None], dist, -dist)
    cantus, counterpoint = midi[k[:, None], cf_deg], midi[k[:, None], cp_deg]
    batch = FirstSpeciesBatch(cantus, counterpoint, below, cantus[:, -1] % 12, np.full(n_pieces, n_notes))
    up_deg = np.where(below[:, None], cp_deg, cf_deg).tolist()
    lo_deg = np.where(below[:, None], cf_deg, cp_deg).tolist()
    upper = [[names[kk][d] for d in row] for kk, row in zip(k.tolist(), up_deg)]
    lower = [[names[kk][d] for d in row] for kk, row in zip(k.tolist(), lo_deg)]
    return batch, upper, lower


def music21_checks(upper: list[str], lower: list[str], cp_is_upper: bool) -> dict[str, int]:
    """Violation counts of one piece computed with music21 objects (the slow reference path),
    with the rules' definitions: Fux allows antiparallel perfect intervals, and a fifth
    approached in similar motion from a diminished fifth is a hidden fifth."""
    ups = [pitch.Pitch(n) for n in upper]
    los = [pitch.Pitch(n) for n in lower]
    cp = ups if cp_is_upper else los
    counts = dict.fromkeys(
        ("dissonance", "voice_crossing", "parallel_fifths", "parallel_octaves", "hidden_fifths",
         "hidden_octaves", "voice_overlap", "similar_motion", "forbidden_leap"), 0
    )
    for u, lo in zip(ups, los):
        counts["dissonance"] += not interval.Interval(lo, u).isConsonant()
        counts["voice_crossing"] += u < lo
    for i in range(1, len(ups)):
        vlq = voiceLeading.VoiceLeadingQuartet(ups[i - 1], ups[i], los[i - 1], los[i])
        contrary, similar = vlq.contraryMotion(), vlq.similarMotion()
        parallel_fifth = vlq.parallelFifth() and not contrary
        counts["parallel_fifths"] += parallel_fifth
        counts["parallel_octaves"] += (vlq.parallelOctave() or vlq.parallelUnison()) and not contrary
        counts["hidden_fifths"] += similar and not parallel_fifth and vlq.vIntervals[1].simpleName == "P5"
        counts["hidden_octaves"] += vlq.hiddenOctave()
        counts["voice_overlap"] += vlq.voiceOverlap()
        counts["similar_motion"] += similar
        leap = interval.Interval(cp[i - 1], cp[i])
        counts["forbidden_leap"] += leap.name.startswith(("A", "d")) or (
            leap.generic.undirected > 5 and leap.name != "P8"
        )
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pieces", type=int, default=10_000)
    parser.add_argument("--music21-pieces", type=int, default=200)
    parser.add_argument("--notes", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    batch, upper, lower = random_pieces(args.pieces, args.notes, args.seed)
    rules.total_rewards(batch)  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        rules.total_rewards(batch)
        times.append(time.perf_counter() - t0)
    batched_rate = args.pieces / float(np.median(times))

    m = min(args.music21_pieces, args.pieces)
    music21_checks(upper[0], lower[0], bool(batch.cantus_below[0]))  # warm-up (interval cache)
    t0 = time.perf_counter()
    slow = [music21_checks(upper[b], lower[b], bool(batch.cantus_below[b])) for b in range(m)]
    music21_rate = m / (time.perf_counter() - t0)

    # Both paths must compute the same thing: compare per-piece counts on the subset.
    fast = rules.violations(batch)
    agree = [int(fast[name][b].sum()) == n for b, counts in enumerate(slow) for name, n in counts.items()]

    print(json.dumps({
        "pieces": args.pieces,
        "batched_pieces_per_s": round(batched_rate),
        "music21_pieces_per_s": round(music21_rate, 1),
        "music21_pieces": m,
        "ratio": round(batched_rate / music21_rate),
        "music21_agreement": sum(agree) / len(agree),
        "threads": 1,
    }))


if __name__ == "__main__":
    main()
