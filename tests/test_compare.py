"""`rlhf compare` and `rlhf report` on real run folders (the shared quick pipeline run)."""

import json
import shutil

import yaml

from apps.cli import main
from apps.compare import compare, config_diff, load_run, short_names


def second_run(quick_run, tmp_path):
    """A copy of the quick run with another seed and a shifted reward curve."""
    other = tmp_path / "other" / "run"
    shutil.copytree(quick_run, other, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["seed"] = 7
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [json.loads(line) for line in (other / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        if "reward/task" in r:
            r["reward/task"] += 1.0
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return other


def test_compare_diffs_configs_overlays_curves_and_tabulates_evaluations(quick_run, tmp_path):
    other = second_run(quick_run, tmp_path)
    runs = [load_run(quick_run), load_run(other)]
    assert [row[0] for row in config_diff(runs)] == ["`seed`"]
    assert short_names([quick_run, other]) == [f"{quick_run.parent.name}/run", "other/run"]
    md = compare([quick_run, other], tmp_path / "cmp")
    text = md.read_text()
    assert "| `seed` | 0 | 7 |" in text
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ev = json.loads((quick_run / "eval.json").read_text())
    models = [m for m in ev["rows"]]
    for name in short_names([quick_run, other]):
        for m in models:
            assert f"| {name} | {m} |" in text
    assert f"{ev['rows']['tilt']['rules/per_note']:.3f}" in text


def test_report_rebuilds_a_lost_report_and_bad_folders_exit_2(quick_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(quick_run, copy, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    (copy / "report.md").unlink()
    assert main(["report", str(copy)]) == 0
    rebuilt = (copy / "report.md").read_text()
    assert rebuilt == (quick_run / "report.md").read_text()  # the same eval.json and config give the same report
    assert main(["compare", str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "not a run folder" in err and "Traceback" not in err


def test_headline_reads_task_rows_and_reward_model_figures():
    from apps.compare import headline

    task = {"rows": {"prior": {"rules/clean": 0.0, "pieces": 10}, "rloo": {"rules/clean": 0.5, "note": "x"}}}
    assert headline(task) == {"prior": {"rules/clean": 0.0, "pieces": 10.0}, "rloo": {"rules/clean": 0.5}}
    reward = {"methods": {"bt": {"kind": "bt", "overall": {"acc/test": 0.77, "pairs/test": 1280.0}}, "vpl": {"kind": "vpl", "by_context": {}}}}
    assert headline(reward) == {"bt": {"acc/test": 0.77, "pairs/test": 1280.0}}
