"""Preference data: the schema in four formats, errors naming file/line/field, leak-free splits,
TRL compatibility, and the rater simulator (features against naive loops, shares, agreement)."""

import json
import warnings

import numpy as np
import pytest

from reward_models.data import (
    Preference,
    build_word_tokenizer,
    encode_pairs,
    from_hf_dataset,
    load_preferences,
    save_preferences,
    split_preferences,
    to_hf_dataset,
)
from apps.simulate import (
    Rater,
    SimulateConfig,
    classify_pairs,
    load_sidecar,
    music_candidates,
    music_features,
    prefers,
    prototype,
    prototype_from_sidecar,
    rater_from_sidecar,
    simulate,
    text_features,
    win_rate,
    write_simulation,
)
from rlhf.errors import UserError
from tasks.counterpoint.piece import FirstSpeciesPiece
from tasks.counterpoint.tokens import build_codec


def records(n=6):
    out = []
    for i in range(n):
        out.append(Preference(
            prompt="which pet ? " if i % 2 else "", chosen=f" a dog {i}", rejected=f" a cat {i}",
            margin=0.5 if i == 1 else None, rater_id=f"r{i % 3}", rater_group="A" if i % 3 else "B",
            pair_id=f"p{i}", source=f"src{i % 2}#x{i}", created_at="2024-05-01T12:00:00Z" if i == 2 else None,
            label="tie" if i == 3 else "chosen",
        ))
    return out


@pytest.mark.parametrize("name", ["prefs.jsonl", "prefs.csv", "prefs.parquet", "prefs_ds"])
def test_roundtrip_every_format(tmp_path, name):
    recs = records()
    path = save_preferences(recs, tmp_path / name)
    back = load_preferences(path)
    assert back == recs  # equality ignores the `where` location
    assert back[3].is_tie and back[1].margin == 0.5 and back[0].margin is None


def test_trl_format_both_ways():
    ds = to_hf_dataset(records())
    assert {"prompt", "chosen", "rejected"} <= set(ds.column_names)
    # TRL's implicit-prompt format (no prompt column) reads as empty prompts
    import datasets

    trl_style = datasets.Dataset.from_dict({"chosen": ["good answer"], "rejected": ["bad answer"]})
    (r,) = from_hf_dataset(trl_style)
    assert r.prompt == "" and r.chosen == "good answer" and r.label == "chosen"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "row, field, words",
    [
        ({"prompt": "p", "rejected": "b"}, "chosen", "missing"),
        ({"prompt": "p", "chosen": "a", "rejected": "   "}, "rejected", "empty"),
        ({"chosen": "same", "rejected": "same"}, "chosen", "identical"),
        ({"chosen": "a", "rejected": "b", "margin": "lots"}, "margin", "finite number"),
        ({"chosen": "a", "rejected": "b", "label": "rejected"}, "label", "'chosen' or 'tie'"),
        ({"chosen": "a", "rejected": "b", "created_at": "yesterday"}, "created_at", "ISO 8601"),
        ({"chosen": ["a"], "rejected": "b"}, "chosen", "expected a string"),
    ],
)
def test_errors_name_file_line_and_field(tmp_path, row, field, words):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"chosen": "x", "rejected": "y"}, row])
    with pytest.raises(UserError) as e:
        load_preferences(path)
    msg = str(e.value)
    assert f"{path}:2: {field}:" in msg and words in msg, msg


def test_duplicate_pair_ids_name_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [{"chosen": "a", "rejected": "b", "pair_id": "x"}, {"chosen": "c", "rejected": "d"},
                                                {"chosen": "e", "rejected": "f", "pair_id": "x"}])
    with pytest.raises(UserError, match=rf"{path}:3: pair_id: duplicate 'x' \(first at {path}:1\)"):
        load_preferences(path)


def test_bad_json_csv_and_paths(tmp_path):
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": \n')
    with pytest.raises(UserError, match=r"b.jsonl:2: not valid JSON"):
        load_preferences(bad)
    csv = tmp_path / "b.csv"
    csv.write_text("prompt,chosen,rejected\np,a,b\np,a,b,extra\n")
    with pytest.raises(UserError, match=r"b.csv:3: 1 more cells"):
        load_preferences(csv)
    csv.write_text("prompt,chosen,rejected\np,a,\n")  # empty required cell
    with pytest.raises(UserError, match=r"b.csv:2: rejected: empty"):
        load_preferences(csv)
    with pytest.raises(UserError, match="not found"):
        load_preferences(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="unknown preference file type"):
        load_preferences(tmp_path / "x.txt")


def test_unknown_columns_warn_but_load(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [{"chosen": "a", "rejected": "b", "score_a": 3}])
    with pytest.warns(UserWarning, match=r"unknown column\(s\) \['score_a'\]"):
        (r,) = load_preferences(path)
    assert r.chosen == "a"


def test_csv_empty_optional_cells_are_missing(tmp_path):
    csv = tmp_path / "c.csv"
    csv.write_text('prompt,chosen,rejected,margin,rater_id,label\n,"a, b",c,,r1,\n')
    (r,) = load_preferences(csv)
    assert r.prompt == "" and r.chosen == "a, b" and r.margin is None and r.rater_id == "r1" and r.label == "chosen"


def test_splits_never_leak():
    recs = [Preference("", f"c{i}", f"r{i}", rater_id=f"u{i % 10}", source=f"piece{i % 7}#{i}", pair_id=str(i)) for i in range(140)]
    train, test, dropped = split_preferences(recs, ["rater"], 0.2, seed=0)
    assert {r.rater_id for r in train}.isdisjoint({r.rater_id for r in test})
    assert len({r.rater_id for r in test}) == 2 and dropped == 0 and len(train) + len(test) == 140
    train, test, dropped = split_preferences(recs, ["rater", "source"], 0.3, seed=1)
    assert {r.rater_id for r in train}.isdisjoint({r.rater_id for r in test})
    assert {r.origin for r in train}.isdisjoint({r.origin for r in test})
    assert dropped == 140 - len(train) - len(test) > 0
    with pytest.raises(UserError, match="rater_id: missing"):
        split_preferences([Preference("", "a", "b")] * 3, ["rater"], 0.2, seed=0)


def test_encoding_matches_trl_and_reports_unknown_tokens():
    tok = build_codec("first_species").tokenizer
    rec = Preference("<bos> <cf_below> cf_50 cf_52 <sep>", " iv_+7 iv_+3", " iv_+4 iv_+3 <eos>")
    (c,), (r,) = encode_pairs([rec], tok)
    assert tok.convert_ids_to_tokens(c) == ["<bos>", "<cf_below>", "cf_50", "cf_52", "<sep>", "iv_+7", "iv_+3", "<eos>"]  # eos appended
    assert r[-1] == tok.eos_token_id and r.count(tok.eos_token_id) == 1  # not doubled
    bad = Preference("<bos> <cf_below> cf_50 <sep>", " iv_+99", " iv_+3", where="f.jsonl:7")
    with pytest.raises(UserError, match=r"f.jsonl:7: chosen: contains words/tokens the tokenizer does not know \(e.g. \['iv_\+99'\]\)"):
        encode_pairs([bad], tok)
    words = build_word_tokenizer(["Which pet?", " a Dog."])
    (c,), _ = encode_pairs([Preference("which pet?", " a dog.", " a pet.")], words)
    assert words.convert_ids_to_tokens(c) == ["which", "pet", "?", "a", "dog", ".", "<eos>"]


# --------------------------------------------------------------------------- simulator


def naive_music_features(p: FirstSpeciesPiece):
    from tasks.counterpoint.scoring import score

    cp, cf = p.counterpoint, p.cantus
    moves = [cp[i] - cp[i - 1] for i in range(1, len(cp))]
    cfm = [cf[i] - cf[i - 1] for i in range(1, len(cf))]
    steps = sum(1 <= abs(m) <= 2 for m in moves) / len(moves)
    leaps = sum(abs(m) > 4 for m in moves) / len(moves)
    contrary = sum((a > 0 and b < 0) or (a < 0 and b > 0) for a, b in zip(moves, cfm)) / len(moves)
    register = (sum(cp) / len(cp) - 60) / 12
    rules = float(score("first_species", [p]).totals[0]) / len(cp)
    return [steps, contrary, leaps, register, rules]


def test_music_features_match_naive_loops():
    pieces = [
        FirstSpeciesPiece((62, 65, 64, 62, 67, 65, 69, 67, 65, 64, 62), (69, 69, 67, 71, 71, 69, 72, 71, 74, 73, 74), "below", 2),
        FirstSpeciesPiece((60, 62, 64, 62, 60), (67, 77, 67, 59, 72), "below", 0),
        FirstSpeciesPiece((60, 59, 57, 59, 60, 62), (48, 55, 53, 43, 45, 48), "above", 0),
    ]
    np.testing.assert_allclose(music_features(pieces), [naive_music_features(p) for p in pieces], atol=1e-12)


def test_text_features_and_prefers():
    assert text_features([" get a calm cat , kids love it .", "no animal"]).tolist() == [[0, 1, 0, 0, 0], [0, 0, 0, 0, 0]]
    cfg = SimulateConfig(domain="text", groups=[{"name": "A", "share": 0.7, "type": "dogs"}, {"name": "B", "share": 0.3, "type": "cats"}])
    a, b = prototype(cfg, "A"), prototype(cfg, "B")
    assert prefers(a, " a dog .", " a cat .") and prefers(b, " a cat .", " a dog .")
    assert prefers(a, " a cat .", " a fish .") and prefers(b, " a cat .", " a fish .")  # agreed
    assert win_rate(a, [" a dog .", " a fish ."], [" a cat .", " a fish ."]) == 0.75  # a tie counts half
    warm = Rater("w", "A", "dogs", "text", a.weights, temperature=1.0)
    noisy = [prefers(warm, " a dog .", " a cat .", noisy=True, rng=np.random.default_rng(i)) for i in range(400)]
    assert 0.65 < np.mean(noisy) < 0.81  # p = σ((4 − 3) / 1) = 0.73


def test_simulation_shares_agreement_and_sidecar(tmp_path):
    cfg = SimulateConfig(domain="text", raters=20, pairs_per_rater=10, disputed_share=0.4, min_gap=0.5, temperature=0.1,
                         groups=[{"name": "A", "share": 0.7, "type": "dogs"}, {"name": "B", "share": 0.3, "type": "cats"}])
    sim = simulate(cfg)
    assert len(sim.records) == 200
    assert [r.group for r in sim.raters].count("A") == 14
    disputed = [sim.meta["pairs"][r.pair_id]["disputed"] for r in sim.records]
    assert np.mean(disputed) == pytest.approx(0.4)
    for r in sim.records:  # disputed ⇔ the prototypes disagree on the pair
        pa, pb = prototype(cfg, "A"), prototype(cfg, "B")
        assert sim.meta["pairs"][r.pair_id]["disputed"] == (prefers(pa, r.chosen, r.rejected) != prefers(pb, r.chosen, r.rejected))
        gap = text_features([r.chosen])[0] - text_features([r.rejected])[0]  # the oracle BT ceiling's input
        assert sim.meta["pairs"][r.pair_id]["feature_gap"] == pytest.approx(gap.tolist())
    path = write_simulation(sim, tmp_path / "pets.csv")
    assert load_preferences(path) == sim.records
    meta = load_sidecar(path)
    assert meta["raters"]["r000"]["group"] == "A"
    assert prototype_from_sidecar(meta, "B") == prototype(cfg, "B")
    assert rater_from_sidecar(meta, "r019").group == "B"
    with pytest.raises(Exception, match="sum to 1"):
        SimulateConfig(groups=[{"name": "A", "share": 0.6, "type": "stepwise"}, {"name": "B", "share": 0.3, "type": "leaps"}])


def test_music_candidates_pair_real_lines_with_the_same_prompt():
    cf = (50, 53, 52, 50, 55, 53, 57, 55, 53, 52, 50)
    lines = [(62, 65, 64, 62, 67, 65, 69, 67, 65, 64, 62), (57, 57, 55, 57, 59, 60, 60, 59, 57, 55, 57), (65, 65, 67, 65, 64, 62, 64, 62, 62, 61, 62)]
    pieces = [FirstSpeciesPiece(cf, cp, "below", 2, f"bach/x#p1:B{v}+0") for cp, v in zip(lines, "SAT")]
    cfg = SimulateConfig(music={"variants": 2})
    c = music_candidates(cfg, np.random.default_rng(0), pieces=pieces)
    assert len(set(c.prompt)) == 1 and 3 < len(c.response) <= 9
    assert all(s == "bach/x#p1" for s in c.source)
    codec = build_codec("first_species")
    ids = codec.tokenizer(c.prompt[0] + c.response[0])["input_ids"]
    n_prompt = len(codec.encode_prompt((cf, "below")))  # the cantus padded to its slots
    assert codec.decode(ids[:n_prompt], ids[n_prompt:]).counterpoint == lines[0]  # the strings are the task's tokens
    pairs, disputed = classify_pairs(c, prototype(cfg, "A"), prototype(cfg, "B"), 0.0)
    ua, ub = prototype(cfg, "A").utility(c.items), prototype(cfg, "B").utility(c.items)
    for (i, j), d in zip(pairs, disputed):
        assert d == ((ua[i] > ua[j]) != (ub[i] > ub[j]))


def test_rater_utility_is_linear_in_features():
    r = Rater("x", "A", "stepwise", "music", (2.0, 2.0, -1.0, 0.0, 1.0), 0.05)
    p = FirstSpeciesPiece((60, 62, 64, 62, 60), (67, 77, 67, 59, 72), "below", 0)
    assert r.utility([p])[0] == pytest.approx(np.dot(naive_music_features(p), r.weights))


def test_warnings_are_not_raised_for_clean_files(tmp_path):
    path = save_preferences(records(), tmp_path / "ok.jsonl")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_preferences(path)


def test_unlabelled_candidate_pairs_are_refused_as_preferences(tmp_path):
    """An `rlhf export-pairs` file has the schema's columns, but its chosen/rejected are only the
    sides A and B: loading it as preferences would teach that A always wins."""
    row = {"prompt": "p", "chosen": "a", "rejected": "b", "pair_id": "x", "metadata": {"kind": "candidate-pair", "domain": "text"}}
    path = write_jsonl(tmp_path / "pairs.jsonl", [row])
    with pytest.raises(UserError, match=rf"{path}:1: an unlabelled candidate pair.*rlhf label serve"):
        load_preferences(path)
