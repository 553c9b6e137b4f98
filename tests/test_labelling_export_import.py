"""Labelling files: export-pairs writes every format with stable ids; Label Studio, CSV and JSONL
labels come back into the preference schema unchanged; malformed and conflicting input is
refused with file and record, and never leaves a partial output."""

import csv
import json
import re
import xml.etree.ElementTree as ET

import pytest

from reward_models.data import load_preferences
from rlhf.errors import UserError
from apps.labelling.cli import export_pairs_main, import_labels_main
from apps.labelling.loop import pair_pieces, tiny_prior
from apps.labelling.pairs import make_pair_id, read_pairs
from tasks.counterpoint.export import read_back

CANTUS = ["D4 F4 E4 D4 G4 F4 A4 G4 F4 E4 D4", "C4 E4 F4 G4 E4 A4 G4 E4 F4 E4 D4 C4"]


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    return tiny_prior(tmp_path_factory.mktemp("prior"), steps=0)


@pytest.fixture(scope="module")
def export(prior, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "round1"
    argv = ["--model", str(prior), "--out", str(out), "--pairs-per-prompt", "1", "--seed", "3"]
    for c in CANTUS:
        argv += ["--cantus", c]
    assert export_pairs_main(argv) == 0
    return out


def ls_export(tasks, judgements):
    """A Label Studio JSON export of ``tasks`` as Label Studio writes it: judgements maps a task
    index to [(completed_by, "A"|"B"|"tie"|"skip", time)]."""
    out = []
    for i, task in enumerate(tasks):
        anns = []
        for j, (user, choice, at) in enumerate(judgements.get(i, [])):
            result = []
            if choice in ("A", "B"):
                result.append({"id": f"pw{i}{j}", "from_name": "pw", "to_name": "text1,text2", "type": "pairwise", "origin": "manual",
                               "value": {"selected": "left" if choice == "A" else "right"}})
            elif choice == "tie":
                result.append({"id": f"tie{i}{j}", "from_name": "tie", "to_name": "text1", "type": "choices", "origin": "manual",
                               "value": {"choices": ["Tie"]}})
            anns.append({"id": 100 * (i + 1) + j, "completed_by": user, "result": result, "was_cancelled": choice == "skip",
                         "ground_truth": False, "created_at": at, "updated_at": at, "draft_created_at": None, "lead_time": 4.2,
                         "prediction": {}, "result_count": 0, "unique_id": f"u{i}{j}", "import_id": None, "last_action": None,
                         "task": i + 1, "project": 3, "updated_by": None, "parent_prediction": None, "parent_annotation": None,
                         "last_created_by": None})
        out.append({"id": i + 1, "annotations": anns, "file_upload": "tasks.json", "drafts": [], "predictions": [], "data": task["data"],
                    "meta": {}, "created_at": "2024-05-01T09:00:00.000000Z", "updated_at": "2024-05-01T10:00:00.000000Z", "inner_id": i + 1,
                    "total_annotations": len(anns), "cancelled_annotations": sum(a["was_cancelled"] for a in anns), "total_predictions": 0,
                    "comment_count": 0, "unresolved_comment_count": 0, "last_comment_updated_at": None, "project": 3, "updated_by": None,
                    "comment_authors": []})
    return out


def expected(pair, choice, rater, at):
    chosen, rejected = (pair.b, pair.a) if choice == "B" else (pair.a, pair.b)
    return {"prompt": pair.prompt, "chosen": chosen, "rejected": rejected, "rater_id": rater, "pair_id": f"{pair.pair_id}/{rater}",
            "source": pair.source, "created_at": at, "label": "tie" if choice == "tie" else "chosen"}


def as_dicts(records):
    return [{k: v for k, v in r.to_dict().items() if k not in ("margin", "rater_group")} for r in records]


def test_export_writes_every_format(export, prior):
    pairs = read_pairs(export / "pairs.jsonl")
    assert len(pairs) == 4 and len({p.prompt for p in pairs}) == 4  # 2 cantus x 2 positions x 1 pair
    rows = [json.loads(x) for x in (export / "pairs.jsonl").read_text().splitlines()]
    for row, p in zip(rows, pairs):
        assert re.fullmatch(r"[0-9a-f]{16}", p.pair_id) and row["metadata"]["kind"] == "candidate-pair"
        meta = p.metadata
        assert meta["models"][0]["path"] == str(prior) and meta["models"][0]["id"].startswith("prior@")
        assert meta["sampling"] == {"temperature": 1.0, "seed": 3, "samples_per_prompt": 4, "pairs_per_prompt": 1}
        assert p.source == f"{meta['prompt_name']}#{p.pair_id}"
        for key, piece in zip("ab", pair_pieces(p)):
            voices = {v["role"]: v for v in p.notes(key)}
            assert voices["cantus"]["pitches"] == list(piece.cantus) and voices["counterpoint"]["pitches"] == list(piece.counterpoint)
            assert set(voices["cantus"]["durations"]) == {4.0}
            files = meta["files"][key]
            upper, lower = read_back(export / files["musicxml"])
            assert (upper, lower) == (list(piece.upper), list(piece.lower))
            assert (export / files["midi"]).read_bytes()[:4] == b"MThd"
    # the file has the schema's (TRL) columns, with A and B as chosen/rejected; being unlabelled,
    # it is refused as preference data (training on it would teach that A always wins)
    rows = [json.loads(line) for line in (export / "pairs.jsonl").read_text().splitlines() if line.strip()]
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [(p.prompt, p.a, p.b) for p in pairs]
    with pytest.raises(UserError, match="unlabelled candidate pair"):
        load_preferences(export / "pairs.jsonl")
    # CSV for spreadsheets
    with (export / "pairs.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["pair_id"] for r in table] == [p.pair_id for p in pairs] and all(r["preferred"] == "" for r in table)
    assert table[0]["display_a"].startswith("counterpoint: ") and table[0]["musicxml_a"].startswith("music/")
    # Label Studio: every $variable of the config is in every task's data
    tasks = json.loads((export / "labelstudio" / "tasks.json").read_text())
    config = (export / "labelstudio" / "config.xml").read_text()
    root = ET.fromstring(config)
    variables = {e.get("value")[1:] for e in root.iter() if (e.get("value") or "").startswith("$")}
    assert variables == {"prompt_text", "text1", "text2", "roll1", "roll2"}
    assert all(variables <= set(t["data"]) for t in tasks) and len(tasks) == 4
    pw = root.find(".//Pairwise")
    assert pw.get("toName") == "text1,text2" and root.find(".//Choices").get("name") == "tie"
    assert tasks[0]["data"]["roll1"].startswith("<svg") and tasks[0]["data"]["midi1"].endswith(".mid")
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["pairs"] == 4 and manifest["task"] == "counterpoint"


def test_pair_ids_are_stable(export, prior, tmp_path):
    argv = ["--model", str(prior), "--pairs-per-prompt", "1", "--seed", "3", "--no-scores"]
    for c in CANTUS:
        argv += ["--cantus", c]
    assert export_pairs_main([*argv, "--out", str(tmp_path / "again")]) == 0
    first, again = read_pairs(export / "pairs.jsonl"), read_pairs(tmp_path / "again" / "pairs.jsonl")
    assert [p.pair_id for p in first] == [p.pair_id for p in again]
    p = first[0]
    model_id = p.metadata["models"][0]["id"]
    assert make_pair_id(p.prompt, p.a, p.b, [model_id, model_id]) == p.pair_id == make_pair_id(p.prompt, p.b, p.a, [model_id] * 2)
    assert make_pair_id(p.prompt, p.a, p.b, ["other@000000000000"] * 2) != p.pair_id
    # an existing folder is never overwritten by accident
    assert export_pairs_main([*argv, "--out", str(tmp_path / "again")]) == 2


def test_labelstudio_round_trip(export, tmp_path, capsys):
    pairs = read_pairs(export / "pairs.jsonl")
    tasks = json.loads((export / "labelstudio" / "tasks.json").read_text())
    bob = {"id": 9, "first_name": "Bob", "last_name": "", "email": "bob@example.org", "avatar": None}
    judgements = {0: [(7, "A", "2024-05-01T10:00:01.100000Z"), (bob, "B", "2024-05-01T10:05:00.000000Z")],
                  1: [(7, "B", "2024-05-01T10:00:02.000000Z"), (bob, "A", "2024-05-01T10:06:00.000000Z")],
                  2: [(7, "tie", "2024-05-01T10:00:03.000000Z")],
                  3: [(7, "skip", "2024-05-01T10:00:04.000000Z")]}
    ls = tmp_path / "project-3-at-2024-05-01.json"
    ls.write_text(json.dumps(ls_export(tasks, judgements)))
    out = tmp_path / "labels.jsonl"
    assert import_labels_main([str(ls), "--pairs", str(export / "pairs.jsonl"), "--out", str(out)]) == 0
    assert "skipped 1" in capsys.readouterr().out
    want = [expected(pairs[i], choice, "ls-7" if user == 7 else "bob@example.org", at)
            for i, js in judgements.items() for user, choice, at in js if choice != "skip"]
    got = load_preferences(out)
    assert sorted(as_dicts(got), key=json.dumps) == sorted(want, key=json.dumps)
    # the same pairs come back: pair ids before the '/', contents equal to the export
    by_id = {p.pair_id: p for p in pairs}
    for r in got:
        p = by_id[r.pair_id.rsplit("/", 1)[0]]
        assert {r.chosen, r.rejected} == {p.a, p.b} and r.prompt == p.prompt
    # without the pairs file the tasks carry everything needed
    out2 = tmp_path / "labels2.jsonl"
    assert import_labels_main([str(ls), "--out", str(out2)]) == 0
    assert as_dicts(load_preferences(out2)) == as_dicts(got)


def test_csv_and_jsonl_round_trips(export, tmp_path, capsys):
    pairs = read_pairs(export / "pairs.jsonl")
    with (export / "pairs.csv").open() as f:
        rows = list(csv.DictReader(f))
    fill = [("A", "carol", "2024-06-01T08:00:00Z"), ("b", "carol", "2024-06-01T08:01:00Z"), ("tie", "", "2024-06-01T08:02:00Z"), ("", "", "")]
    for row, (pref, rater, at) in zip(rows, fill):
        row.update(preferred=pref, rater_id=rater, created_at=at)
    filled = tmp_path / "filled.csv"
    with filled.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "from_csv.jsonl"
    assert import_labels_main([str(filled), "--rater", "dave", "--pairs", str(export / "pairs.jsonl"), "--out", str(out)]) == 0
    want = [expected(pairs[0], "A", "carol", fill[0][2]), expected(pairs[1], "B", "carol", fill[1][2]), expected(pairs[2], "tie", "dave", fill[2][2])]
    assert as_dicts(load_preferences(out)) == want
    # JSONL in, the same JSONL out; the same labels twice are one
    again = tmp_path / "again.jsonl"
    assert import_labels_main([str(out), str(out), "--out", str(again)]) == 0
    assert "duplicates removed 3" in capsys.readouterr().out
    assert as_dicts(load_preferences(again)) == want
    # and CSV output in the schema reads back the same
    as_csv = tmp_path / "again.csv"
    assert import_labels_main([str(out), "--out", str(as_csv)]) == 0
    assert as_dicts(load_preferences(as_csv)) == want


def _ls_file(export, tmp_path, judgements, edit=None, name="ls.json"):
    tasks = json.loads((export / "labelstudio" / "tasks.json").read_text())
    data = ls_export(tasks, judgements)
    if edit:
        edit(data)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _set(path, value):
    def edit(data):
        obj = data
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value
    return edit


T = "2024-05-01T10:00:00Z"
MALFORMED = {
    "ls-bad-selection": (lambda e, t: _ls_file(e, t, {0: [(1, "A", T)], 1: [(1, "A", T)]}, _set([1, "annotations", 0, "result", 0, "value", "selected"], "middle")),
                         r"ls\.json: task 2 \(id 2\) annotation 1: result: pairwise 'selected' is 'middle'"),
    "ls-no-pair-id": (lambda e, t: _ls_file(e, t, {0: [(1, "A", T)]}, lambda d: d[0]["data"].pop("pair_id")), r"ls\.json: task 1 \(id 1\): data\.pair_id: missing"),
    "ls-not-a-list": (lambda e, t: (t / "ls.json", (t / "ls.json").write_text('{"tasks": []}'))[0], r"ls\.json: expected a JSON array of tasks"),
    "ls-broken-json": (lambda e, t: (t / "ls.json", (t / "ls.json").write_text('[{"data": '))[0], r"ls\.json: not valid JSON"),
    "ls-side-and-tie": (lambda e, t: _ls_file(e, t, {0: [(1, "A", T)]}, lambda d: d[0]["annotations"][0]["result"].append(
        {"type": "choices", "from_name": "tie", "value": {"choices": ["Tie"]}})), r"task 1 \(id 1\) annotation 1: result: both a side"),
    "ls-no-user": (lambda e, t: _ls_file(e, t, {0: [(None, "A", T)]}), r"annotation 1: completed_by: None"),
    "ls-edited-candidate": (lambda e, t: _ls_file(e, t, {0: [(1, "A", T)]}, _set([0, "data", "a"], " iv_+3 <eos>")), r"task 1 \(id 1\): a: differs from pair"),
    "csv-bad-choice": (lambda e, t: _csv(e, t, {1: {"preferred": "C", "rater_id": "x"}}), r"bad\.csv:3: preferred: 'C'; write A, B, tie or skip"),
    "csv-no-rater": (lambda e, t: _csv(e, t, {0: {"preferred": "A"}}), r"bad\.csv:2: rater_id: empty; fill the column or pass --rater"),
    "csv-bad-time": (lambda e, t: _csv(e, t, {0: {"preferred": "A", "rater_id": "x", "created_at": "yesterday"}}), r"bad\.csv:2: created_at: 'yesterday'"),
    "jsonl-missing-chosen": (lambda e, t: (t / "bad.jsonl", (t / "bad.jsonl").write_text('{"chosen": "x", "rejected": "y"}\n{"rejected": "y"}\n'))[0],
                             r"bad\.jsonl:2: chosen: missing"),
    "unlabelled-pairs": (lambda e, t: e / "pairs.jsonl", r"pairs\.jsonl: an unlabelled pairs export"),
}


def _csv(export, tmp_path, changes):
    with (export / "pairs.csv").open() as f:
        rows = list(csv.DictReader(f))
    for i, ch in changes.items():
        rows[i].update(ch)
    path = tmp_path / "bad.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_is_refused_with_file_and_record(export, tmp_path, capsys, case):
    make, message = MALFORMED[case]
    src = make(export, tmp_path)
    out = tmp_path / "out.jsonl"
    assert import_labels_main([str(src), "--pairs", str(export / "pairs.jsonl"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl*"))  # nothing written, not even a temp file


def test_conflicts_duplicates_and_atomic_output(export, tmp_path, capsys):
    pairs = read_pairs(export / "pairs.jsonl")
    early, late = "2024-05-01T10:00:00Z", "2024-05-02T10:00:00Z"
    a = _ls_file(export, tmp_path, {0: [(5, "A", early)], 1: [(5, "B", early)]}, name="a.json")
    b = _ls_file(export, tmp_path, {0: [(5, "B", late)], 1: [(5, "B", late)]}, name="b.json")  # pair 0 relabelled, pair 1 the same again
    out = tmp_path / "out.jsonl"
    out.write_text("old content\n")
    assert import_labels_main([str(a), str(b), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "conflict: rater ls-5 labelled the same pair differently" in err and "a.json: task 1 (id 1) annotation 1" in err and "b.json: task 1" in err
    assert out.read_text() == "old content\n"  # a failed import leaves the old file as it was
    assert import_labels_main([str(a), str(b), "--out", str(out), "--overwrite", "--on-conflict", "latest"]) == 0
    assert "duplicates removed 1; conflicts resolved 1" in capsys.readouterr().out
    got = as_dicts(load_preferences(out))
    assert got == [expected(pairs[1], "B", "ls-5", early), expected(pairs[0], "B", "ls-5", late)]
    assert import_labels_main([str(a), str(b), "--out", str(out), "--overwrite", "--on-conflict", "drop"]) == 0
    assert as_dicts(load_preferences(out)) == [expected(pairs[1], "B", "ls-5", early)]
    # different raters on the same pair are not a conflict
    c = _ls_file(export, tmp_path, {0: [(5, "A", early), (6, "B", early)]}, name="c.json")
    assert import_labels_main([str(c), "--out", str(tmp_path / "c.jsonl")]) == 0
    assert import_labels_main([str(c), "--out", str(tmp_path / "c.jsonl")]) == 2  # exists: needs --overwrite
    assert "already exists" in capsys.readouterr().err


def test_translation_pairs_are_text(tmp_path):
    from apps.labelling.server import pair_view
    from rlhf.models import ModelConfig, build_model
    from tasks.translation.tokenizer import TranslationCodec, train_tokenizer

    en = ["a man rides a horse .", "two dogs play in the snow .", "a woman sings on a stage .", "children run in the park ."]
    de = ["ein mann reitet ein pferd .", "zwei hunde spielen im schnee .", "eine frau singt auf einer buehne .", "kinder rennen im park ."]
    codec = TranslationCodec(train_tokenizer(en + de, "en", "de", vocab_size=300, min_frequency=1), "en", "de")
    model = build_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, dropout=0.0, max_positions=96), codec.tokenizer)
    model.save_pretrained(tmp_path / "mt")
    codec.save(tmp_path / "mt")
    (tmp_path / "src.en").write_text("\n".join(en[:2]) + "\n\n")
    assert export_pairs_main(["--model", str(tmp_path / "mt"), "--prompts", str(tmp_path / "src.en"), "--out", str(tmp_path / "x"), "--pairs-per-prompt", "2"]) == 0
    pairs = read_pairs(tmp_path / "x" / "pairs.jsonl")
    assert pairs and {p.prompt for p in pairs} <= set(en[:2]) and all(p.domain == "text" for p in pairs)
    view = pair_view(pairs[0], 0, len(pairs))
    assert view["a"]["notes"] is None and view["a"]["text"] == pairs[0].a.strip() and view["prompt"] == pairs[0].prompt
    assert "HyperText" not in (tmp_path / "x" / "labelstudio" / "config.xml").read_text() and not (tmp_path / "x" / "music").exists()
    # a counterpoint model given sentences (and vice versa) is a user error
    assert export_pairs_main(["--model", str(tmp_path / "mt"), "--out", str(tmp_path / "y")]) == 2


def test_export_pairs_user_errors(tmp_path, capsys, prior):
    assert export_pairs_main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert export_pairs_main(["--model", str(prior), "--out", str(tmp_path / "o"), "--cantus", "D4 X9"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert export_pairs_main(["--model", str(prior), "--out", str(tmp_path / "o"), "--transpose", "up"]) == 2
    assert export_pairs_main(["--out", str(tmp_path / "o")]) == 2
    assert "give --model" in capsys.readouterr().err
    assert export_pairs_main(["--bogus"]) == 2
    assert not (tmp_path / "o").exists()


def test_two_models_head_to_head(prior, tmp_path, capsys):
    """Pairs of prior vs another model (one sample each, random sides); labels through the web
    API; `label export` reports each model's win rate."""
    from apps.labelling.cli import label_main
    from apps.labelling.loop import post_json, serving

    other = tiny_prior(tmp_path / "other", steps=0, seed=1)
    out = tmp_path / "h2h"
    assert export_pairs_main(["--model", str(prior), "--model", str(other), "--out", str(out), "--cantus", CANTUS[0],
                              "--pairs-per-prompt", "3", "--no-scores"]) == 0
    pairs = read_pairs(out / "pairs.jsonl")
    assert len(pairs) == 6 and all({p.metadata["candidates"]["a"]["model"], p.metadata["candidates"]["b"]["model"]} == {0, 1} for p in pairs)
    assert [m["path"] for m in pairs[0].metadata["models"]] == [str(prior), str(other)]
    with serving(out / "pairs.jsonl", tmp_path / "l.sqlite") as url:
        for p in pairs:  # this rater always prefers the first model's piece
            side = "A" if p.metadata["candidates"]["a"]["model"] == 0 else "B"
            post_json(url + "/api/labels", {"pair_id": p.pair_id, "rater": "judge", "choice": side})
    assert label_main(["export", "--pairs", str(out / "pairs.jsonl"), "--db", str(tmp_path / "l.sqlite"), "--out", str(tmp_path / "l.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert f"{prior}: win rate 1.000 (6 wins, 0 ties, 0 losses)" in printed and f"{other}: win rate 0.000" in printed
