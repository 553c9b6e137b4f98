"""Cross-process helpers for runs under ``accelerate launch`` / ``deepspeed`` (DDP or ZeRO).

Every rank samples its own rollouts and trains on its own shard of the global batch; DDP /
DeepSpeed average the *gradients*. Whatever else needs the whole batch goes through here:

* statistics whose value depends on every rank's data (advantage whitening, the KL the
  adaptive controller sees, logged metrics) are reduced with ``torch.distributed``;
* per-token losses are scaled by :func:`token_share` so that the gradient average over ranks
  equals the gradient of the mean over all tokens of the global batch;
* per-sequence sampling seeds (:class:`RowSampler`) make a rank's rollouts the rows of the
  global batch it owns, bit for bit, whatever the number of processes.

With one process (``torch.distributed`` not initialised) every function returns exactly what
the single-process code computes, so single-process runs are unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from rlhf.advantages import masked_mean, masked_sum, whiten
from rlhf.errors import UserError
from rlhf.rollout import inverse_cdf

log = logging.getLogger("rlhf")


# --------------------------------------------------------------------------- who am I


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes of the job (1 without a process group)."""
    return dist.get_world_size() if _initialised() else 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if _initialised() else 0


def local_device() -> torch.device:
    """The device accelerate will give this process (``cuda:LOCAL_RANK`` where there is CUDA,
    else the CPU), known before the ``Accelerator`` exists: models that are not prepared (the
    frozen prior, a target network) must be put there by hand."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def env_rank() -> int:
    """The global rank the launcher assigned, readable before the process group exists
    (``RANK`` is set by torchrun / ``accelerate launch`` / the ``deepspeed`` launcher)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0: the one process that writes logs, reports and checkpoints."""
    return (rank() if _initialised() else env_rank()) == 0


def barrier() -> None:
    if _initialised():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; for small control values only)."""
    if not _initialised():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard_bounds(n_global: int, what: str = "batch") -> tuple[int, int]:
    """[start, end) of this rank's contiguous share of ``n_global`` rows; ``n_global`` must
    divide evenly (uneven shards would weight ranks unequally in DDP's gradient mean)."""
    w, r = world_size(), rank()
    if n_global % w:
        raise ValueError(f"{what} ({n_global}) must be divisible by the number of processes ({w})")
    n = n_global // w
    return r * n, (r + 1) * n


# --------------------------------------------------------------------------- reductions


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of ``x`` (a new tensor, float64 for float inputs so that the order of
    summation over ranks does not matter at float32 precision); ``x`` itself with one process."""
    if not _initialised():
        return x
    y = x.detach().to(torch.float64 if x.is_floating_point() else x.dtype).clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def all_sum_async(x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Start Σ over ranks of ``x`` (float64) and return a function that waits for it: the
    all-reduce's latency then hides behind whatever runs in between (e.g. a backward pass)."""
    if not _initialised():
        return lambda: x
    y = x.detach().to(torch.float64).clone()
    work = dist.all_reduce(y, op=dist.ReduceOp.SUM, async_op=True)

    def wait() -> torch.Tensor:
        work.wait()
        return y

    return wait


def global_masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the masked entries of every rank: Σ_r Σ x·m / Σ_r Σ m (detached)."""
    if not _initialised():
        return masked_mean(x, mask)
    s = all_sum(torch.stack([masked_sum(x.detach().double(), mask), mask.bool().sum().double()]))
    return (s[0] / s[1].clamp(min=1)).to(x.dtype)


def global_row_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of the per-row values x [B] over the rows of every rank (detached)."""
    if not _initialised():
        return x.mean()
    s = all_sum(torch.stack([x.detach().double().sum(), torch.tensor(float(x.numel()), dtype=torch.float64)]))
    return (s[0] / s[1].clamp(min=1)).to(x.dtype)


def global_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """:func:`rlhf.advantages.whiten` with μ and σ² over the real tokens of *all* ranks:

        μ = Σ_r Σ_t m x / N,   σ² = Σ_r Σ_t m (x − μ)² / N,   N = Σ_r Σ_t m,

    (population variance, two passes as in ``masked_var``). Whitening per rank would give
    every rank its own normalisation, i.e. a different objective for each process count."""
    if not _initialised():
        return whiten(x, mask, shift_mean, eps)
    m = mask.bool()
    xd = x.double()
    s = all_sum(torch.stack([masked_sum(xd, m), m.sum().double()]))
    n = s[1].clamp(min=1)
    mean = s[0] / n
    var = all_sum(masked_sum((xd - mean) ** 2, m)) / n
    out = ((xd - mean) * torch.rsqrt(var + eps)).to(x.dtype)
    if not shift_mean:
        out = out + mean.to(x.dtype)
    return torch.where(m, out, torch.zeros((), dtype=out.dtype, device=out.device))


def token_share(mask: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(scale, n_global) for a per-token mean loss over this rank's ``mask``.

    DDP/ZeRO average gradients over W ranks: ∇ = (1/W) Σ_r ∇L_r. With L_r = (1/n_r) Σ_{t∈r} ℓ_t
    that is not the gradient of the global token mean (1/N) Σ_t ℓ_t unless all n_r are equal;
    scaling L_r by n_r·W/N makes it so: (1/W) Σ_r (n_r W/N)(1/n_r) Σ_{t∈r} ℓ_t = (1/N) Σ_t ℓ_t.
    With one process the scale is 1 (and callers skip the multiplication)."""
    n_local = mask.bool().sum()
    if not _initialised():
        return 1.0, n_local
    n_global = all_sum(n_local)
    return float(n_local) * world_size() / max(float(n_global), 1.0), n_global


def reduce_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Mean over ranks of every numeric metric, in one all-reduce (keys sorted so that every
    rank packs the same vector; every rank must call it with the same keys). Values that are
    already global (identical on all ranks) come back unchanged."""
    if not _initialised():
        return metrics
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    if not keys:
        return metrics
    vec = all_sum(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)) / world_size()
    return {**metrics, **{k: float(v) for k, v in zip(keys, vec.tolist())}}


def checksum(module: torch.nn.Module) -> list[float]:
    """(Σ θ, Σ i·θ_i) over all parameters in float64: equal on all ranks iff (with
    overwhelming probability) the parameters are; the weighted sum catches permutations.
    Under ZeRO-3 the full parameters are gathered first (a collective: call on every rank)."""
    with gathered(module):
        flat = torch.cat([p.detach().double().flatten() for p in module.parameters()])
    return [float(flat.sum()), float((flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum())]


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` with one process)."""
    if not _initialised():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------- rollouts


def row_seeds(seed: int, step: int, rows: Sequence[int]) -> list[int]:
    """One sampling seed per global row index: a function of (seed, step, row) only."""
    return [int(np.random.default_rng([seed, step, int(i)]).integers(2**62)) for i in rows]


class RowSampler:
    """A ``probs_fn`` for :func:`rlhf.rollout.decode` that samples row b at step t by inverse
    CDF with its own uniform u_{b,t} (from ``torch.Generator().manual_seed(seeds[b])``):

        a_{b,t} = min{a : Σ_{a' ≤ a} π(a'|s) > u_{b,t} · Σ_{a'} π(a'|s)},

    and returns the one-hot of that action, so ``decode``'s own draw (which takes one
    random stream for the whole batch, making a row's sample depend on the batch it is in)
    can only pick it. A row's tokens then depend on its seed and its own logits alone: a
    rank sampling rows 32..63 of a global batch of 64 gets the same tokens as one process
    sampling all 64 (up to float differences in the logits of different batch shapes).

    ``base(logits) -> probs`` is the algorithm's own exploration policy (e.g. ε-greedy), else
    softmax(logits masked to ``allowed`` / temperature), what ``decode`` samples by default.
    """

    def __init__(self, seeds: Sequence[int], n_new: int, *, allowed: torch.Tensor | None, temperature: float = 1.0,
                 base: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if temperature <= 0:
            raise ValueError("RowSampler needs temperature > 0 (greedy decoding needs no seeds)")
        self.u = torch.stack([torch.rand(n_new, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64) for s in seeds])  # [B, n_new]
        self.blocked = None if allowed is None else ~allowed
        self.temperature, self.base, self.t = temperature, base, 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        if self.base is not None:
            return self.base(logits)
        if self.blocked is not None:
            logits = logits.masked_fill(self.blocked, float("-inf"))
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return torch.softmax(logits, dim=-1)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        probs = self.probs(logits)  # [B, V]
        idx = inverse_cdf(probs, self.u[:, self.t].to(probs.device))  # [B, 1]
        self.t += 1
        return torch.zeros_like(probs, dtype=logits.dtype).scatter_(-1, idx, 1.0)


# --------------------------------------------------------------------------- DeepSpeed


def is_deepspeed(model: Any) -> bool:
    """True for a DeepSpeed engine (what ``accelerator.prepare`` returns under ZeRO)."""
    return type(model).__name__ == "DeepSpeedEngine"


def zero_stage(model: Any) -> int:
    """The ZeRO stage of a DeepSpeed engine, 0 for anything else."""
    return int(model.zero_optimization_stage()) if is_deepspeed(model) else 0


@contextlib.contextmanager
def gathered(module: torch.nn.Module, modifier_rank: int | None = None) -> Iterator[None]:
    """Full parameters of ``module`` inside the block under ZeRO-3 (partitioned parameters
    carry ``ds_id``); a no-op otherwise. A collective: every rank must enter it."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def plain_model_loading(accelerator: Any) -> None:
    """Let ``from_pretrained`` build ordinary, full models again after a DeepSpeed engine exists.

    accelerate registers its DeepSpeed config with transformers; under ZeRO-3 every model
    loaded afterwards is then partitioned at construction (``deepspeed.zero.Init``) even with
    ``zero3_init_flag: false``, including the frozen prior, the next stage's model and the
    evaluation models, none of which go through a DeepSpeed engine: their forward would see
    empty weights. With ``zero3_init_flag: true`` (models too large for one host) nothing is
    undone, and such models must be loaded before the accelerator or prepared themselves."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.zero3_init_flag:
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


@contextlib.contextmanager
def generation(model: Any) -> Iterator[None]:
    """Context for sampling from the raw policy module while it is being trained.

    Under ZeRO-3 each forward all-gathers the layers it runs, so ranks whose rollouts stop
    after different numbers of steps (EOS, other lengths) would wait on each other forever;
    TRL's ``unwrap_model_for_generation`` gathers all parameters once and takes ZeRO's hooks
    off for the block (done here the same way, with TRL's hook helpers, since TRL's context
    expects a transformers model and ours may be a wrapper such as ``PolicyWithValue``).
    ZeRO-1/2 and DDP keep full parameters on every rank: nothing to do."""
    if zero_stage(model) != 3:
        yield
        return
    import deepspeed
    from trl.models.utils import add_hooks, remove_hooks

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        remove_hooks(model)
        try:
            yield
        finally:
            add_hooks(model)


class Forward:
    """What the training forward pass goes through: the prepared (DDP / DeepSpeed) model, so
    that gradients are synchronised, seen by ``rlhf.rollout.sequence_forward`` with the
    signature of the module inside (so it still passes ``logits_to_keep`` and skips the LM
    head on the prompt). With one process ``loop.model`` is the module itself."""

    def __init__(self, prepared: torch.nn.Module, module: torch.nn.Module):
        self.prepared = prepared
        self.forward = module.forward  # signature only
        self.config = getattr(module, "config", None)

    def __call__(self, *args, **kwargs):
        return self.prepared(*args, **kwargs)

    def parameters(self, recurse: bool = True):
        return self.prepared.parameters(recurse)


def training_forward(loop: Any, module: torch.nn.Module) -> Any:
    """``module`` itself when ``loop.model`` is that module (one process), else a
    :class:`Forward` through the prepared wrapper around it."""
    return module if loop.model is module else Forward(loop.model, module)


# --------------------------------------------------------------------------- accelerator


def make_accelerator(mixed_precision: str | None = None):
    """The ``Accelerator`` for this process: CPU (gloo) without CUDA, DeepSpeed when launched
    with a DeepSpeed config (``ACCELERATE_USE_DEEPSPEED=true``, set by ``accelerate launch``
    with a DeepSpeed config or by ``rlhf launch --launcher deepspeed``).

    accelerate only starts DeepSpeed with ``cpu=False``, and on a host without an accelerator
    its backend probe finds nothing (so it would silently run one process per rank): name the
    gloo backend there. On GPUs this is the plain ``Accelerator()`` (NCCL).

    ``mixed_precision`` (no, bf16, fp16; None = the launcher's setting) is accelerate's: the
    prepared model's forward and :meth:`TrainLoop.autocast` run under autocast."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    # resolved here rather than left to accelerate, which would keep a previous run's setting
    mixed_precision = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mixed_precision == "fp16" and not cuda:
        raise UserError("mixed_precision: fp16 needs a GPU (CPU autocast and its gradient scaling are bf16 only); use bf16 or no")
    state = AcceleratorState._shared_state
    if state.get("_mixed_precision") not in (None, mixed_precision) and world_size() == 1:
        # a second run in the same process (a notebook, the test suite) with another precision:
        # accelerate keeps one global state and refuses to change it, so start it afresh
        AcceleratorState._reset_state()
    # TrainLoop steps the LR schedule once per optimizer step itself. accelerate's default steps
    # it num_processes times per step, assuming per-process batches (our batches are global).
    kw: dict[str, Any] = {"step_scheduler_with_optimizer": False, "mixed_precision": mixed_precision}
    if not cuda and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return Accelerator(cpu=False, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")], **kw)
    return Accelerator(cpu=not cuda, **kw)


def quiet_other_ranks(log_root: Any) -> None:
    """On ranks other than 0: no INFO console lines and no file handlers into the run folder
    (rank 0 writes ``run.log``; the others would repeat every line)."""
    if is_main_process():
        return
    log.setLevel(max(log.level, logging.WARNING))
    root = str(os.path.abspath(str(log_root)))
    for h in list(log.handlers):
        if str(getattr(h, "baseFilename", "")).startswith(root):
            log.removeHandler(h)
            h.close()
