"""A new task in one file: counting.

The prompt is a start digit, the completion eight digits; the reward is +1 for every digit that
is one more (mod 10) than the digit before it, so "3 → 4 5 6 7 8 9 0 1" is perfect. The prior is
pre-trained by MLE on random walks (each step −1, 0, +1 or +2), so it counts only sometimes; RL
against it has to make counting the rule without leaving the prior's digits behind.

Use it from YAML alone (examples/my_task.yaml)::

    task:
      name: examples.my_task:CountingTask

or register it by name in your own package's pyproject.toml::

    [project.entry-points."rlhf.tasks"]
    counting = "my_package.my_task:CountingTask"

What a task is (rlhf/interfaces.py): ``Config`` (its typed ``task:`` section), ``build``,
``tokenizer``, ``allowed``, ``eos_id``, ``train_prompts()``, ``reward(completions)``, ``save``;
and for ``rlhf run``: ``corpus``, ``examples``, ``data_stats``, ``evaluate``, ``report``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from pydantic import Field
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhf.config import TaskConfig
from rlhf.interfaces import Completions, Rewards
from rlhf.report import markdown_table
from rlhf.rollout import kl_to_reference_many, sample_many
from rlhf.runs import atomic_write_text

DIGITS = [str(d) for d in range(10)]


class CountingConfig(TaskConfig):
    name: Literal["examples.my_task:CountingTask"] = Field("examples.my_task:CountingTask", description="Task selector.")
    length: int = Field(8, ge=2, le=32, description="Digits per completion.")
    walks: int = Field(2000, ge=10, description="Random walks in the MLE corpus of the prior.")
    eval_samples: int = Field(64, ge=1, description="Completions sampled per model for evaluation.")

    def check_run(self, run: Any) -> None:
        if run.model.path is None and run.model.max_positions < self.length + 3:
            raise ValueError(f"model.max_positions ({run.model.max_positions}) < task.length + 3; raise model.max_positions")


@dataclass(frozen=True)
class CountingPrompt:
    ids: list[int]  # <bos> start-digit
    n_new: int


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer: the ten digits and four special tokens (ids 0-3)."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *DIGITS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


class CountingTask:
    Config = CountingConfig
    quick = Path(__file__).with_name("my_task.quick.yaml")
    eos_id = None  # every completion has `length` digits

    @classmethod
    def build(cls, cfg: CountingConfig, model_dir: Path | None = None) -> "CountingTask":
        tok = PreTrainedTokenizerFast.from_pretrained(str(model_dir)) if model_dir is not None else build_tokenizer()
        return cls(cfg, tok)

    def __init__(self, cfg: CountingConfig, tokenizer: PreTrainedTokenizerFast):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.digit_ids = tokenizer.convert_tokens_to_ids(DIGITS)
        self.allowed = torch.zeros(len(tokenizer), dtype=torch.bool)
        self.allowed[self.digit_ids] = True  # the actions: the ten digits

    def save(self, path: Path) -> None:
        self.tokenizer.save_pretrained(str(path))

    def train_prompts(self) -> list[CountingPrompt]:
        return [CountingPrompt([self.tokenizer.bos_token_id, d], self.cfg.length) for d in self.digit_ids]

    def reward(self, completions: Completions) -> Rewards:
        """[B, T]: +1 at each step whose digit is the previous digit + 1 (mod 10); the first
        step compares with the prompt's start digit."""
        value = {t: i for i, t in enumerate(self.digit_ids)}
        lut = torch.full((len(self.tokenizer),), -100, dtype=torch.long)
        lut[list(value)] = torch.tensor(list(value.values()))
        start = torch.tensor([lut[p.ids[-1]] for p in completions.prompts])[:, None]  # [B, 1]
        digits = lut[completions.tokens]  # [B, T]
        before = torch.cat([start, digits[:, :-1]], dim=1)
        return Rewards(((digits - before) % 10 == 1).float())

    # ----- what `rlhf run` needs ------------------------------------------------------------
    def corpus(self, seed: int, *, progress: bool = True, run_dir: Path | None = None) -> tuple[list, list]:
        """Random walks: (start digit, digits), split 90/10."""
        rng = np.random.default_rng(seed)
        walks = []
        for _ in range(self.cfg.walks):
            x = int(rng.integers(10))
            steps = rng.choice([-1, 0, 1, 2], size=self.cfg.length)
            walks.append((x, [int(v) for v in (x + np.cumsum(steps)) % 10]))
        k = len(walks) // 10
        return walks[k:], walks[:k]

    def examples(self, items: Sequence[tuple[int, list[int]]]) -> list[tuple[list[int], list[int]]]:
        return [([self.tokenizer.bos_token_id, self.digit_ids[x]], [self.digit_ids[d] for d in ds]) for x, ds in items]

    def data_stats(self, train: Sequence, val: Sequence) -> dict[str, Any]:
        return {"train": len(train), "val": len(val)}

    def evaluate(self, models: dict[str, Any], prior: Any, *, seed: int, val: Sequence | None = None) -> dict[str, Any]:
        prompts = [p for p in self.train_prompts() for _ in range(max(1, self.cfg.eval_samples // 10))]
        rows = {}
        for name, model in models.items():
            comps = sample_many(model, [p.ids for p in prompts], [p.n_new for p in prompts], allowed=self.allowed,
                                generator=torch.Generator().manual_seed(seed))
            tokens = torch.tensor(comps)
            c = Completions(prompts, tokens, torch.ones(tokens.shape), [p.n_new for p in prompts])
            per_step = self.reward(c).values
            kl = kl_to_reference_many(model, prior, [p.ids for p in prompts], comps, pad_id=self.tokenizer.pad_token_id, allowed=self.allowed)
            rows[name] = {"reward/piece": float(per_step.sum(1).mean()), "counting share": float(per_step.mean()),
                          "kl/prior": float(np.mean(kl)), "example": " ".join(self.tokenizer.convert_ids_to_tokens(comps[0]))}
        return {"rows": rows}

    def report(self, run_dir: Path, evaluation: dict[str, Any], stats: dict[str, Any]) -> Path:
        rows = evaluation["rows"]
        table = markdown_table(["model", "reward / completion", "counting share", "KL / token", "example"],
                               [[n, r["reward/piece"], r["counting share"], r["kl/prior"], r["example"]] for n, r in rows.items()])
        atomic_write_text(Path(run_dir) / "eval.json", json.dumps(evaluation, indent=1))
        atomic_write_text(Path(run_dir) / "report.md", f"# Counting\n\n{table}\n")
        return Path(run_dir) / "report.md"
