"""Config loading: YAML + overrides, and errors that name the file, line, key and the fix."""

from pathlib import Path

import pytest

from rlhf.config import describe, load_config, read_yaml
from rlhf.errors import UserError
from apps.pipeline import load_run_config, run_config_class
from rlhf.registry import TASKS


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_shipped_configs_load():
    for name in ["counterpoint", "counterpoint-rloo", "melody", "translation"]:
        cfg = load_run_config(f"configs/{name}.yaml")
        assert cfg.pretrain.steps >= 1
    cfg = load_run_config("configs/counterpoint.yaml", quick=True)
    assert cfg.pretrain.steps == 150 and cfg.task.data.max_pieces == 25 and cfg.run_dir == "runs/counterpoint-quick"
    assert cfg.tune.algorithm == "tilt" and cfg.tune.settings.divergence == "symmetric"  # the config's own choices stay
    cfg = load_run_config("configs/counterpoint.yaml", ["pretrain.steps=7", "run_dir=elsewhere"], quick=True)
    assert cfg.pretrain.steps == 7 and cfg.run_dir == "elsewhere"  # your overrides win over the preset


def test_overrides_parse_yaml_values():
    cfg = load_run_config("configs/counterpoint.yaml", ["pretrain.lr=0.01", "task.data.transpositions=[0,1]", "task.fux_dir=null"])
    assert cfg.pretrain.lr == 0.01 and cfg.task.data.transpositions == [0, 1] and cfg.task.fux_dir is None


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    p = write(tmp_path, "seed: 1\npretrain:\n  stepz: 10\n")
    with pytest.raises(UserError) as e:
        load_run_config(p)
    msg = str(e.value)
    assert f"{p}:3" in msg and "pretrain.stepz" in msg and "'steps'" in msg and "Allowed keys" in msg


def test_wrong_type_and_range(tmp_path):
    p = write(tmp_path, "pretrain:\n  lr: -1\n  batch_size: many\n")
    msg = str(pytest.raises(UserError, load_run_config, p).value)
    assert f"{p}:2: pretrain.lr" in msg and "greater than 0" in msg
    assert f"{p}:3: pretrain.batch_size" in msg and "'many'" in msg


def test_bad_choice_lists_allowed_values(tmp_path):
    p = write(tmp_path, "task:\n  mode: second_species\n")
    msg = str(pytest.raises(UserError, load_run_config, p).value)
    assert "task.mode" in msg and "first_species" in msg and "melody" in msg


def test_unknown_rule_weight_lists_rules(tmp_path):
    p = write(tmp_path, "task:\n  rule_weights: {parallel_ninths: 2}\n")
    msg = str(pytest.raises(UserError, load_run_config, p).value)
    assert "parallel_ninths" in msg and "valid names" in msg


def test_cross_field_validation(tmp_path):
    msg = str(pytest.raises(UserError, load_run_config, None, ["model.n_embd=100", "model.n_head=3"]).value)
    assert "divisible" in msg and "command-line override" in msg
    msg = str(pytest.raises(UserError, load_run_config, None, ["tune.algorithm=mrt", "tune.mrt.candidates=beam", "tune.temperature=0.6"]).value)
    assert "mrt.candidates=beam" in msg and "tune.temperature: 1" in msg
    msg = str(pytest.raises(UserError, load_run_config, None, ["tune.algorithm=mrt", "tune.mrt.k=3", "tune.batch_size=64"]).value)
    assert "multiple of mrt.k (3)" in msg
    msg = str(pytest.raises(UserError, load_run_config, None, ["tune.algorithm=rloo", "tune.rloo.credit=token", "tune.rloo.baseline=greedy"]).value)
    assert "credit=token needs baseline=leave_one_out" in msg and "rloo.credit: sequence" in msg
    msg = str(pytest.raises(UserError, load_run_config, None, ["tune.algorithm=rloo", "tune.rloo.gamma=0.5"]).value)
    assert "credit=sequence" in msg and "rloo.gamma at 1" in msg
    msg = str(pytest.raises(UserError, load_run_config, None, ["tune.algorithm=rloo", "tune.rloo.credit=token", "tune.rloo.length_decorrelate=true"]).value)
    assert "length_decorrelate fits one advantage per sample" in msg and "rloo.credit: sequence" in msg
    msg = str(pytest.raises(UserError, load_run_config, "configs/counterpoint-rloo.yaml", ["reward.model=runs/reward"]).value)
    assert "needs the task's reward of every action" in msg and "tune.rloo.credit: token" in msg
    msg = str(pytest.raises(UserError, load_run_config, "configs/counterpoint.yaml", ["reward.model=runs/reward"]).value)
    assert "tune.algorithm=tilt" in msg and "configs/counterpoint-rloo.yaml" in msg and "tune.rloo.credit=token" in msg
    msg = str(pytest.raises(UserError, load_run_config, "configs/counterpoint.yaml", ["tune.ppo.clip=0.1"]).value)
    assert "tune.ppo: settings of another algorithm, but tune.algorithm is tilt" in msg
    msg = str(pytest.raises(UserError, load_run_config, "configs/counterpoint.yaml", ["tune.tilt.divergence=forward", "tune.tilt.forward_weight=2"]).value)
    assert "forward_weight weighs the forward term of divergence: symmetric" in msg and "divergence: forward" in msg
    msg = str(pytest.raises(UserError, load_run_config, "configs/counterpoint.yaml", ["sweep.betas=[0.3, 0]"]).value)
    assert "sweep.betas: the run for 0 is refused" in msg and "tune.kl.beta > 0" in msg and "remove 0 from sweep.betas" in msg
    assert load_run_config("configs/counterpoint-rloo.yaml", ["sweep.betas=[0.3, 0]"]).sweep.betas == [0.3, 0]  # the ablation where it applies
    msg = str(pytest.raises(UserError, load_run_config, None, ["tune.algorithm=sarsa"]).value)
    assert "unknown algorithm 'sarsa'" in msg and "ppo" in msg and "package.module:attribute" in msg
    msg = str(pytest.raises(UserError, load_run_config, None, ["task.pool.min_notes=12", "task.pool.max_notes=9"]).value)
    assert "min_notes (12) must not exceed max_notes (9)" in msg


def test_bad_yaml_and_missing_file(tmp_path):
    p = write(tmp_path, "seed: [1,\n  pretrain: {\n")
    msg = str(pytest.raises(UserError, load_run_config, p).value)
    assert str(p) in msg and "not valid YAML" in msg
    msg = str(pytest.raises(UserError, load_run_config, tmp_path / "nope.yaml").value)
    assert "not found" in msg
    msg = str(pytest.raises(UserError, load_run_config, None, ["pretrain"]).value)
    assert "key=value" in msg


def test_every_field_is_documented():
    rows = describe(run_config_class(TASKS.get("counterpoint")))
    assert {"tune.rloo.k", "tune.ppo.clip", "tune.kl_control.gamma", "tune.mrt.alpha"} <= {k for k, _, _ in rows}
    assert len(rows) > 20
    undocumented = [k for k, _, doc in rows if not doc]
    assert undocumented == []


def test_task_name_picks_the_run_config(tmp_path):
    from tasks.counterpoint.config import CounterpointConfig
    from tasks.translation.config import TranslationConfig

    assert type(load_run_config("configs/translation.yaml").task) is TranslationConfig
    assert type(load_run_config("configs/counterpoint.yaml").task) is CounterpointConfig
    assert type(load_run_config(None, ["task.name=translation"]).task) is TranslationConfig
    assert load_run_config("configs/translation.yaml", quick=True).task.data.max_train_pairs == 3000
    bad = tmp_path / "bad.yaml"
    bad.write_text("task:\n  name: poetry\n")
    with pytest.raises(UserError, match=r"bad.yaml: task.name: unknown task 'poetry'; use one of counterpoint, text, translation"):
        load_run_config(bad)
    with pytest.raises(UserError, match="command-line override: task.data.max_train_pairs: unknown key"):
        load_run_config("configs/counterpoint.yaml", ["task.data.max_train_pairs=5"])


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    """YAML keeps the last of two equal keys: a second `tune:` block would silently drop the first."""
    bad = tmp_path / "dup.yaml"
    bad.write_text("tune:\n  steps: 3\npretrain:\n  steps: 5\ntune:\n  lr: 0.1\n")
    with pytest.raises(UserError, match=r"dup.yaml:5: tune: given twice \(first at line 1\).*Merge the two"):
        load_run_config(bad)
    nested = tmp_path / "nested.yaml"
    nested.write_text("tune:\n  steps: 3\n  steps: 4\n")
    with pytest.raises(UserError, match=r"nested.yaml:3: tune.steps: given twice \(first at line 2\)"):
        load_run_config(nested)
    for path in Path("configs").glob("*.yaml"):  # the shipped presets are free of repeats
        read_yaml(path)


def test_base_inherits_a_config_and_lays_this_one_over_it(tmp_path):
    """`base:` merges sections key by key and replaces values and lists, through a chain of bases,
    with the path relative to the file that names it; every error names the file that set the key."""
    (tmp_path / "presets").mkdir()
    (tmp_path / "root.yaml").write_text("seed: 3\npretrain:\n  steps: 40\n  lr: 0.01\ntask:\n  data:\n    transpositions: [0, 1, 2]\n"
                                        "tune:\n  algorithm: rloo\n  rloo:\n    k: 4\n")
    (tmp_path / "presets" / "mid.yaml").write_text("base: ../root.yaml\npretrain:\n  lr: 0.02\n")
    leaf = tmp_path / "presets" / "leaf.yaml"
    leaf.write_text("base: mid.yaml\ntask:\n  data:\n    transpositions: [5]\ntune:\n  algorithm: tilt\n  rloo: null\n")
    cfg = load_run_config(leaf)
    assert (cfg.seed, cfg.pretrain.steps, cfg.pretrain.lr) == (3, 40, 0.02)  # from the root, the root, the middle
    assert cfg.task.data.transpositions == [5] and cfg.tune.algorithm == "tilt"  # a list replaced; the base's rloo dropped
    # naive reference: the merged dict is the leaf's keys laid one by one over the root's
    data, where = read_yaml(leaf)
    assert data["pretrain"] == {"steps": 40, "lr": 0.02} and "base" not in data
    assert where[("pretrain", "steps")] == f"{tmp_path / 'presets' / '..' / 'root.yaml'}:3"
    assert where[("pretrain", "lr")].endswith("mid.yaml:3") and ("task", "data", "transpositions", "2") not in where

    (tmp_path / "presets" / "mid.yaml").write_text("base: ../root.yaml\npretrain:\n  lr: -1\n")
    with pytest.raises(UserError, match=r"mid.yaml:3: pretrain.lr"):  # the file that set the bad value
        load_run_config(leaf)
    leaf.write_text("base: mid.yaml\ntune:\n  algorithm: tilt\n")  # the base's rloo section still there: refused, not ignored
    (tmp_path / "presets" / "mid.yaml").write_text("base: ../root.yaml\n")
    with pytest.raises(UserError, match=r"leaf.yaml:2: tune: tune.rloo: settings of another algorithm.*tune.rloo: null where it comes from a base config"):
        load_run_config(leaf)


@pytest.mark.parametrize("text, error", [
    ("base: nowhere.yaml\n", r"c.yaml:1: base: .*nowhere.yaml' is not a config file \(the path is relative to the folder of"),
    ("base: \"a\\0b\"\n", r"c.yaml:1: base: .* is not a config file"),
    ("base: " + "x" * 5000 + "\n", r"c.yaml:1: base: .* is not a config file"),
    ("base: c.yaml\nseed: 1\n", r"c.yaml:1: base: c.yaml inherits from itself \(c.yaml -> c.yaml\)"),
    ("seed: 1\nbase: [a.yaml]\n", r"c.yaml:2: base: expected the path of the config this one inherits"),
])
def test_bad_base_is_refused_with_the_line(tmp_path, text, error):
    with pytest.raises(UserError, match=error):
        load_run_config(write(tmp_path, text))


def test_the_rloo_preset_is_the_default_with_its_stated_differences():
    """configs/counterpoint-rloo.yaml inherits configs/counterpoint.yaml (through configs/counterpoint-lastnote.yaml): everything
    neither sets is the default's."""
    rloo, default = load_run_config("configs/counterpoint-rloo.yaml").model_dump(), load_run_config("configs/counterpoint.yaml").model_dump()
    own = read_yaml("configs/counterpoint-rloo.yaml")[1]
    assert rloo["tune"]["algorithm"] == "rloo" and rloo["task"]["lookahead"] == 0.0 and default["task"]["lookahead"] == 5.0
    for section in ("model", "pretrain", "seed"):
        assert rloo[section] == default[section]
    # the preset names its rewards: the novelty paid at the last note, as configs/counterpoint-lastnote.yaml does
    assert rloo["rewards"] == load_run_config("configs/counterpoint-lastnote.yaml").model_dump()["rewards"] != default["rewards"]
    assert {k: v for k, v in rloo["task"].items() if ("task", k) not in own} == {k: v for k, v in default["task"].items() if ("task", k) not in own}
