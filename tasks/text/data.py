"""Rows of the text task from a JSONL file or a local ``datasets`` folder, and the held-out split.

A row is one JSON object per line (JSONL) or one row of a dataset (``Dataset.save_to_disk``)::

    {"prompt": "repeat: red fox", "reference": "red fox", "completion": "red fox"}

``prompt`` is required; ``reference`` (what the task's reward scores against) and ``completion``
(the prior's MLE target; the reference stands in for it when absent) are optional. The keys are
``task.data.prompt_key`` / ``reference_key`` / ``completion_key``. Every problem is a
:class:`~rlhf.errors.UserError` naming the file and line (or the row) and the fix.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rlhf.errors import UserError
from tasks.text.config import TextDataConfig


@dataclass(frozen=True)
class TextItem:
    """One row of the data."""

    prompt: str
    reference: str | None
    completion: str | None
    where: str  # "file:line" or "folder[row]", for messages

    @property
    def target(self) -> str | None:
        """The MLE target: the completion, else the reference."""
        return self.completion if self.completion is not None else self.reference


def _value(row: dict[str, Any], key: str, where: str, option: str, required: bool) -> str | None:
    if key not in row or row[key] is None:
        if required:
            keys = ", ".join(map(repr, row)) or "none"
            raise UserError(f"{where}: no key {key!r} (this row has {keys}); every row needs its prompt text there: add it, or set "
                            f"task.data.{option} to the key that holds the prompt")
        return None
    v = row[key]
    if not isinstance(v, str):
        raise UserError(f"{where}: {key!r} is {type(v).__name__} {v!r}, not text; write it as a JSON string (in quotes), or point "
                        f"task.data.{option} at a key holding text")
    return v


def _item(row: Any, where: str, cfg: TextDataConfig) -> TextItem:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object like {{\"{cfg.prompt_key}\": \"...\", \"{cfg.reference_key}\": \"...\"}}, "
                        f"got {type(row).__name__}; write one object per line")
    return TextItem(_value(row, cfg.prompt_key, where, "prompt_key", True),  # type: ignore[arg-type]
                    _value(row, cfg.reference_key, where, "reference_key", False),
                    _value(row, cfg.completion_key, where, "completion_key", False), where)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:  # type: ignore[operator]  (-sig: a leading BOM is not data)
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{n}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object, "
                                    f"e.g. {{\"prompt\": \"...\", \"reference\": \"...\"}}; fix or remove that line") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from None


def _dataset_rows(path: Path, cfg: TextDataConfig) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UserError(f"{path}: not a datasets folder written by save_to_disk ({e}); give a JSONL file or such a folder") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        split = cfg.split or (names[0] if len(names) == 1 else "train")
        if split not in ds:
            raise UserError(f"{path}: no split {split!r} (splits: {', '.join(names)}); set task.data.split to one of them")
        ds, path = ds[split], path / split
    elif cfg.split is not None:
        raise UserError(f"{path}: one dataset without splits, but task.data.split is {cfg.split!r}; set task.data.split: null")
    if cfg.prompt_key not in ds.column_names:
        raise UserError(f"{path}: no column {cfg.prompt_key!r} (columns: {', '.join(ds.column_names)}); set task.data.prompt_key to the "
                        "column holding the prompt text")
    for i, row in enumerate(ds):
        yield f"{path}[row {i}]", row


def load_items(cfg: TextDataConfig) -> list[TextItem]:
    """The rows of ``cfg.path`` (the first ``cfg.max_examples``) as items."""
    path = Path(cfg.path)
    if not path.exists():
        raise UserError(f"{path}: data not found (task.data.path; a relative path is taken from {os.getcwd()}); give a JSONL file or a "
                        "datasets folder written by save_to_disk")
    rows = _dataset_rows(path, cfg) if path.is_dir() else _jsonl_rows(path)
    items = []
    for where, row in rows:
        if cfg.max_examples is not None and len(items) >= cfg.max_examples:
            break
        items.append(_item(row, where, cfg))
    if not items:
        raise UserError(f"{path}: no rows; the text task needs JSON objects with a {cfg.prompt_key!r} key")
    return items


def prompt_hash(prompt: str) -> str:
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()


def split_items(items: list[TextItem], val_fraction: float) -> tuple[list[TextItem], list[TextItem]]:
    """(train, held-out) items in file order. The held-out prompts are the ``val_fraction`` of
    the distinct prompts with the smallest hash: independent of the seed and of the row order,
    and every row of a prompt lands on the same side."""
    distinct = sorted({it.prompt for it in items}, key=prompt_hash)
    if len(distinct) < 2:
        raise UserError(f"the data has {len(distinct)} distinct prompt(s); a held-out split needs at least 2")
    n_val = min(len(distinct) - 1, max(1, round(val_fraction * len(distinct))))
    held = set(distinct[:n_val])
    return [it for it in items if it.prompt not in held], [it for it in items if it.prompt in held]
