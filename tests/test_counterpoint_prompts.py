"""RL prompts and evaluation sets of the counterpoint task: RL never sees an evaluation cantus firmus."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.counterpoint import cantus as cantus_mod
from tasks.counterpoint.config import CounterpointConfig
from tasks.counterpoint.piece import FirstSpeciesPiece
from tasks.counterpoint.task import WHITE_KEYS, CounterpointTask, canonical_shift


def _shape(ids: list[int], task: CounterpointTask) -> tuple[int, ...]:
    """The transposition-invariant identity of a prompt's cantus: its melodic intervals."""
    cantus, _ = task.codec._parse_prompt(ids)
    return tuple(np.diff(np.asarray(cantus)).tolist())


@pytest.fixture(scope="module")
def task() -> CounterpointTask:
    return CounterpointTask(CounterpointConfig.model_validate({"pool": {"size": 600}, "eval": {"heldout_pool": 20, "train_pool": 10}}))


def test_rl_prompts_never_contain_an_evaluation_cantus(task):
    train = task.train_prompts()
    sets = task.eval_sets()
    assert set(sets) == {"fux", "pool-heldout", "pool-train"}
    train_shapes = {_shape(p.ids, task) for p in train}
    fux_shapes = {tuple(np.diff(p).tolist()) for _, p in cantus_mod.fux_cantus_firmi(None)}
    heldout_shapes = {_shape(p.ids, task) for p in sets["pool-heldout"]}
    assert len(heldout_shapes) == 20 and len(fux_shapes) == 7
    assert not train_shapes & fux_shapes  # no transposition of a Fux cantus firmus is trained on
    assert not train_shapes & heldout_shapes  # the held-out pool is split by melody, not by transposition
    assert {_shape(p.ids, task) for p in sets["pool-train"]} <= train_shapes
    # every training melody, in both positions; each prompt once (with canonical_key, a melody's
    # transpositions meet in one or a few prompts), and with canonical_key off in every transposition
    n_melodies = len(task.pool()[0])
    assert len(train_shapes) == n_melodies
    assert len({tuple(p.ids) for p in train}) == len(train) >= 2 * n_melodies
    assert {p.name.rsplit("/", 1)[1] for p in train} == {"below", "above"}
    as_given = CounterpointTask(task.cfg.model_copy(update={"canonical_key": False}), task.codec)
    assert len(as_given.train_prompts()) == 2 * n_melodies * len(task.cfg.train_cantus_transpositions)


def test_canonical_key_moves_the_cantus_into_the_white_keys_and_the_piece_back():
    """The model sees each cantus in the white-key collection; decode returns the piece in the
    cantus's own key, with the same intervals; the rule scores are the same in both keys."""
    task = CounterpointTask(CounterpointConfig())
    fux_d = cantus_mod.parse_note_names(cantus_mod.FUX_CANTUS_FIRMI["fux-d"])
    for k in range(-5, 7):
        cantus = tuple(p + k for p in fux_d)
        (prompt,) = task.prompts_for([("d", cantus)], ["below"])
        seen, _ = task.codec._parse_prompt(prompt.ids)
        assert {p % 12 for p in seen} <= WHITE_KEYS and seen == tuple(p + prompt.shift for p in cantus) and abs(prompt.shift) <= 6
        comp = task.codec.encode_completion(FirstSpeciesPiece(seen, tuple(p + 7 for p in seen), "below", 2))[:-1]
        (piece,) = task.decode([prompt], [comp])
        assert piece.cantus == cantus and piece.counterpoint == tuple(p + 7 for p in cantus) and piece.final == cantus[-1] % 12
    assert canonical_shift((60, 61, 62, 63)) == 0  # chromatic: no white-key transposition, left as given
    assert canonical_shift((61, 63, 66)) in (-1, 1)


def test_heldout_prompts_are_every_set_rl_did_not_train_on(task):
    names = {p.name for p in task.heldout_prompts()}
    sets = task.eval_sets()
    assert names == {p.name for s in ("fux", "pool-heldout") for p in sets[s]}
    fux_rl = CounterpointTask(task.cfg.model_copy(update={"rl_prompts": "fux"}), task.codec)
    assert {p.name for p in fux_rl.heldout_prompts()} == {p.name for s in ("pool-heldout", "pool-train") for p in sets[s]}
    # with rl_prompts: fux, RL trains on the evaluation cantus firmi themselves (the old setting)
    assert {_shape(p.ids, task) for p in fux_rl.train_prompts()} == {_shape(p.ids, task) for p in sets["fux"]}


def test_pool_is_the_same_for_every_run_seed(task):
    other = CounterpointTask(task.cfg, task.codec)
    assert [p.ids for p in other.eval_sets()["pool-heldout"]] == [p.ids for p in task.eval_sets()["pool-heldout"]]
    reseeded = CounterpointTask(task.cfg.model_copy(update={"pool": task.cfg.pool.model_copy(update={"seed": 1})}), task.codec)
    assert [p.ids for p in reseeded.eval_sets()["pool-heldout"]] != [p.ids for p in task.eval_sets()["pool-heldout"]]


def test_validation_split_is_held_out_and_disjoint_from_the_test_sets(task):
    val_task = CounterpointTask(task.cfg.model_copy(update={"eval": task.cfg.eval.model_copy(update={"split": "validation"})}), task.codec)
    val, test = val_task.eval_sets(), task.eval_sets()
    assert set(val) == {"pool-val", "pool-train"}
    val_shapes = {_shape(p.ids, task) for p in val["pool-val"]}
    assert len(val_shapes) == 20
    assert not val_shapes & {_shape(p.ids, task) for p in task.train_prompts()}  # never trained on
    assert not val_shapes & {_shape(p.ids, task) for s in ("fux", "pool-heldout") for p in test[s]}  # not a test cantus
    assert {p.name for p in val_task.heldout_prompts()} == {p.name for p in val["pool-val"]}
    assert {p.name for p in val_task.distinct_prompts()} <= {p.name for p in val["pool-val"]}
    too_few = CounterpointTask(val_task.cfg.model_copy(update={"eval": val_task.cfg.eval.model_copy(update={"heldout_pool": 40})}), task.codec)
    with pytest.raises(Exception, match="task.pool.size"):
        too_few.eval_sets()
