"""The Pets task (Poddar et al. 2024, sec. 5) as a policy to fine-tune: a language model answers
"which pet should I get?" and rater groups disagree on the animal. It has no reward of its own:
the reward is a trained BT/VPL model (``reward_models.reward_source``), so the task supplies
prompts, the action space, MLE examples for the prior, and sampling + decoding for evaluation.

The tokenizer is the word-level tokenizer the reward model was trained with (loaded from its
folder), so the policy and the reward model read the same ids; the texts are the simulator's
candidate answers of the Pets rater simulator, prompt + answer + ``<eos>``,
exactly as the preference pairs were tokenized.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.errors import UserError
from rlhf.rollout import sample_many


@dataclass(frozen=True)
class PetsPrompt:
    name: str  # "pets#<i>"
    ids: list[int]
    n_new: int  # token budget of an answer (its <eos> included)
    text: str


class TokenizerCodec:
    """What ``rlhf.tune`` saves beside a tuned model: the tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer

    def save(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(str(path))


class PetsTask:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[str], prompt_of: Sequence[str]):
        """``answers[i]`` answers ``prompt_of[i]``; ``prompts`` are the distinct prompts."""
        self.tokenizer = tokenizer
        self.codec = TokenizerCodec(tokenizer)
        self.answers, self.prompt_of = list(answers), list(prompt_of)
        longest = max(len(tokenizer(a)["input_ids"]) for a in self.answers) + 1  # + <eos>
        self.prompts = [PetsPrompt(f"pets#{i}", tokenizer(p)["input_ids"], longest + 4, p) for i, p in enumerate(prompts)]
        # every word but the special tokens that never appear inside an answer
        self.allowed = torch.ones(len(tokenizer), dtype=torch.bool)
        for t in (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id):
            if t is not None:
                self.allowed[t] = False

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def train_prompts(self) -> list[PetsPrompt]:
        return self.prompts

    def examples(self, idx: Sequence[int] | None = None) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, answer ids + eos) of the candidate answers, the prior's MLE data."""
        by_text = {p.text: p for p in self.prompts}
        idx = range(len(self.answers)) if idx is None else idx
        return [(list(by_text[self.prompt_of[i]].ids), self.tokenizer(self.answers[i])["input_ids"] + [self.eos_id]) for i in idx]

    def reward(self, completions):
        raise UserError("the Pets task has no reward of its own: tune it with a reward model (rlhf.tune.tune(..., reward=RewardSource(...)))")

    def save(self, path: Path) -> None:
        self.codec.save(path)

    def cut(self, completion: Sequence[int]) -> list[int]:
        """A sampled completion up to (without) its first ``<eos>``."""
        c = list(completion)
        return c[: c.index(self.eos_id)] if self.eos_id in c else c

    def sample_texts(self, model: PreTrainedModel, per_prompt: int, *, seed: int, temperature: float = 1.0) -> list[str]:
        """``per_prompt`` answers to each prompt (prompt-major order), decoded to text."""
        rep = [p for p in self.prompts for _ in range(per_prompt)]
        gen = torch.Generator().manual_seed(seed)
        comps = sample_many(model, [p.ids for p in rep], [p.n_new for p in rep], allowed=self.allowed, temperature=temperature, generator=gen)
        return [self.tokenizer.decode(self.cut(c)) for c in comps]



def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n * val_fraction)))
    return perm[k:], perm[:k]
