"""The ``rlhf`` command line.

Every subcommand that takes a config reads a YAML file from ``configs/`` plus ``key=value``
overrides (dotted keys, YAML values), e.g.::

    rlhf run configs/counterpoint.yaml pretrain.steps=500 task.eval.samples_per_cantus=8

Mistakes in input (bad YAML, unknown key, missing file, unreadable score) print one
``error:`` message and exit with status 2.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from rlhf.errors import UserError

log = logging.getLogger("rlhf")

EPILOG = """examples:
  rlhf run configs/counterpoint.yaml                 the whole pipeline (data, prior, evaluation, report)
  rlhf run configs/counterpoint.yaml --quick         a one-minute smoke run
  rlhf run configs/counterpoint.yaml --resume        continue an interrupted run
  rlhf pretrain configs/melody.yaml pretrain.steps=2000
  rlhf tune configs/counterpoint.yaml tune.algorithm=psi tune.tilt=null --prior runs/counterpoint/models/prior
  rlhf evaluate configs/counterpoint.yaml --model runs/counterpoint/models/prior
  rlhf sample --model runs/counterpoint/models/prior --cantus "D4 F4 E4 D4 G4 F4 A4 G4 F4 E4 D4"
  rlhf run configs/translation.yaml                  MLE translation prior, RL on sentence BLEU, report
  rlhf translate --model runs/translation/models/rloo --input src.en --output out.de --beam 4
  rlhf simulate-preferences configs/reward-music.yaml   raters of divergent taste -> preference data
  rlhf train-reward configs/reward-music.yaml        Bradley-Terry and VPL reward models, report
  rlhf personalise configs/personal-pets.yaml        one policy per rater group from a VPL reward (after reward-pets)
  rlhf export-pairs --run runs/counterpoint --stage prior --out labelling/round1
  rlhf label serve --pairs labelling/round1/pairs.jsonl --db labelling/round1/labels.sqlite
  rlhf launch --nproc 2 train-reward configs/reward-pets.yaml   the same command on 2 processes (accelerate; --launcher deepspeed)
  rlhf config-help configs/counterpoint.yaml         every config key with its meaning
"""


def _config_args(p: argparse.ArgumentParser, run_flags: bool = True) -> None:
    p.add_argument("config", help="YAML config, e.g. configs/counterpoint.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. pretrain.steps=500")
    p.add_argument("--quick", action="store_true", help="the task's quick preset (smoke-test sizes, about a minute) over the config, "
                   "written into <run_dir>-quick; your overrides still apply on top")
    if run_flags:
        p.add_argument("--resume", action="store_true", help="continue the run in run_dir from its last checkpoint / finished stage")
        p.add_argument("--overwrite", action="store_true", help="delete an existing run_dir first")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rlhf-kl")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf",
        description="RLHF and KL-control fine-tuning of sequence models: MLE priors, rule and learned rewards, "
        "PPO with a KL penalty and Sequence Tutor's KL-control, on counterpoint and translation.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rlhf-kl {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    p = sub.add_parser("run", help="run the whole pipeline from one YAML: data, prior, tuning, evaluation, report",
                       description="Extract the corpus, pre-train the prior by MLE, fine-tune it (tune.algorithm), evaluate both and write report.md into run_dir.")
    _config_args(p)

    p = sub.add_parser("pretrain", help="train the MLE prior (data + pre-training stages)",
                       description="Extract the corpus and train the prior by MLE; the model lands in <run_dir>/models/prior.")
    _config_args(p)

    p = sub.add_parser("tune", help="fine-tune the prior against itself with PPO, RLOO or Sequence Tutor's q/psi/g",
                       description="Fine-tune a copy of the prior on the task reward with a KL term to the frozen prior "
                       "(tune.algorithm: ppo, rloo, q, psi, g). Uses <run_dir>/models/prior, or --prior.")
    _config_args(p)
    p.add_argument("--prior", help="folder of the prior (default: <run_dir>/models/prior)")

    p = sub.add_parser("evaluate", help="sample from a model, score it with the rule rewards, write a report",
                       description="Sample pieces from --model for the evaluation prompts, score them, and write eval.json, report.md and exported pieces into the run folder.")
    _config_args(p, run_flags=False)
    p.add_argument("--model", required=True, help="folder of a model written by save_pretrained (with its tokenizer)")
    p.add_argument("--prior", help="prior for log-likelihoods (default: --model itself)")
    p.add_argument("--out", help="folder for the evaluation report (default: <run_dir>/eval-<model name>)")

    p = sub.add_parser("sample", help="generate pieces from a model and export them as MusicXML and MIDI",
                       description="Generate pieces from a trained model. First species: give cantus firmi as note names or MusicXML files; "
                       "melody: give -n. Writes NN.musicxml and NN.mid per piece and prints each piece's rule report.")
    p.add_argument("--model", required=True, help="folder of a model written by save_pretrained (with its tokenizer)")
    p.add_argument("--cantus", action="append", default=[], metavar="NOTES", help='a cantus firmus as note names, e.g. "D4 F4 E4 D4 G4 F4 A4 G4 F4 E4 D4" (repeatable)')
    p.add_argument("--cantus-file", action="append", default=[], metavar="FILE", help="MusicXML file(s) whose parts are cantus firmi (repeatable)")
    p.add_argument("--position", choices=["below", "above"], default="below", help="where the cantus lies (default: below the counterpoint)")
    p.add_argument("-n", "--num", type=int, default=4, help="pieces per cantus, or melodies in melody mode (default 4)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--out", default="samples", help="output folder (default ./samples)")

    p = sub.add_parser("translate", help="translate a text file line by line with a trained translation model",
                       description="Translate --input (one sentence per line) into --output with a model written by `rlhf run configs/translation.yaml`; "
                       "line i of the output is the translation of line i of the input (empty lines stay empty).")
    p.add_argument("--model", required=True, help="model folder (save_pretrained, with its tokenizer)")
    p.add_argument("--input", required=True, help="UTF-8 text file, one source sentence per line")
    p.add_argument("--output", required=True, help="file to write the translations to")
    p.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy)")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch")

    p = sub.add_parser("simulate-preferences", help="simulate raters of divergent taste and write a preference data set",
                       description="Write data.path of a reward config (configs/reward-*.yaml): pairwise preferences of simulated rater groups.")
    p.add_argument("config", help="YAML config, e.g. configs/reward-music.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")

    p = sub.add_parser("train-reward", help="train Bradley-Terry and VPL reward models on pairwise preferences",
                       description="Split the preferences (no held-out rater or prompt in training), train each of `methods`, "
                       "evaluate on held-out raters and write eval.json and report.md into run_dir.")
    p.add_argument("config", help="YAML config, e.g. configs/reward-music.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
    p.add_argument("--resume", action="store_true", help="continue the run in run_dir from its last checkpoints")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run_dir first")

    p = sub.add_parser("personalise", help="tune one policy per rater group with a VPL reward (Pets) and judge it by that group",
                       description="From a `rlhf train-reward` run with VPL on simulated Pets raters: train a small prior on the candidate answers, "
                       "tune it once per group with z from that group's held-out labelled pairs, and report how often each group prefers "
                       "the tuned answers to the prior's.")
    p.add_argument("config", help="YAML config, e.g. configs/personal-pets.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
    p.add_argument("--resume", action="store_true", help="keep the prior and tuned models already in run_dir")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run_dir first")

    # parsed by apps/labelling/cli.py (see DELEGATED); listed here for `rlhf --help`
    sub.add_parser("export-pairs", help="sample candidate pairs for labelling (JSONL, Label Studio, CSV, MusicXML/MIDI)", add_help=False)
    sub.add_parser("import-labels", help="read labels (Label Studio JSON, CSV, JSONL) back into the preference schema", add_help=False)
    sub.add_parser("label", help="label pairs in a local web page (label serve), write the labels (label export)", add_help=False)

    # parsed by apps/launch.py; listed here for `rlhf --help`
    sub.add_parser("launch", help="run a subcommand on N processes / machines via accelerate launch or deepspeed (prints the command)", add_help=False)

    p = sub.add_parser("compare", help="put finished runs side by side: config differences, training curves, evaluation tables",
                       description="Write OUT/compare.md and OUT/compare.png from run folders (config.yaml, metrics.jsonl, eval.json): "
                       "the config keys on which they differ, their training curves overlaid and their headline evaluation rows.")
    p.add_argument("runs", nargs="+", help="run folders written by rlhf run, tune, evaluate or train-reward")
    p.add_argument("--out", default="compare", help="folder for compare.md and compare.png (default ./compare)")

    p = sub.add_parser("report", help="rebuild a run's report.md and plots from its eval.json",
                       description="Rewrite report.md, plots/ and exported samples of a run folder from its eval.json and config.yaml.")
    p.add_argument("run", help="a run folder with eval.json (rlhf run, or the --out of rlhf evaluate)")

    p = sub.add_parser("config-help", help="list every config key with its default and meaning")
    p.add_argument("config", nargs="?", help="optional YAML whose values are shown as defaults")
    return parser


def _load(args: argparse.Namespace):
    from apps.pipeline import load_run_config

    if args.quick:
        log.info("--quick: the task's quick preset over %s, into <run_dir>-quick", args.config)
    return load_run_config(args.config, args.overrides, quick=args.quick)


def cmd_run(args: argparse.Namespace) -> int:
    from apps.pipeline import run_pipeline

    report = run_pipeline(_load(args), resume=args.resume, overwrite=args.overwrite)
    print(f"report: {report}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from apps.pipeline import make_task, open_run, stage_data, stage_prior

    cfg = _load(args)
    run = open_run(cfg, resume=args.resume, overwrite=args.overwrite)
    task = make_task(cfg)
    train, val = stage_data(cfg, run, task)
    path = stage_prior(cfg, run, task, train, val, resume=args.resume)
    print(f"prior: {path}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from apps.pipeline import stage_tune
    from rlhf.runs import output_run

    cfg = _load(args)
    if cfg.tune is None:
        raise UserError("the config has tune: null; set tune.algorithm=ppo (or rloo, q, psi, g).")
    prior = Path(args.prior) if args.prior else Path(cfg.run_dir) / "models" / "prior"
    run = output_run(cfg.run_dir)
    run.attach_log()
    run.configure(cfg)  # what this tune runs with: config.yaml, trackers, precision
    task = _task_for_model(cfg, prior)
    if (run.final_model_dir(cfg.tune.algorithm) / "config.json").is_file() and not (args.resume or args.overwrite):
        raise UserError(f"{run.final_model_dir(cfg.tune.algorithm)} exists; pass --resume to keep it or --overwrite to tune again.")
    if args.overwrite and run.is_main:  # under a launcher only rank 0 deletes
        import shutil

        shutil.rmtree(run.stage_dir(f"tune-{cfg.tune.algorithm}"), ignore_errors=True)
        shutil.rmtree(run.final_model_dir(cfg.tune.algorithm), ignore_errors=True)
    print(f"{cfg.tune.algorithm}: {stage_tune(cfg, run, task, prior, resume=args.resume)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from apps.pipeline import stage_evaluate
    from rlhf.runs import output_run

    cfg = _load(args)
    model = Path(args.model)
    out = Path(args.out) if args.out else Path(cfg.run_dir) / f"eval-{model.name}"
    task = _task_for_model(cfg, model)  # before the folder exists: a wrong --model leaves no stub --out behind
    run = output_run(out)
    run.attach_log()
    run.configure(cfg)
    prior = Path(args.prior) if args.prior else model
    # with a separate prior, it gets its own row: the baseline every comparison in the report needs
    models = {"prior": prior, model.name: model} if prior.resolve() != model.resolve() else {model.name: model}
    stage_evaluate(cfg, run, task, models, prior, None)
    print(f"report: {out / 'report.md'}")
    return 0


def _task_for_model(cfg, model: Path):
    """The task with the tokenizer saved beside the model (so token ids always match)."""
    from apps.pipeline import make_task

    return make_task(cfg, model)


def cmd_sample(args: argparse.Namespace) -> int:
    from rlhf.models import load_model
    from tasks.counterpoint import cantus as cantus_mod
    from tasks.counterpoint.config import CounterpointConfig
    from tasks.counterpoint.export import write_midi, write_musicxml
    from tasks.counterpoint.task import CounterpointTask, check_model_fits, load_codec

    model_dir = Path(args.model)
    codec = load_codec(model_dir)
    if args.num < 1:
        raise UserError(f"-n must be at least 1 (got {args.num}).")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0 (got {args.temperature}).")
    task = CounterpointTask(CounterpointConfig(mode=codec.mode), codec)
    model = load_model(model_dir)
    if codec.mode == "melody":
        prompts = task.eval_prompts()
    else:
        cantus = [cantus_mod.parse_note_names(text) for text in args.cantus]
        for f in args.cantus_file:
            cantus += cantus_mod.load_cantus_musicxml(f)
        if not cantus:
            raise UserError('first-species models need a cantus firmus: pass --cantus "D4 F4 E4 D4 G4 F4 A4 G4 F4 E4 D4" or --cantus-file cf.musicxml.')
        prompts = []
        for i, pitches in enumerate(cantus):
            try:
                prompts += task.prompts_for([(f"cantus{i + 1}", pitches)], [args.position], skip_invalid=False)
            except ValueError as e:
                raise UserError(f"cantus {i + 1}: {e}") from None
    check_model_fits(model, codec, prompts, model_dir)
    rep, comps = task.sample(model, prompts, args.num, temperature=args.temperature, seed=args.seed)
    items = task.decode(rep, comps)
    scores = task.score(items)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (it, p) in enumerate(zip(items, rep)):
        base = out / f"{i:02d}_{p.name.replace('/', '_')}"
        write_musicxml(it, base.with_suffix(".musicxml"))
        write_midi(it, base.with_suffix(".mid"))
        bad = {k: int(v[i].sum()) for k, v in scores.violations.items() if v[i].any()}
        print(f"{base}.{{musicxml,mid}}  reward {scores.totals[i]:.2f}  violations: {bad or 'none'}")
    return 0


def cmd_config_help(args: argparse.Namespace) -> int:
    from rlhf.config import describe
    from apps.pipeline import load_run_config, run_config_class
    from rlhf.registry import TASKS

    values, cls = None, run_config_class(TASKS.get("counterpoint"))
    if args.config:
        from rlhf.config import load_config, read_yaml

        keys = set(read_yaml(args.config)[0])
        # the config families: personalisation, reward models, and the run configs (by task.name)
        if "reward_run" in keys:
            from apps.personal import PersonalConfig

            cfg = load_config(PersonalConfig, args.config)
        elif keys & {"methods", "bt", "vpl", "simulate"}:
            from apps.reward_cli import RewardRunConfig

            cfg = load_config(RewardRunConfig, args.config)
        else:
            cfg = load_run_config(args.config)
        values, cls = cfg.model_dump(), type(cfg)
    for key, default, doc in describe(cls):
        if values is not None:
            v = values
            for part in key.split("."):
                v = v.get(part) if isinstance(v, dict) else None  # a section set to null has no sub-keys
            default = repr(v)
        print(f"{key} = {default}\n    {doc}")
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    from tasks.translation.decode import translate_file

    if args.beam < 1 or args.batch_size < 1:
        raise UserError(f"--beam and --batch-size must be at least 1 (got {args.beam}, {args.batch_size}).")
    n = translate_file(args.model, args.input, args.output, beam=args.beam, batch_size=args.batch_size)
    print(f"translated {n} lines -> {args.output}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from apps.reward_cli import simulate_main

    print(f"preferences: {simulate_main(args.config, args.overrides)}")
    return 0


def cmd_train_reward(args: argparse.Namespace) -> int:
    from apps.reward_cli import train_reward_main

    root = train_reward_main(args.config, args.overrides, resume=args.resume, overwrite=args.overwrite)
    print(f"report: {root / 'report.md'}")
    return 0


def cmd_personalise(args: argparse.Namespace) -> int:
    from apps.personal import PersonalConfig, personalise
    from rlhf.config import load_config
    from rlhf.runs import open_run

    cfg = load_config(PersonalConfig, args.config, args.overrides)
    run = open_run(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"report: {personalise(cfg, run, resume=args.resume)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from apps.compare import compare

    print(f"comparison: {compare([Path(r) for r in args.runs], Path(args.out))}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from apps.compare import rebuild_report

    print(f"report: {rebuild_report(Path(args.run))}")
    return 0


COMMANDS = {"run": cmd_run, "pretrain": cmd_pretrain, "tune": cmd_tune, "evaluate": cmd_evaluate, "sample": cmd_sample,
            "translate": cmd_translate, "simulate-preferences": cmd_simulate, "train-reward": cmd_train_reward, "personalise": cmd_personalise, "config-help": cmd_config_help,
            "compare": cmd_compare, "report": cmd_report}


DELEGATED = {"export-pairs": "export_pairs_main", "import-labels": "import_labels_main", "label": "label_main"}
"""Subcommands with their own argument parsers (``apps/labelling/cli.py``)."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:  # rlhf launch: its own parser (apps/launch.py); the rest is the launched subcommand
        from apps.launch import launch_main

        return launch_main(argv[1:], commands=[*COMMANDS, *DELEGATED])
    if argv and argv[0] in DELEGATED:
        from apps.labelling import cli as labelling

        return getattr(labelling, DELEGATED[argv[0]])(argv[1:])
    parser = build_parser()
    # Overrides may come after flags (`run c.yaml --resume a=1`): argparse leaves those unknown.
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if not args.command:
        parser.print_help()
        return 2
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    log.setLevel(level)  # also when a host program (or pytest) configured logging first
    log.disabled = False  # a host's logging.config.dictConfig disables existing loggers; run.log must still be written
    for noisy in ("accelerate", "transformers", "datasets", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        from rlhf.runs import discard_stubs

        discard_stubs()  # a run folder holding only its config and log would block the next try
        return 2
    except BrokenPipeError:  # (before OSError, its base class) `rlhf config-help | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the interpreter's final flush cannot fail again
        return 141  # 128 + SIGPIPE, as a tool killed by the broken pipe would
    except OSError as e:
        from rlhf.runs import STORAGE_ERRNOS, discard_stubs

        if e.errno not in STORAGE_ERRNOS:
            raise
        print(f"error: {e.filename}: {e.strerror}; {_STORAGE_FIX.get(e.errno, _STORAGE_FIX[errno.EACCES])}", file=sys.stderr)
        discard_stubs()
        return 1  # the environment, not the input: what was written before stays (checkpoints are whole or absent)
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130
    finally:
        from rlhf.runs import release_run_folders

        release_run_folders()  # the command is over: its run folders are free (main() may run again in one process)


_STORAGE_FIX = {
    errno.ENOSPC: "free space on that disk (fewer kept checkpoints: keep_checkpoints) or set run_dir to another disk, then run again with --resume",
    errno.EDQUOT: "free space in your quota or set run_dir to another disk, then run again with --resume",
    errno.EFBIG: "the file is larger than this file system or the process's file-size limit (ulimit -f) allows; set run_dir to another disk",
    errno.EACCES: "check its permissions: run_dir and --out must be folders you can write, inputs files you can read",
    errno.EROFS: "that file system is read-only: set run_dir (or --out) to a writable folder",
}


def entry() -> None:
    """The ``rlhf`` program (``main`` is the same command line for a caller's own process):
    large tensors in huge pages first (apps/hugepages.py), then the command."""
    from apps.hugepages import reexec_with_hugepages

    reexec_with_hugepages()
    sys.exit(main())


if __name__ == "__main__":
    entry()
