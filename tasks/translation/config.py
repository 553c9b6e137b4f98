"""Config of the translation task (Multi30k English→German by default)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhf.config import Section, TaskConfig


class TranslationDataConfig(Section):
    dir: str | None = Field(
        None, description="Data folder; null = $RLHF_MULTI30K_DIR or ../shared/data/multi30k (next to the repo). See docs/translation.md for getting Multi30k."
    )
    format: Literal["text", "tsv", "jsonl", "hf"] = Field(
        "text",
        description="Layout of the folder: text = <split>.<lang>[.gz] line-aligned files (Multi30k); tsv = <split>.tsv[.gz]; "
        "jsonl = <split>.jsonl[.gz]; hf = a datasets folder from save_to_disk.",
    )
    src_lang: str = Field("en", min_length=1, description="Source language code (file suffix / JSON key).")
    tgt_lang: str = Field("de", min_length=1, description="Target language code (file suffix / JSON key).")
    train_split: str = Field("train", description="Split the prior, the tokenizer and the RL prompts come from.")
    val_split: str = Field("val", description="Held-out split: MLE validation loss and evaluation.")
    test_split: str | None = Field("test_2016_flickr", description="Test split reported in the evaluation; null = none.")
    max_train_pairs: int | None = Field(None, ge=1, description="Use only the first N training pairs (file order); null = all.")
    max_eval_pairs: int | None = Field(None, ge=1, description="Use only the first N pairs of val and test (loss and BLEU); null = all.")
    max_src_tokens: int = Field(60, ge=1, description="Training pairs whose source has more subword tokens are skipped (counted in data_stats.json).")
    max_tgt_tokens: int = Field(60, ge=1, description="Training pairs whose target has more subword tokens are skipped (counted).")
    empty_lines: Literal["skip", "error"] = Field("skip", description="A pair with an empty side: skip it (counted and logged) or stop with an error.")
    encoding_errors: Literal["skip", "error"] = Field("error", description="A line that is not UTF-8: stop with file:line (error) or skip the pair (counted).")


class TokenizerConfig(Section):
    vocab_size: int = Field(4000, ge=300, le=200_000, description="Joint byte-level BPE vocabulary size (including 256 bytes and 6 special tokens).")
    min_frequency: int = Field(2, ge=1, description="A merge must occur at least this often in the training text.")
    path: str | None = Field(None, description="Load this saved tokenizer (a model or tokenizer folder) instead of training one.")


class GenerationLengthConfig(Section):
    ratio: float = Field(1.5, gt=0, le=10, description="A translation may have at most ceil(ratio * source tokens) + extra tokens ...")
    extra: int = Field(5, ge=0, description="... plus this many ...")
    cap: int = Field(64, ge=1, description="... and never more than this (including <eos>).")


class RewardConfig(Section):
    level: Literal["sentence", "corpus"] = Field(
        "sentence",
        description="sentence: each translation's sentence BLEU/100 (Ranzato et al. 2015); corpus: its contribution to the corpus BLEU "
        "of the rollout batch, B·(BLEU(batch) − BLEU(batch without it))/100, so the brevity penalty and the n-gram precisions act "
        "at corpus level as in the reported score (tasks/translation/bleu.py corpus_contributions). Needs rloo.baseline: leave_one_out "
        "(a greedy batch is another corpus).",
    )
    chrf_weight: float = Field(
        0.0, ge=0, le=1, description="Reward = (1 - w) * sentence BLEU/100 + w * sentence chrF/100; 0 = BLEU alone (Ranzato et al. 2015)."
    )
    length_weight: float = Field(
        0.0, ge=0, le=10,
        description="Subtract λ·(relative length error) from the reward (c, r: words of the translation and of its reference; "
        "tasks/translation/bleu.py length_penalty), so RL does not drift to short translations; 0 = off.",
    )
    length_side: Literal["short", "both"] = Field(
        "short", description="The length error of length_weight: short = max(0, 1 − c/r) (only shortness costs); both = |c/r − 1|."
    )
    tokenize: Literal["13a", "intl", "none", "char"] = Field("13a", description="sacrebleu tokenizer of the BLEU reward and of reported BLEU.")


class TranslationEvalConfig(Section):
    splits: list[Literal["val", "test"]] = Field(default_factory=lambda: ["val", "test"], description="Splits scored with corpus BLEU.")
    beam: int = Field(4, ge=1, le=16, description="Beam size of the beam-search rows (1 = report greedy only).")
    batch_size: int = Field(64, ge=1, description="Sentences per generate() call.")
    examples: int = Field(8, ge=0, description="Test sentences shown side by side (source, reference, every model).")


class TranslationConfig(TaskConfig):
    name: Literal["translation"] = Field("translation", description="Task selector.")
    data: TranslationDataConfig = Field(default_factory=TranslationDataConfig, description="Parallel corpus.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Subword tokenizer.")
    length: GenerationLengthConfig = Field(default_factory=GenerationLengthConfig, description="Generation budget per sentence (RL rollouts and decoding).")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="The RL reward.")
    rl_holdout: int | None = Field(
        None, ge=1,
        description="Hold N training pairs (a fixed uniform draw) out of the tokenizer and MLE pre-training, and tune on them alone: "
        "RL then samples sources the prior has not memorised. null = MLE and RL share every training pair.",
    )
    rl_prompts: int | None = Field(None, ge=1, description="RL prompts: the first N of the RL pairs (the training pairs, or the held-out ones); null = all of them.")
    eval: TranslationEvalConfig = Field(default_factory=TranslationEvalConfig, description="Evaluation.")

    @model_validator(mode="after")
    def _distinct_languages(self) -> "TranslationConfig":
        if self.data.src_lang == self.data.tgt_lang:
            raise ValueError(f"data.src_lang and data.tgt_lang are both {self.data.src_lang!r}; give two languages, e.g. en and de")
        return self

    def positions_needed(self, seq2seq: bool = False) -> int:
        """Longest sequence a model must hold: <bos> <src> source <tgt> + target <eos> or a
        generation budget (decoder-only); the longer of the two sides (encoder–decoder)."""
        src, tgt = 3 + self.data.max_src_tokens, max(self.data.max_tgt_tokens + 1, self.length.cap)
        return max(src, tgt + 1) if seq2seq else src + tgt

    def check_run(self, run) -> None:
        if run.model.path is None:  # a loaded model's own config decides
            check_positions(self, run.model.max_positions, seq2seq=run.model.arch == "marian")
        t = run.tune
        if self.reward.level == "corpus" and t is not None and getattr(t.settings, "baseline", None) == "greedy":
            raise ValueError(
                "task.reward.level=corpus scores each translation within its rollout batch, but rloo.baseline=greedy would compare it "
                "with a greedy translation scored within another batch; use rloo.baseline=leave_one_out or task.reward.level=sentence"
            )


def check_positions(task: TranslationConfig, max_positions: int, seq2seq: bool = False) -> None:
    """ValueError unless the model's ``max_positions`` holds the longest sequence the task makes
    (for a RunConfig validator: ``model.max_positions`` vs ``task``)."""
    need = task.positions_needed(seq2seq)
    if max_positions < need:
        how = ("max(3 + task.data.max_src_tokens, max(task.data.max_tgt_tokens + 1, task.length.cap) + 1)" if seq2seq else
               "3 + task.data.max_src_tokens + max(task.data.max_tgt_tokens + 1, task.length.cap)")
        raise ValueError(f"model.max_positions ({max_positions}) is shorter than the longest translation sequence ({need} = {how}); "
                         "raise model.max_positions or lower those")
