"""The counterpoint lookahead (tasks/counterpoint/lookahead.py) against brute-force enumeration
of every consonant counterpoint, the locality its search rests on, and the shaping's promise:
a piece's return changes only by a constant of its cantus."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from apps.pipeline import load_run_config, make_task
from rlhf.interfaces import Completions
from rlhf.rollout import length_mask
from tasks.counterpoint import lookahead as L
from tasks.counterpoint import rules as R
from tasks.counterpoint.cantus_gen import generate_melodies
from tasks.counterpoint.piece import FirstSpeciesBatch

HARD = [r for r in R.FIRST_SPECIES_RULES if r.name not in R.SOFT_RULES]
INTERVALS = np.arange(-24, 25)


def _hard_flags(cf: np.ndarray, cps: np.ndarray, below: bool, rules=HARD) -> np.ndarray:
    """[P, N] any hard rule broken, straight from rules.violations."""
    P, N = cps.shape
    batch = FirstSpeciesBatch(np.repeat(cf[None], P, 0), cps, np.full(P, below), np.full(P, cf[-1] % 12), np.full(P, N))
    return np.logical_or.reduce([v for v in R.violations(batch, rules).values()])


def _no_third_over_the_first_note(batch: FirstSpeciesBatch) -> np.ndarray:
    """A rule of a user's that reads the cantus far back: after its first note the counterpoint
    avoids the pitch class a major third above the cantus's first note."""
    third = (batch.counterpoint - batch.cantus[:, :1]) % 12 == 4
    third[:, 0] = False
    return third


EXTRA = R.Rule("no_third_over_the_first_note", 1.0, "a user's rule that reads the cantus far back", _no_third_over_the_first_note)


def test_feasibility_is_what_enumerating_every_counterpoint_finds():
    """For 5-note cantus firmi in both positions, every counterpoint over the consonances is
    enumerated (a clean piece uses no other interval); a prefix can be finished clean exactly
    where potential_after says so, and ``start`` is whether any clean piece exists."""
    seen_dead_end, starts = 0, set()
    for m in generate_melodies(8, 0, min_notes=8, max_notes=10)[:4]:  # the 3rd and 4th have a position with no clean piece
        cf = np.array(m.pitches[:5])
        for below in (True, False):
            la = L.solve(cf, below, int(cf[-1] % 12), INTERVALS, R.FIRST_SPECIES_RULES)
            cons = np.array([0, 3, 4, 7, 8, 9, 12, 15, 16]) * (1 if below else -1)
            grid = np.array(list(itertools.product(cons, repeat=len(cf)))) + cf[None]  # [9^5, 5]
            flags = _hard_flags(cf, grid, below)
            assert la.start == bool((~flags.any(1)).any())
            starts.add(la.start)
            for t in range(len(cf)):
                finishable: dict[tuple, bool] = {}
                for pre, ok in zip(map(tuple, grid[:, : t + 1]), ~flags[:, t + 1 :].any(1)):
                    finishable[pre] = finishable.get(pre, False) or bool(ok)
                for pre, want in finishable.items():
                    p2, p1 = (pre[t - 2] if t >= 2 else 0), (pre[t - 1] if t >= 1 else 0)
                    got = bool(la.potential_after(t, p2, p1, np.array([pre[t]]))[0])
                    window = [la.index(i, np.array(pre[i])) >= 0 for i in range(max(0, t - 2), t + 1)]
                    if all(window):
                        assert got == want, (cf.tolist(), below, pre)
                        seen_dead_end += not want
                    else:  # a note that breaks a vertical rule in the last three: not finishable (the potential's convention), unless complete
                        assert got == (t == len(cf) - 1)
    assert seen_dead_end > 100 and starts == {True, False}  # dead ends and unsolvable positions occur: the comparisons are not vacuous


def test_a_rule_of_the_users_that_reads_the_cantus_far_back_is_searched_on_whole_pieces():
    """The search evaluates its own rules on four-note windows; a rule of the user's
    (``task.extra_rules``) may read the whole cantus. For 6-note cantus firmi (so that a window
    ends before the last note without the first), enumeration decides which prefixes can be
    finished clean under the built-in rules plus such a rule, and potential_after agrees on each
    of them (each prefix whose last three notes are candidates)."""
    checked = dead_ends = 0
    for seed in (0, 5):  # cantus firmi where reading the first note or a window's first note differ
        cf = np.array(generate_melodies(1, seed, min_notes=8, max_notes=10)[0].pitches[:6])
        N = len(cf)
        for below in (True, False):
            la = L.solve(cf, below, int(cf[-1] % 12), INTERVALS, [*R.FIRST_SPECIES_RULES, EXTRA])
            cons = np.array([0, 3, 4, 7, 8, 9, 12, 15, 16]) * (1 if below else -1)
            grid = np.array(list(itertools.product(cons, repeat=N))) + cf[None]  # [9^6, 6]: rows sharing a prefix are contiguous
            flags = _hard_flags(cf, grid, below, HARD + [EXTRA])
            for t in range(N - 1):
                block = len(cons) ** (N - t - 1)  # rows per prefix of t + 1 notes
                finishable = (~flags[:, t + 1 :].any(1)).reshape(-1, block).any(1)  # [9^(t+1)]
                prefixes = grid[::block, : t + 1]
                # prefixes whose last three notes pass the vertical rules (elsewhere potential_after is False by convention)
                inside = np.logical_and.reduce([la.index(i, prefixes[:, i]) >= 0 for i in range(max(0, t - 2), t + 1)])
                for k in np.flatnonzero(inside):
                    pre = prefixes[k]
                    p2, p1 = (pre[t - 2] if t >= 2 else 0), (pre[t - 1] if t >= 1 else 0)
                    assert bool(la.potential_after(t, p2, p1, np.array([pre[t]]))[0]) == finishable[k], (cf.tolist(), below, pre.tolist())
                    checked += 1
                    dead_ends += not finishable[k]
    assert checked > 1000 and dead_ends > 100  # not vacuous


def test_a_rule_at_a_note_reads_only_the_three_notes_before_it():
    """The premise of the search: changing notes outside j-3..j never changes a hard rule's flag
    at j, the VERTICAL rules' flag at j reads note j alone, and the others read the cantus only
    at notes j-3..j."""
    rng = np.random.default_rng(5)
    vertical = [r for r in HARD if r.name in L.VERTICAL]
    for _ in range(60):
        m = generate_melodies(1, int(rng.integers(1 << 30)), min_notes=8, max_notes=14)[0]
        cf = np.array(m.pitches)
        N, below = len(cf), bool(rng.random() < 0.5)
        sign = 1 if below else -1
        base = cf + sign * rng.choice([0, 3, 4, 7, 8, 9, 12, 16], size=N)
        j = int(rng.integers(N))
        other = base.copy()
        far = np.array([i for i in range(N) if i < j - 3 or i > j], dtype=int)
        other[far] += rng.choice([-5, -2, 2, 7], size=len(far))
        near = np.array([i for i in range(N) if i != j], dtype=int)
        moved = base.copy()
        moved[near] += rng.choice([-5, -2, 2, 7], size=len(near))
        for rule_set, a, b in ((HARD, base, other), (vertical, base, moved)):
            batch = FirstSpeciesBatch(np.stack([cf, cf]), np.stack([a, b]), np.array([below] * 2), np.array([cf[-1] % 12] * 2), np.array([N] * 2))
            for name, v in R.violations(batch, rule_set).items():
                assert v[0, j] == v[1, j], (name, j, a.tolist(), b.tolist())
        # the others read the cantus at notes j-3..j only (the search evaluates them on that window alone)
        far_cf = cf.copy()
        far_cf[far] += rng.choice([-5, -2, 2, 7], size=len(far))
        melodic = [r for r in HARD if r.name not in L.VERTICAL]
        batch = FirstSpeciesBatch(np.stack([cf, far_cf]), np.stack([base, base]), np.array([below] * 2), np.array([cf[-1] % 12] * 2), np.array([N] * 2))
        for name, v in R.violations(batch, melodic).items():
            assert v[0, j] == v[1, j], (name, j, cf.tolist(), far_cf.tolist())


@pytest.fixture(scope="module")
def tasks_and_batch():
    plain = make_task(load_run_config("configs/counterpoint.yaml", ["task.lookahead=0"], quick=True))
    shaped = make_task(load_run_config("configs/counterpoint.yaml", ["task.lookahead=3.0"], quick=True))
    prompts = plain.train_prompts()[:24] * 6
    ids = torch.tensor(plain.codec.completion_token_ids)
    values = plain.codec.completion_values(ids.numpy())
    consonant = ids[torch.from_numpy(np.isin(np.abs(values), [3, 4, 7, 8, 9, 12, 15, 16]))]
    T = max(p.n_new for p in prompts)
    g = torch.Generator().manual_seed(0)
    tokens = consonant[torch.randint(len(consonant), (len(prompts), T), generator=g)]  # mostly consonant: dead ends and clean pieces both occur
    lengths = [p.n_new for p in prompts]
    return plain, shaped, Completions(prompts, tokens, length_mask(lengths, T), lengths)


def test_shaping_changes_each_return_by_a_constant_of_its_cantus(tasks_and_batch):
    """Σ_t r'_t − Σ_t r_t = −Φ(s_0): κ where no clean piece exists for the cantus, else 0; yet
    single notes are charged (dead ends) and given back (later)."""
    plain, shaped, comps = tasks_and_batch
    raw, new = plain.reward(comps).values, shaped.reward(comps).values  # [B, T]
    diff = (new - raw) * comps.mask
    items = plain.decode(comps.prompts, [comps.tokens[b, : comps.lengths[b]].tolist() for b in range(len(comps))])
    starts = np.array([shaped._lookahead(it).start for it in items])
    np.testing.assert_allclose(diff.sum(1).numpy(), np.where(starts, 0.0, 3.0), atol=1e-5)
    assert (diff < -2.9).any() and (diff > 2.9).any()


def test_shaped_action_rewards_agree_with_the_shaped_reward_and_charge_dead_ends(tasks_and_batch):
    plain, shaped, comps = tasks_and_batch
    act, act_plain = shaped.action_rewards(comps), plain.action_rewards(comps)
    at_sampled = act.gather(-1, comps.tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(at_sampled * comps.mask, shaped.reward(comps).values * comps.mask)
    # at a step, two actions with the same rule reward differ by κ exactly when one of them leads into a dead end
    extra = (act - act_plain)[:, :, shaped.allowed]  # [B, T, A]
    spread = extra.amax(-1) - extra.amin(-1)
    assert torch.isclose(spread[comps.mask.bool()], torch.tensor(3.0)).any()
    assert set(torch.unique(spread[comps.mask.bool()].round(decimals=4)).tolist()) <= {0.0, 3.0}


def _shaped_rewards_loop(la: L.Lookahead, cp: np.ndarray, action_pitches: np.ndarray, kappa: float) -> tuple[np.ndarray, np.ndarray]:
    """The shaping terms one note and one pitch at a time through ``potential_after``."""
    N = len(la.cands)
    phi_before = [0.0 if la.start else -kappa]
    after, own = np.empty(action_pitches.shape), np.empty(N)
    for t in range(N):
        p2, p1 = (int(cp[t - 2]) if t >= 2 else 0), (int(cp[t - 1]) if t >= 1 else 0)
        for a, pitch in enumerate(action_pitches[t]):
            after[t, a] = (0.0 if la.potential_after(t, p2, p1, np.array([pitch]))[0] else -kappa) - phi_before[t]
        phi = 0.0 if la.potential_after(t, p2, p1, np.array([cp[t]]))[0] else -kappa
        own[t] = phi - phi_before[t]
        phi_before.append(phi)
    return after, own


def test_shaped_rewards_equal_a_loop_over_potential_after():
    """The one-gather shaping equals asking ``potential_after`` note by note and pitch by pitch,
    on counterpoints that are clean, that break vertical rules, and that leave the MIDI range."""
    rng = np.random.default_rng(3)
    for m in generate_melodies(6, 11, min_notes=8, max_notes=12):
        cf = np.array(m.pitches)
        N = len(cf)
        for below in (True, False):
            la = L.solve(cf, below, int(cf[-1] % 12), INTERVALS, R.FIRST_SPECIES_RULES)
            sign = 1 if below else -1
            actions = cf[:, None] + sign * np.array([-2, 0, 3, 4, 5, 7, 9, 12, 16, 200])[None, :]  # [N, A]: 200 leaves the range
            for _ in range(8):
                cp = cf + sign * rng.choice([0, 3, 4, 7, 8, 9, 12, 5, 2], size=N)
                got = L.shaped_rewards(la, cp, actions, 2.5)
                want = _shaped_rewards_loop(la, cp, actions, 2.5)
                np.testing.assert_array_equal(got[0], want[0])
                np.testing.assert_array_equal(got[1], want[1])
