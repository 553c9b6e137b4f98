"""Token scheme: round trips, the saved Hugging Face tokenizer, range errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from music21 import interval, note
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rlhf.errors import UserError
from tasks.counterpoint.cantus import default_eval_cantus
from tasks.counterpoint.piece import (
    MELODY_N_EVENTS,
    MELODY_STEPS,
    NO_EVENT,
    NOTE_OFF,
    FirstSpeciesPiece,
    Melody,
    note_on,
)
from tasks.counterpoint.tokens import Codec, build_codec


def random_pieces(n: int, seed: int = 0) -> list[FirstSpeciesPiece]:
    """Random first-species pieces on the Fux cantus firmi (any interval within +-24)."""
    rng = np.random.default_rng(seed)
    cantus = default_eval_cantus(range(-6, 7))
    out = []
    for i in range(n):
        name, cf, final = cantus[rng.integers(len(cantus))]
        cp = tuple(int(c + rng.integers(-24, 25)) for c in cf)
        pos = "below" if rng.random() < 0.5 else "above"
        out.append(FirstSpeciesPiece(cf, cp, pos, final, f"{name}#{i}"))
    return out


def random_melodies(n: int, seed: int = 0) -> list[Melody]:
    rng = np.random.default_rng(seed)
    return [
        Melody(tuple(int(e) for e in rng.integers(0, MELODY_N_EVENTS, MELODY_STEPS)), 0, f"m{i}")
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def fs() -> Codec:
    return build_codec("first_species")


@pytest.fixture(scope="module")
def mel() -> Codec:
    return build_codec("melody")


def test_tokenizer_is_hf_fast_wordlevel(fs: Codec) -> None:
    assert isinstance(fs.tokenizer, PreTrainedTokenizerFast)
    assert json.loads(fs.tokenizer.backend_tokenizer.to_str())["model"]["type"] == "WordLevel"
    t = fs.tokenizer
    assert (t.bos_token, t.eos_token, t.pad_token, t.unk_token) == ("<bos>", "<eos>", "<pad>", "<unk>")


def test_first_species_round_trip(fs: Codec) -> None:
    for piece in random_pieces(200):
        prompt, completion = fs.encode(piece)
        assert completion[-1] == fs.eos_id
        assert fs.completion_length(prompt) == len(piece.cantus) == len(completion) - 1
        assert fs.decode(prompt, completion, final=piece.final, source=piece.source) == piece
        # the prompt alone (from a cantus tuple) is the same as from the piece
        assert fs.encode_prompt((piece.cantus, piece.cantus_position)) == prompt


def test_interval_tokens_match_music21_semitones(fs: Codec) -> None:
    """The completion token of each note names music21's signed interval cantus -> counterpoint."""
    piece = random_pieces(1, seed=3)[0]
    tokens = fs.tokenizer.convert_ids_to_tokens(fs.encode_completion(piece))
    for cf, cp, tok in zip(piece.cantus, piece.counterpoint, tokens):
        semis = interval.Interval(noteStart=note.Note(cf), noteEnd=note.Note(cp)).semitones
        assert tok == f"iv_{semis:+d}"
    assert tokens[-1] == "<eos>"


def test_prompt_text_layout(fs: Codec) -> None:
    piece = FirstSpeciesPiece((62, 65, 64), (69, 69, 67), "above", 2)
    text = fs.tokenizer.decode(fs.encode_prompt(piece))
    assert text.split() == ["<bos>", "<cf_above>", "cf_62", "cf_65", "cf_64", "<sep>"] + ["<sep>"] * 13
    old = build_codec("first_species", cantus_slots=0)  # the layout before the padding
    assert old.tokenizer.decode(old.encode_prompt(piece)).split() == ["<bos>", "<cf_above>", "cf_62", "cf_65", "cf_64", "<sep>"]


@pytest.mark.parametrize("n", [3, 9, 16, 20])
def test_cantus_note_i_sits_a_fixed_distance_before_the_token_that_predicts_interval_i(fs: Codec, n: int) -> None:
    """With the padding, cf_i and the position that predicts d_i are ``cantus_slots`` apart for
    every cantus of up to 16 notes (the point of the layout); a longer cantus is unpadded."""
    cantus = tuple(50 + (k % 7) for k in range(n))
    piece = FirstSpeciesPiece(cantus, tuple(c + 7 for c in cantus), "below", 2)
    prompt, completion = fs.encode(piece)
    seq = prompt + completion
    toks = fs.tokenizer.convert_ids_to_tokens(seq)
    for i in range(n):
        cf_pos = 2 + i
        predictor = len(prompt) + i - 1  # the position whose next-token logits give d_i
        assert toks[cf_pos] == f"cf_{cantus[i]}" and toks[predictor + 1] == "iv_+7"
        assert predictor - cf_pos == (16 if n <= 16 else n)
    assert fs.decode(prompt, completion, final=2) == piece
    assert fs.completion_length(prompt) == n


def test_old_layout_tokenizer_still_loads_and_decodes(tmp_path) -> None:
    old = build_codec("first_species", cantus_slots=0)
    old.save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["codec_cantus_slots"]  # as written before the padding existed
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    loaded = Codec.load(tmp_path)
    assert loaded.cantus_slots == 0
    piece = random_pieces(1)[0]
    assert loaded.encode(piece) == old.encode(piece)
    assert loaded.decode(*old.encode(piece)).counterpoint == piece.counterpoint


def test_decode_defaults_and_missing_eos(fs: Codec) -> None:
    piece = FirstSpeciesPiece((62, 65, 64, 62), (69, 69, 67, 66), "below", 7)
    prompt, completion = fs.encode(piece)
    out = fs.decode(prompt, completion[:-1])  # no eos
    assert out.counterpoint == piece.counterpoint and out.final == 62 % 12
    padded = completion + [fs.pad_id, fs.pad_id]
    assert fs.decode(prompt, padded).counterpoint == piece.counterpoint
    with pytest.raises(ValueError, match="3 intervals but the cantus has 4"):
        fs.decode(prompt, completion[:3])


def test_completion_token_ids_are_exactly_the_intervals(fs: Codec, mel: Codec) -> None:
    toks = fs.tokenizer.convert_ids_to_tokens(fs.completion_token_ids)
    assert toks == [f"iv_{d:+d}" for d in range(-24, 25)]
    toks = mel.tokenizer.convert_ids_to_tokens(mel.completion_token_ids)
    assert toks == ["off", "hold", *(f"on_{m}" for m in range(48, 84))]
    assert not set(fs.tokenizer.all_special_ids) & set(fs.completion_token_ids)


def test_completion_values_vectorised_matches_loop(fs: Codec) -> None:
    rng = np.random.default_rng(1)
    ids = rng.choice(fs.completion_token_ids, size=(7, 13))  # [B, N]
    values = fs.completion_values(ids)
    ref = [[int(fs.tokenizer.convert_ids_to_tokens(int(i))[3:]) for i in row] for row in ids]
    assert values.tolist() == ref
    with pytest.raises(ValueError, match="not a first_species completion token"):
        fs.completion_values(np.array([fs.completion_token_ids[0], fs.eos_id]))


def test_melody_round_trip(mel: Codec) -> None:
    for m in random_melodies(50):
        prompt, completion = mel.encode(m)
        assert prompt == [mel.bos_id]
        assert len(completion) == MELODY_STEPS + 1 and completion[-1] == mel.eos_id
        assert mel.completion_length(prompt) == MELODY_STEPS
        assert mel.decode(prompt, completion, source=m.source) == m
    # Sequence Tutor's event codes keep their order: id = 4 + event
    m = Melody((note_on(60), NO_EVENT, NOTE_OFF) + (NO_EVENT,) * 29)
    tokens = mel.tokenizer.convert_ids_to_tokens(mel.encode_completion(m))
    assert tokens[:3] == ["on_60", "hold", "off"]


@pytest.mark.parametrize("mode", ["melody", "first_species"])
def test_save_and_autotokenizer_reload(tmp_path, mode: str) -> None:
    codec = build_codec(mode)
    items = random_melodies(5) if mode == "melody" else random_pieces(5)
    codec.save(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert reloaded.get_vocab() == codec.tokenizer.get_vocab()
    loaded = Codec.load(tmp_path)
    assert loaded.mode == mode
    for item in items:
        prompt, completion = codec.encode(item)
        text = codec.tokenizer.decode(prompt + completion)
        assert reloaded(text)["input_ids"] == prompt + completion
        assert codec.tokenizer(text)["input_ids"] == prompt + completion
        assert loaded.encode(item) == (prompt, completion)
        assert loaded.cantus_slots == codec.cantus_slots


def test_load_rejects_foreign_tokenizer(tmp_path) -> None:
    tok = build_codec("melody").tokenizer
    tok.init_kwargs.pop("codec_mode")
    try:
        tok.save_pretrained(str(tmp_path))
    finally:
        tok.init_kwargs["codec_mode"] = "melody"
    with pytest.raises(UserError, match="codec_mode"):
        Codec.load(tmp_path)
    with pytest.raises(UserError, match="cannot load"):
        Codec.load(tmp_path / "missing")


def test_out_of_range_errors(fs: Codec, mel: Codec) -> None:
    with pytest.raises(ValueError, match=r"cantus note 2 \(MIDI 85\).*36\.\.84"):
        fs.encode_prompt(((60, 85, 60), "below"))
    with pytest.raises(ValueError, match=r"cantus note 1 \(MIDI 35\)"):
        fs.encode(FirstSpeciesPiece((35, 40), (40, 45), "below", 0))
    with pytest.raises(ValueError, match=r"counterpoint note 3 \(MIDI 85\) is \+25 .*-24\.\.\+24"):
        fs.encode_completion(FirstSpeciesPiece((60, 60, 60), (64, 67, 85), "below", 0))
    with pytest.raises(ValueError, match=r"-25 semitones"):
        fs.encode_completion(FirstSpeciesPiece((60,), (35,), "above", 0))
    with pytest.raises(ValueError, match="melody event code 38 outside the allowed range 0..37"):
        mel.encode_completion(Melody((38,) + (1,) * 31))
