"""Policy wrappers over Hugging Face causal LMs: a policy with a value head (PPO).

The prior is a plain causal LM loaded from its folder, put in eval mode with gradients off
(:func:`frozen`); the policy starts as a copy of it. With ``model.lora`` the policy is the
prior's weights wearing adapters and the prior those weights with the adapters off
(:class:`rlhf.lora.AdaptersOff`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from rlhf.lora import Adapted, load_adapters, save_final
from rlhf.models import unsaved_key
from rlhf.rollout import sequence_forward

VALUE_HEAD_FILE = "value_head.safetensors"


def frozen(model: PreTrainedModel) -> PreTrainedModel:
    """Eval mode, no gradients: the prior is never updated."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class PolicyWithValue(nn.Module):
    """A causal LM and a scalar value head on its last hidden state. Saved as the LM's own HF
    folder plus ``value_head.safetensors``.

    ``shared_trunk=False`` (the default) stops the value loss's gradient at the head: with a
    shared trunk (Ziegler et al. 2019) the value loss, whose scale is the squared return, can
    dominate the clipped gradient and drag the policy away from the prior without raising the
    reward (seen here on the counterpoint rules)."""

    def __init__(self, lm: PreTrainedModel, shared_trunk: bool = False):
        super().__init__()
        self.lm = lm
        self.shared_trunk = shared_trunk
        hidden = lm.config.hidden_size if hasattr(lm.config, "hidden_size") else lm.config.n_embd
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: no spurious early advantages
        nn.init.zeros_(self.value_head.bias)

    def forward(self, prompts: torch.Tensor, prompt_mask: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, V] predicting each completion token and values V(s_t) [B, T]."""
        logits, hidden = sequence_forward(self.lm, prompts, prompt_mask, tokens, hidden=True)
        return logits, self.value_head(hidden if self.shared_trunk else hidden.detach()).squeeze(-1)

    @staticmethod
    def _split(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(the LM's entries, the value head's) of this module's state dict, prefixes dropped."""
        lm_state = {k[len("lm."):]: v for k, v in state_dict.items() if k.startswith("lm.")}
        head = {k[len("value_head."):]: v.contiguous() for k, v in state_dict.items() if k.startswith("value_head.")}
        return lm_state, head

    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None, **kw) -> None:
        lm_state, head = self._split(state_dict if state_dict is not None else self.state_dict())
        self.lm.save_pretrained(path, state_dict=lm_state, **kw)  # a LoRA LM: its adapters alone
        save_file(head, str(Path(path) / VALUE_HEAD_FILE))

    def save_final(self, path: Path, state_dict: dict[str, torch.Tensor]) -> None:
        """The final folder: the LM's (a LoRA LM's merged weights and adapter/) and the value head."""
        lm_state, head = self._split(state_dict)
        save_final(self.lm, Path(path), lm_state)
        save_file(head, str(Path(path) / VALUE_HEAD_FILE))

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore weights written by :meth:`save_pretrained` (used by ``--resume``)."""
        if isinstance(self.lm, Adapted):
            load_adapters(self.lm, Path(path))
        else:
            weights = load_file(str(Path(path) / "model.safetensors"))
            missing, unexpected = self.lm.load_state_dict(weights, strict=False)
            if [k for k in missing if not unsaved_key(self.lm, k)] or unexpected:
                raise ValueError(f"{path}: checkpoint does not fit the policy (missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.value_head.load_state_dict(load_file(str(Path(path) / VALUE_HEAD_FILE)))
