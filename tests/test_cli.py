"""End to end through the real `rlhf` command: quick pipeline, sample, evaluate, resume, user errors."""

import contextlib
import io
import importlib.metadata
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from music21 import converter

from apps.cli import main
from rlhf.models import build_model, load_model
from apps.pipeline import load_run_config
from rlhf.config import load_config
from tasks.counterpoint.cantus import parse_note_names
from tasks.counterpoint.task import CounterpointTask
from tasks.counterpoint.tokens import Codec

REPO = Path(__file__).resolve().parents[1]
CF = "D4 F4 E4 D4 G4 F4 A4 G4 F4 E4 D4"


def rlhf_process(*args):
    """The real console entry point in a separate process (exit codes, no traceback)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "apps.cli", *map(str, args)], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)


def rlhf(*args, check=True):
    """``apps.cli.main`` in this process (the same code path, without paying imports per call)."""
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse errors and --help
                code = e.code
    finally:
        os.chdir(cwd)
    r = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"rlhf {' '.join(map(str, args))} failed ({code}):\n{r.stdout}\n{r.stderr}")
    return r


def test_quick_pipeline_writes_a_complete_run_folder(quick_run):
    for name in ["config.yaml", "metrics.jsonl", "run.log", "data_stats.json", "eval.json", "report.md"]:
        assert (quick_run / name).is_file(), name
    prior = quick_run / "models" / "prior"
    assert (prior / "model.safetensors").is_file() and (prior / "tokenizer.json").is_file()
    report = (quick_run / "report.md").read_text()
    for png in ["prior_loss.png", "violations.png", "samples_prior.png"]:
        assert (quick_run / "plots" / png).stat().st_size > 5000
        assert f"plots/{png}" in report
    assert "Fux solutions" in report or not Path(os.environ.get("RLHF_FUX_DIR", REPO.parent / "shared/data/fux-species")).exists()
    rows = [json.loads(line) for line in (quick_run / "metrics.jsonl").read_text().splitlines()]
    assert all("/" in k for r in rows for k in r if k not in ("stage", "step", "time", "lr", "entropy"))
    val = [r["loss/val"] for r in rows if "loss/val" in r]
    # the prior learned: far below the uniform choice among the 49 interval tokens
    assert val[-1] < math.log(49) - 1.0, val
    ev = json.loads((quick_run / "eval.json").read_text())
    assert ev["rows"]["prior"]["pieces"] == ev["prompts"] * ev["per_prompt"]


def test_exported_samples_read_back_with_the_same_notes(quick_run):
    ev = json.loads((quick_run / "eval.json").read_text())
    files = sorted((quick_run / "samples" / "prior").glob("*.musicxml"))
    assert len(files) == 6 and len(list((quick_run / "samples" / "prior").glob("*.mid"))) == 6
    best = sorted(ev["samples"]["prior"], key=lambda s: -s["reward"])[0]
    score = converter.parse(files[0])
    parts = [[n.pitch.midi for n in p.recurse().notes] for p in score.parts]
    assert sorted(map(tuple, parts)) == sorted([tuple(best["cantus"]), tuple(best["counterpoint"])])


def prior_vs_untrained(run_dir):
    """Evaluation rows of a run's prior and of a freshly initialised model of the same size."""
    cfg = load_run_config(run_dir / "config.yaml")
    prior_dir = run_dir / "models" / "prior"
    task = CounterpointTask(cfg.task, Codec.load(prior_dir))
    prior = load_model(prior_dir)
    untrained = build_model(cfg.model, task.tokenizer)
    return task.evaluate({"prior": prior, "untrained": untrained}, prior, seed=0)["rows"]


def test_prior_beats_an_untrained_model_on_the_rules(quick_run):
    """Learning happened: the trained prior breaks the consonance rule far less than its own
    untrained initialisation, judged by the same evaluation."""
    rows = prior_vs_untrained(quick_run)
    assert rows["prior"]["rules/dissonance"] < 0.5 * rows["untrained"]["rules/dissonance"], rows
    assert rows["prior"]["reward/note"] > rows["untrained"]["reward/note"]
    assert rows["prior"]["logp/prior"] > rows["untrained"]["logp/prior"]


def test_resume_reuses_the_finished_prior(quick_run):
    before = (quick_run / "models" / "prior" / "model.safetensors").read_bytes()
    rlhf("run", quick_run / "config.yaml", "--resume", f"task.data.cache_dir={quick_run.parent / 'cache'}")
    assert "prior already trained" in (quick_run / "run.log").read_text()
    assert (quick_run / "models" / "prior" / "model.safetensors").read_bytes() == before
    r = rlhf("run", quick_run / "config.yaml", check=False)
    assert r.returncode == 2 and "--resume" in r.stderr and "Traceback" not in r.stderr


def test_sample_from_note_names_and_musicxml(quick_run, tmp_path):
    prior = quick_run / "models" / "prior"
    r = rlhf("sample", "--model", prior, "--cantus", CF, "-n", "2", "--out", tmp_path / "a", "--seed", "1")
    files = sorted((tmp_path / "a").glob("*.musicxml"))
    assert len(files) == 2 and "violations" in r.stdout
    parts = [[n.pitch.midi for n in p.recurse().notes] for p in converter.parse(files[0]).parts]
    assert parse_note_names(CF) in [tuple(p) for p in parts]
    # a cantus given as a MusicXML file: take the exported piece's lower part (the cantus)
    r = rlhf("sample", "--model", prior, "--cantus-file", files[0], "--position", "above", "-n", "1", "--out", tmp_path / "b")
    assert len(list((tmp_path / "b").glob("*.mid"))) == 2  # one piece per part of the file


def test_evaluate_command(quick_run, tmp_path):
    rlhf("evaluate", "configs/counterpoint.yaml", "--quick", "--model", quick_run / "models" / "prior", "--out", tmp_path / "ev", "task.eval.samples_per_cantus=2", "progress=false")
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert "prior" in ev["rows"] and (tmp_path / "ev" / "report.md").is_file()


@pytest.mark.parametrize(
    "args, expect",
    [
        (["run", "configs/nope.yaml"], "config file not found"),
        (["run", "configs/counterpoint.yaml", "--quick", "pretrain.stepz=3"], "pretrain.stepz"),
        (["run", "configs/counterpoint.yaml", "--quick", "task.mode=fugue"], "first_species"),
        (["sample", "--model", "/nonexistent/model", "--cantus", CF], "model folder not found"),
        (["pretrain", "configs/counterpoint.yaml", "--quick", "--bogus"], "unrecognized arguments"),
    ],
)
def test_user_errors_exit_2_without_traceback(args, expect, tmp_path):
    r = rlhf(*args, check=False)
    assert r.returncode == 2, r.stderr
    assert expect in r.stderr and "Traceback" not in r.stderr


def test_bad_cantus_and_bad_yaml(quick_run, tmp_path):
    r = rlhf("sample", "--model", quick_run / "models" / "prior", "--cantus", "D4 F4 X9 D4", check=False)
    assert r.returncode == 2 and "X9" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.musicxml"
    bad.write_text("<score-partwise><part id='P1'><measure>oops")
    r = rlhf("sample", "--model", quick_run / "models" / "prior", "--cantus-file", bad, check=False)
    assert r.returncode == 2 and str(bad) in r.stderr and "Traceback" not in r.stderr
    y = tmp_path / "bad.yaml"
    y.write_text("pretrain:\n  steps: [1,\n")
    r = rlhf_process("run", y)  # a real process: exit status and stderr as a user sees them
    assert r.returncode == 2 and f"{y}:" in r.stderr and "Traceback" not in r.stderr


def test_help_reads_well():
    r = rlhf_process("--help")
    assert r.returncode == 0
    for cmd in ["run", "pretrain", "evaluate", "sample", "config-help"]:
        assert cmd in r.stdout
        assert rlhf(cmd, "--help").stdout.startswith("usage: rlhf " + cmd)  # exits 0
    assert "pretrain.lr" in rlhf("config-help").stdout
    for cmd in ["export-pairs", "import-labels", "label", "launch", "personalise", "train-reward"]:
        assert cmd in r.stdout
    v = rlhf_process("--version")
    assert v.returncode == 0 and v.stdout.strip() == f"rlhf-kl {importlib.metadata.version('rlhf-kl')}"


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_config_help_explains_every_shipped_config(config):
    """Each family of config (run configs by task, reward models, personalisation) is listed with
    its values; a section set to null (e.g. ``reward``) shows its keys as None."""
    out = rlhf("config-help", f"configs/{config}").stdout
    assert "seed = " in out and "run_dir = " in out
    lines = [ln for ln in out.splitlines() if not ln.startswith(" ")]
    assert len(lines) > 10 and all(" = " in ln for ln in lines)


def test_melody_mode_end_to_end(tmp_path):
    """Sequence Tutor's setting: a melody prior from folk songs and chorale sopranos, evaluated
    with the Table 1 metrics; it keeps to the key far better than its untrained initialisation."""
    run_dir = tmp_path / "melody"
    rlhf("run", "configs/melody.yaml", "--quick", f"run_dir={run_dir}", f"task.data.cache_dir={tmp_path / 'cache'}",
         "task.data.max_pieces=12", "progress=false")
    ev = json.loads((run_dir / "eval.json").read_text())
    row = ev["rows"]["prior"]
    assert row["pieces"] == 48 and "table1/notes_not_in_key" in row and "table1/leaps_resolved" in row
    assert "Table 1" in (run_dir / "report.md").read_text()
    mids = sorted((run_dir / "samples" / "prior").glob("*.mid"))
    assert len(mids) == 6
    rows = prior_vs_untrained(run_dir)
    assert rows["prior"]["table1/notes_not_in_key"] < 0.5 * rows["untrained"]["table1/notes_not_in_key"], rows


def _translation_model(folder: Path) -> Path:
    """A tiny untrained decoder-only translation model with its tokenizer (no corpus needed)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tasks.translation.tokenizer import train_tokenizer

    tok = train_tokenizer(["a dog runs .", "ein Hund rennt ."] * 20, "en", "de", vocab_size=300, min_frequency=1)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_layer=1, n_embd=16, n_head=2)).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_a_damaged_weights_file_is_a_clear_error(tmp_path, damage):
    folder = _translation_model(tmp_path / "model")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "random": os.urandom(5000)}[damage])
    src = tmp_path / "in.en"
    src.write_text("a dog runs .\n", encoding="utf-8")
    r = rlhf("translate", "--model", folder, "--input", src, "--output", tmp_path / "out.de", check=False)
    assert r.returncode == 2 and str(weights) in r.stderr and "damaged" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out.de").exists()


def test_translate_refuses_a_folder_or_its_own_input_as_output(tmp_path):
    folder = _translation_model(tmp_path / "model")
    src = tmp_path / "in.en"
    src.write_text("a dog runs .\n", encoding="utf-8")
    r = rlhf("translate", "--model", folder, "--input", src, "--output", tmp_path, check=False)
    assert r.returncode == 2 and "--output is a folder" in r.stderr
    r = rlhf("translate", "--model", folder, "--input", src, "--output", src, check=False)
    assert r.returncode == 2 and "would be overwritten" in r.stderr and src.read_text(encoding="utf-8") == "a dog runs .\n"
    r = rlhf("translate", "--model", folder, "--input", src, "--output", tmp_path / "no" / "out.de", check=False)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_an_empty_config_is_an_error_not_the_default_run(tmp_path):
    for text in ("", "# only a comment\n"):
        cfg = tmp_path / "empty.yaml"
        cfg.write_text(text, encoding="utf-8")
        r = rlhf("run", cfg, f"run_dir={tmp_path / 'run'}", check=False)
        assert r.returncode == 2 and f"{cfg}: the config is empty" in r.stderr
        assert not (tmp_path / "run").exists()


def test_output_into_a_closed_pipe_ends_quietly():
    """`rlhf config-help | head`: the reader goes away before the writer is done."""
    p = subprocess.Popen([sys.executable, "-m", "apps.cli", "config-help"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    p.stdout.close()  # before the command has written anything
    err = p.stderr.read()
    assert p.wait(timeout=300) == 141 and "Traceback" not in err, err


def test_a_command_that_fails_before_any_result_leaves_no_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    r = rlhf("run", "configs/translation.yaml", f"run_dir={run_dir}", f"task.data.dir={tmp_path / 'no-corpus'}", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert not run_dir.exists()  # so the same command, fixed, needs no --overwrite
    kept = tmp_path / "kept"  # a folder that holds results is never removed
    (kept / "models").mkdir(parents=True)
    (kept / "models" / "x.txt").write_text("result", encoding="utf-8")
    r = rlhf("run", "configs/translation.yaml", f"run_dir={kept}", f"task.data.dir={tmp_path / 'no-corpus'}", "--resume", check=False)
    assert r.returncode == 2 and (kept / "models" / "x.txt").is_file()


def test_a_run_folder_in_use_is_refused_and_freed_when_its_process_dies(tmp_path):
    """Two commands never write one run folder at once; the lock dies with its process, even
    under kill -9, so a crashed run leaves nothing to clean up."""
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom rlhf.runs import Run\nRun(sys.argv[1])\nprint('locked', flush=True)\n"
                               "time.sleep(600)", str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = rlhf_process("pretrain", "configs/counterpoint.yaml", "--quick", f"run_dir={run_dir}", "--resume", "progress=false")
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert "run folder is in use by pid" in r.stderr and str(holder.pid) in r.stderr
    finally:
        holder.kill()
        holder.wait()
    from rlhf.runs import Run, release_run_folder

    Run(run_dir)  # free again after kill -9
    release_run_folder(run_dir)
