"""The counterpoint task: corpus, prompts, rule rewards and evaluation behind one object."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel

from rlhf.rollout import kl_to_reference_many, logprobs_many, sample_many
from tasks.counterpoint import cantus as cantus_mod
from tasks.counterpoint import corpus
from tasks.counterpoint.config import CounterpointConfig
from tasks.counterpoint.piece import MELODY_STEPS, FirstSpeciesPiece, Melody
from tasks.counterpoint.scoring import RuleScores, score
from tasks.counterpoint.tokens import Codec, build_codec

log = logging.getLogger("rlhf")

Item = FirstSpeciesPiece | Melody


@dataclass(frozen=True)
class Prompt:
    name: str  # e.g. "fux-d+0/below"
    ids: list[int]
    n_new: int  # completion length in tokens (without eos)
    final: int | None  # pitch class of the mode's final (first species)


class CounterpointTask:
    def __init__(self, cfg: CounterpointConfig, codec: Codec | None = None):
        self.cfg = cfg
        self.codec = codec or build_codec(cfg.mode, cfg.cantus_slots)
        self.allowed = torch.zeros(len(self.codec.tokenizer), dtype=torch.bool)
        self.allowed[self.codec.completion_token_ids] = True

    @property
    def tokenizer(self):
        return self.codec.tokenizer

    @property
    def fux_dir(self) -> Path | None:
        if self.cfg.fux_dir is not None:
            return Path(os.path.expanduser(self.cfg.fux_dir))
        return cantus_mod.fux_data_dir()

    # ----- data for the prior -------------------------------------------------------------
    def corpus(self, seed: int, progress: bool = True) -> tuple[list[Item], list[Item]]:
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
    def eval_prompts(self) -> list[Prompt]:
        if self.cfg.mode == "melody":
            ids = self.codec.encode_prompt(None)
            return [Prompt("melody", ids, MELODY_STEPS, None)]
        prompts = []
        for name, pitches, final in cantus_mod.default_eval_cantus(self.cfg.eval.cantus_transpositions):
            for pos in self.cfg.eval.positions:
                ids = self.codec.encode_prompt((pitches, pos))
                prompts.append(Prompt(f"{name}/{pos}", ids, len(pitches), final))
        return prompts

    def train_prompts(self) -> list[Prompt]:
        """Prompts for RL: the Fux cantus firmi in every training transposition and position."""
        if self.cfg.mode == "melody":
            return self.eval_prompts()
        prompts = []
        for name, pitches, final in cantus_mod.default_eval_cantus(self.cfg.train_cantus_transpositions):
            for pos in self.cfg.eval.positions:
                try:
                    ids = self.codec.encode_prompt((pitches, pos))
                except ValueError:  # a transposition outside the token range
                    continue
                prompts.append(Prompt(f"{name}/{pos}", ids, len(pitches), final))
        return prompts

    def step_rewards(self, prompts: Sequence[Prompt], tokens: torch.Tensor) -> torch.Tensor:
        """The rule reward of each generated note, [B, T] (0 past a piece's end): the RewardFn.
        With ``clean_bonus`` a piece that breaks no hard rule gets it on its last note."""
        toks = tokens.tolist()
        items = self.decode(prompts, [t[: p.n_new] for p, t in zip(prompts, toks)])
        s = self.score(items)
        r = s.rewards  # [B, N]
        if self.cfg.clean_bonus and self.cfg.mode == "first_species":
            r = r.copy()
            r[np.arange(len(items)), s.notes - 1] += self.cfg.clean_bonus * s.clean()
        out = torch.zeros(tokens.shape, dtype=torch.float32)
        out[:, : r.shape[1]] = torch.from_numpy(r[:, : tokens.shape[1]]).float()
        return out.to(tokens.device)

    # ----- sampling and scoring -----------------------------------------------------------
    def sample(self, model: PreTrainedModel, prompts: Sequence[Prompt], per_prompt: int, *, temperature: float, seed: int) -> tuple[list[Prompt], list[list[int]]]:
        """``per_prompt`` completions for each prompt; returns the repeated prompts and completions."""
        rep = [p for p in prompts for _ in range(per_prompt)]
        gen = torch.Generator().manual_seed(seed)
        comps = sample_many(model, [p.ids for p in rep], [p.n_new for p in rep], allowed=self.allowed.to(next(model.parameters()).device), temperature=temperature, generator=gen)
        return rep, comps

    def decode(self, prompts: Sequence[Prompt], completions: Sequence[Sequence[int]]) -> list[Item]:
        return [self.codec.decode(p.ids, c, final=p.final, source=p.name) for p, c in zip(prompts, completions)]

    def score(self, items: Sequence[Item]) -> RuleScores:
        return score(self.cfg.mode, items, self.cfg.rule_weights)

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
        """Sample from each model and score; also score the reference sets. JSON-serialisable."""
        e = self.cfg.eval
        prompts = self.eval_prompts()
        per = e.melodies if self.cfg.mode == "melody" else e.samples_per_cantus
        rows: dict[str, dict[str, float]] = {}
        samples: dict[str, list[dict[str, Any]]] = {}
        for name, model in models.items():
            rep, comps = self.sample(model, prompts, per, temperature=e.temperature, seed=seed)
            items = self.decode(rep, comps)
            ll = self.loglik(prior, [p.ids for p in rep], comps)
            rows[name] = self.summarize(items, ll, [p.name for p in rep])
            kl = kl_to_reference_many(model, prior, [p.ids for p in rep], comps, pad_id=self.tokenizer.pad_token_id, allowed=self.allowed)
            rows[name]["kl/prior"] = float(np.mean(kl))
            s = self.score(items)
            samples[name] = [_to_json(it, float(r)) for it, r in zip(items, s.totals)]
        for name, items in self.references(val).items():
            pairs = [self.codec.encode(it) for it in items]
            ll = self.loglik(prior, [p for p, _ in pairs], [c[: len(c) - 1] for _, c in pairs])  # drop eos
            rows[name] = self.summarize(items, ll)
        return {"mode": self.cfg.mode, "prompts": len(prompts), "per_prompt": per, "rows": rows, "samples": samples}


def distinct_per_100(items: Sequence[Item], groups: Sequence[str]) -> float:
    """Distinct pieces per 100 samples: within each prompt's samples, consecutive chunks of
    up to 100 are counted for distinct pieces, scaled to 100 and averaged over chunks."""
    by_group: dict[str, list[Item]] = {}
    for it, g in zip(items, groups):
        by_group.setdefault(g, []).append(it)
    rates = [100.0 * len({_key(x) for x in chunk}) / len(chunk) for xs in by_group.values() for chunk in (xs[i : i + 100] for i in range(0, len(xs), 100))]
    return float(np.mean(rates)) if rates else float("nan")


def _key(it: Item) -> tuple:
    return (it.cantus, it.counterpoint) if isinstance(it, FirstSpeciesPiece) else it.events


def _to_json(it: Item, reward: float) -> dict[str, Any]:
    if isinstance(it, FirstSpeciesPiece):
        return {"cantus": list(it.cantus), "counterpoint": list(it.counterpoint), "cantus_position": it.cantus_position, "final": it.final, "source": it.source, "reward": reward}
    return {"events": list(it.events), "tonic": it.tonic, "source": it.source, "reward": reward}


def from_json(d: dict[str, Any]) -> Item:
    if "events" in d:
        return Melody(tuple(d["events"]), d.get("tonic", 0), d.get("source", ""))
    return FirstSpeciesPiece(tuple(d["cantus"]), tuple(d["counterpoint"]), d["cantus_position"], d["final"], d.get("source", ""))
