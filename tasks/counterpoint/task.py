"""The counterpoint task: corpus, prompts, rule rewards and evaluation behind one object."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel

from rlhf.errors import UserError
from rlhf.interfaces import Completions, Rewards
from rlhf.rollout import kl_to_reference_many, logprobs_many, sample_many
from tasks.counterpoint import cantus as cantus_mod
from tasks.counterpoint import cantus_gen
from tasks.counterpoint import corpus
from tasks.counterpoint.config import CounterpointConfig
from tasks.counterpoint.export import write_midi, write_musicxml
from tasks.counterpoint.report import write_report
from tasks.counterpoint import lookahead, rules
from tasks.counterpoint.piece import MELODY_STEPS, FirstSpeciesBatch, FirstSpeciesPiece, Item, Melody, from_json, to_json
from tasks.counterpoint.scoring import RuleScores, score
from tasks.counterpoint.tokens import CANTUS_HIGH, CANTUS_LOW, Codec, build_codec

log = logging.getLogger("rlhf")


@dataclass(frozen=True)
class Prompt:
    name: str  # e.g. "fux-d+0/below"
    ids: list[int]  # the model's input: the cantus moved by ``shift`` semitones
    n_new: int  # completion length in tokens (without eos)
    final: int | None  # pitch class of the mode's final, in the key of ``ids`` (first species)
    shift: int = 0  # semitones the cantus was moved for the model (canonical_key); decode moves the piece back


WHITE_KEYS = frozenset({0, 2, 4, 5, 7, 9, 11})  # the pitch classes of the C-major collection


def canonical_shift(pitches: Sequence[int]) -> int:
    """The smallest move (by size, then upward first) in -6..+5 semitones that puts every pitch
    class of ``pitches`` in the white-key collection; 0 when none does (a chromatic line).

    Every first-species rule is transposition-invariant, so a cantus and its transposition have
    the same correct counterpoints, written as the same interval tokens. Moved to the white
    keys, the pitch of a cantus note alone says which third or sixth above or below it lies in
    the mode (over D: F and B, not F-sharp and B-flat); in its own key that depends on the key,
    which the policy would first have to infer from the whole cantus."""
    pcs = {p % 12 for p in pitches}
    for s in sorted(range(-6, 6), key=lambda k: (abs(k), -k)):
        if {(p + s) % 12 for p in pcs} <= WHITE_KEYS:
            return s
    return 0


class CounterpointTask:
    """First-species counterpoint (or melody) as a :class:`~rlhf.interfaces.PipelineTask`;
    its reward (:meth:`reward`, :meth:`action_rewards`) is the music-theory rules'."""

    Config = CounterpointConfig
    quick = Path(__file__).with_name("quick.yaml")  # the --quick preset
    eos_id = None  # every completion has its prompt's n_new notes

    @classmethod
    def build(cls, cfg: CounterpointConfig, model_dir: Path | None = None) -> "CounterpointTask":
        """The task; with ``model_dir``, reading the codec saved beside that model."""
        if model_dir is None:
            return cls(cfg)
        codec = load_codec(model_dir)
        if codec.mode != cfg.mode:
            raise UserError(f"{model_dir}: the model was trained for mode {codec.mode!r} but the config says task.mode={cfg.mode!r}; "
                            f"pass task.mode={codec.mode}.")
        return cls(cfg, codec)

    def save(self, path: Path) -> None:
        self.codec.save(path)

    def report(self, run_dir: Path, evaluation: dict[str, Any], stats: dict[str, Any]) -> Path:
        """report.md with plots, and the best pieces of each model as MusicXML and MIDI."""
        run_dir = Path(run_dir)
        exported: dict[str, list[Path]] = {}
        for model, samples in evaluation["samples"].items():
            files = exported[model] = []
            (run_dir / "samples" / model).mkdir(parents=True, exist_ok=True)
            for i, s in enumerate(sorted(samples, key=lambda s: -s["reward"])[: self.cfg.eval.export]):
                base = run_dir / "samples" / model / f"{i:02d}_{s['source'].replace('/', '_')}"
                item = from_json(s)
                files += [write_musicxml(item, base.with_suffix(".musicxml")), write_midi(item, base.with_suffix(".mid"))]
        return write_report(run_dir, evaluation, stats, exported, {r.name: r.doc for r in self.rules})

    def __init__(self, cfg: CounterpointConfig, codec: Codec | None = None):
        self.cfg = cfg
        self.codec = codec or build_codec(cfg.mode, cfg.cantus_slots)
        self.allowed = torch.zeros(len(self.codec.tokenizer), dtype=torch.bool)
        self.allowed[self.codec.completion_token_ids] = True
        self._pool: tuple[list[cantus_gen.Cantus], list[cantus_gen.Cantus]] | None = None
        self.rules = cfg.rules()  # the built-in rules of the mode plus task.extra_rules
        self._solved: dict[tuple, lookahead.Lookahead] = {}  # cantus, position, final -> its solved lookahead (task.lookahead)
        self._action_ids = np.asarray(self.codec.completion_token_ids)  # [A] the action space's token ids
        self._action_values = self.codec.completion_values(self._action_ids)  # [A] each action's interval (first species) or event

    @property
    def tokenizer(self):
        return self.codec.tokenizer

    @property
    def fux_dir(self) -> Path | None:
        if self.cfg.fux_dir is not None:
            return Path(os.path.expanduser(self.cfg.fux_dir))
        return cantus_mod.fux_data_dir()

    # ----- data for the prior -------------------------------------------------------------
    def corpus(self, seed: int, *, progress: bool = True, run_dir: Path | None = None) -> tuple[list[Item], list[Item]]:
        """(train, val) corpus items, split by source piece."""
        d = self.cfg.data
        cache = Path(d.cache_dir)
        if self.cfg.mode == "first_species":
            items: list[Any] = corpus.extract_first_species(
                d.max_pieces, d.transpositions, d.min_notes, d.max_notes, cache, progress
            )
        else:
            items = corpus.extract_melodies(d.max_pieces, cache_dir=cache, progress=progress)
        train, val = corpus.split_by_piece(items, d.val_fraction, seed)
        return train, val

    def data_stats(self, train: Sequence[Item], val: Sequence[Item]) -> dict[str, Any]:
        """Examples, pieces and tokens per split, as written to ``data_stats.json``."""
        return {"train": corpus.corpus_stats(train, self.codec), "val": corpus.corpus_stats(val, self.codec)}

    def examples(self, items: Sequence[Item]) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, completion ids incl. eos) for MLE."""
        return [self.codec.encode(it) for it in items]

    # ----- prompts ------------------------------------------------------------------------
    def prompts_for(self, cantus: Iterable[tuple[str, Sequence[int]]], positions: Sequence[str] | None = None, *, skip_invalid: bool = True) -> list[Prompt]:
        """One prompt per cantus firmus and position (default: the evaluated ones), with the cantus
        moved to its :func:`canonical_shift` when ``canonical_key`` is on. A cantus outside the token
        range is skipped (``skip_invalid``) or raises ValueError."""
        prompts = []
        for name, pitches in cantus:
            shift = canonical_shift(pitches) if self.cfg.canonical_key else 0
            moved = [p + shift for p in pitches]
            if shift and not all(CANTUS_LOW <= p <= CANTUS_HIGH for p in moved):
                shift, moved = 0, list(pitches)  # the move would leave the token range: keep the key
            for pos in positions or self.cfg.eval.positions:
                try:
                    ids = self.codec.encode_prompt((moved, pos))
                except ValueError:  # a transposition outside the token range
                    if skip_invalid:
                        continue
                    raise
                prompts.append(Prompt(f"{name}/{pos}", ids, len(pitches), moved[-1] % 12, shift))
        return prompts

    def pool(self) -> tuple[list[cantus_gen.Cantus], list[cantus_gen.Cantus]]:
        """(train, held-out) generated cantus firmi, split by melody; the same for every run seed."""
        if self._pool is None:
            p = self.cfg.pool
            try:
                melodies = cantus_gen.generate_melodies(p.size, p.seed, min_notes=p.min_notes, max_notes=p.max_notes)
            except ValueError as e:
                raise UserError(f"task.pool: {e} (task.pool.size, task.pool.min_notes, task.pool.max_notes)") from None
            self._pool = cantus_gen.split_melodies(melodies, p.heldout_fraction, p.seed)
        return self._pool

    def eval_sets(self) -> dict[str, list[Prompt]]:
        """Evaluation prompts by set. First species: ``fux`` (Fux's cantus firmi in the evaluation
        transpositions), ``pool-heldout`` (held-out generated melodies), both never trained on with
        ``rl_prompts: pool``, and ``pool-train`` (melodies RL trained on), all in both positions."""
        if self.cfg.mode == "melody":
            return {"melody": [Prompt("melody", self.codec.encode_prompt(None), MELODY_STEPS, None)]}
        e = self.cfg.eval
        train, heldout = self.pool()
        trained = {"pool-train": self.prompts_for((c.name, c.pitches) for c in train[: e.train_pool])}
        if e.split == "validation":  # the held-out melodies after the test ones: for choosing settings
            sets = {"pool-val": self.prompts_for((c.name, c.pitches) for c in self._validation_melodies()), **trained}
        else:
            fux = [(name, pitches) for name, pitches, _ in cantus_mod.default_eval_cantus(e.cantus_transpositions)]
            sets = {"fux": self.prompts_for(fux), "pool-heldout": self.prompts_for((c.name, c.pitches) for c in heldout[: e.heldout_pool]),
                    **trained}
        return {k: v for k, v in sets.items() if v}

    def _validation_melodies(self) -> list[cantus_gen.Cantus]:
        n = self.cfg.eval.heldout_pool
        heldout = self.pool()[1]
        if len(heldout) < 2 * n:
            raise UserError(f"task.eval.split: validation needs {2 * n} held-out melodies (the test's {n} and as many more); the pool holds "
                            f"{len(heldout)}: raise task.pool.size or task.pool.heldout_fraction, or lower task.eval.heldout_pool")
        return heldout[n : 2 * n]

    def distinct_prompts(self) -> list[Prompt]:
        """The cantus firmi of ``distinct/100``: Fux's 7, untransposed (test), or the first 7 validation melodies."""
        if self.cfg.eval.split == "validation":
            return self.prompts_for((c.name, c.pitches) for c in self._validation_melodies()[:7])
        return self.prompts_for((n, pitches) for n, pitches, _ in cantus_mod.default_eval_cantus((0,)))

    def heldout_prompts(self) -> list[Prompt]:
        """The prompts of the headline evaluation: every set RL did not train on."""
        trained = {"pool-train"} if self.cfg.rl_prompts == "pool" else {"fux"}
        return [p for name, ps in self.eval_sets().items() if name not in trained for p in ps]

    def eval_prompts(self) -> list[Prompt]:
        """Every evaluation prompt, held-out sets first."""
        return [p for ps in self.eval_sets().values() for p in ps]

    def train_prompts(self) -> list[Prompt]:
        """Prompts for RL: the pool's training melodies (or Fux's cantus firmi, ``rl_prompts: fux``)
        in every training transposition and position."""
        if self.cfg.mode == "melody":
            return self.eval_prompts()
        shifts = self.cfg.train_cantus_transpositions
        if self.cfg.rl_prompts == "fux":
            return self.prompts_for((name, pitches) for name, pitches, _ in cantus_mod.default_eval_cantus(shifts))
        prompts = self.prompts_for((t.name, t.pitches) for c in self.pool()[0] for t in (cantus_gen.transpose(c, k) for k in shifts))
        # with canonical_key the transpositions of a melody mostly meet in one prompt: keep each once
        return list({tuple(p.ids): p for p in prompts}.values())

    def reward(self, completions: Completions) -> Rewards:
        """The rule reward of each note (:meth:`step_rewards`): the task's RewardFn."""
        return Rewards(self.step_rewards(completions.prompts, completions.tokens))

    def step_rewards(self, prompts: Sequence[Prompt], tokens: torch.Tensor) -> torch.Tensor:
        """The rule reward of each generated note, [B, T] (0 past a piece's end).
        With ``clean_bonus`` a piece that breaks no hard rule gets it on its last note."""
        toks = tokens.tolist()
        items = self.decode(prompts, [t[: p.n_new] for p, t in zip(prompts, toks)])
        s = self.score(items)
        r = s.rewards  # [B, N]
        if self.cfg.clean_bonus and self.cfg.mode == "first_species":
            r = r.copy()
            r[np.arange(len(items)), s.notes - 1] += self.cfg.clean_bonus * s.clean()
        if self.cfg.lookahead and self.cfg.mode == "first_species":
            r = r.copy()
            for b, it in enumerate(items):
                n = len(it.cantus)
                r[b, :n] += lookahead.shaped_rewards(self._lookahead(it), it.counterpoint, np.zeros((n, 0), dtype=np.int64), self.cfg.lookahead)[1]
        out = torch.zeros(tokens.shape, dtype=torch.float32)
        out[:, : r.shape[1]] = torch.from_numpy(r[:, : tokens.shape[1]]).float()
        return out.to(tokens.device)

    def action_rewards(self, completions: Completions) -> torch.Tensor:
        """[B, T, V] the step reward each action would get at each step after the sampled notes
        before it (rules.counterfactual_step_rewards; 0 for tokens outside the action space and
        past a piece's end): at the sampled token it equals :meth:`step_rewards`. First species."""
        if self.cfg.mode != "first_species":
            raise UserError("per-action rewards exist for first species only; use tune.rloo.credit: token for melodies")
        prompts, tokens = completions.prompts, completions.tokens
        B, T = tokens.shape
        items = self.decode(prompts, [t[: p.n_new] for p, t in zip(prompts, tokens.tolist())])
        ids, values = self._action_ids, self._action_values
        bonus = self.cfg.clean_bonus
        r = rules.counterfactual_step_rewards(FirstSpeciesBatch.from_pieces(items), values, self.cfg.rule_weights, bonus, self.rules)
        if self.cfg.lookahead:
            for b, it in enumerate(items):
                m = len(it.cantus)
                pitches = np.asarray(it.cantus)[:, None] + values[None, :]  # [N, A]: the note each action writes
                r[b, :m] += lookahead.shaped_rewards(self._lookahead(it), it.counterpoint, pitches, self.cfg.lookahead)[0]
        out = torch.zeros(B, T, len(self.allowed), dtype=torch.float32)
        n = min(T, r.shape[1])
        out[:, :n, torch.from_numpy(ids)] = torch.from_numpy(r[:, :n]).float()
        return out.to(tokens.device)

    def _lookahead(self, it: FirstSpeciesPiece) -> lookahead.Lookahead:
        key = (it.cantus, it.cantus_position, it.final)
        if key not in self._solved:
            self._solved[key] = lookahead.solve(it.cantus, it.cantus_position == "below", it.final, self._action_values, self.rules)
        return self._solved[key]

    # ----- sampling and scoring -----------------------------------------------------------
    def sample(self, model: PreTrainedModel, prompts: Sequence[Prompt], per_prompt: int, *, temperature: float, seed: int) -> tuple[list[Prompt], list[list[int]]]:
        """``per_prompt`` completions for each prompt; returns the repeated prompts and completions."""
        rep = [p for p in prompts for _ in range(per_prompt)]
        gen = torch.Generator().manual_seed(seed)
        comps = sample_many(model, [p.ids for p in rep], [p.n_new for p in rep], allowed=self.allowed.to(next(model.parameters()).device), temperature=temperature, generator=gen)
        return rep, comps

    def decode(self, prompts: Sequence[Prompt], completions: Sequence[Sequence[int]]) -> list[Item]:
        """The pieces, in the key of the prompts' own cantus (moved back by ``shift``)."""
        items = [self.codec.decode(p.ids, c, final=p.final, source=p.name) for p, c in zip(prompts, completions)]
        return [_moved(it, -p.shift) if p.shift else it for it, p in zip(items, prompts)]

    def score(self, items: Sequence[Item]) -> RuleScores:
        return score(self.cfg.mode, items, self.cfg.rule_weights, self.rules if self.cfg.mode == "first_species" else None)

    def loglik(self, model: PreTrainedModel, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> np.ndarray:
        """[B] mean log-likelihood per note under ``model`` (masked to the task's action space)."""
        lp = logprobs_many(model, [list(p) for p in prompts], [list(c) for c in completions], allowed=self.allowed.to(next(model.parameters()).device))
        return np.array([float(np.mean(x)) for x in lp])

    # ----- evaluation ---------------------------------------------------------------------
    def summarize(self, items: Sequence[Item], loglik: np.ndarray | None, groups: Sequence[str] | None = None) -> dict[str, float]:
        """The evaluation row of a set of pieces: violations per note per rule, clean share, reward."""
        s = self.score(items)
        row: dict[str, float] = {"pieces": float(len(items))}
        row.update({f"rules/{k}": v for k, v in s.per_note().items()})
        row["rules/clean"] = float(s.clean().mean()) if len(items) else float("nan")
        hard = [k for k in s.violations if k not in s.soft]
        row["rules/per_note"] = float(sum(s.violations[k].sum() for k in hard)) / max(float(s.notes.sum()), 1.0)
        row["reward/piece"] = float(s.totals.mean()) if len(items) else float("nan")
        row["reward/note"] = float(s.totals.sum() / max(s.notes.sum(), 1))
        if loglik is not None:
            row["logp/prior"] = float(loglik.mean())
        row["distinct"] = len({tuple(_key(it)) for it in items}) / max(len(items), 1)
        if groups is not None:
            row["distinct/100"] = distinct_per_100(items, groups)
        if self.cfg.mode == "melody":
            from tasks.counterpoint.melody_rules import table1_metrics
            from tasks.counterpoint.scoring import melody_array

            events, tonic = melody_array(items)  # type: ignore[arg-type]
            row.update({f"table1/{k}": v for k, v in table1_metrics(events, tonic).items()})
        return row

    def references(self, val: Sequence[Item] | None, limit: int = 1000) -> dict[str, list[Item]]:
        """Reference sets scored beside the models: Fux's own solutions and held-out corpus pieces."""
        refs: dict[str, list[Item]] = {}
        if self.cfg.mode == "first_species" and self.fux_dir is not None:
            refs["Fux solutions"] = list(cantus_mod.load_fux_first_species(self.fux_dir))
        if val:
            refs["held-out corpus"] = list(val[:limit])
        return refs

    def evaluate(self, models: dict[str, PreTrainedModel], prior: PreTrainedModel, *, seed: int, val: Sequence[Item] | None = None) -> dict[str, Any]:
        """Sample from each model for every evaluation set and score; also score the reference sets.

        ``rows`` holds the headline: each model on the held-out prompts pooled (every set RL did not
        train on) and the reference sets; ``rows_by_set`` each model on each set. JSON-serialisable."""
        e = self.cfg.eval
        sets = self.eval_sets()
        heldout = {p.name for p in self.heldout_prompts()}
        prompts = [p for ps in sets.values() for p in ps]
        set_of = np.array([name for name, ps in sets.items() for _ in ps])
        per = e.melodies if self.cfg.mode == "melody" else e.samples_per_cantus
        rows: dict[str, dict[str, float]] = {}
        by_set: dict[str, dict[str, dict[str, float]]] = {name: {} for name in sets}
        samples: dict[str, list[dict[str, Any]]] = {}
        for name, model in models.items():
            rep, comps = self.sample(model, prompts, per, temperature=e.temperature, seed=seed)
            items = self.decode(rep, comps)
            ll = self.loglik(prior, [p.ids for p in rep], comps)
            kl = np.asarray(kl_to_reference_many(model, prior, [p.ids for p in rep], comps, pad_id=self.tokenizer.pad_token_id, allowed=self.allowed))
            which = np.repeat(set_of, per)  # [B] the set of each sample (prompts repeat ``per`` times in a row)
            groups = [p.name for p in rep]
            for set_name in sets:
                idx = np.flatnonzero(which == set_name)
                by_set[set_name][name] = self._row([items[i] for i in idx], ll[idx], kl[idx], [groups[i] for i in idx])
            idx = np.array([i for i, p in enumerate(rep) if p.name in heldout], dtype=np.int64)
            rows[name] = self._row([items[i] for i in idx], ll[idx], kl[idx], [groups[i] for i in idx])
            if self.cfg.mode == "first_species" and e.distinct_samples:
                # distinct pieces per 100 samples of one cantus, measured on 100 (or more) samples, not scaled up from a few
                drep, dcomps = self.sample(model, self.distinct_prompts(), e.distinct_samples, temperature=e.temperature, seed=seed + 1)
                rows[name]["distinct/100"] = distinct_per_100(self.decode(drep, dcomps), [p.name for p in drep])
            totals = self.score(items).totals
            samples[name] = [{**to_json(it, float(r)), "set": str(w)} for it, r, w in zip(items, totals, which)]
        for name, items in self.references(val).items():
            pairs = [self.codec.encode(it) for it in items]
            ll = self.loglik(prior, [p for p, _ in pairs], [c[: len(c) - 1] for _, c in pairs])  # drop eos
            rows[name] = self.summarize(items, ll)
        return {"mode": self.cfg.mode, "prompts": len(heldout), "per_prompt": per, "sets": {k: len(v) for k, v in sets.items()},
                "distinct_samples": e.distinct_samples if self.cfg.mode == "first_species" else 0,
                "heldout_sets": [k for k, v in sets.items() if v and v[0].name in heldout], "rows": rows, "rows_by_set": by_set, "samples": samples}

    def _row(self, items: list[Item], ll: np.ndarray, kl: np.ndarray, groups: list[str]) -> dict[str, float]:
        row = self.summarize(items, ll, groups)
        row["kl/prior"] = float(np.mean(kl)) if len(kl) else float("nan")
        return row


def distinct_per_100(items: Sequence[Item], groups: Sequence[str]) -> float:
    """Distinct pieces per 100 samples: within each prompt's samples, consecutive chunks of
    up to 100 are counted for distinct pieces, scaled to 100 and averaged over chunks."""
    by_group: dict[str, list[Item]] = {}
    for it, g in zip(items, groups):
        by_group.setdefault(g, []).append(it)
    rates = [100.0 * len({_key(x) for x in chunk}) / len(chunk) for xs in by_group.values() for chunk in (xs[i : i + 100] for i in range(0, len(xs), 100))]
    return float(np.mean(rates)) if rates else float("nan")


def _moved(it: Item, semitones: int) -> Item:
    assert isinstance(it, FirstSpeciesPiece)
    return FirstSpeciesPiece(tuple(p + semitones for p in it.cantus), tuple(p + semitones for p in it.counterpoint), it.cantus_position,
                             (it.final + semitones) % 12, it.source)


def _key(it: Item) -> tuple:
    return (it.cantus, it.counterpoint) if isinstance(it, FirstSpeciesPiece) else it.events


def check_model_fits(model: PreTrainedModel, codec: Codec, prompts: Sequence[Prompt], model_dir: str | Path) -> None:
    """UserError when the codec saved beside ``model`` has another vocabulary than the model (a
    damaged or swapped tokenizer), or a prompt and its completion need more positions than the
    model has (a cantus given on the command line can be longer than any the model trained on)."""
    rows = model.get_input_embeddings().num_embeddings
    if len(codec.tokenizer) != rows:
        raise UserError(f"{model_dir}: the tokenizer has {len(codec.tokenizer)} tokens but the model {rows}; the tokenizer files and the weights "
                        "do not belong together. Copy the model folder again, or retrain it.")
    cfg = model.config
    limit = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    for p in prompts:
        if limit and len(p.ids) + p.n_new > limit:
            raise UserError(f"cantus {p.name.rsplit('/', 1)[0]!r}: {p.n_new} notes need {len(p.ids) + p.n_new} positions (the prompt and the "
                            f"counterpoint) but the model in {model_dir} has {limit}; shorten the cantus, or train a model with a larger "
                            "model.max_positions.")


def load_codec(model: Path) -> Codec:
    """The codec saved beside a counterpoint model (clear error for any other folder)."""
    model = Path(model)
    if not model.is_dir():
        raise UserError(f"{model}: model folder not found. Train one with `rlhf run` or `rlhf pretrain` (it lands in <run_dir>/models/prior).")
    try:
        return Codec.load(model)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001  a damaged tokenizer.json makes `tokenizers` raise a bare Exception; its config, TypeError, KeyError...
        raise UserError(f"{model}: no counterpoint tokenizer found beside the model ({type(e).__name__}: {' '.join(str(e).split())[:300]}). "
                        "Use a model folder written by `rlhf pretrain`.") from None
