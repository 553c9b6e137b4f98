"""``rlhf export-pairs``: sample candidate pairs from one or two models and write them for labelling.

For each prompt (a cantus firmus in a position, a melody start, or a source sentence) the model
samples candidates; distinct candidates are paired (one model: two of its samples; two models:
one sample of each, e.g. prior vs tuned policy), shown in a random A/B order. The export folder::

    <out>/pairs.jsonl              the pairs (apps/labelling/pairs.py): schema columns + metadata
    <out>/pairs.csv                for spreadsheets: fill in `preferred` (A, B, tie, skip) and `rater_id`
    <out>/labelstudio/tasks.json   Label Studio import file (one task per pair)
    <out>/labelstudio/config.xml   the matching pairwise-comparison labelling config
    <out>/music/<hash>.musicxml    music: one MusicXML and one MIDI file per distinct candidate,
    <out>/music/<hash>.mid         referenced from each pair's metadata.files (paths relative to <out>)
    <out>/manifest.json            models, sampling settings, counts

The whole folder is written into a temporary sibling and renamed (``rlhf.runs.atomic_dir``),
so an interrupted export leaves no half-written folder.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from apps.labelling.pairs import CandidatePair, make_pair_id, midi_name, pairs_jsonl, sha_hex
from rlhf.errors import UserError

log = logging.getLogger("rlhf")

QUARTERS_PER_WHOLE = 4.0
SIXTEENTH = 0.25


@dataclass(frozen=True)
class ModelInfo:
    """A model folder to sample from, with what identifies it in pair ids and metadata."""

    path: Path
    model_id: str  # "<folder name>@<sha256 of the weights, 12 hex>": stable across machines
    checkpoint_step: int | None
    kind: str  # "counterpoint" or "translation"

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "id": self.model_id, "checkpoint_step": self.checkpoint_step}


@dataclass(frozen=True)
class Candidate:
    """One sampled answer: the schema strings plus what the page and the files need."""

    prompt_name: str
    prompt: str  # as the reward model reads it
    response: str
    display_prompt: str
    display: str
    model: int  # index into the models list
    sample: int  # index among that model's samples for this prompt
    item: Any = None  # FirstSpeciesPiece / Melody for music, None for text
    task: dict[str, Any] | None = None


# --------------------------------------------------------------------------- models


def weights_digest(path: Path) -> str:
    """sha256 (12 hex) over the model's weight files and config, read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    if not files:
        raise UserError(f"{path}: no model weights (model.safetensors) found; point --model at a folder written by save_pretrained.")
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


def checkpoint_step(path: Path) -> int | None:
    """The training step of a model folder when it can be known: ``.../step-000123`` folders,
    or ``<run>/models/<name>`` whose run has ``checkpoints/<name>`` or ``checkpoints/tune-<name>``
    (the last checkpoint of a stage is its final model). None otherwise."""
    from rlhf.runs import latest_checkpoint

    if path.name.startswith("step-") and path.name[5:].isdigit():
        return int(path.name[5:])
    if path.parent.name == "models":
        run = path.parent.parent
        for stage in (path.name, f"tune-{path.name}"):
            ckpt = latest_checkpoint(run / "checkpoints" / stage)
            if ckpt is not None:
                return int(ckpt.name[5:])
    return None


def model_kind(path: Path) -> str:
    """``counterpoint`` or ``translation``, read from the tokenizer config saved beside the model."""
    cfg_path = path / "tokenizer_config.json"
    if not (path / "config.json").is_file() or not cfg_path.is_file():
        raise UserError(f"{path}: not a model folder with its tokenizer (config.json, tokenizer_config.json). "
                        "Use a folder written by `rlhf pretrain`/`rlhf tune`, e.g. runs/counterpoint/models/prior.")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # also not UTF-8, a 5000-digit number, thousands of nested [
        raise UserError(f"{cfg_path}: unreadable tokenizer config ({e}).") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_path}: expected a JSON object (a tokenizer config), got {type(cfg).__name__}; use a folder written by `rlhf pretrain`.")
    if cfg.get("codec_mode"):
        return "counterpoint"
    if cfg.get("src_lang") and cfg.get("tgt_lang"):
        return "translation"
    raise UserError(f"{cfg_path}: neither a counterpoint (codec_mode) nor a translation (src_lang/tgt_lang) tokenizer; export-pairs supports these two tasks.")


def model_info(path: str | Path) -> ModelInfo:
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{p}: model folder not found. Give --model <folder written by save_pretrained> or --run <run_dir> [--stage prior].")
    kind = model_kind(p)
    return ModelInfo(p, f"{p.resolve().name}@{weights_digest(p)}", checkpoint_step(p), kind)


# --------------------------------------------------------------------------- music


def voices_of(item: Any) -> list[dict[str, Any]]:
    """The page's compact note list: voices, upper first, pitches (None = rest) and durations in quarters."""
    from tasks.counterpoint.export import melody_notes
    from tasks.counterpoint.piece import FirstSpeciesPiece

    if isinstance(item, FirstSpeciesPiece):
        roles = ("counterpoint", "cantus") if item.cantus_position == "below" else ("cantus", "counterpoint")
        return [{"role": role, "pitches": [int(x) for x in line], "durations": [QUARTERS_PER_WHOLE] * len(line)}
                for role, line in zip(roles, (item.upper, item.lower))]
    runs = melody_notes(item.events)
    return [{"role": "melody", "pitches": [p for p, _ in runs], "durations": [n * SIXTEENTH for _, n in runs]}]


def _names(pitches: Sequence[int | None]) -> str:
    return " ".join(midi_name(p) for p in pitches)


def music_candidates(info: ModelInfo, index: int, cantus: Sequence[tuple[str, tuple[int, ...]]], positions: Sequence[str],
                     samples: int, temperature: float, seed: int) -> list[Candidate]:
    """``samples`` completions per prompt of a counterpoint model (first species or melody)."""
    from rlhf.models import load_model
    from tasks.counterpoint.config import CounterpointConfig
    from tasks.counterpoint.task import CounterpointTask, Prompt, check_model_fits, load_codec

    codec = load_codec(info.path)
    task = CounterpointTask(CounterpointConfig(mode=codec.mode), codec)
    if codec.mode == "melody":
        prompts = task.eval_prompts()
    else:
        prompts = []
        for name, pitches in cantus:
            for pos in positions:
                try:
                    ids = codec.encode_prompt((pitches, pos))
                except ValueError as e:
                    raise UserError(f"cantus {name!r}: {e}") from None
                prompts.append(Prompt(f"{name}/{pos}", ids, len(pitches), pitches[-1] % 12))
    model = load_model(info.path)
    check_model_fits(model, codec, prompts, info.path)
    rep, comps = task.sample(model, prompts, samples, temperature=temperature, seed=seed)
    items = task.decode(rep, comps)
    tok = codec.tokenizer
    out = []
    for k, (p, c, it) in enumerate(zip(rep, comps, items)):
        prompt = " ".join(tok.convert_ids_to_tokens(list(p.ids)))
        response = " " + " ".join(tok.convert_ids_to_tokens(list(c[: p.n_new]) + [codec.eos_id]))
        if codec.mode == "melody":
            shown_prompt, shown = "melody (two bars, 16th-note grid)", _names([v["pitches"] for v in voices_of(it)][0])
            info_task = {"mode": "melody"}
        else:
            shown_prompt = f"cantus firmus {it.cantus_position} the counterpoint: {_names(it.cantus)}"
            shown = f"counterpoint: {_names(it.counterpoint)}"
            info_task = {"mode": "first_species", "cantus_position": it.cantus_position, "final": it.final}
        out.append(Candidate(p.name, prompt, response, shown_prompt, shown, index, k % samples, it, info_task))
    return out


# --------------------------------------------------------------------------- text


def read_prompts(path: str | Path) -> list[str]:
    """Source sentences, one per line (empty lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: prompts file not found; give a UTF-8 text file with one source sentence per line.")
    try:
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8.") from None
    lines = [x for x in lines if x]
    if not lines:
        raise UserError(f"{p}: no prompts; write one source sentence per line.")
    return lines


def text_candidates(info: ModelInfo, index: int, sources: Sequence[str], samples: int, temperature: float, seed: int) -> list[Candidate]:
    """``samples`` sampled translations per source sentence (cut at the first ``<eos>``)."""
    import torch

    from rlhf.models import load_model
    from rlhf.rollout import sample_many
    from tasks.translation.decode import max_new_tokens, model_positions
    from tasks.translation.tokenizer import TranslationCodec

    codec = TranslationCodec.load(info.path)
    model = load_model(info.path)
    limit = model_positions(model)
    prompts, budgets = [], []
    for i, src in enumerate(sources):
        ids = codec.encode_prompt(src)
        n = min(max_new_tokens(len(ids) - 3), limit - len(ids))
        if n < 1:
            raise UserError(f"prompt {i + 1}: {len(ids)} tokens leave no room to answer within the model's {limit} positions; shorten it.")
        prompts += [ids] * samples
        budgets += [n] * samples
    gen = torch.Generator().manual_seed(seed)
    comps = sample_many(model, prompts, budgets, allowed=codec.allowed(), temperature=temperature, generator=gen)
    texts = codec.decode_batch(comps)
    out = []
    for k, text in enumerate(texts):
        src = sources[k // samples]
        if text.strip():  # an immediate <eos> is no answer to compare
            out.append(Candidate(f"prompt-{k // samples + 1}", src, " " + text, src, text, index, k % samples))
    return out


# --------------------------------------------------------------------------- pairs


def make_pairs(candidates: Sequence[Candidate], models: Sequence[ModelInfo], n_models: int, pairs_per_prompt: int,
               seed: int) -> list[tuple[CandidatePair, Candidate, Candidate]]:
    """Distinct candidates of each prompt paired: one model -> disjoint pairs of its samples;
    two models -> sample i of model 0 against sample i of model 1. A/B order is random (seeded)."""
    rng = random.Random(seed)
    by_prompt: dict[tuple[str, str], list[list[Candidate]]] = {}
    for c in candidates:
        lists = by_prompt.setdefault((c.prompt_name, c.prompt), [[] for _ in range(n_models)])
        if all(c.response != x.response for x in lists[c.model]):
            lists[c.model].append(c)
    out: list[tuple[CandidatePair, Candidate, Candidate]] = []
    seen: set[str] = set()
    for lists in by_prompt.values():
        if n_models == 1:
            xs = lists[0]
            couples = [(xs[i], xs[i + 1]) for i in range(0, len(xs) - 1, 2)]
        else:
            couples = [(x, y) for x, y in zip(lists[0], lists[1]) if x.response != y.response]
        for x, y in couples[:pairs_per_prompt]:
            a, b = (x, y) if rng.random() < 0.5 else (y, x)
            pid = make_pair_id(a.prompt, a.response, b.response, [models[a.model].model_id, models[b.model].model_id])
            if pid in seen:
                continue
            seen.add(pid)
            meta: dict[str, Any] = {
                "domain": "music" if a.item is not None else "text",
                "prompt_name": a.prompt_name,
                "display": {"prompt": a.display_prompt, "a": a.display, "b": b.display},
                "candidates": {"a": {"model": a.model, "sample": a.sample}, "b": {"model": b.model, "sample": b.sample}},
            }
            if a.item is not None:
                meta["notes"] = {"a": voices_of(a.item), "b": voices_of(b.item)}
                meta["task"] = a.task
            out.append((CandidatePair(pid, a.prompt, a.response, b.response, f"{a.prompt_name}#{pid}", meta), a, b))
    return out


# --------------------------------------------------------------------------- files


def piano_roll_svg(voices: Sequence[dict[str, Any]], lo: int, hi: int, width: int = 360, height: int = 160) -> str:
    """A small SVG piano roll (for Label Studio's HyperText): one coloured bar per note."""
    colours = {"cantus": "#888888", "counterpoint": "#1f6fd1", "melody": "#1f6fd1"}
    total = max(sum(v["durations"]) for v in voices) or 1.0
    span = max(hi - lo + 1, 1)
    row = height / span
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
             f'<rect width="{width}" height="{height}" fill="#fafafa" stroke="#cccccc"/>']
    for v in voices:
        t = 0.0
        for p, d in zip(v["pitches"], v["durations"]):
            if p is not None:
                x, w = t / total * width, d / total * width
                y = (hi - p) * row
                parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w - 1, 1):.1f}" height="{max(row - 1, 1):.1f}" '
                             f'fill="{colours.get(v["role"], "#444444")}"/>')
            t += d
    parts.append("</svg>")
    return "".join(parts)


def labelstudio_config(music: bool) -> str:
    """The pairwise-comparison labelling config matching :func:`labelstudio_tasks`."""
    roll = lambda n: f'\n      <HyperText name="roll{n}" value="$roll{n}" inline="true"/>' if music else ""  # noqa: E731
    return f"""<View>
  <Header value="Which candidate is better? Pick A (left) or B (right); choose Tie if neither is. Skip if you cannot judge."/>
  <Text name="prompt" value="$prompt_text"/>
  <View style="display: grid; grid-template-columns: 1fr 1fr; column-gap: 1em">
    <View>
      <Header value="A"/>
      <Text name="text1" value="$text1"/>{roll(1)}
    </View>
    <View>
      <Header value="B"/>
      <Text name="text2" value="$text2"/>{roll(2)}
    </View>
  </View>
  <Pairwise name="pw" toName="text1,text2"/>
  <Choices name="tie" toName="text1" choice="single" showInline="true">
    <Choice value="Tie"/>
  </Choices>
</View>
"""


def labelstudio_tasks(pairs: Sequence[CandidatePair]) -> list[dict[str, Any]]:
    """One Label Studio task per pair. ``data`` keeps the raw strings (``prompt``, ``a``, ``b``)
    so an export from Label Studio can be imported without the pairs file."""
    tasks = []
    for p in pairs:
        data: dict[str, Any] = {"pair_id": p.pair_id, "prompt": p.prompt, "a": p.a, "b": p.b, "source": p.source,
                                "prompt_text": p.display("prompt"), "text1": p.display("a"), "text2": p.display("b")}
        va, vb = p.notes("a"), p.notes("b")
        if va and vb:
            pitches = [x for v in (*va, *vb) for x in v["pitches"] if x is not None]
            lo, hi = min(pitches) - 2, max(pitches) + 2
            data["roll1"], data["roll2"] = piano_roll_svg(va, lo, hi), piano_roll_svg(vb, lo, hi)
        for key, n in (("a", 1), ("b", 2)):
            for kind, path in ((p.metadata.get("files") or {}).get(key) or {}).items():
                data[f"{kind}{n}"] = path
        tasks.append({"data": data})
    return tasks


CSV_COLUMNS = ("pair_id", "prompt_name", "display_prompt", "display_a", "display_b", "preferred", "rater_id", "created_at",
               "musicxml_a", "midi_a", "musicxml_b", "midi_b", "prompt", "candidate_a", "candidate_b", "source")


def _cell(text: str) -> str:
    """A display cell a spreadsheet will not run as a formula (CSV injection): a leading
    = + - @ gets an apostrophe. Only the display columns; the raw columns stay exact."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def pairs_csv(pairs: Sequence[CandidatePair]) -> str:
    """The spreadsheet: readable columns first, ``preferred`` (A, B, tie, skip) and ``rater_id`` to fill in."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    w.writeheader()
    for p in pairs:
        files = p.metadata.get("files") or {}
        w.writerow({"pair_id": p.pair_id, "prompt_name": _cell(p.metadata.get("prompt_name", "")), "display_prompt": _cell(p.display("prompt")),
                    "display_a": _cell(p.display("a")), "display_b": _cell(p.display("b")), "preferred": "", "rater_id": "", "created_at": "",
                    "musicxml_a": (files.get("a") or {}).get("musicxml", ""), "midi_a": (files.get("a") or {}).get("midi", ""),
                    "musicxml_b": (files.get("b") or {}).get("musicxml", ""), "midi_b": (files.get("b") or {}).get("midi", ""),
                    "prompt": p.prompt, "candidate_a": p.a, "candidate_b": p.b, "source": p.source})
    return buf.getvalue()


def write_scores(root: Path, triples: Sequence[tuple[CandidatePair, Candidate, Candidate]]) -> list[CandidatePair]:
    """MusicXML + MIDI per distinct candidate under ``root/music``; returns the pairs with
    ``metadata.files`` pointing at them (relative paths)."""
    from tasks.counterpoint.export import write_midi, write_musicxml

    (root / "music").mkdir(parents=True, exist_ok=True)
    written: dict[str, dict[str, str]] = {}
    out = []
    for pair, a, b in triples:
        files = {}
        for key, c in (("a", a), ("b", b)):
            h = sha_hex(c.prompt + "\n" + c.response)
            if h not in written:
                rel = {"musicxml": f"music/{h}.musicxml", "midi": f"music/{h}.mid"}
                write_musicxml(c.item, root / rel["musicxml"])
                write_midi(c.item, root / rel["midi"])
                written[h] = rel
            files[key] = written[h]
        out.append(CandidatePair(pair.pair_id, pair.prompt, pair.a, pair.b, pair.source, {**pair.metadata, "files": files}))
    return out


def write_export(out: Path, triples: Sequence[tuple[CandidatePair, Candidate, Candidate]], manifest: dict[str, Any],
                 *, scores: bool, overwrite: bool) -> list[CandidatePair]:
    """Write the export folder atomically (see the module docstring); returns the pairs written."""
    from rlhf.runs import atomic_dir

    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it or choose another --out.")
    result: list[CandidatePair] = []

    def write(tmp: Path) -> None:
        music = any(a.item is not None for _, a, _ in triples)
        pairs = write_scores(tmp, triples) if music and scores else [p for p, _, _ in triples]
        (tmp / "pairs.jsonl").write_text(pairs_jsonl(pairs), encoding="utf-8")
        (tmp / "pairs.csv").write_text(pairs_csv(pairs), encoding="utf-8")
        (tmp / "labelstudio").mkdir()
        (tmp / "labelstudio" / "tasks.json").write_text(json.dumps(labelstudio_tasks(pairs), ensure_ascii=False, indent=1), encoding="utf-8")
        (tmp / "labelstudio" / "config.xml").write_text(labelstudio_config(music), encoding="utf-8")
        (tmp / "manifest.json").write_text(json.dumps({**manifest, "pairs": len(pairs)}, indent=1), encoding="utf-8")
        result.extend(pairs)

    atomic_dir(out, write)
    return result


def export_pairs(models: Sequence[str | Path], out: str | Path, *, cantus: Sequence[tuple[str, tuple[int, ...]]] = (),
                 positions: Sequence[str] = ("below", "above"), prompts: Sequence[str] = (), pairs_per_prompt: int = 2,
                 temperature: float = 1.0, seed: int = 0, scores: bool = True, overwrite: bool = False) -> list[CandidatePair]:
    """Sample, pair and write (see the module docstring). ``cantus``: (name, MIDI pitches); none
    = Fux's cantus firmi. ``prompts``: source sentences for translation models. Returns the pairs."""
    if not 1 <= len(models) <= 2:
        raise UserError(f"give one --model (pairs of its samples) or two (one sample of each per pair); got {len(models)}.")
    if pairs_per_prompt < 1:
        raise UserError(f"--pairs-per-prompt must be at least 1 (got {pairs_per_prompt}).")
    if temperature <= 0:
        raise UserError(f"--temperature must be > 0 to sample distinct candidates (got {temperature}).")
    infos = [model_info(m) for m in models]
    if len({i.kind for i in infos}) > 1:
        raise UserError(f"the models are of different tasks ({', '.join(f'{i.path}: {i.kind}' for i in infos)}); compare models of one task.")
    kind = infos[0].kind
    # one model: pairs of its own samples, so draw twice as many (and a margin for duplicates)
    samples = 4 * pairs_per_prompt if len(infos) == 1 else 2 * pairs_per_prompt
    candidates: list[Candidate] = []
    for i, info in enumerate(infos):
        if kind == "translation":
            if not prompts:
                raise UserError(f"{info.path} is a translation model: give --prompts FILE (one source sentence per line).")
            candidates += text_candidates(info, i, prompts, samples, temperature, seed + i)
        else:
            if prompts:
                raise UserError(f"{info.path} is a counterpoint model: give cantus firmi (--cantus / --cantus-file), not --prompts.")
            from tasks.counterpoint.cantus import fux_cantus_firmi

            candidates += music_candidates(info, i, list(cantus) or fux_cantus_firmi(None), positions, samples, temperature, seed + i)
    triples = make_pairs(candidates, infos, len(infos), pairs_per_prompt, seed)
    if not triples:
        raise UserError("every prompt's samples were identical, so no pair could be formed; raise --temperature or use more prompts.")
    manifest = {"kind": "rlhf-export-pairs", "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "task": kind, "models": [i.as_dict() for i in infos],
                "sampling": {"temperature": temperature, "seed": seed, "samples_per_prompt": samples, "pairs_per_prompt": pairs_per_prompt}}
    # every pair carries the settings it was made with, so a labelled file keeps its provenance
    triples = [(CandidatePair(p.pair_id, p.prompt, p.a, p.b, p.source, {**p.metadata, "models": manifest["models"], "sampling": manifest["sampling"]}), a, b)
               for p, a, b in triples]
    pairs = write_export(Path(out), triples, manifest, scores=scores, overwrite=overwrite)
    log.info("export-pairs: %d pairs from %d prompts -> %s", len(pairs), len({p.prompt for p in pairs}), out)
    return pairs

