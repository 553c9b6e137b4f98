"""Parallel-corpus loaders: every format loads the same pairs, and every input mistake
(misaligned files, empty lines, bad encoding, malformed TSV/JSONL, missing files) gives a
UserError naming the file and line, or a counted skip that never shifts the alignment.
All inputs are written here; Multi30k is only read by the last test (skipped without it)."""

import gzip
import json

import pytest

from rlhf.errors import UserError
from tasks.translation.data import (
    MULTI30K_ENV,
    load_hf,
    load_jsonl,
    load_split,
    load_text_pair,
    load_tsv,
    read_sentences,
    resolve_data_dir,
)

EN = ["A dog runs.", "Two men talk.", "A girl sings a song."]
DE = ["Ein Hund rennt.", "Zwei Männer reden.", "Ein Mädchen singt ein Lied."]


def write(path, lines, gz=False, newline="\n"):
    data = "".join(line + newline for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def test_aligned_text_files_plain_and_gzip(tmp_path):
    for gz in (False, True):
        suffix = ".gz" if gz else ""
        s = write(tmp_path / f"train.en{suffix}", EN, gz)
        t = write(tmp_path / f"train.de{suffix}", DE, gz)
        pairs, report = load_text_pair(s, t)
        assert [(p.src, p.tgt) for p in pairs] == list(zip(EN, DE))
        assert report.kept == 3 and report.n_skipped == 0
        assert pairs[1].origin.endswith(":2")


def test_misaligned_files_name_both_files_and_counts(tmp_path):
    s = write(tmp_path / "a.en", EN)
    t = write(tmp_path / "a.de", DE[:2])
    with pytest.raises(UserError) as e:
        load_text_pair(s, t)
    msg = str(e.value)
    assert "a.en" in msg and "a.de" in msg and "3 lines" in msg and "has 2" in msg


def test_empty_line_is_a_counted_skip_that_keeps_alignment(tmp_path):
    s = write(tmp_path / "a.en", [EN[0], "", EN[2]])
    t = write(tmp_path / "a.de", DE)
    pairs, report = load_text_pair(s, t)
    assert [(p.src, p.tgt) for p in pairs] == [(EN[0], DE[0]), (EN[2], DE[2])]  # line 3 still pairs with line 3
    assert report.skipped == {"empty source": [2]}
    assert "skipped 1" in report.summary() and "lines 2" in report.summary()
    with pytest.raises(UserError, match=r"a\.en:2: empty source"):
        load_text_pair(s, t, empty_lines="error")


def test_invalid_utf8_names_file_line_and_byte(tmp_path):
    s = write(tmp_path / "a.en", EN)
    t = tmp_path / "a.de"
    t.write_bytes(b"Ein Hund rennt.\nZwei M\xe4nner reden.\nEin M\xc3\xa4dchen singt.\n")  # line 2 is latin-1
    with pytest.raises(UserError, match=r"a\.de:2: not UTF-8 \(byte 0xe4 at column 7\)"):
        load_text_pair(s, t)
    pairs, report = load_text_pair(s, t, encoding_errors="skip")
    assert [p.tgt for p in pairs] == ["Ein Hund rennt.", "Ein Mädchen singt."]
    assert report.skipped == {"not UTF-8": [2]}


def test_line_ends_bom_and_unicode_separators(tmp_path):
    s = tmp_path / "a.en"
    s.write_bytes(b"\xef\xbb\xbfA dog\r\nTwo men\r\n")  # BOM and Windows line ends
    t = tmp_path / "a.de"
    t.write_bytes("Ein Hund\u2028bellt\nZwei Männer".encode())  # U+2028 inside a line, no final newline
    pairs, _ = load_text_pair(s, t)
    assert [(p.src, p.tgt) for p in pairs] == [("A dog", "Ein Hund bellt"), ("Two men", "Zwei Männer")]


def test_corrupt_gzip(tmp_path):
    s = tmp_path / "a.en.gz"
    s.write_bytes(b"not gzip at all")
    t = write(tmp_path / "a.de", DE)
    with pytest.raises(UserError, match="not a readable gzip file"):
        load_text_pair(s, t)


def test_tsv_with_and_without_header(tmp_path):
    plain = write(tmp_path / "plain.tsv", [f"{e}\t{d}" for e, d in zip(EN, DE)])
    pairs, _ = load_tsv(plain, "en", "de")
    assert [(p.src, p.tgt) for p in pairs] == list(zip(EN, DE))
    headed = write(tmp_path / "headed.tsv", ["id\tde\ten"] + [f"{i}\t{d}\t{e}" for i, (e, d) in enumerate(zip(EN, DE))])
    pairs, report = load_tsv(headed, "en", "de")
    assert [(p.src, p.tgt) for p in pairs] == list(zip(EN, DE)) and report.kept == 3


def test_tsv_without_a_tab_is_an_error_with_its_line(tmp_path):
    bad = write(tmp_path / "bad.tsv", [f"{EN[0]}\t{DE[0]}", f"{EN[1]}    {DE[1]}"])
    with pytest.raises(UserError, match=r"bad\.tsv:2: expected at least 2 tab-separated fields, found 1"):
        load_tsv(bad, "en", "de")


def test_jsonl_flat_and_wmt_style(tmp_path):
    recs = [{"en": EN[0], "de": DE[0]}, {"translation": {"de": DE[1], "en": EN[1]}}, {"en": EN[2], "de": DE[2], "id": 7}]
    f = write(tmp_path / "train.jsonl", [json.dumps(r, ensure_ascii=False) for r in recs])
    pairs, _ = load_jsonl(f, "en", "de")
    assert [(p.src, p.tgt) for p in pairs] == list(zip(EN, DE))


def test_jsonl_errors_name_line_and_field(tmp_path):
    f = write(tmp_path / "bad.jsonl", [json.dumps({"en": EN[0], "de": DE[0]}), "{not json"])
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not valid JSON"):
        load_jsonl(f, "en", "de")
    g = write(tmp_path / "missing.jsonl", [json.dumps({"en": EN[0], "fr": "Un chien."})])
    with pytest.raises(UserError, match=r"missing\.jsonl:1: expected keys 'en' and 'de'.*missing \['de'\]"):
        load_jsonl(g, "en", "de")


def test_hf_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"translation": [{"en": e, "de": d} for e, d in zip(EN, DE)]})})
    dd.save_to_disk(str(tmp_path / "ds"))
    pairs, _ = load_hf(tmp_path / "ds", "train", "en", "de")
    assert [(p.src, p.tgt) for p in pairs] == list(zip(EN, DE))
    with pytest.raises(UserError, match=r"no split 'val'; it has \['train'\]"):
        load_hf(tmp_path / "ds", "val", "en", "de")


def test_load_split_layouts_and_missing_files(tmp_path):
    write(tmp_path / "val.en.gz", EN, gz=True)
    write(tmp_path / "val.de", DE)
    pairs, _ = load_split(tmp_path, "val", "text", "en", "de")  # .gz on one side only is fine
    assert len(pairs) == 3
    with pytest.raises(UserError, match=r"no file test\.en or test\.en\.gz.*val\.de"):
        load_split(tmp_path, "test", "text", "en", "de")
    with pytest.raises(UserError, match="data folder not found.*multi30k"):
        load_split(tmp_path / "nope", "train", "text", "en", "de")


def test_data_dir_from_config_then_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(MULTI30K_ENV, str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir(str(tmp_path / "cfg")) == tmp_path / "cfg"
    monkeypatch.delenv(MULTI30K_ENV)
    assert resolve_data_dir(None).parts[-3:] == ("shared", "data", "multi30k")


def test_read_sentences_keeps_empty_lines(tmp_path):
    f = write(tmp_path / "in.txt", ["A dog.", "", "  Two   men. "])
    assert read_sentences(f) == ["A dog.", "", "Two men."]


def test_multi30k_splits_load_with_documented_sizes():
    d = resolve_data_dir(None)
    if not (d / "train.en.gz").is_file():
        pytest.skip(f"Multi30k not found in {d} (set {MULTI30K_ENV}); see docs/translation.md")
    sizes = {}
    for split in ("train", "val", "test_2016_flickr"):
        pairs, report = load_split(d, split, "text", "en", "de")
        sizes[split] = report.kept + report.n_skipped
    assert sizes == {"train": 29000, "val": 1014, "test_2016_flickr": 1000}
