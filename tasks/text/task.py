"""The generic text task: prompts (with references) from your data, a tokenizer, a reward.

Bring a JSONL file or a ``datasets`` folder of prompts (``tasks/text/data.py``), optionally a
tokenizer and a model of yours (``task.tokenizer``, ``model.path``), and the run does the rest:
an MLE prior on the answers (or your model as it is, ``pretrain: null``), fine-tuning against
the task's reward (sentence BLEU or chrF against each prompt's reference, ``task.reward.kind``)
or rewards of yours (``rewards:``), evaluation on held-out prompts and a report.

A prompt is :class:`TextPrompt`: its ids ``[<bos>] prompt [<sep>]`` (``tasks/text/tokenizer.py``),
the completion budget ``task.max_new_tokens`` (``<eos>`` included), its text and its reference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from rlhf.errors import UserError
from rlhf.interfaces import Completions, Rewards
from tasks.text.config import TextConfig, TextRewardConfig
from tasks.text.data import TextItem, load_items, split_items
from tasks.text.report import write_report
from tasks.text.rewards import SentenceBLEUReward, SentenceCHRFReward
from tasks.text.tokenizer import TextCodec, load_tokenizer, model_vocab_size, train_bpe

log = logging.getLogger("rlhf")


@dataclass(frozen=True)
class TextPrompt:
    """One prompt as the tuner and the rewards see it."""

    ids: list[int]  # [<bos>] prompt tokens [<sep>]
    n_new: int  # completion budget, <eos> included
    text: str
    reference: str | None = None


def make_reward(cfg: TextRewardConfig) -> SentenceBLEUReward | SentenceCHRFReward | None:
    """The task's own reward of ``task.reward`` (None for kind none)."""
    if cfg.kind == "bleu":
        return SentenceBLEUReward(tokenize=cfg.tokenize, lowercase=cfg.lowercase)
    if cfg.kind == "chrf":
        return SentenceCHRFReward()
    return None


def distinct_ngrams(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams / all word n-grams over ``texts`` (NaN if there are none)."""
    grams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


class TextTask:
    """Data, tokenizer, prompts, reward, evaluation and report of the text task.

    ``codec`` is the tokenizer of an existing model (``build(cfg, model_dir)``); without it the
    tokenizer is loaded from ``task.tokenizer`` or trained on the training rows by :meth:`corpus`
    (or on first use of :attr:`tokenizer`).
    """

    Config = TextConfig
    quick = Path(__file__).with_name("quick.yaml")  # the --quick preset

    @classmethod
    def build(cls, cfg: TextConfig, model_dir: Path | None = None) -> "TextTask":
        """The task; with ``model_dir``, reading the tokenizer saved beside that model."""
        if model_dir is None:
            return cls(cfg)
        if not Path(model_dir).is_dir():
            raise UserError(f"{model_dir}: model folder not found. Train one with `rlhf run` (it lands in <run_dir>/models/prior) or give "
                            "a folder written by save_pretrained.")
        return cls(cfg, TextCodec(load_tokenizer(model_dir, "the model's tokenizer"), str(model_dir), model_vocab_size(model_dir)))

    def __init__(self, cfg: TextConfig, codec: TextCodec | None = None):
        self.cfg = cfg
        self._codec = codec
        self._items: list[TextItem] | None = None
        self._split: tuple[list[TextItem], list[TextItem]] | None = None
        self.skips: dict[str, dict[str, int]] = {}
        self._reward = make_reward(cfg.reward)
        self._allowed: torch.Tensor | None = None
        self._allowed_done = False
        self._train_prompts: list[TextPrompt] | None = None

    # ----- data ---------------------------------------------------------------------------
    def split(self) -> tuple[list[TextItem], list[TextItem]]:
        """(train, held-out) rows as read (no length limits yet), loaded once."""
        if self._split is None:
            items = load_items(self.cfg.data)
            if self._reward is not None:
                missing = next((it for it in items if it.reference is None), None)
                if missing is not None:
                    raise UserError(
                        f"{missing.where}: no {self.cfg.data.reference_key!r}; task.reward.kind={self.cfg.reward.kind} scores each completion "
                        "against its prompt's reference: give every row one, set task.data.reference_key to the key holding it, or set "
                        "task.reward.kind: none and give rewards: of your own"
                    )
            self._split = split_items(items, self.cfg.data.val_fraction)
            log.info("data: %d rows from %s (%d train, %d held out)", len(items), self.cfg.data.path, *map(len, self._split))
        return self._split

    def ensure_codec(self, tokenizer_dir: Path | None = None) -> TextCodec:
        """The codec: given, loaded (``task.tokenizer``, or ``tokenizer_dir`` from an earlier
        attempt of the same run, so ``--resume`` keeps the token ids), or a byte-level BPE trained
        on the training rows and saved into ``tokenizer_dir``."""
        if self._codec is None:
            t = self.cfg.tokenizer
            if t is not None:
                self._codec = TextCodec(load_tokenizer(t), t, model_vocab_size(t))
            elif tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file():
                self._codec = TextCodec(load_tokenizer(tokenizer_dir, "the run's tokenizer"), "trained")
            else:
                train = self.split()[0]
                texts = [s for it in train for s in (it.prompt, it.reference, it.completion) if s]
                self._codec = TextCodec(train_bpe(texts, self.cfg.vocab_size), "trained")
                log.info("tokenizer: byte-level BPE, %d tokens, trained on %d rows", len(self._codec), len(train))
                if tokenizer_dir is not None:
                    self._codec.save(tokenizer_dir)
        return self._codec

    @property
    def codec(self) -> TextCodec:
        return self.ensure_codec()

    @property
    def tokenizer(self):
        return self.codec.tokenizer

    @property
    def eos_id(self) -> int:
        return self.codec.eos_id

    @property
    def allowed(self) -> torch.Tensor | None:
        """[V] bool: every token but pad, bos and the other special tokens that are not eos; None = all."""
        if not self._allowed_done:
            self._allowed, self._allowed_done = self.codec.allowed(), True
        return self._allowed

    def _fits(self, items: Sequence[TextItem], key: str) -> list[TextItem]:
        """Rows whose prompt and MLE target fit ``data.max_prompt_tokens`` and ``max_new_tokens``
        (the target plus its eos); the rest counted in ``skips[key]`` and logged."""
        c = self.codec
        prompts = c.encode_texts([it.prompt for it in items])
        targets = c.encode_targets([it.target or "" for it in items])
        long_prompt = [len(p) > self.cfg.data.max_prompt_tokens for p in prompts]
        long_target = [not lp and len(t) + 1 > self.cfg.max_new_tokens for lp, t in zip(long_prompt, targets)]
        self.skips[key] = {"prompt too long": sum(long_prompt), "target too long": sum(long_target)}
        if any(self.skips[key].values()):
            log.info("data: %s rows skipped: %s (task.data.max_prompt_tokens=%d, task.max_new_tokens=%d)", key, self.skips[key],
                     self.cfg.data.max_prompt_tokens, self.cfg.max_new_tokens)
        return [it for it, a, b in zip(items, long_prompt, long_target) if not (a or b)]

    def corpus(self, seed: int, *, progress: bool = True, run_dir: Path | None = None) -> tuple[list[TextItem], list[TextItem]]:
        """(train, held-out) rows within the length limits. The split is by prompt hash
        (``tasks/text/data.py``), so ``seed`` and ``progress`` are unused."""
        self.ensure_codec(None if run_dir is None else Path(run_dir) / "tokenizer")  # in the run folder: --resume reuses the ids
        train, val = self.split()
        return self._fits(train, "train"), self._fits(val, "val")

    def examples(self, items: Sequence[TextItem]) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, target ids + eos) for MLE; rows with neither completion nor reference have no target and are left out."""
        with_target = [it for it in items if it.target is not None]
        if items and not with_target:
            raise UserError(f"no row has a {self.cfg.data.completion_key!r} or {self.cfg.data.reference_key!r} (e.g. {items[0].where}), so the "
                            "prior has nothing to learn by MLE; add answers to the data, or start from a model of yours with model.path "
                            "and pretrain: null")
        c = self.codec
        prompts, targets = c.encode_texts([it.prompt for it in with_target]), c.encode_targets([it.target for it in with_target])  # type: ignore[misc]
        return [(c.prompt_ids(p), c.target_ids(t)) for p, t in zip(prompts, targets)]

    def data_stats(self, train: Sequence[TextItem], val: Sequence[TextItem]) -> dict[str, Any]:
        """Sizes, skips and token counts, as written to ``data_stats.json``."""
        c = self.codec
        out: dict[str, Any] = {"source": self.cfg.data.path,
                               "tokenizer": {"vocab": len(c), "kind": "byte-level BPE trained on the data" if c.source == "trained" else c.source}}
        for key, items in (("train", train), ("val", val)):
            ex = self.examples(items) if any(it.target is not None for it in items) else []
            out[key] = {"examples": len(items), "prompts": len({it.prompt for it in items}),
                        "with_reference": sum(it.reference is not None for it in items), "mle_targets": len(ex),
                        "prompt_tokens": round(float(np.mean([len(p) for p, _ in ex])), 2) if ex else None,
                        "target_tokens": round(float(np.mean([len(t) - 1 for _, t in ex])), 2) if ex else None,
                        "skipped": self.skips.get(key, {})}
        return out

    # ----- prompts and reward -------------------------------------------------------------
    def prompts(self, items: Sequence[TextItem]) -> list[TextPrompt]:
        c = self.codec
        enc = c.encode_texts([it.prompt for it in items])
        return [TextPrompt(c.prompt_ids(e), self.cfg.max_new_tokens, it.prompt, it.reference) for e, it in zip(enc, items)]

    def train_prompts(self) -> list[TextPrompt]:
        """RL prompts: the training rows within the length limits (a prompt given twice comes twice)."""
        if self._train_prompts is None:
            self._train_prompts = self.prompts(self._fits(self.split()[0], "train"))
            if not self._train_prompts:
                raise UserError("no training prompt fits task.data.max_prompt_tokens / task.max_new_tokens; raise them")
        return self._train_prompts

    def heldout_prompts(self, val: Sequence[TextItem] | None = None) -> list[TextPrompt]:
        """The first ``eval.prompts`` held-out prompts (of ``val``, else of the task's own split)."""
        items = list(val) if val is not None else self._fits(self.split()[1], "val")
        return self.prompts(items[: self.cfg.eval.prompts])

    def reward(self, completions: Completions) -> Rewards:
        """[B] the configured reference-based reward (sentence BLEU or chrF / 100). The task's RewardFn."""
        if self._reward is None:
            raise UserError("task.reward.kind is none: the text task has no reward of its own; give the run rewards: (e.g. "
                            "[{fn: 'my_module:my_reward'}]) or reward: (a trained reward model), or set task.reward.kind: bleu or chrf")
        return self._reward(completions)

    def save(self, path: Path) -> None:
        self.codec.save(path)

    # ----- evaluation ---------------------------------------------------------------------
    def cut(self, row: Sequence[int], n_new: int) -> list[int]:
        """A sampled row cut to its completion: its first ``n_new`` tokens up to and including the first eos."""
        row = [int(t) for t in row[:n_new]]
        return row[: row.index(self.eos_id) + 1] if self.eos_id in row else row

    def completions(self, prompts: Sequence[TextPrompt], comps: Sequence[Sequence[int]]) -> Completions:
        """A :class:`Completions` batch of cut completions (eos included where they ended)."""
        lengths = [len(c) for c in comps]
        t = max(max(lengths, default=1), 1)
        tokens = torch.full((len(comps), t), self.codec.pad_id, dtype=torch.long)
        for b, c in enumerate(comps):
            tokens[b, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).float()
        return Completions(list(prompts), tokens, mask, lengths, self.eos_id, self.tokenizer)

    def _check_vocab(self, model: Any, name: str) -> None:
        """UserError unless ``model``'s vocabulary fits the tokenizer and the action space."""
        v = getattr(getattr(model, "config", None), "vocab_size", None)
        if not isinstance(v, int):
            return
        if v < len(self.codec):
            raise UserError(f"model {name} has {v} token embeddings but the tokenizer ({self.codec.source}) has {len(self.codec)} tokens; "
                            "use the tokenizer the model was trained with (task.tokenizer)")
        if self.allowed is not None and v != self.allowed.numel():
            raise UserError(f"model {name} has {v} token embeddings but the action space has {self.allowed.numel()} ids (the tokenizer in "
                            f"{self.codec.source} and the model config beside it); keep the tokenizer in the model's own folder and point "
                            "task.tokenizer there")

    @torch.no_grad()
    def evaluate(self, models: dict[str, Any], prior: Any, *, seed: int, val: Sequence[TextItem] | None = None) -> dict[str, Any]:
        """Each model sampled ``eval.samples`` times on the first ``eval.prompts`` held-out prompts.

        Row keys (per model): ``reward`` (mean task reward; absent for kind none), ``exact`` (share
        of completions equal to the reference), ``kl/prior`` (exact KL to the prior per token along
        the model's own samples, eos included; 0 for the prior), ``distinct/prompt`` (distinct
        completions among a prompt's samples / samples, mean over prompts), ``distinct-1`` and
        ``distinct-2`` (distinct word uni-/bigrams over all completions / all of them), ``length``
        (tokens, eos excluded), ``eos`` (share that ended within the budget). JSON-serialisable."""
        from rlhf.rollout import kl_to_reference_many, sample_many

        e = self.cfg.eval
        prompts = self.heldout_prompts(val)
        if not prompts:
            raise UserError("no held-out prompt to evaluate; raise task.data.val_fraction or check the length limits")
        rep = [p for p in prompts for _ in range(e.samples)]
        ids, budgets = [p.ids for p in rep], [p.n_new for p in rep]
        refs = [p.reference for p in rep]
        self._check_vocab(prior, "prior")
        rows: dict[str, dict[str, float]] = {}
        texts_of: dict[str, list[str]] = {}
        for name, model in models.items():
            self._check_vocab(model, name)
            model.eval()
            gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)  # the same stream for every model
            raw = sample_many(model, ids, budgets, allowed=self.allowed, temperature=e.temperature, generator=gen, max_batch=e.batch_size)
            comps = [self.cut(r, n) for r, n in zip(raw, budgets)]
            batch = self.completions(rep, comps)
            texts = [t.strip() for t in batch.texts]
            texts_of[name] = texts
            row: dict[str, float] = {}
            if self._reward is not None:
                row["reward"] = float(self._reward(batch).values.float().mean())
            if all(r is not None for r in refs):
                row["exact"] = float(np.mean([t == r.strip() for t, r in zip(texts, refs)]))  # type: ignore[union-attr]
            if model is prior:
                row["kl/prior"] = 0.0
            else:
                kl = kl_to_reference_many(model, prior, ids, comps, pad_id=self.codec.pad_id, allowed=self.allowed, max_batch=e.batch_size)
                row["kl/prior"] = float(np.mean(kl))
            row["distinct/prompt"] = float(np.mean([len(set(texts[i : i + e.samples])) / e.samples for i in range(0, len(texts), e.samples)]))
            row["distinct-1"], row["distinct-2"] = distinct_ngrams(texts, 1), distinct_ngrams(texts, 2)
            row["length"] = float(np.mean([len(c) - (1 if c and c[-1] == self.eos_id else 0) for c in comps]))
            row["eos"] = float(np.mean([bool(c) and c[-1] == self.eos_id for c in comps]))
            rows[name] = row
            log.info("eval %s: %s", name, {k: round(v, 4) for k, v in row.items()})
        examples = [{"prompt": p.text, "reference": p.reference, **{n: t[i * e.samples] for n, t in texts_of.items()}}
                    for i, p in enumerate(prompts[: e.examples])]
        return {"prompts": len(prompts), "samples": e.samples, "temperature": e.temperature, "reward": self.cfg.reward.kind,
                "rows": rows, "examples": examples}

    def report(self, run_dir: Path, evaluation: dict[str, Any], stats: dict[str, Any]) -> Path:
        return write_report(Path(run_dir), evaluation, stats)
