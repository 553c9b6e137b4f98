"""Candidate pairs to be labelled: one record type shared by the export, the importer and the web app.

A pairs file (``pairs.jsonl``, written by ``rlhf export-pairs``) holds one unlabelled pair per
line in the columns of the preference schema (``reward_models/data.py``) plus ``metadata``::

    pair_id   "3f9c0a1b2c3d4e5f"    sha256 of prompt + both candidates + model ids (16 hex digits)
    prompt    "<bos> <cf_below> cf_62 ... <sep>"    the context, as the reward model reads it
    chosen    candidate A (before labelling: just the left-hand candidate)
    rejected  candidate B (the right-hand candidate)
    source    "fux-d/below#3f9c0a1b2c3d4e5f"   prompt name, '#', pair id (splits by source group by prompt)
    metadata  {"kind": "candidate-pair", "domain": "music"|"text", "display": {...}, "notes": {...}, ...}

``chosen``/``rejected`` carry candidates A and B in presentation order so the file keeps the
schema's TRL columns; ``metadata.kind == "candidate-pair"`` marks it as unlabelled, and the
importer refuses to read such a file as labels. Labels always come back through
``rlhf label export`` or ``rlhf import-labels``, which put the preferred candidate first.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from reward_models.data import json_problem, lone_surrogate, not_utf8
from rlhf.errors import UserError

PAIR_KIND = "candidate-pair"
PAIR_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
RATER_RE = re.compile(r"^[A-Za-z0-9_.@+-]{1,64}$")
RATER_PATTERN = RATER_RE.pattern
PAIR_ID_PATTERN = PAIR_ID_RE.pattern
MAX_ERRORS = 10
NOTE_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")


@dataclass(frozen=True)
class CandidatePair:
    """One unlabelled pair: ``a`` and ``b`` answer ``prompt``; ``metadata`` as in the module doc."""

    pair_id: str
    prompt: str
    a: str
    b: str
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def domain(self) -> str:
        return str(self.metadata.get("domain", "text"))

    def display(self, key: str) -> str:
        """Human-readable text of ``prompt``, ``a`` or ``b`` (raw strings when not given)."""
        shown = self.metadata.get("display") or {}
        raw = {"prompt": self.prompt, "a": self.a, "b": self.b}[key]
        value = shown.get(key)
        return value if isinstance(value, str) else raw

    def notes(self, key: str) -> list[dict[str, Any]] | None:
        """Voices of candidate ``a`` or ``b`` (music only): ``[{role, pitches, durations}, ...]``."""
        notes = self.metadata.get("notes") or {}
        return notes.get(key)

    def to_row(self) -> dict[str, Any]:
        """The JSONL row: schema columns (A as ``chosen``, B as ``rejected``) plus ``metadata``."""
        return {"pair_id": self.pair_id, "prompt": self.prompt, "chosen": self.a, "rejected": self.b,
                "source": self.source, "metadata": {"kind": PAIR_KIND, **self.metadata}}


def sha_hex(data: bytes | str, n: int = 16) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()[:n]


def make_pair_id(prompt: str, a: str, b: str, models: Sequence[str]) -> str:
    """Stable id of a pair: the same prompt, the same two candidates (in either order) and the
    same models always give the same id, on any machine."""
    key = json.dumps({"prompt": prompt, "candidates": sorted([a, b]), "models": sorted(models)}, ensure_ascii=False, sort_keys=True)
    return sha_hex(key)


def midi_name(m: int | None) -> str:
    """``60 -> "C4"``; ``None`` (a rest) -> ``"rest"``."""
    if m is None:
        return "rest"
    return f"{NOTE_NAMES[m % 12]}{m // 12 - 1}"


# --------------------------------------------------------------------------- reading


def format_errors(errors: list[str]) -> str:
    """The first MAX_ERRORS problems, one per line, and how many more there are."""
    more = f"\n... and {len(errors) - MAX_ERRORS} more problems." if len(errors) > MAX_ERRORS else ""
    return "\n".join(errors[:MAX_ERRORS]) + more


def _check_voices(v: Any) -> bool:
    """A list of ``{role: str, pitches: [int|None], durations: [number > 0]}`` of equal lengths."""
    if not isinstance(v, list) or not v:
        return False
    for voice in v:
        if not isinstance(voice, dict) or not isinstance(voice.get("role"), str):
            return False
        p, d = voice.get("pitches"), voice.get("durations")
        if not isinstance(p, list) or not isinstance(d, list) or len(p) != len(d) or len(p) > 4096:
            return False
        if not all(x is None or (isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 127) for x in p):
            return False
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x <= 64 for x in d):
            return False
    return True


def parse_pair_row(row: Any, where: str, errors: list[str]) -> CandidatePair | None:
    """Validate one pairs-file row; appends ``where: field: problem; fix`` to ``errors``."""
    bad = len(errors)
    if not isinstance(row, dict):
        errors.append(f"{where}: expected a JSON object with pair_id, prompt, chosen, rejected, metadata; got {type(row).__name__}")
        return None
    pid = row.get("pair_id")
    if not isinstance(pid, str) or not PAIR_ID_RE.fullmatch(pid):
        errors.append(f"{where}: pair_id: {pid!r} is not an id of 1-64 letters, digits, '_.:-'; re-export with rlhf export-pairs")
    for key in ("prompt", "chosen", "rejected", "source"):
        v = row.get(key, "" if key in ("prompt", "source") else None)
        if not isinstance(v, str):
            errors.append(f"{where}: {key}: expected a string, got {type(v).__name__}")
        elif (problem := lone_surrogate(v)) is not None:
            errors.append(f"{where}: {key}: {problem}; re-export with rlhf export-pairs")
    if isinstance(row.get("chosen"), str) and row.get("chosen") == row.get("rejected"):
        errors.append(f"{where}: chosen: identical to rejected; a pair needs two different candidates")
    meta = row.get("metadata", {})
    if not isinstance(meta, dict):
        errors.append(f"{where}: metadata: expected an object, got {type(meta).__name__}")
        meta = {}
    elif meta.get("kind", PAIR_KIND) != PAIR_KIND:
        errors.append(f"{where}: metadata.kind: {meta.get('kind')!r}; a pairs file has kind {PAIR_KIND!r}")
    for key in ("a", "b"):
        notes = (meta.get("notes") or {}).get(key) if isinstance(meta.get("notes"), dict) else None
        if notes is not None and not _check_voices(notes):
            errors.append(f"{where}: metadata.notes.{key}: expected voices [{{role, pitches, durations}}] of equal lengths, MIDI 0-127, durations > 0")
    if len(errors) > bad:
        return None
    meta = {k: v for k, v in meta.items() if k != "kind"}
    return CandidatePair(pid, row.get("prompt", ""), row["chosen"], row["rejected"], row.get("source", ""), meta)


def read_pairs(path: str | Path) -> list[CandidatePair]:
    """Read and validate a pairs file written by ``rlhf export-pairs`` (JSONL); raises one
    UserError naming file, line and field of the first problems."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: pairs file not found. Write one with `rlhf export-pairs --model DIR --out DIR` (it makes <out>/pairs.jsonl).")
    errors: list[str] = []
    pairs: list[CandidatePair] = []
    seen: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise not_utf8(path, "re-export with rlhf export-pairs") from None
    for i, line in enumerate(io.StringIO(text, newline=None), 1):  # lines as a text-mode file splits them
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:  # also a number over Python's 4300-digit limit, thousands of nested [
            errors.append(f"{where}: not valid JSON ({json_problem(e)}); each line must be one JSON object")
            continue
        p = parse_pair_row(row, where, errors)
        if p is None:
            continue
        if p.pair_id in seen:
            errors.append(f"{where}: pair_id: duplicate {p.pair_id!r} (first at {seen[p.pair_id]}); pair ids must be unique")
            continue
        seen[p.pair_id] = where
        pairs.append(p)
    if errors:
        raise UserError(format_errors(errors))
    if not pairs:
        raise UserError(f"{path}: no pairs. Export some with `rlhf export-pairs`.")
    return pairs


def pairs_jsonl(pairs: Iterable[CandidatePair]) -> str:
    return "".join(json.dumps(p.to_row(), ensure_ascii=False) + "\n" for p in pairs)
