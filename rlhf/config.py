"""Typed configs loaded from YAML with ``key=value`` overrides, and errors a user can act on.

Every config is a pydantic model derived from :class:`Section` (unknown keys are refused).
Each field is documented once, in its ``Field(description=...)``; ``rlhf config-help``
and the docs print those descriptions.  A bad value fails at load time with the file, the
line, the dotted key, what was wrong and the allowed values, e.g.::

    configs/counterpoint.yaml:12: pretrain.lr: Input should be greater than 0 (got -1.0).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rlhf.errors import UserError

T = TypeVar("T", bound=BaseModel)


class Section(BaseModel):
    """Base of every config section: strict about unknown keys, validates on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# The settings every training loop shares (MLE pre-training, Bradley-Terry, VPL, RL tuning),
# documented here once; each loop's section gives only its own default, e.g.
# ``steps: Steps = 3000``. (``batch_size`` counts different things per loop and stays local.)
Steps = Annotated[int, Field(ge=1, description="Training steps: optimizer steps (MLE, BT, VPL) or iterations of rollout + update (RL).")]
LearningRate = Annotated[float, Field(gt=0, le=1, description="Learning rate: the peak of AdamW's linear warm-up and cosine decay (MLE, BT, VPL); constant Adam in RL unless tune.lr_schedule says otherwise.")]
WeightDecay = Annotated[float, Field(ge=0, description="AdamW weight decay.")]
WarmupSteps = Annotated[int, Field(ge=0, description="Linear learning-rate warm-up steps.")]
GradClip = Annotated[float, Field(gt=0, description="Clip the global gradient norm to this value.")]
EvalEvery = Annotated[int, Field(ge=1, description="Held-out metrics every this many steps.")]
CheckpointEvery = Annotated[int, Field(ge=1, description="Write a resumable checkpoint every this many steps (RL: iterations).")]
KeepCheckpoints = Annotated[int, Field(ge=1, description="How many of the newest checkpoints to keep.")]
EMADecay = Annotated[float | None, Field(gt=0, lt=1, description="Keep an exponential moving average of the weights with this decay and save it as the final model (Polyak averaging); null = off.")]


Tracker = Literal["tensorboard", "wandb", "mlflow"]
_TRACKER_MODULE = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


class RunSettings(Section):
    """What every command that writes a run folder shares (``rlhf run``, ``tune``, ``evaluate``,
    ``train-reward``, ``personalise``): where its metrics go besides ``metrics.jsonl``, and the
    precision of training."""

    log_with: list[Tracker] = Field(
        default_factory=list,
        description="Experiment trackers that receive every row of metrics.jsonl, through accelerate's trackers: tensorboard (event "
        "files in <run_dir>/tracking/<stage>), wandb, mlflow (where installed). [] = metrics.jsonl only.",
    )
    mixed_precision: Literal["no", "bf16", "fp16"] | None = Field(
        None,
        description="Training forwards under autocast in this precision (weights and optimizer stay float32), through accelerate: bf16 on "
        "CPUs and GPUs that support it, fp16 on GPUs only. null = what the launcher says (accelerate launch --mixed_precision), else no.",
    )

    @field_validator("log_with")
    @classmethod
    def _installed(cls, names: list[str]) -> list[str]:
        import importlib.util

        for name in names:
            if importlib.util.find_spec(_TRACKER_MODULE[name]) is None:
                raise ValueError(f"tracker {name} is not installed; pip install {name}, or remove it from log_with")
        if len(set(names)) != len(names):
            raise ValueError(f"a tracker is named twice in {names}")
        return names


class TaskConfig(Section):
    """Base of a task's ``task:`` section."""

    name: str = Field(..., description="The task: a registered name (counterpoint, translation, text) or an import path 'package.module:Class'.")

    def check_run(self, run: Any) -> None:
        """Raise ValueError (cause and fix) when the rest of the run config does not fit this
        task (e.g. ``model.max_positions`` shorter than the task's sequences)."""


def _key_lines(text: str, source: str = "config") -> dict[tuple[str, ...], int]:
    """Map each dotted key path of a YAML document to its 1-based line number. A key given
    twice in one mapping is a UserError: YAML loaders silently keep the last one, which would
    drop a whole section without a word."""
    lines: dict[tuple[str, ...], int] = {}
    seen: set[int] = set()  # nodes already walked: an alias (*a) repeats its anchor's node, and may contain it

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = (*path, str(k.value))
                if key in lines:
                    raise UserError(f"{source}:{k.start_mark.line + 1}: {'.'.join(key)}: given twice (first at line {lines[key]}); "
                                    "YAML would keep only the last. Merge the two into one.")
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[(*path, str(i))] = v.start_mark.line + 1
                walk(v, (*path, str(i)))
        elif isinstance(node, yaml.ScalarNode) and re.search("[\ud800-\udfff]", node.value):  # "\ud800": no path, print or file takes it
            raise UserError(f"{source}:{node.start_mark.line + 1}: {'.'.join(path) or '(top level)'}: a \\u escape of a UTF-16 surrogate "
                            f"({_shown(node.value)}) is not text in YAML; write the character itself, or \\U and 8 hex digits (e.g. \\U0001F600).")

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """Read a YAML mapping; returns (data, key -> ``file:line`` where it was set). Raises UserError
    on any problem.

    A top-level ``base: other.yaml`` (a path relative to this file) inherits that config: this
    file is laid over it, sections merged key by key, lists and values replaced (``deep_merge``),
    so a preset states only how it differs from its base. Bases may themselves have a base.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: config file not found. Pass a path to a YAML file, e.g. configs/counterpoint.yaml.")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{p}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the config as UTF-8.") from None
    try:
        data = yaml.safe_load(text)
        lines = _key_lines(text, str(p))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise UserError(f"{p}{where}: not valid YAML ({problem}). Fix the syntax at that line.") from None
    except RecursionError:
        raise UserError(f"{p}: nested too deeply to read (thousands of levels of [ or {{); fix the brackets.") from None
    except ValueError:  # PyYAML's int() of a number over Python's 4300-digit limit
        m = re.search(r"\d{4000,}", text)
        where = f":{text.count(chr(10), 0, m.start()) + 1}" if m else ""
        digits = len(m.group()) if m else "over 4300"
        raise UserError(f"{p}{where}: a number of {digits} digits is too long to read; no setting takes that many digits.") from None
    if data is None or data == {}:  # an empty file would silently start the whole default run (hours)
        raise UserError(f"{p}: the config is empty (no keys, or only comments). Start from a preset such as configs/counterpoint.yaml "
                        "or configs/translation.yaml, or write the keys you want to set.")
    if not isinstance(data, dict):
        raise UserError(f"{p}: the top level must be a mapping of keys to values, got {type(data).__name__}.")
    where = {k: f"{p}:{n}" for k, n in lines.items()}
    if "base" not in data:
        return data, where
    return _inherit(p, data, where, _chain)


def _inherit(p: Path, data: dict[str, Any], where: dict[tuple[str, ...], str], chain: tuple[Path, ...]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """``data`` (read from ``p``, with its ``base`` key) laid over the config it names."""
    base = data.pop("base")
    at = where.pop(("base",))
    if not isinstance(base, str) or not base.strip():
        raise UserError(f"{at}: base: expected the path of the config this one inherits, relative to this file (e.g. base: "
                        f"counterpoint.yaml); got {_shown(base)}.")
    target = p.parent / base
    chain = (*chain, p.resolve())
    try:
        found, resolved = target.is_file(), target.resolve()
    except (OSError, ValueError):  # a NUL byte, a name longer than the file system takes
        found, resolved = False, None
    if resolved in chain:
        names = " -> ".join(str(c.name) for c in (*chain, resolved))
        raise UserError(f"{at}: base: {base} inherits from itself ({names}); remove the base key from one of them.")
    if not found:
        raise UserError(f"{at}: base: {_shown(str(target))} is not a config file (the path is relative to the folder of {p}); give the "
                        "path of an existing config.")
    base_data, base_where = read_yaml(target, chain)
    # drop the base's locations under a key this file replaces with a value or a list
    replaced = [k for k in where if not isinstance(_get(data, k), dict)]
    base_where = {k: v for k, v in base_where.items() if not any(k[: len(r)] == r for r in replaced)}
    return deep_merge(base_data, data), {**base_where, **where}


def _get(data: Any, key: tuple[str, ...]) -> Any:
    for part in key:
        data = data.get(part) if isinstance(data, dict) else data[int(part)] if isinstance(data, list) else None
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid over ``base`` (sections merged key by key; values and lists replaced), as a new dict."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected key=value, e.g. pretrain.steps=200.")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise UserError(f"override {item!r}: the key before '=' is empty.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except (yaml.YAMLError, ValueError, RecursionError):  # not YAML (or a 5000-digit number, or 3000 nested [): the text itself
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise UserError(f"override {item!r}: {part!r} is a value, not a section, so it has no key {parts[-1]!r}.")
            node = child
        node[parts[-1]] = value
    return data


def _allowed_hint(model: type[BaseModel], loc: tuple[Any, ...], bad_key: str) -> str:
    """For an unknown key, list the section's keys and the closest match."""
    cls: Any = model
    for part in loc[:-1]:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return ""
        ann = field.annotation
        cls = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if cls is None:
            return ""
    fields = list(getattr(cls, "model_fields", {}))
    close = difflib.get_close_matches(bad_key, fields, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"{hint} Allowed keys here: {', '.join(fields)}."


def _shown(value: Any, limit: int = 200) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters; an integer too long for
    Python to print (over 4300 digits) is described instead."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return f"an integer of {value.bit_length()} bits" if isinstance(value, int) else f"a {type(value).__name__} too large to show"
    return text if len(text) <= limit else text[:limit] + "..."


def format_validation_error(
    err: ValidationError,
    model: type[BaseModel],
    source: str,
    lines: dict[tuple[str, ...], str],
    overridden: set[tuple[str, ...]],
) -> str:
    out = []
    for e in err.errors():
        loc = tuple(str(x) for x in e["loc"])
        dotted = ".".join(loc) or "(top level)"
        if not dotted.isprintable():  # a key with a line break or control character (an override typed oddly): quoted, on one line
            dotted = repr(dotted)
        if any(loc[: len(o)] == o or o[: len(loc)] == loc for o in overridden):
            where = "command-line override"
        else:
            where = next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), source)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = f"unknown key.{_allowed_hint(model, loc, loc[-1])}"
        elif e["type"] == "missing":
            msg = "required key is missing; add it."
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ") + "."
        else:
            msg = f"{msg} (got {_shown(e.get('input'))})."
        out.append(f"{where}: {dotted}: {msg}")
    return "\n".join(out)


def load_config(model: type[T], path: str | Path | None, overrides: Sequence[str] = ()) -> T:
    """Load ``model`` from a YAML file (or defaults when ``path`` is None) plus overrides."""
    data, lines = read_yaml(path) if path is not None else ({}, {})
    overridden = {tuple(o.split("=", 1)[0].strip().split(".")) for o in overrides if "=" in o}
    apply_overrides(data, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        source = str(path) if path is not None else "defaults"
        raise UserError(format_validation_error(err, model, source, lines, overridden)) from None


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML, as written into every run folder."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def describe(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every field, recursing into sections."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        sub = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if field.exclude:
            continue
        if sub is not None:
            rows.extend(describe(sub, key + "."))
        else:
            default = "" if field.is_required() else repr(field.get_default(call_default_factory=True))
            rows.append((key, default, field.description or ""))
    for key, sub in getattr(model, "described_sections", lambda: [])():  # sections chosen at load time (tune.<algorithm>)
        rows.extend(describe(sub, f"{prefix}{key}."))
    return rows
