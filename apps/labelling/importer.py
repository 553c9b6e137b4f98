"""``rlhf import-labels`` and ``rlhf label export``: labels from anywhere into the preference schema.

Inputs (format from the content, not only the name):

* a **Label Studio export** (JSON array of tasks, each with ``data`` and ``annotations``) of the
  tasks written by ``rlhf export-pairs``: a ``pairwise`` result ``{"selected": "left"}`` means A
  (``text1``) is preferred, ``"right"`` B; the ``tie`` choice ``Tie`` a tie; cancelled (skipped)
  annotations and annotations with neither are skipped. The rater is ``completed_by`` (an e-mail
  when Label Studio gives one, else ``ls-<user id>``), the time stamp ``updated_at`` (else
  ``created_at``).
* the **pairs CSV** (``pairs.csv`` of the export) with ``preferred`` filled in: ``A``, ``B``,
  ``tie``, ``skip`` or empty (not labelled yet); ``rater_id`` per row or ``--rater``;
  ``created_at`` per row or the import time.
* the project's **preference JSONL / CSV / Parquet** (``reward_models/data.py``), e.g. the output of
  ``rlhf label export`` or of an earlier import.

Output records: ``chosen`` = the preferred candidate, ``rater_id``, ``created_at``, ``source`` as
exported, ``pair_id = <pair id>/<rater>`` (the schema needs one id per record; the part before the
last ``/`` is the exported pair id), ``label: tie`` for ties.

Checks: malformed records are refused with file and record number; the same rater labelling the
same pair (same prompt and candidates, in either order) twice the same way is a duplicate (kept
once); twice differently is a **conflict**: an error naming both places, unless
``--on-conflict latest`` (keep the later time stamp) or ``drop`` (drop both). The output is
written only after everything has been read and checked, atomically (temp file + rename).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from reward_models.data import Preference, csv_error, json_problem, load_preferences, lone_surrogate, not_utf8, save_preferences, validate
from apps.labelling.pairs import PAIR_ID_RE, PAIR_KIND, RATER_RE, CandidatePair, format_errors
from apps.labelling.store import Label, LabelStore, utc_now
from rlhf.errors import UserError

log = logging.getLogger("rlhf")

OnConflict = Literal["error", "latest", "drop"]
Format = Literal["auto", "labelstudio", "csv", "jsonl"]
CHOICE_ALIASES = {"a": "A", "b": "B", "tie": "tie", "t": "tie", "skip": "skip", "s": "skip"}


@dataclass
class ImportSummary:
    """What an import read and wrote (printed by the CLI)."""

    read: dict[str, int] = field(default_factory=dict)  # records per input file
    skipped: int = 0  # skips, cancelled or empty annotations, unlabelled CSV rows
    duplicates: int = 0
    conflicts: int = 0  # conflicting groups resolved by --on-conflict latest/drop
    written: int = 0
    out: str = ""


def _parse_time(value: str) -> datetime:
    t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _valid_time(value: Any) -> bool:
    try:
        _parse_time(value)
        return isinstance(value, str)
    except (TypeError, ValueError, AttributeError):
        return False


def record_of(pair_id: str, prompt: str, a: str, b: str, source: str | None, choice: str, rater: str, at: str, where: str) -> Preference | None:
    """The schema record of one judgement (None for a skip)."""
    if choice == "skip":
        return None
    chosen, rejected = (b, a) if choice == "B" else (a, b)
    return Preference(prompt, chosen, rejected, rater_id=rater, pair_id=f"{pair_id}/{rater}", source=source or None,
                      created_at=at, label="tie" if choice == "tie" else "chosen", where=where)


def _content(pair_id: str, data: Mapping[str, Any], pairs: Mapping[str, CandidatePair] | None, where: str,
             errors: list[str]) -> tuple[str, str, str, str | None] | None:
    """(prompt, a, b, source) of a pair from the record itself, checked against ``pairs`` when given."""
    known = pairs.get(pair_id) if pairs is not None else None
    if pairs is not None and known is None:
        errors.append(f"{where}: pair_id: {pair_id!r} is not in the pairs file; import with the pairs file these tasks came from")
        return None
    got = {k: data.get(k) for k in ("prompt", "a", "b")}
    if known is not None:
        want = {"prompt": known.prompt, "a": known.a, "b": known.b}
        for k, v in got.items():
            if v is not None and v != want[k]:
                errors.append(f"{where}: {k}: differs from pair {pair_id} in the pairs file; the task was edited or comes from another export")
                return None
        return known.prompt, known.a, known.b, known.source
    bad = [k for k in ("a", "b") if not isinstance(got[k], str) or not got[k].strip()]
    if bad or not isinstance(got["prompt"], str):
        errors.append(f"{where}: data: missing {', '.join(bad) or 'prompt'}; import tasks written by `rlhf export-pairs`, or pass --pairs pairs.jsonl")
        return None
    for k in ("prompt", "a", "b", "source"):
        if isinstance(data.get(k), str) and (problem := lone_surrogate(data[k])) is not None:
            errors.append(f"{where}: data.{k}: {problem}; re-export the tasks, or pass --pairs pairs.jsonl")
            return None
    source = data.get("source")
    return got["prompt"], got["a"], got["b"], source if isinstance(source, str) else None


# --------------------------------------------------------------------------- Label Studio


def ls_rater(completed_by: Any) -> str | None:
    """Rater id of a Label Studio annotation's ``completed_by`` (int id, or a user object)."""
    if isinstance(completed_by, bool):
        return None
    if isinstance(completed_by, int):
        return f"ls-{completed_by}"
    if isinstance(completed_by, dict):
        email = completed_by.get("email")
        if isinstance(email, str) and RATER_RE.fullmatch(email):
            return email
        return ls_rater(completed_by.get("id"))
    if isinstance(completed_by, str) and RATER_RE.fullmatch(completed_by):
        return completed_by
    return None


def ls_choice(result: Any, where: str, errors: list[str]) -> str | None:
    """``A``, ``B``, ``tie`` or None (no judgement) from an annotation's ``result`` list."""
    if not isinstance(result, list):
        errors.append(f"{where}: result: expected a list of regions, got {type(result).__name__}")
        return None
    side = tie = None
    for region in result:
        if not isinstance(region, dict) or not isinstance(region.get("value"), dict):
            errors.append(f"{where}: result: each region needs a 'value' object")
            return None
        kind, value = region.get("type"), region["value"]
        if kind == "pairwise":
            sel = value.get("selected")
            if sel not in ("left", "right"):
                errors.append(f"{where}: result: pairwise 'selected' is {sel!r}; Label Studio writes 'left' or 'right'")
                return None
            side = "A" if sel == "left" else "B"
        elif kind == "choices" and region.get("from_name") == "tie":
            choices = value.get("choices")
            if not isinstance(choices, list) or any(not isinstance(c, str) for c in choices):
                errors.append(f"{where}: result: tie 'choices' must be a list of strings")
                return None
            tie = "Tie" in choices or None
    if side and tie:
        errors.append(f"{where}: result: both a side ({side}) and Tie were chosen; fix the annotation in Label Studio (one of them)")
        return None
    return "tie" if tie else side


def read_labelstudio(path: Path, pairs: Mapping[str, CandidatePair] | None = None) -> tuple[list[Preference], int]:
    """(records, skipped) of a Label Studio JSON export (see the module docstring)."""
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); export the project from Label Studio as JSON.") from None
    except UnicodeDecodeError:
        raise not_utf8(path, "export the project from Label Studio as JSON") from None
    except (ValueError, RecursionError) as e:  # a number over Python's 4300-digit limit, or thousands of nested [
        raise UserError(f"{path}: not readable JSON ({json_problem(e)}); export the project from Label Studio as JSON.") from None
    if not isinstance(tasks, list):
        raise UserError(f"{path}: expected a JSON array of tasks (Label Studio's JSON export), got {type(tasks).__name__}.")
    errors: list[str] = []
    out: list[Preference] = []
    skipped = 0
    for i, task in enumerate(tasks, 1):
        where_t = f"{path}: task {i}" + (f" (id {task.get('id')})" if isinstance(task, dict) and "id" in task else "")
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            errors.append(f"{where_t}: expected an object with 'data' (the exported pair) and 'annotations'")
            continue
        data = task["data"]
        anns = task.get("annotations", task.get("completions", []))  # "completions": Label Studio < 1.0
        if not isinstance(anns, list):
            errors.append(f"{where_t}: annotations: expected a list, got {type(anns).__name__}")
            continue
        pid = data.get("pair_id")
        if not isinstance(pid, str) or not PAIR_ID_RE.fullmatch(pid):
            what = "missing" if pid is None else f"{pid!r} is not a pair id"
            errors.append(f"{where_t}: data.pair_id: {what}; import the tasks.json written by `rlhf export-pairs` into Label Studio")
            continue
        content = _content(pid, data, pairs, where_t, errors) if anns else None
        for j, ann in enumerate(anns, 1):
            where = f"{where_t} annotation {j}"
            if not isinstance(ann, dict):
                errors.append(f"{where}: expected an object, got {type(ann).__name__}")
                continue
            if ann.get("was_cancelled") is True:
                skipped += 1
                continue
            choice = ls_choice(ann.get("result", []), where, errors)
            rater = ls_rater(ann.get("completed_by"))
            at = ann.get("updated_at") or ann.get("created_at")
            if rater is None:
                errors.append(f"{where}: completed_by: {ann.get('completed_by')!r} is not a user id or user object")
            if not _valid_time(at):
                errors.append(f"{where}: created_at: {at!r} is not an ISO 8601 time stamp")
            if choice is None:
                skipped += 1
                continue
            if content is None or rater is None or not _valid_time(at):
                continue
            rec = record_of(pid, *content, choice, rater, at, where)  # type: ignore[misc]
            if rec is not None:
                out.append(rec)
    if errors:
        raise UserError(format_errors(errors))
    return out, skipped


# --------------------------------------------------------------------------- pairs CSV


def read_pairs_csv(path: Path, rater: str | None = None, pairs: Mapping[str, CandidatePair] | None = None,
                   now: str | None = None) -> tuple[list[Preference], int]:
    """(records, skipped) of an export's ``pairs.csv`` with ``preferred`` filled in."""
    now = now or utc_now()
    errors: list[str] = []
    out: list[Preference] = []
    skipped = 0
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise not_utf8(path, "save the CSV as UTF-8 (in a spreadsheet: CSV UTF-8)") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    line = 1
    try:
        missing = [c for c in ("pair_id", "preferred") if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path}: missing column(s) {missing}; use the pairs.csv written by `rlhf export-pairs`.")
        line = 2
        for row in reader:
            where = f"{path}:{line}"
            line = reader.line_num + 1
            if row.get(None):  # type: ignore[call-overload]
                errors.append(f"{where}: more cells than header columns; quote cells that contain commas")
                continue
            raw = (row.get("preferred") or "").strip()
            if not raw:
                skipped += 1
                continue
            choice = CHOICE_ALIASES.get(raw.lower())
            if choice is None:
                errors.append(f"{where}: preferred: {raw!r}; write A, B, tie or skip (or leave it empty)")
                continue
            who = (row.get("rater_id") or "").strip() or rater
            if not who:
                errors.append(f"{where}: rater_id: empty; fill the column or pass --rater NAME")
                continue
            if not RATER_RE.fullmatch(who):
                errors.append(f"{where}: rater_id: {who!r}; use 1-64 letters, digits or _.@+-")
                continue
            at = (row.get("created_at") or "").strip() or now
            if not _valid_time(at):
                errors.append(f"{where}: created_at: {at!r} is not an ISO 8601 time stamp (e.g. 2024-05-01T12:00:00Z)")
                continue
            pid = (row.get("pair_id") or "").strip()
            if not PAIR_ID_RE.fullmatch(pid):
                errors.append(f"{where}: pair_id: {pid!r} is not a pair id; keep the column as exported")
                continue
            data = {"prompt": row.get("prompt"), "a": row.get("candidate_a"), "b": row.get("candidate_b"), "source": row.get("source")}
            content = _content(pid, data, pairs, where, errors)
            if content is None:
                continue
            if choice == "skip":
                skipped += 1
                continue
            out.append(record_of(pid, *content, choice, who, at, where))  # type: ignore[arg-type]
    except csv.Error as e:
        raise csv_error(path, line, e) from None
    if errors:
        raise UserError(format_errors(errors))
    return out, skipped


# --------------------------------------------------------------------------- schema files


def read_schema(path: Path, rater: str | None = None) -> list[Preference]:
    """Records of a preference-schema file; refuses an unlabelled pairs export."""
    if path.suffix.lower() in (".jsonl", ".json"):
        with path.open(encoding="utf-8", errors="replace") as f:  # a peek; load_preferences reports bad bytes with their line
            first = next((x for x in f if x.strip()), "")
        try:
            row = json.loads(first) if first else {}
        except (ValueError, RecursionError):
            row = {}
        if isinstance(row, dict) and isinstance(row.get("metadata"), dict) and row["metadata"].get("kind") == PAIR_KIND:
            raise UserError(f"{path}: an unlabelled pairs export (rlhf export-pairs), not labels. Label it first: "
                            "`rlhf label serve --pairs ...`, Label Studio (labelstudio/tasks.json) or the CSV, then import those labels.")
    records = load_preferences(path)
    if rater is not None:
        records = [r if r.rater_id else replace(r, rater_id=rater) for r in records]
    return records


def detect_format(path: Path) -> str:
    """``labelstudio`` (a JSON array), ``csv`` (the pairs CSV, with ``preferred``), or ``schema``."""
    if not path.is_file():
        raise UserError(f"{path}: file not found; give a Label Studio JSON export, the pairs CSV or a preference JSONL.")
    suffix = path.suffix.lower()
    if suffix == ".json":
        with path.open(encoding="utf-8", errors="replace") as f:
            head = f.read(4096).lstrip()
        if head.startswith("["):
            return "labelstudio"
        try:  # one JSON document that is not a record (e.g. {"tasks": [...]}) is neither format
            whole = json.loads(path.read_text(encoding="utf-8", errors="replace"))
        except (ValueError, RecursionError):
            whole = None
        if isinstance(whole, dict) and not {"chosen", "rejected"} & set(whole):
            raise UserError(f"{path}: expected a JSON array of tasks (Label Studio's JSON export) or preference records "
                            "(one JSON object with chosen/rejected per line).")
        return "schema"
    if suffix == ".csv":
        with path.open(encoding="utf-8", errors="replace", newline="") as f:  # a peek at the header; the reader reports bad bytes
            try:
                header = next(csv.reader(f), [])
            except csv.Error:
                header = []
        return "csv" if "preferred" in header else "schema"
    return "schema"


# --------------------------------------------------------------------------- merging


def _key(r: Preference) -> tuple:
    return (r.rater_id or "", r.prompt, frozenset((r.chosen, r.rejected)))


def _outcome(r: Preference) -> str:
    return "<tie>" if r.is_tie else r.chosen


def resolve(records: Sequence[Preference], on_conflict: OnConflict = "error") -> tuple[list[Preference], int, int]:
    """(records, duplicates removed, conflicts resolved): one record per (rater, pair)."""
    groups: dict[tuple, list[Preference]] = {}
    for r in records:
        groups.setdefault(_key(r), []).append(r)
    keep: list[Preference] = []
    dups = conflicts = 0
    errors: list[str] = []
    for rs in groups.values():
        distinct: dict[str, Preference] = {}
        for r in rs:
            distinct.setdefault(_outcome(r), r)
        dups += len(rs) - len(distinct)
        if len(distinct) == 1:
            keep.append(rs[0])
            continue
        rater = rs[0].rater_id or "(no rater_id)"
        if on_conflict == "error":
            places = "; ".join(f"{r.where or '?'} says {'tie' if r.is_tie else 'chosen=' + repr(r.chosen[:40])}" for r in distinct.values())
            errors.append(f"conflict: rater {rater} labelled the same pair differently: {places}. "
                          "Fix one of them, or pass --on-conflict latest (keep the later time stamp) or drop")
            continue
        conflicts += 1
        if on_conflict == "latest":
            cands = list(distinct.values())
            if any(r.created_at is None for r in cands):
                errors.append(f"conflict: rater {rater}: {', '.join(r.where for r in cands)} lack created_at, so 'latest' cannot decide; use --on-conflict drop")
                continue
            keep.append(max(cands, key=lambda r: _parse_time(r.created_at)))  # type: ignore[arg-type]
    if errors:
        raise UserError(format_errors(errors))
    order = {id(r): i for i, r in enumerate(records)}
    keep.sort(key=lambda r: order[id(r)])
    return keep, dups, conflicts


def import_labels(inputs: Sequence[str | Path], out: str | Path, *, fmt: Format = "auto", rater: str | None = None,
                  pairs: Mapping[str, CandidatePair] | None = None, on_conflict: OnConflict = "error",
                  overwrite: bool = False) -> ImportSummary:
    """Read every input, check, merge and write ``out`` (any schema format by its suffix)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it or choose another --out.")
    if rater is not None and not RATER_RE.fullmatch(rater):
        raise UserError(f"--rater {rater!r}: use 1-64 letters, digits or _.@+-")
    summary = ImportSummary(out=str(out))
    records: list[Preference] = []
    for src in inputs:
        path = Path(src)
        kind = detect_format(path) if fmt == "auto" else {"jsonl": "schema"}.get(fmt, fmt)
        if path.resolve() == out.resolve():
            raise UserError(f"{path}: is also the --out file; write the import to a new file.")
        if kind == "labelstudio":
            recs, skipped = read_labelstudio(path, pairs)
        elif kind == "csv":
            recs, skipped = read_pairs_csv(path, rater, pairs)
        else:
            recs, skipped = read_schema(path, rater), 0
        summary.read[str(path)] = len(recs)
        summary.skipped += skipped
        records += recs
    if not records:
        raise UserError(f"no labels in {', '.join(map(str, inputs))} ({summary.skipped} skipped or unlabelled); nothing written.")
    records, summary.duplicates, summary.conflicts = resolve(records, on_conflict)
    validate(records)  # one record per pair_id
    save_preferences(records, out)
    summary.written = len(records)
    return summary


# --------------------------------------------------------------------------- the web app's labels


def label_records(pairs: Sequence[CandidatePair], labels: Sequence[Label]) -> tuple[list[Preference], int]:
    """(records, skipped) of the labels stored by the web app; refuses labels of unknown pairs."""
    by_id = {p.pair_id: p for p in pairs}
    unknown = sorted({lb.pair_id for lb in labels if lb.pair_id not in by_id})
    if unknown:
        raise UserError(f"the label database has labels of {len(unknown)} pair(s) not in the pairs file (e.g. {unknown[:3]}); "
                        "give the --pairs file the session was served with.")
    out, skipped = [], 0
    for lb in labels:
        p = by_id[lb.pair_id]
        rec = record_of(p.pair_id, p.prompt, p.a, p.b, p.source, lb.choice, lb.rater, lb.updated_at, f"db: {lb.pair_id}/{lb.rater}")
        if rec is None:
            skipped += 1
        else:
            out.append(rec)
    return out, skipped


def export_labels(pairs: Sequence[CandidatePair], store: LabelStore, out: str | Path, *, rater: str | None = None,
                  overwrite: bool = False) -> tuple[int, int]:
    """``rlhf label export``: the database's labels as schema records, written atomically.
    Returns (records written, skips left out)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it or choose another --out.")
    records, skipped = label_records(pairs, store.labels(rater))
    if not records:
        raise UserError(f"{store.path}: no labels{' by ' + rater if rater else ''} yet ({skipped} skipped); nothing written.")
    validate(records)
    save_preferences(records, out)
    return len(records), skipped


def model_win_rates(pairs: Sequence[CandidatePair], records: Sequence[Preference]) -> dict[str, dict[str, float]]:
    """For pairs that put two models against each other (``export-pairs`` with two models): per
    model path, wins, ties, losses and win rate (ties count ½) over the labelled records."""
    by_id = {p.pair_id: p for p in pairs}
    stats: dict[str, dict[str, float]] = {}
    for r in records:
        p = by_id.get((r.pair_id or "").rsplit("/", 1)[0])
        if p is None:
            continue
        cand, models = p.metadata.get("candidates") or {}, p.metadata.get("models") or []
        try:
            name_a, name_b = models[cand["a"]["model"]]["path"], models[cand["b"]["model"]]["path"]
        except (KeyError, IndexError, TypeError):
            continue
        if name_a == name_b:
            continue
        winner = None if r.is_tie else (name_a if r.chosen == p.a else name_b)
        for name in (name_a, name_b):
            s = stats.setdefault(name, {"wins": 0, "ties": 0, "losses": 0})
            key = "ties" if winner is None else "wins" if winner == name else "losses"
            s[key] += 1
    for s in stats.values():
        s["win_rate"] = (s["wins"] + 0.5 * s["ties"]) / max(s["wins"] + s["ties"] + s["losses"], 1)
    return stats
