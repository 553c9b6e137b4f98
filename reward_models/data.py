"""Pairwise preference data: one schema, four file formats, validation, leak-free splits.

Schema (one record = one rater's judgement of one pair)::

    prompt      str, may be empty    the context both responses answer (a cantus prompt, a question)
    chosen      str, required        the preferred response
    rejected    str, required        the other response
    margin      float, optional      how much better ``chosen`` is; BT loss -log σ(r_c - r_r - margin)
    rater_id    str, optional        who judged (needed for VPL and for splits by rater)
    rater_group str, optional        the rater's group, for per-group metrics (simulated or declared)
    pair_id     str, optional        unique id of the record (duplicates are an error)
    source      str, optional        provenance; the part before '#' names the origin (splits by source)
    created_at  str, optional        ISO 8601 time stamp
    label       "chosen" | "tie"     default "chosen"; see ties below

The ``prompt``/``chosen``/``rejected`` columns are TRL's preference format (explicit prompt):
a sequence is ``prompt + chosen`` concatenated as is, with the tokenizer's eos appended when
missing, exactly as ``trl.RewardTrainer`` does, so data moves both ways unchanged
(:func:`to_hf_dataset` / :func:`from_hf_dataset`). For music, responses are space-separated
token strings of the counterpoint task (``"iv_+7 iv_+3 ... <eos>"``); for text, plain text.

Ties (documented choice): a record with ``label: tie`` is kept in the data (it is valid,
written back, counted in statistics) but excluded from the Bradley-Terry loss and from
accuracy, because BT has no tie outcome; ``chosen``/``rejected`` are then just the two
responses in the order given. (Modelling ties, e.g. Rao-Kupper, is left for later.)

Formats, chosen by the path: ``*.jsonl`` / ``*.json`` (one object per line), ``*.csv``
(header row; empty optional cells are missing), ``*.parquet``, a folder written by
``datasets.Dataset.save_to_disk`` (optionally ``folder#split`` for a ``DatasetDict``), and
``hf://owner/name[#split]`` for the Hugging Face hub (only when the user has access; nothing
in this project downloads at run time).

Mistakes raise :class:`rlhf.errors.UserError` naming the file, the line (or row), the field
and the fix; unknown columns only warn.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

from rlhf.errors import UserError

Label = Literal["chosen", "tie"]
SplitKey = Literal["rater", "prompt", "source"]

REQUIRED = ("chosen", "rejected")
OPTIONAL = ("prompt", "margin", "rater_id", "rater_group", "pair_id", "source", "created_at", "label")
COLUMNS = ("prompt", "chosen", "rejected", "margin", "rater_id", "rater_group", "pair_id", "source", "created_at", "label")
MAX_ERRORS = 10


@dataclass(frozen=True)
class Preference:
    """One rater's judgement: ``chosen`` ≻ ``rejected`` given ``prompt`` (or a tie)."""

    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None
    rater_id: str | None = None
    rater_group: str | None = None
    pair_id: str | None = None
    source: str | None = None
    created_at: str | None = None
    label: Label = "chosen"
    where: str = field(default="", compare=False, repr=False)  # "file:line", for later error messages

    @property
    def is_tie(self) -> bool:
        return self.label == "tie"

    @property
    def origin(self) -> str:
        """The part of ``source`` before '#': the unit of splits by source (e.g. a chorale)."""
        return (self.source or "").split("#", 1)[0]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("where")
        return d


# --------------------------------------------------------------------------- validation


def _fmt_errors(errors: list[str]) -> str:
    head = errors[:MAX_ERRORS]
    more = f"\n... and {len(errors) - MAX_ERRORS} more problems." if len(errors) > MAX_ERRORS else ""
    return "\n".join(head) + more


def not_utf8(path: Path, fix: str = "save it as UTF-8") -> UserError:
    """The error for a file that does not decode as UTF-8: its first bad byte, with line and column."""
    raw = Path(path).read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        return UserError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}); {fix}.")
    return UserError(f"{path}: not UTF-8 text; {fix}.")


def json_problem(e: Exception) -> str:
    """What is wrong with a JSON text, from what ``json.loads`` raised (JSONDecodeError,
    ValueError for a number over Python's 4300-digit limit, RecursionError for deep nesting)."""
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at column {e.colno}"
    if isinstance(e, RecursionError):
        return "nested too deeply: thousands of [ or {"
    return "a number with more than 4300 digits" if "digits" in str(e) else str(e)


def lone_surrogate(text: str) -> str | None:
    """A description of the first lone UTF-16 surrogate in ``text`` (what a JSON escape such as
    ``\\ud800`` decodes to; no UTF-8 writer or tokenizer accepts it), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"a lone surrogate \\u{ord(text[e.start]):04x} at character {e.start + 1}, which is not text (a broken \\u escape)"
    return None


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def parse_record(raw: dict[str, Any], where: str, errors: list[str], *, empty_is_missing: bool = False) -> Preference | None:
    """Validate one raw row into a :class:`Preference`; appends ``where: field: problem. fix`` to
    ``errors`` and returns None on failure. ``empty_is_missing``: CSV cells are '' when absent."""
    bad = len(errors)

    def err(fieldname: str, msg: str) -> None:
        errors.append(f"{where}: {fieldname}: {msg}")

    def text(name: str, required: bool) -> str | None:
        v = raw.get(name)
        if _is_missing(v) or (empty_is_missing and v == "" and not required):
            if required:
                err(name, f"missing; every record needs {name!r} (a non-empty string)")
            return None
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            err(name, f"expected a string, got {type(v).__name__} {v!r}")
            return None
        v = str(v)
        if (bad := lone_surrogate(v)) is not None:
            err(name, f"{bad}; fix the program that wrote the file")
            return None
        if required and not v.strip():
            err(name, "empty; give the response text (or drop the record)")
        return v

    prompt = text("prompt", False)
    chosen = text("chosen", True)
    rejected = text("rejected", True)
    margin = raw.get("margin")
    if _is_missing(margin) or (empty_is_missing and margin == ""):
        margin = None
    else:
        try:
            if isinstance(margin, bool):
                raise ValueError
            margin = float(margin)
            if not math.isfinite(margin):
                raise ValueError
        except (TypeError, ValueError):
            err("margin", f"expected a finite number, got {margin!r}; leave it empty for no margin")
            margin = None
    ids = {k: text(k, False) for k in ("rater_id", "rater_group", "pair_id", "source", "created_at")}
    if ids["created_at"] is not None:
        try:
            datetime.fromisoformat(ids["created_at"].replace("Z", "+00:00"))
        except ValueError:
            err("created_at", f"not an ISO 8601 time stamp ({ids['created_at']!r}); use e.g. 2024-05-01T12:00:00Z")
    label = raw.get("label")
    if _is_missing(label) or label == "":
        label = "chosen"
    elif label not in ("chosen", "tie"):
        err("label", f"expected 'chosen' or 'tie', got {label!r}")
        label = "chosen"
    if chosen is not None and rejected is not None and chosen.strip() and chosen.strip() == rejected.strip():
        err("chosen", "identical to 'rejected'; a pair must compare two different responses. Drop the record")
    if len(errors) > bad:
        return None
    return Preference(prompt or "", chosen, rejected, margin, label=label, where=where, **ids)  # type: ignore[arg-type]


def validate(records: Sequence[Preference], source: str = "records") -> None:
    """Checks across records: duplicate ``pair_id`` (with both locations)."""
    seen: dict[str, str] = {}
    errors = []
    for r in records:
        if r.pair_id is None:
            continue
        if r.pair_id in seen:
            errors.append(f"{r.where or source}: pair_id: duplicate {r.pair_id!r} (first at {seen[r.pair_id]}); pair ids must be unique")
        else:
            seen[r.pair_id] = r.where or source
    if errors:
        raise UserError(_fmt_errors(errors))


def _warn_unknown(columns: Iterable[str], source: str) -> None:
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        warnings.warn(
            f"{source}: unknown column(s) {unknown} ignored; known columns: {', '.join(COLUMNS)}", UserWarning, stacklevel=3
        )


def records_from_rows(rows: Iterable[tuple[str, dict[str, Any]]], source: str, *, empty_is_missing: bool = False) -> list[Preference]:
    """Validate ``(where, row)`` pairs; raises one UserError listing the first problems."""
    errors: list[str] = []
    out: list[Preference] = []
    columns: dict[str, None] = {}
    for where, row in rows:
        columns.update(dict.fromkeys(row))
        meta = row.get("metadata")
        if isinstance(meta, dict) and meta.get("kind") == "candidate-pair":
            # chosen/rejected of an `rlhf export-pairs` row are only sides A and B: training on
            # them would teach that A always wins
            raise UserError(f"{where}: an unlabelled candidate pair (metadata.kind: candidate-pair, from `rlhf export-pairs`), not a preference. "
                            "Label the pairs (`rlhf label serve`, then `rlhf label export`) or import labels (`rlhf import-labels`), and use that file.")
        rec = parse_record(row, where, errors, empty_is_missing=empty_is_missing)
        if rec is not None:
            out.append(rec)
    _warn_unknown(columns, source)
    if errors:
        raise UserError(_fmt_errors(errors))
    if not out:
        raise UserError(f"{source}: no preference records. Each record needs 'chosen' and 'rejected' (and optionally 'prompt').")
    validate(out, source)
    return out


# --------------------------------------------------------------------------- reading


def _format_of(path: str) -> str:
    if path.startswith("hf://"):
        return "hub"
    p = Path(path.split("#", 1)[0])
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if p.is_dir() or suffix == "":
        return "hf"
    raise UserError(f"{path}: unknown preference file type {suffix!r}; use .jsonl, .csv, .parquet or a datasets folder (save_to_disk).")


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    for i, line in enumerate(io.StringIO(text, newline=None), 1):  # lines as a text-mode file splits them
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise UserError(f"{path}:{i}: not valid JSON ({json_problem(e)}); each line must be one JSON object.") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{i}: expected a JSON object with prompt/chosen/rejected, got {type(row).__name__}.")
        yield f"{path}:{i}", row


def csv_error(path: Path, line: int, e: csv.Error) -> UserError:
    """The error for a CSV the csv module cannot parse (e.g. a cell over its 131072-character limit)."""
    return UserError(f"{path}:{line}: not readable as CSV ({e}); check the quotes on that line, and keep very long texts in JSONL.")


def _csv_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        text = path.read_bytes().decode("utf-8")  # line ends as they are: csv reads \r\n inside quoted cells itself
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    start = 1
    try:
        if reader.fieldnames is None:
            raise UserError(f"{path}: empty CSV; the first row must name the columns, e.g. prompt,chosen,rejected.")
        start = 2
        for row in reader:
            extra = row.pop(None, None)  # type: ignore[call-overload]
            if extra:
                raise UserError(f"{path}:{start}: {len(extra)} more cells than header columns; quote fields that contain commas.")
            yield f"{path}:{start}", row
            start = reader.line_num + 1
    except csv.Error as e:
        raise csv_error(path, start, e) from None


def _table_rows(table_rows: Iterable[dict[str, Any]], source: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for i, row in enumerate(table_rows):
        yield f"{source}: row {i}", row


def _load_hf(path: str) -> Any:
    import datasets

    base, _, split = path.partition("#")
    try:
        if base.startswith("hf://"):
            ds = datasets.load_dataset(base[len("hf://"):], split=split or None)
        else:
            if not Path(base).is_dir():
                raise UserError(f"{base}: preference data not found. Give a .jsonl/.csv/.parquet file or a datasets folder.")
            ds = datasets.load_from_disk(base)
    except UserError:
        raise
    except Exception as e:  # datasets raises many types for unreadable folders
        raise UserError(f"{path}: could not load a Hugging Face dataset ({type(e).__name__}: {e}).") from None
    if isinstance(ds, (datasets.DatasetDict, dict)):
        names = list(ds)
        if split:
            if split not in ds:
                raise UserError(f"{path}: no split {split!r}; available: {names}. Use {base}#<split>.")
            ds = ds[split]
        elif len(names) == 1:
            ds = ds[names[0]]
        else:
            raise UserError(f"{path}: a DatasetDict with splits {names}; pick one as {base}#<split>.")
    return ds


def load_preferences(path: str | Path) -> list[Preference]:
    """Read and validate preference records from any supported format (see module docstring)."""
    path = str(path)
    kind = _format_of(path)
    if kind in ("jsonl", "csv", "parquet"):
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{p}: preference file not found. Create it (e.g. `rlhf simulate-preferences <config>`) or fix data.path.")
    if kind == "jsonl":
        return records_from_rows(_jsonl_rows(Path(path)), path)
    if kind == "csv":
        return records_from_rows(_csv_rows(Path(path)), path, empty_is_missing=True)
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise UserError(f"{path}: not a readable Parquet file ({e}).") from None
        return records_from_rows(_table_rows(table.to_pylist(), path), path)
    ds = _load_hf(path)
    return from_hf_dataset(ds, source=path)


def from_hf_dataset(ds: Any, source: str = "dataset") -> list[Preference]:
    """Records from a ``datasets.Dataset`` with TRL preference columns (explicit or empty prompt)."""
    if "chosen" in ds.column_names and ds.num_rows and isinstance(ds[0]["chosen"], list):
        raise UserError(f"{source}: conversational preference data (lists of messages) is not supported; flatten it to text first.")
    return records_from_rows(_table_rows(iter(ds), source), source)


# --------------------------------------------------------------------------- writing


def _rows(records: Sequence[Preference], drop_empty: bool) -> list[dict[str, Any]]:
    rows = [r.to_dict() for r in records]
    if drop_empty:  # leave out optional columns no record uses
        used = {k for row in rows for k, v in row.items() if v is not None and not (k == "label" and v == "chosen")}
        keep = [c for c in COLUMNS if c in used or c in ("prompt", "chosen", "rejected")]
        rows = [{k: row[k] for k in keep} for row in rows]
    return rows


def save_preferences(records: Sequence[Preference], path: str | Path) -> Path:
    """Write records in the format given by ``path`` (atomically for files)."""
    from rlhf.runs import atomic_dir, atomic_write_text

    path = Path(path)
    kind = _format_of(str(path))
    rows = _rows(records, drop_empty=True)
    if kind == "jsonl":
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    elif kind == "csv":
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else list(COLUMNS), lineterminator="\n")
        w.writeheader()
        w.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in rows])
        atomic_write_text(path, buf.getvalue())
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(pa.Table.from_pylist(_rows(records, drop_empty=False)), tmp)
        tmp.replace(path)
    elif kind == "hf":
        atomic_dir(path, lambda tmp: to_hf_dataset(records).save_to_disk(str(tmp)))
    else:
        raise UserError(f"{path}: cannot write to the hub from here; save to a local folder and push it yourself.")
    return path


def to_hf_dataset(records: Sequence[Preference]) -> Any:
    """A ``datasets.Dataset`` with every schema column; ``trl.RewardTrainer`` reads its
    ``prompt``/``chosen``/``rejected`` (and ``margin`` if you keep it) directly. Ties are kept
    (column ``label``): drop them with ``ds.filter(lambda r: r['label'] != 'tie')`` for TRL."""
    import datasets

    return datasets.Dataset.from_list(_rows(records, drop_empty=False))


# --------------------------------------------------------------------------- splits


def _key(r: Preference, by: SplitKey) -> str:
    if by == "rater":
        if r.rater_id is None:
            raise UserError(f"{r.where}: rater_id: missing; splitting by rater needs rater_id in every record (or set split.by without 'rater').")
        return r.rater_id
    if by == "prompt":
        return r.prompt
    if r.source is None:
        raise UserError(f"{r.where}: source: missing; splitting by source needs source in every record (or set split.by without 'source').")
    return r.origin


def held_out_keys(keys: Sequence[str], fraction: float, seed: int, strata: dict[str, str] | None = None) -> set[str]:
    """``round(fraction * n)`` distinct keys chosen at random (at least 1, at most n - 1); with
    ``strata`` (key -> stratum) that share of each stratum's keys, so the held-out keys keep the
    strata's mix (each stratum of two or more keys keeps at least one in training)."""
    uniq = sorted(set(keys))
    if len(uniq) < 2:
        raise UserError(f"cannot hold out a share of {len(uniq)} distinct value(s); a split needs at least two.")

    def share(n: int) -> int:  # at least 1, and (of two or more) at least 1 left for training
        return min(max(round(fraction * n), 1), max(n - 1, 1))

    if strata:
        groups: dict[str, list[str]] = {}
        for k in uniq:
            groups.setdefault(strata.get(k, ""), []).append(k)
        out: set[str] = set()
        for i, (_, ks) in enumerate(sorted(groups.items())):
            out |= set(random.Random(seed * 1000 + i).sample(ks, share(len(ks))))
        if len(out) < len(uniq):
            return out
    return set(random.Random(seed).sample(uniq, share(len(uniq))))


def split_preferences(
    records: Sequence[Preference], by: Sequence[SplitKey], test_fraction: float, seed: int, stratify: bool = False
) -> tuple[list[Preference], list[Preference], int]:
    """(train, test, dropped): for each key in ``by`` a random share of its values is held out;
    test = records whose every key is held out, train = records with no held-out key, and records
    that mix (a held-out rater on a training prompt) are dropped, so no held-out rater, prompt
    or source ever appears in training. ``stratify`` holds out that share of each rater group
    (``rater_group``) when splitting by rater, so the test raters keep the data's group mix."""
    if not by:
        raise UserError("split.by is empty; give at least one of rater, prompt, source.")
    strata = None
    if stratify:
        if "rater" not in by:
            raise UserError("split.stratify balances held-out raters by rater_group; it needs 'rater' in split.by.")
        missing = next((r for r in records if r.rater_group is None), None)
        if missing is not None:
            raise UserError(f"{missing.where}: rater_group: missing; split.stratify needs rater_group in every record (or set split.stratify: false).")
        strata = {str(r.rater_id): str(r.rater_group) for r in records}
    held = {k: held_out_keys([_key(r, k) for r in records], test_fraction, seed + i, strata if k == "rater" else None) for i, k in enumerate(by)}
    train, test = [], []
    for r in records:
        flags = [_key(r, k) in held[k] for k in by]
        if all(flags):
            test.append(r)
        elif not any(flags):
            train.append(r)
    dropped = len(records) - len(train) - len(test)
    if not train or not test:
        raise UserError(f"split by {list(by)} left {len(train)} training and {len(test)} test records; lower split.test_fraction or split by fewer keys.")
    return train, test, dropped


def by_rater(records: Sequence[Preference]) -> dict[str, list[Preference]]:
    out: dict[str, list[Preference]] = {}
    for r in records:
        if r.rater_id is None:
            raise UserError(f"{r.where}: rater_id: missing; VPL learns per-rater latents, so every record needs a rater_id.")
        out.setdefault(r.rater_id, []).append(r)
    return out


# --------------------------------------------------------------------------- tokens


def sequence_text(prompt: str, response: str, eos_token: str | None) -> str:
    """The text a reward model reads: ``prompt + response`` (+ eos if missing), as in TRL."""
    text = prompt + response
    if eos_token and not text.endswith(eos_token):
        text += eos_token
    return text


def encode_pairs(
    records: Sequence[Preference], tokenizer: Any, max_length: int | None = None
) -> tuple[list[list[int]], list[list[int]]]:
    """(chosen ids, rejected ids) per record, tokenized like ``trl.RewardTrainer``."""
    eos = tokenizer.eos_token
    texts = [sequence_text(r.prompt, x, eos) for r in records for x in (r.chosen, r.rejected)]
    ids = tokenizer(texts)["input_ids"] if texts else []
    unk = tokenizer.unk_token_id
    errors = []
    for i, seq in enumerate(ids):
        r = records[i // 2]
        fieldname = "chosen" if i % 2 == 0 else "rejected"
        if unk is not None and unk in seq and tokenizer.unk_token not in texts[i]:
            errors.append(f"{r.where}: {fieldname}: contains words/tokens the tokenizer does not know (e.g. {_unknown(tokenizer, texts[i])[:3]}); "
                          "use the task's token strings or tokenizer: words")
        if max_length is not None and len(seq) > max_length:
            errors.append(f"{r.where}: {fieldname}: {len(seq)} tokens (prompt + response) exceed model.max_positions={max_length}; raise it or shorten the text")
    if errors:
        raise UserError(_fmt_errors(errors))
    return ids[0::2], ids[1::2]


def _unknown(tokenizer: Any, text: str) -> list[str]:
    """The pieces of ``text`` that the tokenizer maps to its unknown token."""
    enc = tokenizer(text, return_offsets_mapping=True)
    return [text[a:b] for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if t == tokenizer.unk_token_id]


def build_word_tokenizer(texts: Iterable[str]) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over the lower-cased words and punctuation of
    ``texts`` (special tokens ``<pad>`` = 0, ``<bos>``, ``<eos>``, ``<unk>``), for text data
    without a tokenizer of its own. Saved with the model like any HF tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    pre = pre_tokenizers.Whitespace()
    norm = normalizers.Lowercase()
    words: dict[str, None] = {}
    for t in texts:
        for s in specials:
            t = t.replace(s, " ")
        for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)):
            words[w] = None
    vocab = {w: i for i, w in enumerate(specials + sorted(words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = norm
    backend.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def comparable(records: Sequence[Preference]) -> list[Preference]:
    """The records that enter the BT loss and accuracy: everything but ties."""
    return [r for r in records if not r.is_tie]
