"""Config of the generic text task: prompts (and references) from a JSONL file or a local
``datasets`` folder, a tokenizer, a generation budget, the task's own reward and evaluation.

Sequence layout (decoder-only model, the prompt as prefix)::

    prompt      [<bos>] p_1 ... p_n [<sep>]        completion   y_1 ... y_m <eos>

``<bos>`` and ``<sep>`` are there when the tokenizer has them (a tokenizer trained by the task
always has both); see ``tasks/text/task.py``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from rlhf.config import Section, TaskConfig


class TextDataConfig(Section):
    path: str = Field(
        ...,
        description="The data: a JSONL file (one JSON object per line) or a local datasets folder written by save_to_disk "
        "(read with datasets.load_from_disk; nothing is downloaded). Relative paths are from the current folder.",
    )
    split: str | None = Field(
        None, description="For a datasets folder holding several splits (a DatasetDict): the split to read; null = its only split, or 'train'."
    )
    prompt_key: str = Field("prompt", min_length=1, description="Key (JSONL) or column (datasets) of the prompt text; required in every row.")
    reference_key: str = Field(
        "reference", min_length=1,
        description="Key of the reference answer the task's reward (task.reward.kind) scores against; may be absent when the reward kind is none.",
    )
    completion_key: str = Field(
        "completion", min_length=1,
        description="Key of the MLE target of the prior; a row without it uses its reference as the target.",
    )
    val_fraction: float = Field(
        0.1, gt=0, le=0.5,
        description="Share of the distinct prompts held out (MLE validation loss and evaluation). The split is by prompt text "
        "(ordered by a hash), so it does not depend on the run seed and a repeated prompt never lands on both sides.",
    )
    max_examples: int | None = Field(None, ge=2, description="Read only the first N rows (file order); null = all.")
    max_prompt_tokens: int = Field(64, ge=1, description="Rows whose prompt has more tokens are skipped (counted in data_stats.json).")


class TextRewardConfig(Section):
    kind: Literal["bleu", "chrf", "none"] = Field(
        "bleu",
        description="The task's own reward of a completion against its prompt's reference: bleu = sacrebleu sentence BLEU/100, "
        "chrf = sentence chrF/100; none = the task has no reward of its own (the run must give rewards: or reward:).",
    )
    tokenize: Literal["13a", "intl", "none", "char", "zh"] = Field("13a", description="sacrebleu tokenizer of the BLEU reward.")
    lowercase: bool = Field(False, description="Score BLEU case-insensitively.")


class TextEvalConfig(Section):
    prompts: int = Field(64, ge=1, description="Held-out prompts evaluated (the first N of the held-out split).")
    samples: int = Field(4, ge=1, le=256, description="Completions sampled per prompt and model (distinct/prompt counts among them).")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature of the evaluation (0 = greedy: then every sample of a prompt is the same).")
    examples: int = Field(6, ge=0, description="Held-out prompts shown in the report with each model's first sample.")
    batch_size: int = Field(256, ge=1, description="Sequences per sampling / KL forward pass.")


class TextConfig(TaskConfig):
    name: Literal["text"] = Field("text", description="Task selector.")
    data: TextDataConfig = Field(..., description="Where the prompts, references and MLE targets come from.")
    tokenizer: str | None = Field(
        None,
        description="A local tokenizer folder (save_pretrained; e.g. the folder of model.path). null = train a byte-level BPE "
        "on the training rows into <run_dir>/tokenizer (reused on --resume).",
    )
    vocab_size: int = Field(1000, ge=270, le=200_000, description="Vocabulary of the BPE trained when tokenizer is null (256 bytes and 5 special tokens included).")
    max_new_tokens: int = Field(32, ge=2, description="Completion budget in tokens, <eos> included (RL, evaluation); longer MLE targets are skipped.")
    reward: TextRewardConfig = Field(default_factory=TextRewardConfig, description="The task's own reward.")
    eval: TextEvalConfig = Field(default_factory=TextEvalConfig, description="Evaluation.")

    def positions_needed(self) -> int:
        """Longest sequence: <bos> prompt <sep> + completion budget."""
        return 2 + self.data.max_prompt_tokens + self.max_new_tokens

    @model_validator(mode="after")
    def _keys_differ(self) -> "TextConfig":
        d = self.data
        for other in ("reference_key", "completion_key"):
            if getattr(d, other) == d.prompt_key:
                raise ValueError(f"data.prompt_key and data.{other} are both {d.prompt_key!r}; the prompt and its answer need two keys")
        return self

    def check_run(self, run: Any) -> None:
        m = run.model
        if m.path is not None and self.tokenizer is None:
            raise ValueError(
                f"model.path ({m.path}) is a trained model, whose token ids only its own tokenizer knows, but task.tokenizer is null "
                "(train a new one); set task.tokenizer to its tokenizer folder (often the same folder as model.path)"
            )
        if m.path is None and m.max_positions < self.positions_needed():
            raise ValueError(
                f"model.max_positions ({m.max_positions}) is shorter than the longest text sequence ({self.positions_needed()} = 2 + "
                "task.data.max_prompt_tokens + task.max_new_tokens); raise model.max_positions or lower those"
            )
        tuning = run.tune is not None
        if self.reward.kind == "none" and tuning:
            if not run.rewards and run.reward is None:
                raise ValueError(
                    "task.reward.kind is none (the task has no reward of its own) and the run gives no other: add rewards:, e.g. "
                    "rewards: [{fn: 'my_module:my_reward'}], or reward: (a trained reward model), or set task.reward.kind: bleu or chrf"
                )
            if any(t.fn == "task" for t in run.rewards):
                raise ValueError("rewards: has a term fn: task, but task.reward.kind is none; set task.reward.kind (bleu, chrf) or drop that term")
