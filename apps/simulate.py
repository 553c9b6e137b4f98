"""Simulated raters with divergent tastes, for music and for text, writing the preference schema.

Every rater scores an item by a linear utility over named features, u(x) = Σ_k w_k f_k(x),
and labels a pair with a noisy Bradley-Terry choice, p(a ≻ b) = σ((u(a) − u(b)) / T), with T
the ``temperature``. A rater's weights are their type's weights times exp(ε), ε ~ N(0, jitter²)
per weight, so raters of one group differ a little. A rater group is a share of the raters with
one type; the group's *prototype* is the type's weights without jitter.

Pairs are classified with the prototypes of the first two groups: **agreed** if both prefer
the same item, **disputed** if they prefer different items, and pairs where either prototype's
utility gap is below ``min_gap`` are not used (too close to call). Each rater labels
``pairs_per_rater`` pairs, a ``disputed_share`` of them disputed.

Rater types
-----------
Music (features of the counterpoint line of a first-species piece, see :func:`music_features`):

* ``stepwise`` -- prizes conjunct motion and contrary motion, dislikes leaps:
  steps +2, contrary +2, leaps −1, rules +1.
* ``leaps`` -- prizes wide leaps and a high register, mildly dislikes stepwise lines:
  steps −1, leaps +2, register +1.5, rules +1.
* ``rules`` -- Fux's rules only (the task's rule reward): rules +1.

where ``steps`` / ``leaps`` are the shares of melodic moves of 1-2 semitones / more than 4
semitones, ``contrary`` the share of contrary motions between the voices, ``register`` the mean
counterpoint pitch in octaves above middle C, and ``rules`` the task's rule reward per note
(``tasks/counterpoint/scoring.py``, ≤ 0). Both taste types weigh the rules alike, which makes
agreed pairs; their tastes make disputed ones.

Candidates are real: two-voice phrases of the Bach chorale corpus (``tasks/counterpoint/corpus.py``)
with the bass as cantus below, whose soprano, alto and tenor lines are three real answers to
the same prompt, plus ``variants`` per line with one or two notes displaced by an octave or the
whole line moved an octave (a consonance stays a consonance; leaps and register change).
A pair compares two candidates for the same prompt; ``source`` names the chorale phrase.

Text (Pets-style, after Poddar et al. 2024, sec. 5): answers to "which pet should I get?"
naming one animal among filler words; the feature is the animal (one-hot).

* ``dogs`` -- dog 4, cat 3, rabbit 2, bird 1, fish 0.
* ``cats`` -- cat 4, dog 3, bird 2, rabbit 1, fish 0.

The two groups agree on every pair except dog vs cat and rabbit vs bird.

Outputs: the records (``data.path``, any format of ``reward_models/data.py``) and a sidecar
``<data.path>.sim.json`` with the raters (group, type, weights) and, per ``pair_id``, whether
the pair is disputed, what each group's prototype prefers, and the rater's probability of the
label given (for the noise ceiling).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import Field, model_validator

from reward_models.data import Preference, save_preferences
from rlhf.config import Section
from rlhf.errors import UserError
from tasks.counterpoint.config import CounterpointDataConfig
from tasks.counterpoint.piece import FirstSpeciesBatch, FirstSpeciesPiece
from tasks.counterpoint.task import from_json

MUSIC_FEATURES = ("steps", "contrary", "leaps", "register", "rules")
ANIMALS = ("dog", "cat", "rabbit", "bird", "fish")
TEXT_FEATURES = ANIMALS

RATER_TYPES: dict[str, dict[str, dict[str, float]]] = {
    "music": {
        "stepwise": {"steps": 2.0, "contrary": 2.0, "leaps": -1.0, "rules": 1.0},
        "leaps": {"steps": -1.0, "leaps": 2.0, "register": 1.5, "rules": 1.0},
        "rules": {"rules": 1.0},
    },
    "text": {
        "dogs": {"dog": 4.0, "cat": 3.0, "rabbit": 2.0, "bird": 1.0, "fish": 0.0},
        "cats": {"cat": 4.0, "dog": 3.0, "bird": 2.0, "rabbit": 1.0, "fish": 0.0},
    },
}


# --------------------------------------------------------------------------- config


class RaterGroupConfig(Section):
    name: str = Field(..., min_length=1, description="Group name, written as rater_group (e.g. A).")
    share: float = Field(..., gt=0, le=1, description="Share of the raters in this group (shares must sum to 1).")
    type: str = Field(..., description="Rater type: music: stepwise, leaps, rules; text: dogs, cats.")
    weights: dict[str, float] = Field(default_factory=dict, description="Override single feature weights of the type, e.g. {register: 2.0}.")


def _default_groups() -> list[RaterGroupConfig]:
    return [RaterGroupConfig(name="A", share=0.7, type="stepwise"), RaterGroupConfig(name="B", share=0.3, type="leaps")]


class MusicSimConfig(Section):
    data: CounterpointDataConfig = Field(default_factory=CounterpointDataConfig, description="Corpus extraction (the defaults reuse the prior's corpus cache).")
    max_prompts: int = Field(600, ge=1, description="Distinct prompts (bass phrase × transposition) drawn from the corpus.")
    variants: int = Field(2, ge=0, le=8, description="Octave-displaced variants added per real line.")


class TextSimConfig(Section):
    responses_per_prompt: int = Field(40, ge=4, description="Distinct answers generated per prompt.")


class SimulateConfig(Section):
    domain: Literal["music", "text"] = Field("music", description="music: first-species counterpoint from the Bach corpus; text: Pets-style answers.")
    raters: int = Field(120, ge=2, description="Number of simulated raters.")
    groups: list[RaterGroupConfig] = Field(default_factory=_default_groups, description="Rater groups: name, share, type (the first two define agreed/disputed pairs).")
    pairs_per_rater: int = Field(48, ge=1, description="Pairs each rater labels.")
    disputed_share: float = Field(0.5, ge=0, le=1, description="Share of a rater's pairs on which the first two groups' prototypes disagree.")
    min_gap: float = Field(0.15, ge=0, description="Skip pairs whose utility gap is below this for either prototype (too close to call).")
    temperature: float = Field(0.05, gt=0, description="BT choice temperature T: p(a ≻ b) = σ((u(a) − u(b)) / T); smaller = less label noise.")
    weight_jitter: float = Field(0.15, ge=0, description="Per-rater log-normal jitter of each weight (σ of ε in w·exp(ε)).")
    seed: int = Field(0, ge=0, description="Seed of the simulation.")
    music: MusicSimConfig = Field(default_factory=MusicSimConfig, description="Music candidates.")
    text: TextSimConfig = Field(default_factory=TextSimConfig, description="Text candidates.")

    @model_validator(mode="after")
    def _check(self) -> "SimulateConfig":
        total = sum(g.share for g in self.groups)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"group shares sum to {total:g}; they must sum to 1 (e.g. 0.7 and 0.3)")
        types = RATER_TYPES[self.domain]
        feats = MUSIC_FEATURES if self.domain == "music" else TEXT_FEATURES
        for g in self.groups:
            if g.type not in types:
                raise ValueError(f"group {g.name!r}: unknown {self.domain} rater type {g.type!r}; choose one of {', '.join(types)}")
            bad = sorted(set(g.weights) - set(feats))
            if bad:
                raise ValueError(f"group {g.name!r}: unknown feature(s) {bad}; {self.domain} features: {', '.join(feats)}")
        if len({g.name for g in self.groups}) != len(self.groups):
            raise ValueError("group names must be distinct")
        if len(self.groups) < 2 and 0 < self.disputed_share:
            raise ValueError("disputed pairs need two groups; add a group or set disputed_share: 0")
        return self


# --------------------------------------------------------------------------- raters


@dataclass(frozen=True)
class Rater:
    """A simulated rater: linear utility over ``features`` and a BT choice temperature."""

    rater_id: str
    group: str
    type: str
    domain: Literal["music", "text"]
    weights: tuple[float, ...]
    temperature: float

    @property
    def features(self) -> tuple[str, ...]:
        return MUSIC_FEATURES if self.domain == "music" else TEXT_FEATURES

    def utility(self, items: Sequence[Any]) -> np.ndarray:
        """[N] utilities of pieces (music) or response strings (text)."""
        return features_of(self.domain, items) @ np.asarray(self.weights)


def type_weights(domain: str, type_: str, overrides: dict[str, float] | None = None) -> tuple[float, ...]:
    feats = MUSIC_FEATURES if domain == "music" else TEXT_FEATURES
    w = {**RATER_TYPES[domain][type_], **(overrides or {})}
    return tuple(float(w.get(f, 0.0)) for f in feats)


def prototype(cfg: SimulateConfig, group: str) -> Rater:
    """The group's prototype rater (its type's weights, no jitter, the configured temperature)."""
    for g in cfg.groups:
        if g.name == group:
            return Rater(f"prototype-{g.name}", g.name, g.type, cfg.domain, type_weights(cfg.domain, g.type, g.weights), cfg.temperature)
    raise UserError(f"no rater group {group!r}; groups: {[g.name for g in cfg.groups]}")


def make_raters(cfg: SimulateConfig, rng: np.random.Generator) -> list[Rater]:
    """``cfg.raters`` raters, group sizes by largest remainder of the shares, jittered weights."""
    exact = [g.share * cfg.raters for g in cfg.groups]
    counts = [int(math.floor(x)) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[: cfg.raters - sum(counts)]:
        counts[i] += 1
    raters = []
    for g, n in zip(cfg.groups, counts):
        base = np.asarray(type_weights(cfg.domain, g.type, g.weights))
        for _ in range(n):
            w = base * np.exp(rng.normal(0.0, cfg.weight_jitter, size=base.shape))
            raters.append(Rater(f"r{len(raters):03d}", g.name, g.type, cfg.domain, tuple(float(x) for x in w), cfg.temperature))
    return raters


def choice_probability(u_a: np.ndarray, u_b: np.ndarray, temperature: float) -> np.ndarray:
    """Noisy Bradley-Terry choice: p(a ≻ b) = σ((u(a) − u(b)) / T)."""
    return 1.0 / (1.0 + np.exp(-(np.asarray(u_a) - np.asarray(u_b)) / temperature))


def prefers(rater: Rater, a: Any, b: Any, *, noisy: bool = False, rng: np.random.Generator | None = None) -> bool:
    """Does ``rater`` prefer item ``a`` to ``b``? Deterministic (u(a) > u(b)) unless ``noisy``,
    then a draw with p = σ((u(a) − u(b)) / T). Items: FirstSpeciesPiece (music) or str (text)."""
    u = rater.utility([a, b])
    if not noisy:
        return bool(u[0] > u[1])
    rng = rng or np.random.default_rng()
    return bool(rng.random() < choice_probability(u[0], u[1], rater.temperature))


def win_rate(rater: Rater, items_a: Sequence[Any], items_b: Sequence[Any]) -> float:
    """Share of index-aligned pairs in which ``rater`` prefers a to b (ties count ½): e.g. tuned
    policy vs prior samples for the same prompts."""
    if len(items_a) != len(items_b) or not len(items_a):
        raise ValueError(f"win_rate needs two equally long non-empty lists, got {len(items_a)} and {len(items_b)}")
    ua, ub = rater.utility(items_a), rater.utility(items_b)
    return float(np.mean((ua > ub) + 0.5 * (ua == ub)))


# --------------------------------------------------------------------------- features


def music_features(pieces: Sequence[FirstSpeciesPiece]) -> np.ndarray:
    """[N, 5] features (steps, contrary, leaps, register, rules) of first-species pieces:

    steps    = share of melodic moves m_i = cp_i − cp_{i−1} with 1 ≤ |m_i| ≤ 2
    contrary = share of moves in contrary motion to the cantus (rules.motion_types)
    leaps    = share of moves with |m_i| > 4 (rules.LEAP_THRESHOLD)
    register = (mean_i cp_i − 60) / 12, octaves above middle C
    rules    = the task's rule reward per note (scoring.score, default weights; ≤ 0)
    """
    from tasks.counterpoint.rules import CONTRARY, LEAP_THRESHOLD, motion_types
    from tasks.counterpoint.scoring import score

    batch = FirstSpeciesBatch.from_pieces(pieces)
    mask = batch.mask
    cp = batch.counterpoint.astype(np.float64)
    moves = np.abs(np.diff(cp, axis=1))
    mmask = mask[:, 1:]
    n_moves = np.maximum(mmask.sum(1), 1)
    steps = (((moves >= 1) & (moves <= 2)) & mmask).sum(1) / n_moves
    leaps = ((moves > LEAP_THRESHOLD) & mmask).sum(1) / n_moves
    contrary = ((motion_types(batch)[:, 1:] == CONTRARY) & mmask).sum(1) / n_moves
    register = ((cp * mask).sum(1) / np.maximum(mask.sum(1), 1) - 60.0) / 12.0
    s = score("first_species", pieces)
    rules = s.totals / np.maximum(s.notes, 1)
    return np.stack([steps, contrary, leaps, register, rules], axis=1)


def text_features(texts: Sequence[str]) -> np.ndarray:
    """[N, 5] one-hot of the animal an answer names (dog, cat, rabbit, bird, fish; the first
    one named counts; none = all zeros)."""
    out = np.zeros((len(texts), len(ANIMALS)))
    for i, t in enumerate(texts):
        words = t.lower().replace(".", " ").replace(",", " ").split()
        for w in words:
            if w in ANIMALS:
                out[i, ANIMALS.index(w)] = 1.0
                break
    return out


def features_of(domain: str, items: Sequence[Any]) -> np.ndarray:
    return music_features(items) if domain == "music" else text_features(items)


# --------------------------------------------------------------------------- candidates


@dataclass
class Candidates:
    """Items grouped by prompt: ``prompt[i]`` answers with ``response[i]`` (strings of the
    schema), ``features[i]`` its features, ``source[i]`` its provenance."""

    prompt: list[str]
    response: list[str]
    features: np.ndarray  # [N, F]
    source: list[str]
    items: list[Any]


def octave_variants(piece: FirstSpeciesPiece, n: int, rng: np.random.Generator) -> list[FirstSpeciesPiece]:
    """Up to ``n`` distinct variants of the counterpoint: one or two interior notes moved by an
    octave (a leap appears, the vertical interval class stays), or the whole line moved an
    octave (register), always within ±24 semitones of the cantus."""
    from tasks.counterpoint.tokens import MAX_INTERVAL

    out: dict[tuple[int, ...], None] = {}
    cf, cp = np.array(piece.cantus), np.array(piece.counterpoint)
    if len(cp) < 3:
        return []
    for _ in range(4 * n):
        if len(out) >= n:
            break
        new = cp.copy()
        if rng.random() < 1 / 3:
            new = new + 12 * rng.choice([-1, 1])
        else:
            k = int(rng.integers(1, 3))
            for i in rng.choice(np.arange(1, len(cp) - 1), size=min(k, len(cp) - 2), replace=False):
                new[i] += 12 * rng.choice([-1, 1])
        if np.all(np.abs(new - cf) <= MAX_INTERVAL) and not np.array_equal(new, cp):
            out[tuple(int(x) for x in new)] = None
    return [FirstSpeciesPiece(piece.cantus, cp_, piece.cantus_position, piece.final, f"{piece.source}~{j}") for j, cp_ in enumerate(out)]


def music_candidates(cfg: SimulateConfig, rng: np.random.Generator, pieces: Sequence[FirstSpeciesPiece] | None = None,
                     progress: bool = False) -> Candidates:
    """Real counterpoint lines from the corpus (or ``pieces``) grouped by prompt, plus variants."""
    from tasks.counterpoint import corpus
    from tasks.counterpoint.tokens import build_codec

    if pieces is None:
        d = cfg.music.data
        pieces = corpus.extract_first_species(d.max_pieces, d.transpositions, d.min_notes, d.max_notes, Path(d.cache_dir), progress)
    codec = build_codec("first_species")
    groups: dict[tuple, list[FirstSpeciesPiece]] = {}
    for p in pieces:
        groups.setdefault((p.cantus, p.cantus_position), []).append(p)
    keys = [k for k, v in groups.items() if len({x.counterpoint for x in v}) >= 2 or cfg.music.variants > 0]
    if not keys:
        raise UserError("the corpus gave no prompt with two or more candidate lines; raise simulate.music.data.max_pieces or simulate.music.variants.")
    order = rng.permutation(len(keys))[: cfg.music.max_prompts]
    items: list[FirstSpeciesPiece] = []
    for i in sorted(order):
        lines = list({p.counterpoint: p for p in groups[keys[i]]}.values())
        for p in lines:
            items.append(p)
            items += octave_variants(p, cfg.music.variants, rng)
    tok = codec.tokenizer
    prompts, responses = [], []
    for it in items:
        pr, co = codec.encode(it)
        prompts.append(" ".join(tok.convert_ids_to_tokens(pr)))
        responses.append(" " + " ".join(tok.convert_ids_to_tokens(co)))
    sources = [it.source.split(":", 1)[0] for it in items]
    return Candidates(prompts, responses, music_features(items), sources, items)


PET_PROMPTS = ("which pet should i get ?", "what animal would make a good pet for us ?", "we want a pet . what do you suggest ?")
PET_OPENERS = ("you should get", "i would get", "get", "my advice : get", "the best choice is", "i suggest")
PET_ADJECTIVES = ("a friendly", "a small", "a quiet", "a playful", "a young", "a calm", "a lovely")
PET_REASONS = (".", ", it is fun .", ", it is easy to keep .", ", it will keep you company .", ", kids love it .")


def text_candidates(cfg: SimulateConfig, rng: np.random.Generator) -> Candidates:
    """Pets-style answers: opener + adjective + animal + reason, ``responses_per_prompt`` each."""
    prompts, responses = [], []
    for pi, prompt in enumerate(PET_PROMPTS):
        seen: dict[str, None] = {}
        for _ in range(20 * cfg.text.responses_per_prompt):
            if len(seen) >= cfg.text.responses_per_prompt:
                break
            animal = ANIMALS[len(seen) % len(ANIMALS)]
            parts = (PET_OPENERS[rng.integers(len(PET_OPENERS))], PET_ADJECTIVES[rng.integers(len(PET_ADJECTIVES))], animal,
                     PET_REASONS[rng.integers(len(PET_REASONS))])
            seen[" " + " ".join(parts)] = None
        for r in seen:
            prompts.append(prompt)
            responses.append(r)
    src = [f"pets#{PET_PROMPTS.index(p)}" for p in prompts]
    return Candidates(prompts, responses, text_features(responses), src, responses)


# --------------------------------------------------------------------------- pairs


def classify_pairs(c: Candidates, proto_a: Rater, proto_b: Rater | None, min_gap: float) -> tuple[np.ndarray, np.ndarray]:
    """(pairs [M, 2] of candidate indices with the same prompt, disputed [M] bool): pairs whose
    gap is at least ``min_gap`` under both prototypes (the second may be None: all agreed)."""
    ua = c.features @ np.asarray(proto_a.weights)
    ub = c.features @ np.asarray(proto_b.weights) if proto_b is not None else ua
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(c.prompt):
        by_prompt.setdefault(p, []).append(i)
    pairs = []
    for idx in by_prompt.values():
        ii, jj = np.triu_indices(len(idx), k=1)
        pairs.append(np.stack([np.asarray(idx)[ii], np.asarray(idx)[jj]], axis=1))
    pairs = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)
    pairs = pairs[[c.response[i] != c.response[j] for i, j in pairs]] if len(pairs) else pairs
    da, db = ua[pairs[:, 0]] - ua[pairs[:, 1]], ub[pairs[:, 0]] - ub[pairs[:, 1]]
    keep = (np.abs(da) >= min_gap) & (np.abs(db) >= min_gap)
    return pairs[keep], (np.sign(da) != np.sign(db))[keep]


@dataclass
class Simulation:
    records: list[Preference]
    raters: list[Rater]
    meta: dict[str, Any]  # the sidecar


def simulate(cfg: SimulateConfig, candidates: Candidates | None = None, *, progress: bool = False) -> Simulation:
    """Raters, pairs and noisy labels (see the module docstring)."""
    rng = np.random.default_rng(cfg.seed)
    if candidates is None:
        candidates = music_candidates(cfg, rng, progress=progress) if cfg.domain == "music" else text_candidates(cfg, rng)
    raters = make_raters(cfg, rng)
    pa = prototype(cfg, cfg.groups[0].name)
    pb = prototype(cfg, cfg.groups[1].name) if len(cfg.groups) > 1 else None
    pairs, disputed = classify_pairs(candidates, pa, pb, cfg.min_gap)
    pools = {True: np.flatnonzero(disputed), False: np.flatnonzero(~disputed)}
    n_disp = int(round(cfg.disputed_share * cfg.pairs_per_rater))
    need = {True: n_disp, False: cfg.pairs_per_rater - n_disp}
    for k, n in need.items():
        if n and len(pools[k]) < n:
            raise UserError(f"only {len(pools[k])} {'disputed' if k else 'agreed'} pairs clear simulate.min_gap={cfg.min_gap}, but each rater needs {n}; "
                            "lower min_gap or pairs_per_rater, or use more prompts (simulate.music.max_prompts).")
    feats = candidates.features
    records: list[Preference] = []
    meta_pairs: dict[str, Any] = {}
    ua_all, ub_all = feats @ np.asarray(pa.weights), feats @ np.asarray((pb or pa).weights)
    for rater in raters:
        chosen_idx = np.concatenate([rng.choice(pools[k], size=n, replace=False) for k, n in need.items() if n])
        rng.shuffle(chosen_idx)
        w = np.asarray(rater.weights)
        for k, m in enumerate(chosen_idx):
            i, j = pairs[m]
            if rng.random() < 0.5:  # presentation order
                i, j = j, i
            p_i = float(choice_probability(feats[i] @ w, feats[j] @ w, rater.temperature))
            first_wins = rng.random() < p_i
            a, b = (i, j) if first_wins else (j, i)
            pid = f"{rater.rater_id}-{k:03d}"
            records.append(Preference(
                prompt=candidates.prompt[a], chosen=candidates.response[a], rejected=candidates.response[b],
                rater_id=rater.rater_id, rater_group=rater.group, pair_id=pid, source=candidates.source[a],
                created_at=f"2024-01-01T{(k // 60) % 24:02d}:{k % 60:02d}:00Z",
            ))
            meta_pairs[pid] = {
                "disputed": bool(disputed[m]),
                "prefers": {pa.group: "chosen" if ua_all[a] > ua_all[b] else "rejected",
                            **({pb.group: "chosen" if ub_all[a] > ub_all[b] else "rejected"} if pb else {})},
                "p_label": p_i if first_wins else 1.0 - p_i,
                "feature_gap": [round(float(x), 6) for x in feats[a] - feats[b]],  # chosen − rejected: the oracle BT ceiling's input
            }
    meta = {
        "config": cfg.model_dump(mode="json"),
        "features": list(MUSIC_FEATURES if cfg.domain == "music" else TEXT_FEATURES),
        "prototypes": {g.name: list(prototype(cfg, g.name).weights) for g in cfg.groups},
        "raters": {r.rater_id: {"group": r.group, "type": r.type, "weights": list(r.weights)} for r in raters},
        "candidates": len(candidates.response),
        "pair_pool": {"agreed": int((~disputed).sum()), "disputed": int(disputed.sum())},
        "pairs": meta_pairs,
    }
    return Simulation(records, raters, meta)


def sidecar_path(data_path: str | Path) -> Path:
    p = Path(str(data_path).split("#", 1)[0])
    return p.with_name(p.name + ".sim.json")


def write_simulation(sim: Simulation, path: str | Path) -> Path:
    """Write the records to ``path`` and the sidecar beside it; returns ``path``."""
    from rlhf.runs import atomic_write_text

    out = save_preferences(sim.records, path)
    atomic_write_text(sidecar_path(path), json.dumps(sim.meta))
    return out


def load_sidecar(data_path: str | Path) -> dict[str, Any] | None:
    p = sidecar_path(data_path)
    return json.loads(p.read_text()) if p.is_file() else None


def rater_from_sidecar(meta: dict[str, Any], rater_id: str) -> Rater:
    cfg = meta["config"]
    r = meta["raters"][rater_id]
    return Rater(rater_id, r["group"], r["type"], cfg["domain"], tuple(r["weights"]), cfg["temperature"])


def prototype_from_sidecar(meta: dict[str, Any], group: str) -> Rater:
    """A group's prototype rater from a sidecar (e.g. to judge tuned-policy vs prior samples)."""
    cfg = meta["config"]
    groups = {g["name"]: g for g in cfg["groups"]}
    if group not in groups:
        raise UserError(f"no rater group {group!r} in the simulation; groups: {sorted(groups)}")
    return Rater(f"prototype-{group}", group, groups[group]["type"], cfg["domain"], tuple(meta["prototypes"][group]), cfg["temperature"])


def preference_win_rates(evaluation: dict[str, Any], meta: dict[str, Any], baseline: str = "prior") -> dict[str, dict[str, float]]:
    """model -> group -> share of evaluation samples that the group's prototype rater prefers
    to the ``baseline`` model's sample of the same prompt and index (ties count ½): the
    personalisation check of a tuned policy. ``evaluation`` is ``CounterpointTask.evaluate``'s
    output, ``meta`` the simulation sidecar of the preference data."""
    samples = evaluation["samples"]
    if baseline not in samples:
        return {}
    base = [from_json(s) for s in samples[baseline]]
    groups = [g["name"] for g in meta["config"]["groups"]]
    return {name: {g: win_rate(prototype_from_sidecar(meta, g), [from_json(s) for s in items], base) for g in groups}
            for name, items in samples.items() if name != baseline}
