"""Entry points of ``rlhf export-pairs``, ``rlhf import-labels`` and ``rlhf label {serve,export}``.

Each takes the arguments after its subcommand name and returns an exit status: 0 on success,
2 with one ``error:`` line on a user mistake (``rlhf.errors.UserError``) or bad arguments::

    rlhf export-pairs --model runs/counterpoint/models/prior --out labelling/round1
    rlhf label serve --pairs labelling/round1/pairs.jsonl --db labelling/round1/labels.sqlite
    rlhf label export --pairs labelling/round1/pairs.jsonl --db labelling/round1/labels.sqlite --out labels.jsonl
    rlhf import-labels project-export.json pairs-filled.csv --pairs labelling/round1/pairs.jsonl --out labels.jsonl
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Callable, Sequence

from rlhf.errors import UserError

log = logging.getLogger("rlhf")

TOKEN_ENV = "RLHF_LABEL_TOKEN"


def _setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    log.setLevel(level)
    for noisy in ("transformers", "torch", "accelerate", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None, body: Callable[[argparse.Namespace], int]) -> int:
    """Parse, run, and turn UserError into ``error: ...`` + status 2 (argparse errors are 2 too)."""
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as e:  # --help (0) or a usage error (2): a status, not an exception, for callers
        return int(e.code or 0) if isinstance(e.code, int) or e.code is None else 2
    _setup_logging(getattr(args, "verbose", False))
    try:
        return body(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# --------------------------------------------------------------------------- export-pairs


def export_pairs_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlhf export-pairs",
        description="Sample candidate pairs from a model (or two: one sample of each per pair) and write them for labelling: "
        "pairs.jsonl (preference schema + metadata), pairs.csv, Label Studio tasks.json + config.xml, and for music "
        "a MusicXML and a MIDI file per candidate.")
    src = p.add_argument_group("where the candidates come from")
    src.add_argument("--model", action="append", default=[], metavar="DIR", help="model folder (save_pretrained, with its tokenizer); twice = compare two models")
    src.add_argument("--run", metavar="RUN_DIR", help="a run folder; takes <RUN_DIR>/models/<stage>")
    src.add_argument("--stage", action="append", default=[], metavar="NAME", help="model name inside --run (default prior; twice = compare, e.g. --stage prior --stage ppo)")
    pr = p.add_argument_group("prompts")
    pr.add_argument("--cantus", action="append", default=[], metavar="NOTES", help='counterpoint: a cantus firmus as note names, e.g. "D4 F4 E4 D4 G4 F4 A4 G4 F4 E4 D4" (repeatable; default: Fux\'s cantus firmi)')
    pr.add_argument("--cantus-file", action="append", default=[], metavar="FILE", help="counterpoint: MusicXML file(s) whose parts are cantus firmi")
    pr.add_argument("--transpose", default="0", metavar="SHIFTS", help='counterpoint: semitone shifts of every cantus, e.g. --transpose=-2,0,2 (default 0)')
    pr.add_argument("--position", choices=["below", "above", "both"], default="both", help="where the cantus lies (default both)")
    pr.add_argument("--prompts", metavar="FILE", help="translation: source sentences, one per line")
    s = p.add_argument_group("sampling")
    s.add_argument("--pairs-per-prompt", type=int, default=2, help="pairs per prompt (default 2)")
    s.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, > 0 (default 1.0)")
    s.add_argument("--seed", type=int, default=0, help="sampling and A/B-order seed (default 0)")
    p.add_argument("--no-scores", action="store_true", help="music: skip the MusicXML/MIDI files (about 0.25 s per candidate)")
    p.add_argument("--out", required=True, metavar="DIR", help="export folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _models(args: argparse.Namespace) -> list[Path]:
    if args.run and args.model:
        raise UserError("give --model or --run, not both.")
    if args.stage and not args.run:
        raise UserError("--stage names a model inside --run RUN_DIR; give --run too (or use --model DIR).")
    if args.run:
        return [Path(args.run) / "models" / stage for stage in (args.stage or ["prior"])]
    if not args.model:
        raise UserError("give --model DIR (a model folder) or --run RUN_DIR [--stage prior].")
    return [Path(m) for m in args.model]


def _shifts(text: str) -> list[int]:
    try:
        shifts = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UserError(f"--transpose {text!r}: give semitone shifts separated by commas, e.g. -2,0,2.") from None
    if not shifts or any(abs(s) > 24 for s in shifts):
        raise UserError(f"--transpose {text!r}: give one or more shifts within -24..24.")
    return shifts


def _cantus(args: argparse.Namespace) -> list[tuple[str, tuple[int, ...]]]:
    """(name, pitches) of the given cantus firmi (default Fux's), in every --transpose shift."""
    from tasks.counterpoint import cantus as cantus_mod

    base = [(f"cantus{i}", cantus_mod.parse_note_names(text)) for i, text in enumerate(args.cantus, 1)]
    for f in args.cantus_file:
        base += [(f"{Path(f).stem}-{j}", pitches) for j, pitches in enumerate(cantus_mod.load_cantus_musicxml(f), 1)]
    shifts = _shifts(args.transpose)
    if not base and shifts == [0]:
        return []  # export_pairs takes Fux's cantus firmi
    base = base or cantus_mod.fux_cantus_firmi(None)
    return [(name if s == 0 else f"{name}{s:+d}", tuple(p + s for p in pitches)) for name, pitches in base for s in shifts]


def _export_pairs(args: argparse.Namespace) -> int:
    from apps.labelling.export import export_pairs, read_prompts

    positions = ["below", "above"] if args.position == "both" else [args.position]
    pairs = export_pairs(_models(args), args.out, cantus=_cantus(args), positions=positions,
                         prompts=read_prompts(args.prompts) if args.prompts else (), pairs_per_prompt=args.pairs_per_prompt,
                         temperature=args.temperature, seed=args.seed, scores=not args.no_scores, overwrite=args.overwrite)
    out = Path(args.out)
    print(f"{len(pairs)} pairs -> {out / 'pairs.jsonl'} (also pairs.csv, labelstudio/tasks.json, labelstudio/config.xml)")
    print(f"label them: rlhf label serve --pairs {out / 'pairs.jsonl'} --db {out / 'labels.sqlite'}")
    return 0


def export_pairs_main(argv: Sequence[str] | None = None) -> int:
    """``rlhf export-pairs ...`` (see :func:`export_pairs_parser`)."""
    return _run(export_pairs_parser(), argv, _export_pairs)


# --------------------------------------------------------------------------- import-labels


def import_labels_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlhf import-labels",
        description="Read labels (a Label Studio JSON export, the export's pairs.csv with `preferred` filled in, or preference "
        "JSONL/CSV/Parquet) into the preference schema with rater ids and time stamps. Refuses malformed records (file and "
        "record number), detects conflicting labels of one pair by one rater, removes duplicates, and writes --out atomically.")
    p.add_argument("inputs", nargs="+", metavar="FILE", help="label files (format detected from the content)")
    p.add_argument("--out", required=True, metavar="FILE", help="output: .jsonl, .csv or .parquet (must not exist unless --overwrite)")
    p.add_argument("--format", choices=["auto", "labelstudio", "csv", "jsonl"], default="auto", help="force the input format (default auto)")
    p.add_argument("--pairs", metavar="PAIRS_JSONL", help="the export's pairs.jsonl: check pair ids and contents against it")
    p.add_argument("--rater", metavar="NAME", help="rater id for CSV rows / records without one")
    p.add_argument("--on-conflict", choices=["error", "latest", "drop"], default="error",
                   help="same rater, same pair, different labels: error (default), keep the latest, or drop both")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _import_labels(args: argparse.Namespace) -> int:
    from apps.labelling.importer import import_labels
    from apps.labelling.pairs import read_pairs

    pairs = {p.pair_id: p for p in read_pairs(args.pairs)} if args.pairs else None
    s = import_labels(args.inputs, args.out, fmt=args.format, rater=args.rater, pairs=pairs, on_conflict=args.on_conflict,
                      overwrite=args.overwrite)
    read = ", ".join(f"{k}: {v}" for k, v in s.read.items())
    print(f"read {sum(s.read.values())} labels ({read}); skipped {s.skipped}; duplicates removed {s.duplicates}; "
          f"conflicts resolved {s.conflicts}; wrote {s.written} records -> {s.out}")
    return 0


def import_labels_main(argv: Sequence[str] | None = None) -> int:
    """``rlhf import-labels ...`` (see :func:`import_labels_parser`)."""
    return _run(import_labels_parser(), argv, _import_labels)


# --------------------------------------------------------------------------- label serve / export


def label_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf label", description="Label pairs in a local web page, and export the labels.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="action", metavar="{serve,export}", required=True)
    s = sub.add_parser("serve", help="start the labelling page",
                       description="Serve the pairs in a local web page; every label is stored in --db (SQLite) before the page hears back.")
    s.add_argument("--pairs", required=True, metavar="PAIRS_JSONL", help="pairs.jsonl written by `rlhf export-pairs`")
    s.add_argument("--db", required=True, metavar="FILE", help="SQLite file of the labels (created if missing)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; others need a token)")
    s.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 = any free port)")
    s.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                   help=f"access token the page must present ('auto' = a random one; default ${TOKEN_ENV}, else none on 127.0.0.1)")
    s.add_argument("--max-body", type=int, default=16 * 1024, help="largest request body in bytes (default 16384)")
    s.add_argument("--active", metavar="VPL_MODEL", help="serve each rater the pair whose label says most about their taste under this VPL reward "
                   "model (models/reward-vpl of `rlhf train-reward`), instead of the file order")
    e = sub.add_parser("export", help="write the stored labels in the preference schema",
                       description="Write the labels in --db as preference records (chosen = the preferred candidate; ties as label: tie; skips left out), atomically.")
    e.add_argument("--pairs", required=True, metavar="PAIRS_JSONL", help="the pairs file the session served")
    e.add_argument("--db", required=True, metavar="FILE", help="SQLite file of the labels")
    e.add_argument("--out", required=True, metavar="FILE", help="output: .jsonl, .csv or .parquet")
    e.add_argument("--rater", metavar="NAME", help="only this rater's labels")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return p


def _serve(args: argparse.Namespace) -> int:
    from apps.labelling.pairs import read_pairs
    from apps.labelling.server import LOOPBACK, bind_socket, create_app, make_server
    from apps.labelling.store import LabelStore

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: use 0-65535.")
    if not 256 <= args.max_body <= 10 * 1024 * 1024:
        raise UserError(f"--max-body {args.max_body}: use 256 bytes to 10 MiB.")
    loopback = args.host in LOOPBACK
    token = secrets.token_urlsafe(16) if args.token == "auto" else (args.token or None)
    if not loopback and not token:
        raise UserError(f"--host {args.host} lets other machines in; give --token TOKEN (or --token auto, or ${TOKEN_ENV}).")
    if token is not None and len(token) < 8:
        raise UserError("--token: use at least 8 characters (or --token auto).")
    pairs = read_pairs(args.pairs)
    store = LabelStore(args.db)
    chooser = None
    if args.active:
        from apps.labelling.active import ActiveChooser

        chooser = ActiveChooser(args.active, pairs)
    app = create_app(pairs, store, token=token, max_body=args.max_body, check_host=loopback, chooser=chooser)
    sock = bind_socket(args.host, args.port)
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    print(f"labelling {len(pairs)} pairs from {args.pairs}; labels go to {args.db}", flush=True)
    print(f"serving on {url}", flush=True)
    make_server(app, sock).run(sockets=[sock])
    return 0


def _label_export(args: argparse.Namespace) -> int:
    from apps.labelling.importer import export_labels
    from apps.labelling.pairs import read_pairs
    from apps.labelling.store import LabelStore

    if not Path(args.db).is_file():
        raise UserError(f"{args.db}: label database not found; label first with `rlhf label serve --pairs ... --db {args.db}`.")
    pairs = read_pairs(args.pairs)
    n, skipped = export_labels(pairs, LabelStore(args.db), args.out, rater=args.rater, overwrite=args.overwrite)
    print(f"wrote {n} labels ({skipped} skips left out) -> {args.out}")
    from reward_models.data import load_preferences
    from apps.labelling.importer import model_win_rates

    for model, s in model_win_rates(pairs, load_preferences(args.out)).items():  # pairs of two models: who won
        print(f"{model}: win rate {s['win_rate']:.3f} ({s['wins']:g} wins, {s['ties']:g} ties, {s['losses']:g} losses)")
    return 0


def label_main(argv: Sequence[str] | None = None) -> int:
    """``rlhf label serve ...`` / ``rlhf label export ...`` (see :func:`label_parser`)."""
    return _run(label_parser(), argv, lambda a: _serve(a) if a.action == "serve" else _label_export(a))


if __name__ == "__main__":  # python -m apps.labelling.cli label serve ...
    commands = {"export-pairs": export_pairs_main, "import-labels": import_labels_main, "label": label_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(f"usage: python -m apps.labelling.cli {{{','.join(commands)}}} ...", file=sys.stderr)
        sys.exit(2)
    sys.exit(commands[sys.argv[1]](sys.argv[2:]))
