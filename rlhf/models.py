"""Build or load the Hugging Face models used as prior and policy: causal LMs (GPT-2, Llama)
and encoder–decoder models (Marian; any ``AutoModelForSeq2SeqLM`` folder: T5, BART, OPUS-MT).

No weights are ever downloaded: a model is either built from this config (tiny, trained
here) or loaded from a local folder written by ``save_pretrained``.  Users with hub access
can pass a hub id as ``path``; it is handed to ``from_pretrained`` unchanged.

A task can bring its own architecture (:data:`ARCHITECTURES`, ``model.arch`` of a run config
and ``backbone:`` of a reward config): a function (model config, tokenizer) → Hugging Face
config, whose module registers its model classes with transformers' ``Auto*`` classes. Its name
is the config's ``model_type``, so a saved folder of that type finds its module again
(:func:`ensure_model_type`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import torch
from pydantic import Field, model_validator
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, GPT2Config, LlamaConfig, MarianConfig, PreTrainedModel, PreTrainedTokenizerBase

from rlhf.config import Section
from rlhf.errors import UserError
from rlhf.lora import LoraSettings
from rlhf.registry import Registry

BUILT_IN_ARCHS = ("gpt2", "llama", "marian")
ARCHITECTURES: Registry = Registry("model architecture", "rlhf.architectures")
"""Architecture name (= its ``model_type``) -> function (ModelConfig, tokenizer) -> PretrainedConfig;
the built-in ``counterpoint_columns`` is an entry point (``tasks/counterpoint/columns.py``)."""


def ensure_model_type(model_type: str | None) -> None:
    """Import the module of a registered architecture, so that transformers can build
    ``model_type`` (a no-op for transformers' own types)."""
    from transformers import CONFIG_MAPPING

    if model_type and model_type not in CONFIG_MAPPING and model_type in ARCHITECTURES:
        ARCHITECTURES.get(model_type)


def folder_model_type(path: str | Path) -> str | None:
    """The ``model_type`` in a saved model folder's config.json (None if it has none)."""
    p = Path(path) / "config.json"
    try:
        cfg = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{p}: not readable as JSON ({e}); point the model path at a folder written by save_pretrained.") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{p}: expected a JSON object (a model config), got {type(cfg).__name__}; point the model path at a folder written by save_pretrained.")
    model_type = cfg.get("model_type")
    return model_type if isinstance(model_type, str) else None


class ModelConfig(Section):
    arch: str = Field(
        "gpt2", description="Architecture of a model built from config: gpt2 or llama (decoder-only: the prompt is a prefix) or marian "
        "(encoder–decoder: the encoder reads the prompt, the decoder writes the completion; post-layer-norm, sinusoidal positions, "
        "tied embeddings), or a task's registered architecture (entry-point group rlhf.architectures), e.g. counterpoint_columns "
        "(GPT-2 that also embeds each note's two voices and what the next note is judged against).")
    n_layer: int = Field(4, ge=1, le=48, description="Transformer blocks (marian: this many in the encoder and in the decoder).")
    n_embd: int = Field(128, ge=8, le=8192, description="Hidden width; must be divisible by n_head.")
    n_head: int = Field(4, ge=1, le=128, description="Attention heads.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on embeddings, attention and residuals.")
    max_positions: int = Field(128, ge=8, le=65536, description="Longest sequence in tokens (decoder-only: prompt + completion; marian: each of them).")
    path: str | None = Field(
        None, description="Load a pre-trained model from this folder (or hub id) instead of building one: a causal LM or an "
        "encoder–decoder (AutoModelForSeq2SeqLM), told apart by its config.json."
    )
    lora: LoraSettings | None = Field(
        None, description="Train LoRA adapters instead of every weight (rlhf/lora.py): the policy in rlhf tune and rlhf run's tuning stage, "
        "with the frozen prior the same weights with the adapters off (one copy in memory), and reward models on a pre-trained backbone "
        "(model.path). Pre-training still trains every weight. A tuned model's folder holds the merged weights (what every later stage "
        "loads) and the adapters alone in adapter/. null = full fine-tuning; {} = LoRA with the defaults below.",
    )

    @model_validator(mode="after")
    def _known_arch(self) -> "ModelConfig":
        if self.arch not in BUILT_IN_ARCHS and self.arch not in ARCHITECTURES:
            raise ValueError(f"model.arch {self.arch!r} is unknown; use one of {', '.join([*BUILT_IN_ARCHS, *ARCHITECTURES.names()])}")
        return self

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelConfig":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); e.g. n_embd=128, n_head=4")
        return self


def is_seq2seq(model: PreTrainedModel) -> bool:
    """Whether ``model`` is an encoder–decoder (the prompt goes to its encoder)."""
    return bool(getattr(model.config, "is_encoder_decoder", False))


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A freshly initialised model sized by ``cfg`` with the tokenizer's vocabulary."""
    if cfg.path is not None:
        return load_model(cfg.path)
    vocab = len(tokenizer)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if cfg.arch not in BUILT_IN_ARCHS:
        config = ARCHITECTURES.get(cfg.arch)(cfg, tokenizer)
    elif cfg.arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_positions=cfg.max_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, **ids,
        )
    elif cfg.arch == "marian":
        # The decoder starts from <bos> (Marian's own checkpoints start from <pad>; any id works
        # as long as training and decoding agree, and both read it from the config).
        # Initialisation as in fairseq / Marian: weights N(0, d^-1/2) and token embeddings scaled
        # by √d, so tokens weigh as much as the unit-size sinusoidal positions. transformers'
        # default (std 0.02, no scaling) drowns the tokens in the positions: such a model
        # learned only the target's unigram statistics in 600 steps of a copy task.
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
        config = MarianConfig(
            vocab_size=vocab, d_model=cfg.n_embd, encoder_layers=cfg.n_layer, decoder_layers=cfg.n_layer,
            encoder_attention_heads=cfg.n_head, decoder_attention_heads=cfg.n_head, encoder_ffn_dim=4 * cfg.n_embd,
            decoder_ffn_dim=4 * cfg.n_embd, max_position_embeddings=cfg.max_positions, dropout=cfg.dropout,
            attention_dropout=cfg.dropout, activation_dropout=0.0, decoder_start_token_id=start, forced_eos_token_id=None,
            share_encoder_decoder_embeddings=True, tie_word_embeddings=True, scale_embedding=True,
            init_std=cfg.n_embd**-0.5, **ids,
        )
        return AutoModelForSeq2SeqLM.from_config(config)
    else:
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=cfg.n_embd, intermediate_size=4 * cfg.n_embd, num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head, max_position_embeddings=cfg.max_positions, attention_dropout=cfg.dropout, **ids,
        )
    return AutoModelForCausalLM.from_config(config)


def rebuilt_key(model: PreTrainedModel, key: str) -> bool:
    """Whether ``key`` is a weight the model rebuilds at init, so ``save_pretrained`` leaves it
    out (``_keys_to_ignore_on_save``: e.g. Marian's sinusoidal positions)."""
    return any(re.search(p, key) for p in getattr(model, "_keys_to_ignore_on_save", None) or [])


def unsaved_key(model: PreTrainedModel, key: str) -> bool:
    """Whether ``save_pretrained`` leaves ``key`` out: a tied weight (saved once, under the key it
    is tied to) or one the model rebuilds itself."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing_ok = getattr(model, "_keys_to_ignore_on_load_missing", None) or []
    return key in tied or key.endswith("lm_head.weight") or rebuilt_key(model, key) or any(re.search(p, key) for p in missing_ok)


def freeze_unsaved(model: PreTrainedModel) -> PreTrainedModel:
    """Freeze the parameters ``save_pretrained`` leaves out (``_keys_to_ignore_on_save``:
    Marian's sinusoidal positions, rebuilt at init). A freshly built Marian has them frozen,
    but transformers 5's ``from_pretrained`` hands them back trainable, so a policy loaded from
    its prior trained them, and every checkpoint and the final model lost those updates: a
    resumed run (and any reload of the tuned model) ran on other positions than it trained with."""
    for name, p in model.named_parameters():
        if rebuilt_key(model, name):
            p.requires_grad_(False)
    return model


_LAYER_KEYS = ("n_layer", "num_hidden_layers", "num_layers", "encoder_layers", "decoder_layers")


def check_layer_count(folder: Path) -> None:
    """UserError when ``config.json`` declares a number of layers the weights do not hold: the
    missing layers would be initialised at random without a word (or, by the million, exhaust the
    memory before transformers checks anything). Reads only the safetensors headers."""
    cfg_path = folder / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return  # unreadable: transformers says so
    files = sorted(folder.glob("*.safetensors"))
    if not isinstance(cfg, dict) or not files:
        return
    stored: dict[str, int] = {}  # layer stack (e.g. transformer.h, model.encoder.layers) -> layers in the weights
    for f in files:
        with safe_open(str(f), framework="pt") as weights:
            for name in weights.keys():
                if m := re.match(r"(.*?\.(?:h|layers|layer|blocks?))\.(\d+)\.", name):
                    stored[m.group(1)] = max(stored.get(m.group(1), 0), int(m.group(2)) + 1)
    for key in _LAYER_KEYS if stored else ():
        v = cfg.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v not in stored.values():
            held = ", ".join(f"{n} in {stack}" for stack, n in sorted(stored.items()))
            raise UserError(f"{cfg_path}: {key} is {v}, but the weights hold {held}; the config and the weights do not belong together. "
                            "Copy the model folder again, or retrain it.")


def load_model(path: str | Path) -> PreTrainedModel:
    p = Path(path)
    if p.exists() and not (p / "config.json").is_file():
        raise UserError(f"{p}: not a model folder (no config.json). Point --model at a folder written by save_pretrained, e.g. runs/counterpoint/models/prior.")
    if not p.exists() and (str(path).startswith((".", "/")) or p.suffix):
        raise UserError(f"{p}: model folder not found. Run `rlhf pretrain` first or fix the path.")
    if p.exists():
        ensure_model_type(folder_model_type(p))
    try:
        if p.is_dir():
            check_layer_count(p)
        seq2seq = bool(getattr(AutoConfig.from_pretrained(str(path)), "is_encoder_decoder", False))
        return freeze_unsaved((AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(str(path)))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: could not load a causal LM or an encoder-decoder model ({e}).") from None
    except SafetensorError as e:  # a truncated, empty or foreign model.safetensors
        raise UserError(f"{p / 'model.safetensors'}: the weights file is damaged ({e}); copy the model folder again, or retrain it "
                        "(a run resumes from its last checkpoint with --resume).") from None
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001  a damaged config.json: transformers raises TypeError, KeyError, RuntimeError (weights of another shape), ...
        detail = " ".join(str(e).split())
        if "ignore_mismatched_sizes" in detail:  # transformers 5 put the useful part in a log report
            detail = "the weights have other shapes than it gives (e.g. n_embd, vocab_size, n_positions)"
        raise UserError(f"{p / 'config.json' if p.exists() else path}: cannot load the model it describes ({type(e).__name__}: "
                        f"{detail[:300]}{'...' if len(detail) > 300 else ''}); copy the model folder again, or retrain it.") from None


def special_layout(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the special tokens ``tokenizer`` puts around a text of its own accord,
    found by encoding a probe with and without them: ``([], [</s>])`` for OPUS-MT's Marian,
    ``([<s>], [</s>])`` for BART, ``([<s>], [])`` for LLaMA, ``([], [])`` for GPT-2."""
    probe = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(probe) + 1):
        if full[i : i + len(probe)] == probe:
            return [int(t) for t in full[:i]], [int(t) for t in full[i + len(probe):]]
    return [], []  # a tokenizer that changes the text itself when adding tokens: no layout of its own assumed


def encode_batch(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], *, target: bool = False) -> list[list[int]]:
    """Token ids of each text, no special tokens added (a literal "</s>" in a text is text);
    ``target``: encoded as targets (``text_target``: a Marian tokenizer's target vocabulary)."""
    if not texts:
        return []
    kw = {"text_target" if target else "text": list(texts)}
    return tokenizer(**kw, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def action_mask(tokenizer: PreTrainedTokenizerBase, vocab: int, eos_id: int) -> torch.Tensor:
    """[vocab] bool: every id the tokenizer has but its special tokens other than eos (the model
    may have more rows than the tokenizer has tokens: those are never allowed)."""
    mask = torch.ones(vocab, dtype=torch.bool)
    mask[len(tokenizer):] = False
    for i in tokenizer.all_special_ids:
        if i is not None and i != eos_id and i < vocab:
            mask[i] = False
    return mask


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
