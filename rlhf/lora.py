"""LoRA adapters (Hu et al. 2021, through ``peft``) for the policy and the reward models, and
the frozen prior as the policy's own weights with its adapters switched off (as TRL does), so
one copy of the base weights is in memory.

* :func:`with_lora` wraps a model in a ``PeftModel``: fresh adapters (B = 0, so the outputs are
  unchanged until the first step) on its linear layers, every other weight frozen in place.
* :class:`AdaptersOff` is the prior of a LoRA tune: the same modules run under peft's
  ``disable_adapter()``, in eval mode, without gradients.
* Checkpoints hold the adapters alone (peft's ``save_pretrained``; :func:`load_adapters`
  restores them on resume). A final model folder (:func:`save_final`) is a plain Hugging Face
  folder with the adapters merged (W + (α/r)·B·A), which every later stage loads with
  ``load_model`` unchanged, plus the adapters alone in ``adapter/``, which
  ``PeftModel.from_pretrained(base, folder / "adapter")`` puts back on the base model.

``peft`` is imported only where it is used: a run without ``model.lora`` does not load it.
"""

from __future__ import annotations

import warnings
from collections import Counter
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import torch
from pydantic import Field, field_validator

from rlhf.config import Section
from rlhf.errors import UserError

ADAPTER_DIR = "adapter"  # models/<name>/adapter/: the adapters alone, as peft's save_pretrained writes them
ADAPTER_FILE = "adapter_model.safetensors"
FALLBACK_TARGETS = (["c_attn"], ["q_proj", "v_proj"])
"""Tried in turn when peft knows no default for a model_type (a task's GPT-2, Marian): the first
whose layers all exist is adapted."""


class LoraSettings(Section):
    r: int = Field(8, ge=1, le=4096, description="LoRA (model.lora: null = off, full fine-tuning; {} = on with these defaults): rank of each "
                   "adapter; the update of a weight W [out, in] is (alpha/r)·B·A with A [r, in] and B [out, r], r·(in + out) trainable "
                   "numbers per adapted matrix.")
    alpha: float = Field(16.0, gt=0, description="Scale of the update, (alpha/r)·B·A (peft's lora_alpha); with alpha/r fixed a different r "
                         "keeps the update's size.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on each adapter's input while training in train mode (reward models); the RL "
                           "policy runs in eval mode (no dropout noise in its ratios), so it has no effect on tuning.")
    target_modules: list[str] | None = Field(
        None, description="Layers to adapt, by name or name suffix, e.g. [c_attn] (GPT-2) or [q_proj, v_proj]; null = peft's default for the "
        "architecture (GPT-2: c_attn; Llama: q_proj, v_proj), else c_attn or q_proj + v_proj, whichever the model has (a task's GPT-2, Marian).")

    @field_validator("target_modules")
    @classmethod
    def _some(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("an empty list adapts nothing; name the layers to adapt (e.g. [c_attn]) or set null for the architecture's default")
        return v


@runtime_checkable
class Adapted(Protocol):
    """A model wearing adapters over frozen base weights (peft's ``PeftModel``)."""

    def get_base_model(self) -> torch.nn.Module: ...

    def disable_adapter(self) -> AbstractContextManager[None]: ...


@runtime_checkable
class SavesFinal(Protocol):
    """A wrapper that lays out its own final folder (``PolicyWithValue``: its LM's, plus the value head)."""

    def save_final(self, path: Path, state_dict: dict[str, torch.Tensor]) -> None: ...


def _matches(name: str, target: str) -> bool:
    """peft's rule: a target names a module by its full name or a dotted suffix of it."""
    return name == target or name.endswith("." + target)


def _linear_names(model: torch.nn.Module) -> list[str]:
    """The distinct last name components of the model's linear layers (what a target can name)."""
    from transformers.pytorch_utils import Conv1D

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))})


def target_modules(model: torch.nn.Module, settings: LoraSettings) -> list[str]:
    """The layer names to adapt: ``settings.target_modules`` (each must match a layer), else
    peft's default for the model_type, else the first of :data:`FALLBACK_TARGETS` the model has."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    names = [n for n, _ in model.named_modules()]
    found = lambda t: any(_matches(n, t) for n in names)  # noqa: E731
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if settings.target_modules is not None:
        missing = [t for t in settings.target_modules if not found(t)]
        if missing:
            raise UserError(f"model.lora.target_modules: {missing} name no layer of this {model_type} model; its linear layers are "
                            f"{_linear_names(model)}")
        return list(settings.target_modules)
    for candidate in (DEFAULTS.get(model_type), *FALLBACK_TARGETS):
        if candidate and all(found(t) for t in candidate):
            return list(candidate)
    raise UserError(f"model.lora.target_modules: no default for a {model_type} model; name the layers to adapt, from its linear layers "
                    f"{_linear_names(model)}")


def _refuse_tied(model: torch.nn.Module, adapted: dict[str, torch.nn.Module]) -> None:
    """A layer whose weight is tied to another (GPT-2's lm_head = wte) cannot be adapted: the
    merged folder saves the tied weight once, so the update would be lost."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    tied = [n for n, m in adapted.items() if any(uses[id(p)] > 1 for p in m.parameters(recurse=False))]
    if tied:
        raise UserError(f"model.lora.target_modules: {tied[:3]} share their weight with another layer (tied embeddings), which a merged "
                        "model could not hold; adapt other layers")


def with_lora(model: torch.nn.Module, settings: LoraSettings, task_type: str | None = "lm", modules_to_save: list[str] | None = None) -> Adapted:
    """``model`` wearing fresh LoRA adapters, its own weights frozen in place (not copied).

    ``task_type``: "lm" (the policy: peft's CAUSAL_LM or SEQ_2_SEQ_LM, read from the config),
    a peft task type (SEQ_CLS also trains the new classification head whole, and checkpoints
    keep it), or None for a model of our own (its forward is passed any arguments);
    ``modules_to_save``: modules trained and saved whole (a model's freshly built heads)."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    if task_type == "lm":
        task_type = "SEQ_2_SEQ_LM" if getattr(model.config, "is_encoder_decoder", False) else "CAUSAL_LM"
    targets = target_modules(model, settings)
    adapted = {n: m for n, m in model.named_modules() if any(_matches(n, t) for t in targets)}  # not empty: target_modules checked
    _refuse_tied(model, adapted)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets,
                        # GPT-2's Conv1D stores W as [in, out]: peft must transpose B·A for it (and says so in a warning if not told)
                        fan_in_fan_out=all(isinstance(m, Conv1D) for m in adapted.values()),
                        task_type=task_type, modules_to_save=modules_to_save)
    with warnings.catch_warnings():  # peft asks transformers 5 a deprecated question; nothing a user can act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def adapter_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the adapters (peft names them ``lora_*``)."""
    return ((n, p) for n, p in model.named_parameters() if "lora_" in n)


class AdaptersOff(torch.nn.Module):
    """The frozen prior of a LoRA tune: ``model``'s (or its ``module``'s, e.g. the encoder) forward
    with the adapters off, in eval mode, without gradients: the base weights, which never train.

    ``model`` is held outside the module tree, so neither ``state_dict`` nor ``.to()`` sees a
    second copy; :meth:`parameters` yields the base weights (the policy's own tensors). What the
    rollout and scoring code reads of a prior is here: ``config``, the forward with a KV cache,
    ``get_encoder`` (encoder–decoders), ``generate`` and ``get_base_model`` (whose forward's
    signature says which keywords pass through)."""

    def __init__(self, model: Adapted, module: Callable[..., Any] | None = None):
        super().__init__()
        object.__setattr__(self, "_model", model)  # not a submodule (see above)
        object.__setattr__(self, "_module", module if module is not None else model)
        self.eval()

    @property
    def config(self) -> Any:
        return self._model.config

    def get_base_model(self) -> torch.nn.Module:
        return self._model.get_base_model()

    def get_encoder(self) -> "AdaptersOff":
        return AdaptersOff(self._model, self._model.get_encoder())

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return ((prefix + n, p) for n, p in self._model.named_parameters(remove_duplicate=remove_duplicate) if "lora_" not in n)

    def _off(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        model = self._model
        was_training = model.training
        if was_training:  # no dropout in the prior, whatever mode the policy is in
            model.eval()
        try:
            with torch.no_grad(), model.disable_adapter():
                return fn(*args, **kwargs)
        finally:
            if was_training:
                model.train()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._off(self._module, *args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._off(self._model.generate, *args, **kwargs)


def merged_state_dict(model: Adapted) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter folded into the weight it adapts,
    W + (α/r)·B·A (peft's own ``get_delta_weight``), and every ``modules_to_save`` copy in place
    of its original; keys as the base model's ``save_pretrained`` writes them. Computed beside
    the live weights, which stay as they are (the prior runs on them)."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    adapter = model.active_adapter
    with torch.no_grad():
        deltas = {f"{name}.base_layer.weight": m.get_delta_weight(adapter) for name, m in base.named_modules()
                  if isinstance(m, LoraLayer) and adapter in m.lora_A}
        out = {}
        for key, value in base.state_dict().items():
            if "lora_" in key or ".original_module." in key:  # the adapters themselves; a head's frozen original
                continue
            if key in deltas:
                value = value + deltas[key]
            out[key.replace(".base_layer.", ".").replace(f".modules_to_save.{adapter}.", ".")] = value
    return out


def save_merged(model: Adapted, path: Path) -> None:
    """A plain Hugging Face folder of ``model`` with its adapters merged (what ``load_model`` /
    ``from_pretrained`` read), and the adapters alone in ``path / ADAPTER_DIR``."""
    model.get_base_model().save_pretrained(path, state_dict=merged_state_dict(model), safe_serialization=True)
    # save_embedding_layers=False: peft would otherwise look up the base model's config (on the hub if the path is not local)
    model.save_pretrained(str(path / ADAPTER_DIR), save_embedding_layers=False)


def save_final(model: Any, path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """Write the final model folder of a training stage, what later stages load: a wrapper's
    own layout (:class:`SavesFinal`), a LoRA model's merged folder (:func:`save_merged`), else
    ``save_pretrained`` of ``state_dict``."""
    if isinstance(model, SavesFinal):
        model.save_final(path, state_dict)
    elif isinstance(model, Adapted):
        save_merged(model, path)
    else:
        model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)


def load_adapters(model: Adapted, folder: Path) -> None:
    """Restore the adapters (and ``modules_to_save``) that peft's ``save_pretrained`` wrote into
    ``folder`` (a checkpoint); the base weights are the prior's and never change. Raises
    ValueError when the folder holds none, or adapters of another shape or other layers."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    file = Path(folder) / ADAPTER_FILE
    if not file.is_file():
        raise ValueError(f"{folder}: checkpoint holds no adapters ({ADAPTER_FILE}): it was written without model.lora")
    adapter = model.active_adapter
    try:
        result = set_peft_model_state_dict(model, load_file(str(file)), adapter_name=adapter)
    except (KeyError, RuntimeError) as e:  # a head missing; adapters of another rank
        raise ValueError(f"{folder}: the checkpoint's adapters do not fit the model ({str(e)[:200]})") from None
    missing = [k for k in result.missing_keys if f".{adapter}." in k]  # the base weights are not in the file, by design
    if missing or result.unexpected_keys:
        raise ValueError(f"{folder}: the checkpoint's adapters do not fit the model (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
