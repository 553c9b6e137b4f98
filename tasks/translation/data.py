"""Parallel corpora: two aligned text files, TSV, JSONL or a local Hugging Face ``datasets`` folder.

Every loader returns ``(pairs, report)``: the sentence pairs in file order and a
:class:`LoadReport` of what was skipped and why. Nothing is ever skipped silently, and a
skipped line drops the *pair* (both sides), so the two languages can never slide out of
alignment. Mistakes in the input raise :class:`rlhf.errors.UserError` naming the file, the
line and the fix:

* two text files with different line counts → error naming both files and both counts;
* a line that is not UTF-8 → error with file:line:byte (or a counted skip if
  ``encoding_errors="skip"``);
* an empty (or whitespace-only) side → counted skip (or an error if ``empty_lines="error"``);
* a TSV line without two tab-separated fields, a JSONL line that is not a JSON object with
  both language keys → error with file:line.

Lines are split on ``\\n`` only: ``str.splitlines`` would also split on U+2028, U+0085, form
feeds... which may sit inside one sentence of one language and then shift every later line.

File layout of a data folder (``format`` in the config; ``split`` is train, val, ...)::

    text   <dir>/<split>.<src_lang>[.gz] and <dir>/<split>.<tgt_lang>[.gz]   (Multi30k's layout)
    tsv    <dir>/<split>.tsv[.gz]     src<TAB>tgt, or a header line naming the language columns
    jsonl  <dir>/<split>.jsonl[.gz]   {"en": ..., "de": ...} or {"translation": {"en": ..., "de": ...}}
    hf     <dir> written by ``DatasetDict.save_to_disk``; columns as in jsonl
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

from rlhf.errors import UserError

Format = Literal["text", "tsv", "jsonl", "hf"]
Policy = Literal["skip", "error"]

MULTI30K_ENV = "RLHF_MULTI30K_DIR"
MULTI30K_HELP = (
    "Get Multi30k task 1 (English-German, raw) from https://github.com/multi30k/dataset (data/task1/raw: "
    "train.en.gz, train.de.gz, val.*, test_2016_flickr.*) into one folder and set task.data.dir=<folder> "
    f"or the environment variable {MULTI30K_ENV}."
)


@dataclass(frozen=True)
class Pair:
    """One aligned sentence pair; ``origin`` says where it came from (``file:line``)."""

    src: str
    tgt: str
    origin: str = ""


@dataclass
class LoadReport:
    """Pairs kept and lines skipped (by reason, with their 1-based line numbers) of one source."""

    source: str
    kept: int = 0
    skipped: dict[str, list[int]] = field(default_factory=dict)

    def skip(self, reason: str, line: int) -> None:
        self.skipped.setdefault(reason, []).append(line)

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def summary(self) -> str:
        """One line for the log, e.g. ``train.en.gz: 28990 pairs kept, skipped 10 (empty: lines 3, 17, ...)``."""
        if not self.skipped:
            return f"{self.source}: {self.kept} pairs kept"
        parts = [f"{k}: {len(v)} (lines {', '.join(map(str, v[:5]))}{', ...' if len(v) > 5 else ''})" for k, v in self.skipped.items()]
        return f"{self.source}: {self.kept} pairs kept, skipped {self.n_skipped} ({'; '.join(parts)})"

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "kept": self.kept, "skipped": {k: len(v) for k, v in self.skipped.items()}}


def read_raw_lines(path: Path) -> list[bytes]:
    """The lines of a text file (gzip if it ends in .gz) as bytes, split on ``\\n`` only, without
    the line ends (``\\r\\n`` too) and without a UTF-8 byte-order mark."""
    if not path.is_file():
        raise UserError(f"{path}: file not found.")
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: not a readable gzip file ({e}). Re-download it, or decompress it and drop the .gz suffix.") from None
    data = data.removeprefix(b"\xef\xbb\xbf")
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":  # the final newline ends the last line; it does not start a new one
        lines.pop()
    return [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]


def decode_line(raw: bytes, path: Path, line: int) -> str:
    """UTF-8 text of one line; UserError with file:line and the bad byte otherwise."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}). Convert the file, "
            f"e.g. `iconv -f latin1 -t utf-8`, or set task.data.encoding_errors=skip to drop such pairs."
        ) from None


def _clean(text: str) -> str:
    """Whitespace runs (tabs, newlines inside a JSON string, ...) become one space; ends stripped."""
    return " ".join(text.split())


def _accept(src: str, tgt: str, where: str, line: int, report: LoadReport, empty_lines: Policy) -> Pair | None:
    """The pair, or None (counted in ``report``) when a side is empty under the skip policy."""
    src, tgt = _clean(src), _clean(tgt)
    if not src or not tgt:
        side = "source" if not src else "target"
        if empty_lines == "error":
            raise UserError(f"{where}:{line}: empty {side} sentence. Remove the line from both sides, or set task.data.empty_lines=skip.")
        report.skip(f"empty {side}", line)
        return None
    report.kept += 1
    return Pair(src, tgt, f"{where}:{line}")


def load_text_pair(
    src_path: str | Path, tgt_path: str | Path, *, empty_lines: Policy = "skip", encoding_errors: Policy = "error"
) -> tuple[list[Pair], LoadReport]:
    """Pairs from two line-aligned files (line i of one translates line i of the other)."""
    sp, tp = Path(src_path), Path(tgt_path)
    src_lines, tgt_lines = read_raw_lines(sp), read_raw_lines(tp)
    if len(src_lines) != len(tgt_lines):
        raise UserError(
            f"{sp} has {len(src_lines)} lines but {tp} has {len(tgt_lines)}: the files are not aligned "
            "(line i of one must translate line i of the other). Fix or re-extract the shorter file."
        )
    report = LoadReport(f"{sp.name} + {tp.name}")
    pairs = []
    for i, (rs, rt) in enumerate(zip(src_lines, tgt_lines), start=1):
        try:
            s, t = decode_line(rs, sp, i), decode_line(rt, tp, i)
        except UserError:
            if encoding_errors == "error":
                raise
            report.skip("not UTF-8", i)
            continue
        if (p := _accept(s, t, str(sp), i, report, empty_lines)) is not None:
            pairs.append(p)
    return pairs, report


def _text_lines(path: Path, report: LoadReport, encoding_errors: Policy) -> Iterable[tuple[int, str]]:
    """(line number, text) of a one-record-per-line file, honouring the encoding policy."""
    for i, raw in enumerate(read_raw_lines(path), start=1):
        try:
            yield i, decode_line(raw, path, i)
        except UserError:
            if encoding_errors == "error":
                raise
            report.skip("not UTF-8", i)


def load_tsv(
    path: str | Path, src_lang: str, tgt_lang: str, *, empty_lines: Policy = "skip", encoding_errors: Policy = "error"
) -> tuple[list[Pair], LoadReport]:
    """Pairs from ``src<TAB>tgt`` lines. A first line whose fields include both language codes
    is a header that picks the columns (e.g. ``id  de  en``); otherwise columns 1 and 2."""
    p = Path(path)
    report = LoadReport(p.name)
    pairs: list[Pair] = []
    cols: tuple[int, int] | None = None
    for i, text in _text_lines(p, report, encoding_errors):
        fields = text.split("\t")
        if i == 1 and src_lang in fields and tgt_lang in fields:
            cols = (fields.index(src_lang), fields.index(tgt_lang))
            continue
        s_col, t_col = cols or (0, 1)
        if len(fields) <= max(s_col, t_col):
            if not text.strip() and empty_lines == "skip":
                report.skip("empty line", i)
                continue
            raise UserError(
                f"{p}:{i}: expected at least {max(s_col, t_col) + 1} tab-separated fields, found {len(fields)}. "
                f"Write each pair as <{src_lang}>\\t<{tgt_lang}> (a tab, not spaces)."
            )
        if (pair := _accept(fields[s_col], fields[t_col], str(p), i, report, empty_lines)) is not None:
            pairs.append(pair)
    return pairs, report


def _record_sides(rec: Any, src_lang: str, tgt_lang: str) -> tuple[Any, Any] | str:
    """(src, tgt) of a JSON/HF record, or the reason it has none. Accepts flat
    ``{"en": .., "de": ..}`` and the WMT style ``{"translation": {"en": .., "de": ..}}``."""
    if not isinstance(rec, dict):
        return f"a JSON object, found {type(rec).__name__}"
    if isinstance(rec.get("translation"), dict):
        rec = rec["translation"]
    missing = [k for k in (src_lang, tgt_lang) if k not in rec]
    if missing:
        return f"keys {src_lang!r} and {tgt_lang!r} (or a 'translation' object with them), missing {missing} (has {sorted(rec)[:6]})"
    s, t = rec[src_lang], rec[tgt_lang]
    if not isinstance(s, str) or not isinstance(t, str):
        return f"string values for {src_lang!r} and {tgt_lang!r}, found {type(s).__name__} and {type(t).__name__}"
    return s, t


def load_jsonl(
    path: str | Path, src_lang: str, tgt_lang: str, *, empty_lines: Policy = "skip", encoding_errors: Policy = "error"
) -> tuple[list[Pair], LoadReport]:
    """Pairs from JSON lines keyed by language code (see :func:`_record_sides`)."""
    p = Path(path)
    report = LoadReport(p.name)
    pairs: list[Pair] = []
    for i, text in _text_lines(p, report, encoding_errors):
        if not text.strip():
            if empty_lines == "error":
                raise UserError(f"{p}:{i}: empty line. Remove it, or set task.data.empty_lines=skip.")
            report.skip("empty line", i)
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{p}:{i}: not valid JSON ({e.msg} at column {e.colno}). Write one JSON object per line.") from None
        except (ValueError, RecursionError) as e:  # a number over Python's 4300-digit limit; thousands of nested [
            what = "nested too deeply" if isinstance(e, RecursionError) else "a number with more than 4300 digits"
            raise UserError(f"{p}:{i}: not valid JSON ({what}). Write one JSON object per line.") from None
        sides = _record_sides(rec, src_lang, tgt_lang)
        if isinstance(sides, str):
            raise UserError(f"{p}:{i}: expected {sides}.")
        for lang, side in zip((src_lang, tgt_lang), sides):
            try:
                side.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate from a "\ud800" escape: no tokenizer or writer takes it
                raise UserError(f"{p}:{i}: {lang}: a lone surrogate \\u{ord(side[e.start]):04x} at character {e.start + 1} (a broken \\u escape), "
                                "not text. Fix the program that wrote the file.") from None
        if (pair := _accept(*sides, str(p), i, report, empty_lines)) is not None:
            pairs.append(pair)
    return pairs, report


def load_hf(
    path: str | Path, split: str, src_lang: str, tgt_lang: str, *, empty_lines: Policy = "skip"
) -> tuple[list[Pair], LoadReport]:
    """Pairs of one split of a ``datasets`` folder saved with ``save_to_disk`` (rows as in jsonl;
    "line" numbers are 1-based row numbers)."""
    import datasets

    p = Path(path)
    try:
        ds = datasets.load_from_disk(str(p))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{p}: not a dataset folder written by save_to_disk ({e}).") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{p}: no split {split!r}; it has {sorted(ds)}. Set task.data.<train|val|test>_split to one of them.")
        ds = ds[split]
    report = LoadReport(f"{p.name}[{split}]")
    pairs: list[Pair] = []
    for i, rec in enumerate(ds, start=1):
        sides = _record_sides(rec, src_lang, tgt_lang)
        if isinstance(sides, str):
            raise UserError(f"{p}[{split}] row {i}: expected {sides}.")
        if (pair := _accept(*sides, f"{p}[{split}]", i, report, empty_lines)) is not None:
            pairs.append(pair)
    return pairs, report


def _find(directory: Path, stem: str) -> Path:
    """``<dir>/<stem>`` or ``<dir>/<stem>.gz``, whichever exists."""
    for cand in (directory / stem, directory / f"{stem}.gz"):
        if cand.is_file():
            return cand
    present = sorted(x.name for x in directory.iterdir())[:12] if directory.is_dir() else []
    raise UserError(f"{directory}: no file {stem} or {stem}.gz (the folder has {present or 'nothing'}). Check task.data.dir, the split name and the language codes.")


def load_split(
    directory: str | Path, split: str, fmt: Format, src_lang: str, tgt_lang: str, *,
    empty_lines: Policy = "skip", encoding_errors: Policy = "error",
) -> tuple[list[Pair], LoadReport]:
    """One split of a data folder in one of the layouts of the module docstring."""
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"{d}: data folder not found. {MULTI30K_HELP}")
    if fmt == "text":
        return load_text_pair(_find(d, f"{split}.{src_lang}"), _find(d, f"{split}.{tgt_lang}"), empty_lines=empty_lines, encoding_errors=encoding_errors)
    if fmt == "tsv":
        return load_tsv(_find(d, f"{split}.tsv"), src_lang, tgt_lang, empty_lines=empty_lines, encoding_errors=encoding_errors)
    if fmt == "jsonl":
        return load_jsonl(_find(d, f"{split}.jsonl"), src_lang, tgt_lang, empty_lines=empty_lines, encoding_errors=encoding_errors)
    return load_hf(d, split, src_lang, tgt_lang, empty_lines=empty_lines)


def default_data_dir() -> Path:
    """``$RLHF_MULTI30K_DIR`` if set, else ``<repo>/../shared/data/multi30k``."""
    env = os.environ.get(MULTI30K_ENV)
    if env:
        return Path(os.path.expanduser(env))
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "multi30k"


def resolve_data_dir(configured: str | None) -> Path:
    """The data folder: the configured one (``~`` expanded) or :func:`default_data_dir`."""
    return Path(os.path.expanduser(configured)) if configured else default_data_dir()


def read_sentences(path: str | Path) -> list[str]:
    """The lines of a text file to translate (gz allowed), UTF-8, whitespace-normalised; empty
    lines are kept (they translate to empty lines, so output line i matches input line i)."""
    p = Path(path)
    return [_clean(decode_line(raw, p, i)) for i, raw in enumerate(read_raw_lines(p), start=1)]


def head(pairs: Sequence[Pair], n: int | None) -> list[Pair]:
    """The first ``n`` pairs (all if None): file order, so a slice is the same on every machine."""
    return list(pairs if n is None else pairs[:n])
