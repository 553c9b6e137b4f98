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

import contextlib
import logging
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from rlhf import distributed
from rlhf.errors import UserError
from rlhf.lora import Adapted, load_adapters, save_final
from rlhf.models import unsaved_key
from rlhf.progress import progress_bar
from rlhf.runs import Run, atomic_dir, prune_checkpoints

log = logging.getLogger("rlhf")

STATE_FILE = "trainer_state.pt"
ZERO_DIR = "zero"  # DeepSpeed's own sharded checkpoint (optimizer partitions) inside a step folder

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
        self.accelerator = accelerator or distributed.make_accelerator(run.mixed_precision)
        self.run = run
        self.stage = stage
        if not self.accelerator.is_main_process:  # only rank 0 writes metrics, logs and checkpoints
            run.is_main = False
            run.metrics.enabled = False
            distributed.quiet_other_ranks(run.root)
        self._configure_deepspeed(grad_clip)
        if scheduler is not None:  # one prepare call: DeepSpeed builds its engine from all three
            self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        else:
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
            self.scheduler = None
        distributed.plain_model_loading(self.accelerator)
        self.total_steps = total_steps
        self.checkpoint_every = checkpoint_every
        self.keep_checkpoints = keep_checkpoints
        self.grad_clip = grad_clip
        self.tokenizer = tokenizer
        self.progress = progress
        self.step = 0
        self.resumes = 0  # how often resume() restored a checkpoint (a rollback moves the step back)
        # trainer-specific state restored by resume(); a callable value is called at save time
        self.extra_state: dict[str, Any] = {}

    def _configure_deepspeed(self, grad_clip: float | None) -> None:
        """Fill the DeepSpeed config's ``auto`` values accelerate cannot infer here: we feed no
        DataLoader, so the micro-batch size only feeds DeepSpeed's own throughput logging (1);
        gradient clipping is DeepSpeed's job under ZeRO, so it gets this stage's ``grad_clip``."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is None:
            return
        ds = plugin.deepspeed_config
        if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds["train_micro_batch_size_per_gpu"] = 1
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = float(grad_clip or 0.0)
        ds.setdefault("zero_allow_untested_optimizer", True)  # our torch optimizers (fused Adam/AdamW) under ZeRO

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def autocast(self) -> contextlib.AbstractContextManager:
        """The training forward's precision context: autocast to bf16/fp16 under
        ``mixed_precision``, else nothing. Wraps every forward that is trained through, the
        fast paths that bypass the prepared model's ``forward`` included."""
        return self.accelerator.autocast()

    @property
    def unwrapped(self) -> PreTrainedModel:
        return self.accelerator.unwrap_model(self.model)

    def optimizer_step(self, loss: torch.Tensor) -> dict[str, float]:
        """Backward, clip, optimizer and scheduler step, without advancing the training step
        (an RL iteration takes several optimizer steps). Returns ``grad/norm`` and ``lr``."""
        return self.accumulate_step([loss])[1]

    def accumulate_step(self, losses: Iterable[torch.Tensor]) -> tuple[float, dict[str, float]]:
        """:meth:`optimizer_step` on the sum of ``losses`` (micro-batches' shares of one loss),
        each backpropagated as it comes, so one micro-batch's graph is freed before the next is
        built. Returns (the summed loss, the step's metrics). DeepSpeed steps inside every
        backward, so there it takes one loss only."""
        self.optimizer.zero_grad(set_to_none=True)
        total, n = 0.0, 0
        for loss in losses:
            if n and self.accelerator.distributed_type == DistributedType.DEEPSPEED:
                raise UserError("micro-batches (tune.rloo.micro_batch) accumulate gradients over several backward passes, which DeepSpeed "
                                "would step after each; under DeepSpeed set tune.rloo.micro_batch: null")
            with torch.autocast(self.device.type, enabled=False):  # mixed precision: autocast the forward only, never the backward
                self.accelerator.backward(loss)
            total, n = total + float(loss.detach()), n + 1
        self.check_finite("loss", total)  # before the optimizer moves a weight
        norm = float("nan")
        if self.grad_clip is not None:
            # under DeepSpeed, backward() already clipped and stepped; this returns its norm (or None)
            g = self.accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            norm = float("nan") if g is None else float(g)
            if g is not None:
                self.check_finite("grad/norm", norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return total, {"grad/norm": norm, "lr": self.optimizer.param_groups[0]["lr"]}

    def check_finite(self, name: str, value: float) -> None:
        """Stop with a clear error when ``value`` is NaN or ±Inf, before anything is updated or
        saved: the last checkpoint stays the last good one."""
        if math.isfinite(value):
            return
        last = self.run.latest_checkpoint(self.stage)
        kept = f"the last checkpoint, {last}, is intact (resume from it with --resume)" if last else "no checkpoint was written yet"
        raise UserError(f"stage {self.stage}, step {self.step + 1}: {name} is {value}; the run stopped before the optimizer step and {kept}. "
                        "Lower the learning rate, check the reward for NaN/Inf, or set a KL guard (tune.kl.max).")

    def advance(self) -> None:
        """Count one training step (what checkpoints, resume and the progress bar count)."""
        self.step += 1

    def update(self, loss: torch.Tensor) -> dict[str, float]:
        """One optimizer step that is also one training step (supervised training)."""
        metrics = self.optimizer_step(loss)
        self.advance()
        return metrics

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Write one metrics row (rank 0). Under a launcher every rank must call this with the
        same keys: the values are averaged over ranks first (one all-reduce)."""
        metrics = distributed.reduce_metrics(metrics)
        self.run.metrics.log(self.step if step is None else step, metrics, self.stage)

    def steps(self) -> Iterator[int]:
        """Yield the remaining step indices with a progress bar; checkpoint every k steps."""
        bar = progress_bar(total=self.total_steps, initial=self.step, desc=self.stage, unit="step",
                           disable=not (self.progress and self.accelerator.is_main_process), dynamic_ncols=True)
        try:
            while self.step < self.total_steps:
                start, resumes = self.step, self.resumes
                yield self.step
                if resumes != self.resumes:  # the body rolled back to a checkpoint
                    bar.n = self.step
                    bar.refresh()
                    continue
                if self.step == start:
                    raise RuntimeError("TrainLoop.steps(): the loop body must call update() or advance() once per step")
                bar.update(1)
                if self.checkpoint_every and self.step % self.checkpoint_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            bar.close()

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/<stage>/step-N`` atomically (HF model + tokenizer + trainer state).

        Under DeepSpeed the folder also holds DeepSpeed's own checkpoint (``zero/``: each rank
        writes its optimizer partition, so the run folder must be on storage every node sees);
        the HF weights next to it are the full model either way (gathered under ZeRO-3)."""
        self.accelerator.wait_for_everyone()
        state_dict = self.accelerator.get_state_dict(self.model)  # gathers ZeRO-3 shards on every rank
        # callables are evaluated now, on every rank (they may gather per-rank state)
        extra = {k: v() if callable(v) else v for k, v in self.extra_state.items()}
        target = self.run.checkpoint_dir(self.stage, self.step)
        zero = None
        if distributed.is_deepspeed(self.model):
            # every rank writes its shard here first; rank 0 then moves it into the atomic folder
            zero = target.parent / f".zero-{target.name}"
            self.model.save_checkpoint(str(zero), tag=ZERO_DIR)
            self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        state = {
            "step": self.step,
            # a ZeRO optimizer's state_dict is this rank's partition only: zero/ holds all of them
            "optimizer": None if zero is not None else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None and zero is None else None,
            "rng": _rng_state(),
            "extra": extra,
        }

        def write(tmp: Path) -> None:
            self.unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            with (tmp / STATE_FILE).open("wb") as f:  # a Python file: a full disk surfaces as its OSError (torch's own writer hides it)
                torch.save(state, f)
            if zero is not None:
                os.replace(zero / ZERO_DIR, tmp / ZERO_DIR)
                shutil.rmtree(zero, ignore_errors=True)

        atomic_dir(target, write)
        prune_checkpoints(self.run.stage_dir(self.stage), self.keep_checkpoints)
        log.info("checkpoint %s", target)
        return target

    def resume(self) -> bool:
        """Restore weights, optimizer, scheduler, step, RNG and ``extra_state`` from the newest
        checkpoint."""
        ckpt = distributed.broadcast_object(self.run.latest_checkpoint(self.stage))  # rank 0's view of the folder
        if self.accelerator.is_main_process:
            for p in self.run.discard_partial(self.stage):
                log.info("removed %s, a checkpoint a crash left half-written", p)
        if ckpt is None:
            if self.accelerator.is_main_process:  # killed before its first checkpoint: the stage starts over, its rows are stale
                self.run.metrics.truncate(self.stage, 0)
            return False
        state_path = ckpt / STATE_FILE
        if not state_path.is_file():
            raise UserError(f"{ckpt}: checkpoint has no {STATE_FILE}; delete the folder or start without --resume.")
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if distributed.is_deepspeed(self.model):
            if not (ckpt / ZERO_DIR).is_dir():
                raise UserError(f"{ckpt}: no DeepSpeed state ({ZERO_DIR}/); it was written without DeepSpeed. Resume with the launcher config that wrote it.")
            # weights, optimizer partitions and the LR schedule, each rank its own shard
            self.model.load_checkpoint(str(ckpt), tag=ZERO_DIR)
        else:
            if state["optimizer"] is None:
                raise UserError(f"{ckpt}: written under DeepSpeed ZeRO; resume it under the same DeepSpeed config.")
            self._load_weights(ckpt)
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state["scheduler"] is not None:
                self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.resumes += 1
        self.extra_state = state.get("extra", {})
        if self.accelerator.is_main_process:
            self.run.metrics.truncate(self.stage, self.step)
        log.info("resumed %s from %s (step %d)", self.stage, ckpt, self.step)
        return True

    def _load_weights(self, ckpt: Path) -> None:
        if hasattr(self.unwrapped, "load_checkpoint"):  # wrappers that save more than one HF model
            try:
                self.unwrapped.load_checkpoint(ckpt)
            except ValueError as e:
                raise UserError(f"{e}. Resume with the config that wrote it.") from None
            return
        if isinstance(self.unwrapped, Adapted):  # LoRA: the checkpoint holds the adapters alone
            try:
                load_adapters(self.unwrapped, ckpt)
            except ValueError as e:
                raise UserError(f"{e}. Resume with the config that wrote it.") from None
            return
        from safetensors.torch import load_file

        if not (ckpt / "model.safetensors").is_file():
            raise UserError(f"{ckpt}: checkpoint has no model.safetensors (one with adapter_model.safetensors was written with model.lora). "
                            "Resume with the config that wrote it.")
        weights = load_file(str(ckpt / "model.safetensors"))
        missing, unexpected = self.unwrapped.load_state_dict(weights, strict=False)
        # Tied weights are saved once (GPT-2's lm_head = wte; Marian's encoder/decoder embed_tokens
        # and lm_head = shared) and Marian's sinusoidal positions not at all (rebuilt at init):
        # checking lm_head alone made every encoder–decoder checkpoint refuse to resume.
        missing = [k for k in missing if not unsaved_key(self.unwrapped, k)]
        if missing or unexpected:
            raise UserError(f"{ckpt}: checkpoint does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]}). Resume with the config that wrote it.")

    def finish(self, final_dir: Path, before_final: Callable[[], None] | None = None) -> Path:
        """Save the last checkpoint and a plain HF model folder (what later stages load; a LoRA
        model's with its adapters merged, and the adapters alone in ``adapter/``).
        ``before_final`` runs between the two (e.g. swapping in averaged weights, so the
        checkpoint keeps the iterate a resume continues from)."""
        # decided on rank 0 and broadcast: every rank must take part in save_checkpoint or none
        if distributed.broadcast_object(self.run.latest_checkpoint(self.stage) != self.run.checkpoint_dir(self.stage, self.step)):
            self.save_checkpoint()
        self.accelerator.wait_for_everyone()
        if before_final is not None:
            before_final()
        state_dict = self.accelerator.get_state_dict(self.model)
        if self.accelerator.is_main_process:
            def write(tmp: Path) -> None:
                save_final(self.unwrapped, tmp, state_dict)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(tmp)

            atomic_dir(final_dir, write)
        self.accelerator.wait_for_everyone()
        return final_dir
