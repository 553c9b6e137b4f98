"""The translation task behind one object: corpus, tokenizer, prompts, BLEU reward, evaluation.

It mirrors the counterpoint task's protocol used by ``apps.pipeline`` and ``rlhf.tune.Tuner``:
``corpus(seed)``, ``examples(items)``, ``codec.save(dir)``, ``tokenizer``, ``allowed``,
``eos_id``, ``train_prompts()`` and ``step_rewards(prompts, tokens)``, ``evaluate(...)``.

The model is decoder-only with the source as prompt (see ``tokenizer.py``)::

    prompt      <bos> <en> x_1 ... x_n <de>          completion   y_1 ... y_m <eos>

The RL reward (Ranzato et al. 2015, MIXER) is the sentence BLEU of the whole translation,
given once, at its last real token: the first ``<eos>``, or the last token of the budget when
the sample never stopped. Every other step gets 0, so the return of any step is the sentence
BLEU, and the KL term of the shaped reward is what gives intermediate steps a signal.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel

from rlhf.errors import UserError
from rlhf.interfaces import Completions, Rewards
from tasks.translation.bleu import SentenceBLEU, SentenceCHRF, bleu_from_stats, bleu_signature, corpus_bleu, corpus_contributions, length_penalty
from tasks.translation.config import TranslationConfig
from tasks.translation.data import LoadReport, Pair, head, load_split, resolve_data_dir
from tasks.translation.decode import generate, max_new_tokens
from tasks.translation.report import write_report
from tasks.translation.tokenizer import TranslationCodec, train_tokenizer

log = logging.getLogger("rlhf")

SPLIT_KEYS = ("train", "val", "test")
HOLDOUT_SEED = 0  # the draw of task.rl_holdout: fixed, independent of the run seed


@dataclass(frozen=True)
class TranslationPrompt:
    """One source sentence as an RL / decoding prompt, with its reference."""

    ids: list[int]  # <bos> <src> x_1..x_n <tgt>
    n_new: int  # generation budget in tokens, <eos> included
    src: str
    ref: str


class TranslationTask:
    """Corpus, tokenizer, prompts, reward and evaluation of one language pair.

    ``codec`` is the saved tokenizer of an existing model; without it the tokenizer is trained
    on the training split by :meth:`corpus` (or loaded from ``task.tokenizer.path``), and the
    task attributes that need it (``tokenizer``, ``allowed``, prompts) load the corpus first.
    """

    Config = TranslationConfig
    quick = Path(__file__).with_name("quick.yaml")  # the --quick preset

    @classmethod
    def build(cls, cfg: TranslationConfig, model_dir: Path | None = None) -> "TranslationTask":
        """The task; with ``model_dir``, reading the tokenizer saved beside that model."""
        if model_dir is None:
            return cls(cfg)
        if not Path(model_dir).is_dir():
            raise UserError(f"{model_dir}: model folder not found. Train one with `rlhf run` or `rlhf pretrain` (it lands in <run_dir>/models/prior).")
        return cls(cfg, TranslationCodec.load(model_dir))

    def __init__(self, cfg: TranslationConfig, codec: TranslationCodec | None = None):
        self.cfg = cfg
        self._codec = codec
        if codec is not None:
            self._check_langs(codec, "the model's tokenizer")
        self._splits: dict[str, list[Pair]] = {}
        self.load_reports: dict[str, LoadReport] = {}
        self.length_skips: dict[str, int] = {}
        self.bleu = SentenceBLEU(tokenize=cfg.reward.tokenize)
        self.chrf = SentenceCHRF() if cfg.reward.chrf_weight > 0 else None
        self._allowed: torch.Tensor | None = None
        self._train_prompts: list[TranslationPrompt] | None = None

    def _check_langs(self, codec: TranslationCodec, what: str) -> None:
        d = self.cfg.data
        if (codec.src_lang, codec.tgt_lang) != (d.src_lang, d.tgt_lang):
            raise UserError(f"{what} translates {codec.src_lang}→{codec.tgt_lang} but the config says task.data.src_lang={d.src_lang}, "
                            f"tgt_lang={d.tgt_lang}; use matching languages or another model.")

    # ----- data ---------------------------------------------------------------------------
    def split(self, key: str) -> list[Pair]:
        """Pairs of split ``key`` (train, val or test), loaded once; val/test capped by
        ``data.max_eval_pairs``, train by ``data.max_train_pairs`` (first N in file order)."""
        if key not in SPLIT_KEYS:
            raise ValueError(f"split must be one of {SPLIT_KEYS}, got {key!r}")
        if key not in self._splits:
            d = self.cfg.data
            name = {"train": d.train_split, "val": d.val_split, "test": d.test_split}[key]
            if name is None:
                raise UserError(f"task.data.{key}_split is null, so there is no {key} split to use; set it or drop {key!r} from task.eval.splits.")
            pairs, report = load_split(resolve_data_dir(d.dir), name, d.format, d.src_lang, d.tgt_lang,
                                       empty_lines=d.empty_lines, encoding_errors=d.encoding_errors)
            log.info("data: %s", report.summary())
            self.load_reports[key] = report
            self._splits[key] = head(pairs, d.max_train_pairs if key == "train" else d.max_eval_pairs)
            if not self._splits[key]:
                raise UserError(f"{report.source}: no usable sentence pairs ({report.summary()}).")
        return self._splits[key]

    def train_parts(self) -> tuple[list[Pair], list[Pair]]:
        """(MLE pairs, RL pairs) of the training split, each in file order: with ``rl_holdout``
        = N, N pairs drawn uniformly at random (a fixed draw, the same for every run seed, so a
        prior and its tuning agree) and the rest; otherwise the whole split twice. Random, not
        the file's tail: Multi30k's training file is not shuffled (the prior scores 46 BLEU on its
        first pairs and 38 on those near 25,000)."""
        train, n = self.split("train"), self.cfg.rl_holdout
        if n is None:
            return train, train
        if n >= len(train):
            raise UserError(f"task.rl_holdout={n} holds out every one of the {len(train)} training pairs, leaving none for pre-training; "
                            f"use fewer than {len(train)} (e.g. {max(1, len(train) // 8)}) or null to tune on the training pairs themselves.")
        held = set(random.Random(HOLDOUT_SEED).sample(range(len(train)), n))
        return [p for i, p in enumerate(train) if i not in held], [p for i, p in enumerate(train) if i in held]

    def ensure_codec(self, tokenizer_dir: Path | None = None) -> TranslationCodec:
        """The codec: given, loaded (``tokenizer.path``, or ``tokenizer_dir`` from an earlier
        attempt of the same run, so ``--resume`` keeps the token ids), or trained on the training
        split (both sides) and saved into ``tokenizer_dir``."""
        if self._codec is None:
            t = self.cfg.tokenizer
            saved = Path(t.path) if t.path else tokenizer_dir
            if saved is not None and (saved / "tokenizer_config.json").is_file():
                self._codec = TranslationCodec.load(saved)
                self._check_langs(self._codec, f"the tokenizer in {saved}")
            elif t.path:
                raise UserError(f"{t.path}: no tokenizer_config.json there; set task.tokenizer.path to a model or tokenizer folder, or null to train one.")
            else:
                train = self.train_parts()[0]  # held-out RL pairs stay unseen
                d = self.cfg.data
                tok = train_tokenizer((s for p in train for s in (p.src, p.tgt)), d.src_lang, d.tgt_lang, t.vocab_size, t.min_frequency)
                self._codec = TranslationCodec(tok, d.src_lang, d.tgt_lang)
                log.info("tokenizer: joint byte-level BPE, %d tokens, trained on %d pairs", len(tok), len(train))
                if tokenizer_dir is not None:
                    self._codec.save(tokenizer_dir)
        return self._codec

    @property
    def codec(self) -> TranslationCodec:
        return self.ensure_codec()

    @property
    def tokenizer(self):
        return self.codec.tokenizer

    @property
    def eos_id(self) -> int:
        return self.codec.eos_id

    @property
    def allowed(self) -> torch.Tensor:
        """[V] bool: subwords and ``<eos>`` (see :meth:`TranslationCodec.allowed`)."""
        if self._allowed is None:
            self._allowed = self.codec.allowed()
        return self._allowed

    def _fits(self, pairs: Sequence[Pair], key: str) -> list[Pair]:
        """Pairs within the token limits; the rest counted in ``length_skips[key]`` and logged."""
        d, c = self.cfg.data, self.codec
        src, tgt = c.encode_texts([p.src for p in pairs]), c.encode_targets([p.tgt for p in pairs])
        keep = [p for p, s, t in zip(pairs, src, tgt) if len(s) <= d.max_src_tokens and len(t) <= d.max_tgt_tokens]
        self.length_skips[key] = len(pairs) - len(keep)
        if self.length_skips[key]:
            log.info("data: %d %s pairs longer than %d/%d tokens skipped", self.length_skips[key], key, d.max_src_tokens, d.max_tgt_tokens)
        return keep

    def corpus(self, seed: int, *, progress: bool = True, run_dir: Path | None = None) -> tuple[list[Pair], list[Pair]]:
        """(train, val) pairs for MLE, within the token limits: the training split less the
        ``rl_holdout`` pairs. The splits are the corpus's own, so ``seed`` and ``progress`` are
        unused (kept for the task protocol)."""
        self.ensure_codec(None if run_dir is None else Path(run_dir) / "tokenizer")  # in the run folder: --resume reuses the same ids
        return self._fits(self.train_parts()[0], "train"), self._fits(self.split("val"), "val")

    def examples(self, items: Sequence[Pair]) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, completion ids ending in ``<eos>``) for MLE."""
        c = self.codec
        src, tgt = c.encode_texts([p.src for p in items]), c.encode_targets([p.tgt for p in items])
        return [(c.prompt_ids(s), [*t, c.eos_id]) for s, t in zip(src, tgt)]

    def data_stats(self, train: Sequence[Pair], val: Sequence[Pair]) -> dict[str, Any]:
        """Sizes, skips and token counts of the corpus, as written to ``data_stats.json``."""
        out: dict[str, Any] = {"tokenizer": {"vocab": len(self.codec), "kind": self.codec.kind}}
        if self.cfg.rl_holdout:
            out["rl_holdout"] = self.cfg.rl_holdout  # training pairs kept out of MLE for RL
        n_layout = self.codec.n_layout  # the prompt's tokens around the source (<bos> and the tags, or </s>)
        for key, pairs in (("train", train), ("val", val)):
            ex = self.examples(pairs)
            words = sum(len(p.src.split()) + len(p.tgt.split()) for p in pairs)
            tokens = sum(len(a) + len(b) for a, b in ex)
            rep = self.load_reports.get(key)
            out[key] = {"examples": len(pairs), "src_tokens": sum(len(a) - n_layout for a, _ in ex), "tgt_tokens": sum(len(b) - 1 for _, b in ex),
                        "tokens": tokens, "tokens_per_word": round((tokens - (n_layout + 1) * len(ex)) / max(words, 1), 3),
                        "skipped": {**(rep.as_dict()["skipped"] if rep else {}), "too long": self.length_skips.get(key, 0)}}
        return out

    # ----- prompts and reward -------------------------------------------------------------
    def prompt(self, pair: Pair) -> TranslationPrompt:
        """The prompt of a source sentence with its generation budget (``task.length``)."""
        ln = self.cfg.length
        ids = self.codec.encode_prompt(pair.src)
        return TranslationPrompt(ids, max_new_tokens(len(ids) - self.codec.n_layout, ln.ratio, ln.extra, ln.cap), pair.src, pair.tgt)

    def train_prompts(self) -> list[TranslationPrompt]:
        """RL prompts: the training pairs (or the ``rl_holdout`` pairs held out of MLE) within the
        token limits, the first ``rl_prompts`` of them; their references' BLEU statistics are
        precomputed here, once."""
        if self._train_prompts is None:
            pairs = self._fits(self.train_parts()[1], "rl" if self.cfg.rl_holdout else "train")
            if self.cfg.rl_prompts is not None:
                pairs = pairs[: self.cfg.rl_prompts]
            self._train_prompts = [self.prompt(p) for p in pairs]
            self.bleu.prepare([p.ref for p in self._train_prompts])
        return self._train_prompts

    def rewards(self, hyps: Sequence[str], refs: Sequence[str]) -> np.ndarray:
        """[B] RL reward of each translation (:meth:`scored`)."""
        return self.scored(hyps, refs)[0]

    def scored(self, hyps: Sequence[str], refs: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """[B] RL reward of each translation and the BLEU statistics [B, 10] it came from. The
        reward is sentence BLEU/100 (sacrebleu, effective order) or, with ``reward.level:
        corpus``, its contribution to the corpus BLEU of the batch ``hyps``
        (:func:`~tasks.translation.bleu.corpus_contributions`); mixed with sentence chrF/100 when
        ``reward.chrf_weight`` > 0; minus ``reward.length_weight`` times the length error (``reward.length_side``)."""
        st = self.bleu.stats(hyps, refs)  # [B, 2 + 2·4]: c, r, matches, totals
        r = corpus_contributions(st) if self.cfg.reward.level == "corpus" else bleu_from_stats(st) / 100.0
        w = self.cfg.reward.chrf_weight
        if self.chrf is not None and w > 0:
            r = (1 - w) * r + w * self.chrf.scores(hyps, refs) / 100.0
        if self.cfg.reward.length_weight > 0:
            r = r - self.cfg.reward.length_weight * length_penalty(st[:, 0], st[:, 1], self.cfg.reward.length_side)
        return r, st

    def completions(self, prompts: Sequence[TranslationPrompt], tokens: torch.Tensor) -> list[list[int]]:
        """Each row of sampled ``tokens`` [B, T] cut to its sample: the first ``n_new`` tokens,
        up to and including the first ``<eos>``."""
        out = []
        for p, row in zip(prompts, tokens.tolist()):
            row = row[: p.n_new]  # columns past a row's budget belong to longer rows of the batch
            out.append(row[: row.index(self.eos_id) + 1] if self.eos_id in row else row)
        return out

    def reward(self, completions: Completions) -> Rewards:
        """[B] each translation's reward (:meth:`scored`), with the batch's length ratio as a
        diagnostic; the core puts it on the row's last token (its ``<eos>``, or the budget's last
        token). The task's RewardFn."""
        comps = self.completions(completions.prompts, completions.tokens)
        r, st = self.scored(self.codec.decode_batch(comps), [p.ref for p in completions.prompts])  # [B], [B, 10]
        # length_ratio: words of the samples over words of their references, as the corpus brevity penalty counts them
        return Rewards(torch.from_numpy(np.asarray(r)).float(), {"length_ratio": float(st[:, 0].sum() / max(st[:, 1].sum(), 1))})

    def save(self, path: Path) -> None:
        self.codec.save(path)

    def report(self, run_dir: Path, evaluation: dict[str, Any], stats: dict[str, Any]) -> Path:
        return write_report(Path(run_dir), evaluation, stats)

    # ----- evaluation ---------------------------------------------------------------------
    def decode_split(self, model: PreTrainedModel, pairs: Sequence[Pair], beam: int) -> tuple[list[TranslationPrompt], list[list[int]], list[str]]:
        """Prompts, completion ids and texts of greedy (beam 1) or beam-search translations."""
        prompts = [self.prompt(p) for p in pairs]
        suppress = torch.nonzero(~self.allowed).flatten().tolist()
        comps = generate(model, [p.ids for p in prompts], [p.n_new for p in prompts], eos_id=self.eos_id, pad_id=self.codec.pad_id,
                         suppress=suppress, beam=beam, batch_size=self.cfg.eval.batch_size)
        return prompts, comps, self.codec.decode_batch(comps)

    def score_split(self, model: PreTrainedModel, prior: PreTrainedModel, pairs: Sequence[Pair]) -> tuple[dict[str, float | int], list[str]]:
        """One model's row on one split, and its greedy translations. Keys (docs/translation.md):
        ``bleu`` and ``ratio`` (corpus BLEU and length ratio, greedy), ``bleu/beam`` and
        ``ratio/beam`` (beam search), ``reward/sentence`` (mean sentence BLEU/100 of the greedy
        output), ``kl/prior`` (exact KL to the prior per token along the greedy
        output, ``<eos>`` included), ``eos`` (share of translations that ended), ``vocab``
        (distinct 13a words in all translations)."""
        from rlhf.rollout import kl_to_reference_many

        refs = [p.tgt for p in pairs]
        prompts, comps, hyps = self.decode_split(model, pairs, beam=1)
        b = corpus_bleu(hyps, refs, self.cfg.reward.tokenize)
        row = {"bleu": b.score, "ratio": b.ratio, "reward/sentence": float(self.bleu.rewards(hyps, refs).mean())}
        if self.cfg.eval.beam > 1:
            hb = self.decode_split(model, pairs, beam=self.cfg.eval.beam)[2]
            bb = corpus_bleu(hb, refs, self.cfg.reward.tokenize)
            row.update({"bleu/beam": bb.score, "ratio/beam": bb.ratio})
        kl = kl_to_reference_many(model, prior, [p.ids for p in prompts], comps, pad_id=self.codec.pad_id, allowed=self.allowed,
                                  max_batch=self.cfg.eval.batch_size)  # [B, T, V] logits twice: keep batches small
        row["kl/prior"] = float(np.mean(kl))
        row["eos"] = float(np.mean([bool(c) and c[-1] == self.eos_id for c in comps]))
        row["vocab"] = len({w for h in hyps for w in self.bleu.words(h)})
        return row, hyps

    def evaluate(self, models: dict[str, PreTrainedModel], prior: PreTrainedModel, *, seed: int, val: Sequence[Pair] | None = None) -> dict[str, Any]:
        """Corpus BLEU (sacrebleu signature), length ratio, KL to the prior per token and more
        (see :meth:`score_split`) of every model on each split of ``eval.splits``, plus the first
        ``eval.examples`` test (else val) sentences side by side. Decoding is deterministic, so
        ``seed`` is unused; ``val`` is unused (the whole val split is scored, not the filtered
        one). JSON-serialisable."""
        e = self.cfg.eval
        splits = [s for s in e.splits if s != "test" or self.cfg.data.test_split is not None]
        out: dict[str, Any] = {"splits": {}, "examples": [], "beam": e.beam,
                               "signature": bleu_signature(self.cfg.reward.tokenize)}
        for key in splits:
            pairs = self.split(key)
            rows, hyps = {}, {}
            for name, model in models.items():
                rows[name], hyps[name] = self.score_split(model, prior, pairs)
                log.info("eval %s %s: %s", key, name, {k: round(v, 3) for k, v in rows[name].items()})
            ref_vocab = len({w for p in pairs for w in self.bleu.words(p.tgt)})
            out["splits"][key] = {"split": {"val": self.cfg.data.val_split, "test": self.cfg.data.test_split}[key],
                                  "sentences": len(pairs), "rows": rows, "reference_vocab": ref_vocab}
            out["examples"] = [{"src": p.src, "ref": p.tgt, **{n: h[i] for n, h in hyps.items()}} for i, p in enumerate(pairs[: e.examples])]
        return out
