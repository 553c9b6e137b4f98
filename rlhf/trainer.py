"""The one training-loop layer every trainer goes through, built on ``accelerate``.

It owns what is the same for MLE pre-training, reward-model training and RL: device and
process placement (so ``accelerate launch`` / DeepSpeed work unchanged), the optimizer step
with gradient clipping, resumable checkpoints, metrics, and the progress bar.  The
algorithm-specific math lives elsewhere; a trainer's loop reads::

    loop = TrainLoop(run, "pretrain", model, optimizer, ...)
    loop.resume()                       # no-op on a fresh run
    for step in loop.steps():           # progress bar, checkpoint every k steps
        loss = ...                      # the algorithm's math
        metrics = loop.update(loss)     # backward, clip, step
        loop.log(metrics)
    loop.finish(final_dir)              # last checkpoint + plain HF model folder
"""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from rlhf.errors import UserError
from rlhf.runs import Run, atomic_dir, prune_checkpoints

log = logging.getLogger("rlhf")

STATE_FILE = "trainer_state.pt"

# transformers draws a bar per save_pretrained ("Writing model shards"); ours is the step bar.
hf_logging.disable_progress_bar()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class TrainLoop:
    """Accelerator, optimizer step, checkpoints and metrics for one training stage."""

    def __init__(
        self,
        run: Run,
        stage: str,
        model: PreTrainedModel,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        *,
        total_steps: int,
        checkpoint_every: int,
        keep_checkpoints: int = 2,
        grad_clip: float | None = 1.0,
        tokenizer: PreTrainedTokenizerBase | None = None,
        accelerator: Accelerator | None = None,
        progress: bool = True,
    ):
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.run = run
        self.stage = stage
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.scheduler = self.accelerator.prepare(scheduler) if scheduler is not None else None
        self.total_steps = total_steps
        self.checkpoint_every = checkpoint_every
        self.keep_checkpoints = keep_checkpoints
        self.grad_clip = grad_clip
        self.tokenizer = tokenizer
        self.progress = progress
        self.step = 0
        self.extra_state: dict[str, Any] = {}  # trainer-specific state restored by resume()

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def unwrapped(self) -> PreTrainedModel:
        return self.accelerator.unwrap_model(self.model)

    def optimizer_step(self, loss: torch.Tensor) -> dict[str, float]:
        """Backward, clip, optimizer and scheduler step, without advancing the training step
        (an RL iteration takes several optimizer steps). Returns ``grad/norm`` and ``lr``."""
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        norm = float("nan")
        if self.grad_clip is not None:
            norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip))
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return {"grad/norm": norm, "lr": self.optimizer.param_groups[0]["lr"]}

    def advance(self) -> None:
        """Count one training step (what checkpoints, resume and the progress bar count)."""
        self.step += 1

    def update(self, loss: torch.Tensor) -> dict[str, float]:
        """One optimizer step that is also one training step (supervised training)."""
        metrics = self.optimizer_step(loss)
        self.advance()
        return metrics

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.run.metrics.log(self.step if step is None else step, metrics, self.stage)

    def steps(self) -> Iterator[int]:
        """Yield the remaining step indices with a progress bar; checkpoint every k steps."""
        bar = tqdm(
            total=self.total_steps, initial=self.step, desc=self.stage, unit="step",
            disable=not (self.progress and self.accelerator.is_main_process), dynamic_ncols=True,
            mininterval=0.1 if sys.stderr.isatty() else 30.0,  # a log file gets a line per 30 s, not per step
        )
        try:
            while self.step < self.total_steps:
                start = self.step
                yield self.step
                if self.step == start:
                    raise RuntimeError("TrainLoop.steps(): the loop body must call update() or advance() once per step")
                bar.update(1)
                if self.checkpoint_every and self.step % self.checkpoint_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            bar.close()

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/<stage>/step-N`` atomically (HF model + tokenizer + trainer state)."""
        self.accelerator.wait_for_everyone()
        state_dict = self.accelerator.get_state_dict(self.model)  # gathers ZeRO-3 shards on every rank
        if not self.accelerator.is_main_process:
            return None
        target = self.run.checkpoint_dir(self.stage, self.step)
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": _rng_state(),
            "extra": self.extra_state,
        }

        def write(tmp: Path) -> None:
            self.unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            torch.save(state, tmp / STATE_FILE)

        atomic_dir(target, write)
        prune_checkpoints(self.run.stage_dir(self.stage), self.keep_checkpoints)
        log.info("checkpoint %s", target)
        return target

    def resume(self) -> bool:
        """Restore weights, optimizer, scheduler, step and RNG from the newest checkpoint."""
        ckpt = self.run.latest_checkpoint(self.stage)
        if ckpt is None:
            return False
        state_path = ckpt / STATE_FILE
        if not state_path.is_file():
            raise UserError(f"{ckpt}: checkpoint has no {STATE_FILE}; delete the folder or start without --resume.")
        if hasattr(self.unwrapped, "load_checkpoint"):  # wrappers that save more than one HF model
            try:
                self.unwrapped.load_checkpoint(ckpt)
            except ValueError as e:
                raise UserError(f"{e}. Resume with the config that wrote it.") from None
        else:
            from safetensors.torch import load_file

            weights = load_file(str(ckpt / "model.safetensors"))
            missing, unexpected = self.unwrapped.load_state_dict(weights, strict=False)
            # Tied embeddings (lm_head = wte) are saved once; anything else missing is a real mismatch.
            missing = [k for k in missing if not k.endswith("lm_head.weight")]
            if missing or unexpected:
                raise UserError(f"{ckpt}: checkpoint does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]}). Resume with the config that wrote it.")
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.extra_state = state.get("extra", {})
        if self.accelerator.is_main_process:
            self.run.metrics.truncate(self.stage, self.step)
        log.info("resumed %s from %s (step %d)", self.stage, ckpt, self.step)
        return True

    def finish(self, final_dir: Path) -> Path:
        """Save the last checkpoint and a plain HF model folder (what later stages load)."""
        if self.run.latest_checkpoint(self.stage) != self.run.checkpoint_dir(self.stage, self.step):
            self.save_checkpoint()
        self.accelerator.wait_for_everyone()
        state_dict = self.accelerator.get_state_dict(self.model)
        if self.accelerator.is_main_process:
            def write(tmp: Path) -> None:
                self.unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(tmp)

            atomic_dir(final_dir, write)
        self.accelerator.wait_for_everyone()
        return final_dir
