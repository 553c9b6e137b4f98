"""The loop closed at small scale: prior → export pairs → label (simulated raters through the web
API) → import → train BT and VPL → tune with the learned reward → does the rater prefer the tuned model?

Each step is a plain function that the test (``tests/test_labelling_loop.py``) and the
walk-through in ``docs/labelling.md`` share; ``python -m apps.labelling.loop --out DIR``
runs them all (about a minute on two CPU cores) and prints the rater's win rate.

The raters are the rater simulator's (``apps/simulate.py``): linear utilities over music
features and a noisy Bradley-Terry choice. They judge exactly what a person would: the two
pieces the page shows (decoded from the pair's token strings), and post ``A`` or ``B``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import threading
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from apps.labelling.pairs import CandidatePair
from apps.simulate import Rater

log = logging.getLogger("rlhf")

CONSONANCES = (3, 4, 7, 8, 9, 12, 15, 16)  # semitones: 3rds, 5th, 6ths, octave, 10ths


# --------------------------------------------------------------------------- a tiny prior


def synthetic_pieces(seed: int = 0, transpositions: Sequence[int] = (-2, 0, 2), per_cantus: int = 6) -> list[Any]:
    """First-species pieces over Fux's cantus firmi with random consonant intervals: a stand-in
    corpus that trains a tiny prior in seconds (the real one is the Bach chorale corpus)."""
    from tasks.counterpoint.cantus import fux_cantus_firmi
    from tasks.counterpoint.piece import FirstSpeciesPiece

    rng = np.random.default_rng(seed)
    out = []
    for name, pitches in fux_cantus_firmi(None):
        for t in transpositions:
            cf = tuple(p + t for p in pitches)
            for pos, sign in (("below", 1), ("above", -1)):
                for k in range(per_cantus):
                    iv = rng.choice(CONSONANCES, size=len(cf))
                    cp = tuple(int(c + sign * d) for c, d in zip(cf, iv))
                    out.append(FirstSpeciesPiece(cf, cp, pos, cf[-1] % 12, f"synthetic/{name}{t:+d}#{pos}{k}"))
    return out


def tiny_prior(run_dir: str | Path, steps: int = 150, seed: int = 0, progress: bool = False) -> Path:
    """A 2-layer GPT-2 counterpoint prior trained by MLE on :func:`synthetic_pieces` for ``steps``
    (0 = untrained); returns ``<run_dir>/models/prior`` (model + tokenizer, as `rlhf pretrain` writes it)."""
    from rlhf.models import ModelConfig, build_model
    from rlhf.pretrain import PretrainConfig, pretrain
    from rlhf.runs import Run
    from rlhf.trainer import seed_everything
    from tasks.counterpoint.tokens import build_codec

    seed_everything(seed)
    codec = build_codec("first_species")
    pieces = synthetic_pieces(seed)
    examples = [codec.encode(p) for p in pieces]
    model = build_model(ModelConfig(n_layer=2, n_embd=64, n_head=4, dropout=0.0, max_positions=64), codec.tokenizer)
    if steps == 0:  # an untrained model: enough for tests of the file formats
        final = Path(run_dir) / "models" / "prior"
        model.save_pretrained(final)
        codec.save(final)
        return final
    cfg = PretrainConfig(steps=steps, batch_size=32, lr=3e-3, warmup_steps=10, eval_every=steps, checkpoint_every=steps)
    run = Run(run_dir)
    final = pretrain(run, cfg, model, codec.tokenizer, examples, examples[:64], seed=seed, progress=progress)
    codec.save(final)
    return final


# --------------------------------------------------------------------------- raters through the web API


def music_raters(n: int, rater_type: str = "leaps", seed: int = 0, temperature: float = 0.05) -> list[Rater]:
    """``n`` simulated raters of one type (weights jittered per rater, as in the simulator)."""
    from apps.simulate import RaterGroupConfig, SimulateConfig, make_raters

    cfg = SimulateConfig(domain="music", raters=n, groups=[RaterGroupConfig(name="A", share=1.0, type=rater_type)],
                         disputed_share=0.0, temperature=temperature, seed=seed)
    return make_raters(cfg, np.random.default_rng(seed))


def music_prototype(rater_type: str = "leaps", temperature: float = 0.05) -> Rater:
    """The rater type without jitter: the judge of tuned vs prior samples."""
    from apps.simulate import type_weights

    return Rater(f"prototype-{rater_type}", "A", rater_type, "music", type_weights("music", rater_type), temperature)


@functools.lru_cache(maxsize=1)
def _codec() -> Any:
    from tasks.counterpoint.tokens import build_codec

    return build_codec("first_species")


def pair_pieces(pair: CandidatePair) -> tuple[Any, Any]:
    """The two first-species pieces of a music pair, decoded from its token strings."""
    codec = _codec()
    tok = codec.tokenizer
    prompt = tok.convert_tokens_to_ids(pair.prompt.split())
    return tuple(codec.decode(prompt, tok.convert_tokens_to_ids(x.split())) for x in (pair.a, pair.b))  # type: ignore[return-value]


def post_json(url: str, body: dict[str, Any], token: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """POST JSON, return the JSON answer (raises urllib.error.HTTPError on 4xx/5xx)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **({"X-Access-Token": token} if token else {})})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def label_through_api(base_url: str, pairs: Sequence[CandidatePair], raters: Sequence[Rater], *, per_pair: int = 1,
                      token: str | None = None, seed: int = 0) -> int:
    """Each pair is judged by ``per_pair`` raters (round robin, so raters see different pairs
    and a held-out rater's pairs are new to the reward model): a noisy BT choice on the rater's
    utilities, posted as ``A`` or ``B`` to ``POST /api/labels``. Returns the labels acknowledged."""
    from http.client import HTTPConnection
    from urllib.parse import urlsplit

    rng = np.random.default_rng(seed)
    pieces = [x for pair in pairs for x in pair_pieces(pair)]
    # u[r, i, 0/1]: rater r's utility of pair i's A and B, computed in one batch per rater
    utils = np.stack([r.utility(pieces).reshape(len(pairs), 2) for r in raters])
    url = urlsplit(base_url)
    conn = HTTPConnection(url.hostname, url.port, timeout=30)  # one keep-alive connection for all posts
    headers = {"Content-Type": "application/json", **({"X-Access-Token": token} if token else {})}
    n = 0
    try:
        for i, pair in enumerate(pairs):
            for k in range(per_pair):
                j = (i * per_pair + k) % len(raters)
                rater, u = raters[j], utils[j, i]
                p_a = 1.0 / (1.0 + np.exp(-(u[0] - u[1]) / rater.temperature))
                body = {"pair_id": pair.pair_id, "rater": rater.rater_id, "choice": "A" if rng.random() < p_a else "B"}
                conn.request("POST", "/api/labels", json.dumps(body).encode(), headers)  # bytes: one send, no Nagle delay
                r = conn.getresponse()
                answer = r.read()
                if r.status != 200:
                    raise RuntimeError(f"POST /api/labels -> {r.status}: {answer[:200]!r}")
                n += 1
    finally:
        conn.close()
    return n


@contextmanager
def serving(pairs_path: str | Path, db_path: str | Path, token: str | None = None, active: str | Path | None = None) -> Iterator[str]:
    """Run the labelling app in a background thread on a free loopback port; yields its URL.
    ``active``: a VPL model folder; each rater is then served the most informative pair."""
    from apps.labelling.pairs import read_pairs
    from apps.labelling.server import bind_socket, create_app, make_server
    from apps.labelling.store import LabelStore

    pairs = read_pairs(pairs_path)
    chooser = None
    if active is not None:
        from apps.labelling.active import ActiveChooser

        chooser = ActiveChooser(active, pairs)
    app = create_app(pairs, LabelStore(db_path), token=token, chooser=chooser)
    sock = bind_socket("127.0.0.1", 0)
    server = make_server(app, sock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the labelling server did not start")
            thread.join(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


# --------------------------------------------------------------------------- reward models and tuning


def train_rewards(data: str | Path, run_dir: str | Path, *, bt_steps: int = 150, vpl_steps: int = 100, seed: int = 0) -> Path:
    """BT and VPL (tiny) on the imported labels with ``rlhf train-reward``'s entry point; returns the run folder."""
    from apps.reward_cli import train_reward_main

    over = [f"data.path={data}", f"run_dir={run_dir}", "simulate=null", "progress=false", f"seed={seed}",
            "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
            f"bt.steps={bt_steps}", "bt.batch_size=32", "bt.lr=3e-3", "bt.warmup_steps=10", f"bt.eval_every={bt_steps}", f"bt.checkpoint_every={bt_steps}",
            f"vpl.steps={vpl_steps}", "vpl.raters_per_batch=4", f"vpl.eval_every={vpl_steps}", f"vpl.checkpoint_every={vpl_steps}",
            "vpl.latent_dim=4", "vpl.pair_hidden=32", "vpl.head_hidden=32", "vpl.beta_warmup_steps=20",
            # a few labels per rater and no rater groups: the plain backbone and VPL, context from 8 pairs
            "backbone=null", "data.split.stratify=false", "vpl.head=mlp", "vpl.encoder=pair", "vpl.init_from_bt=true",
            "vpl.context_sizes=[0,1,2,4,8]", "eval.context_sizes=[0,1,2,4,8]", "eval.context_pool=8", "eval.active=false"]
    return train_reward_main("configs/reward-music.yaml", over, overwrite=True)


def tune_with_reward(prior: str | Path, reward: Any, run_dir: str | Path, *, steps: int = 30, batch_size: int = 32,
                     beta: float = 0.05, seed: int = 0) -> Path:
    """PPO from the prior against ``reward`` (a :class:`reward_models.reward_source.RewardSource`),
    KL-penalised; returns the tuned model folder."""
    from rlhf.runs import Run
    from rlhf.tune import TuneConfig, tune
    from tasks.counterpoint.config import CounterpointConfig
    from tasks.counterpoint.task import CounterpointTask
    from tasks.counterpoint.tokens import Codec

    task = CounterpointTask(CounterpointConfig(rl_prompts="fux", train_cantus_transpositions=[0]), Codec.load(prior))
    cfg = TuneConfig.model_validate({"algorithm": "ppo", "steps": steps, "batch_size": batch_size, "checkpoint_every": steps,
                                     "kl": {"beta": beta}})
    return tune(Run(run_dir), cfg, task, Path(prior), reward=reward, seed=seed, progress=False, name="ppo-learned")


def win_rate_vs_prior(rater: Rater, tuned: str | Path, prior: str | Path, per_prompt: int = 8, seed: int = 1) -> float:
    """Share of prompts × samples where ``rater`` (noiselessly) prefers the tuned model's piece
    to the prior's for the same prompt (ties ½); the prompts are the export's (Fux, both positions)."""
    from apps.simulate import win_rate
    from rlhf.models import load_model
    from tasks.counterpoint.config import CounterpointConfig
    from tasks.counterpoint.task import CounterpointTask
    from tasks.counterpoint.tokens import Codec

    task = CounterpointTask(CounterpointConfig(rl_prompts="fux", train_cantus_transpositions=[0]), Codec.load(prior))
    prompts = task.train_prompts()
    items = {}
    for name, path in (("tuned", tuned), ("prior", prior)):
        rep, comps = task.sample(load_model(path), prompts, per_prompt, temperature=1.0, seed=seed)
        items[name] = task.decode(rep, comps)
    return win_rate(rater, items["tuned"], items["prior"])


def label_actively(base_url: str, pairs: Sequence[CandidatePair], rater: Rater, n: int, *, token: str | None = None, seed: int = 0) -> list[str]:
    """One rater labels the ``n`` pairs the page serves them one after the other (``GET
    /api/next``: with ``--active``, the most informative pair given their labels so far), each
    with a noisy BT choice on their utility of the two pieces. Returns the pair ids as served."""
    from urllib.parse import quote

    by_id = {p.pair_id: p for p in pairs}
    rng = np.random.default_rng(seed)
    served: list[str] = []
    for _ in range(n):
        req = urllib.request.Request(f"{base_url}/api/next?rater={quote(rater.rater_id)}", headers={"X-Access-Token": token} if token else {})
        with urllib.request.urlopen(req, timeout=30) as r:
            view = json.loads(r.read())["pair"]
        if view is None:
            break
        u = rater.utility(list(pair_pieces(by_id[view["pair_id"]])))
        p_a = 1.0 / (1.0 + np.exp(-(u[0] - u[1]) / rater.temperature))
        post_json(f"{base_url}/api/labels", {"pair_id": view["pair_id"], "rater": rater.rater_id, "choice": "A" if rng.random() < p_a else "B"}, token)
        served.append(view["pair_id"])
    return served


def one_rater_loop(out: str | Path, pairs: Sequence[CandidatePair], reward_model: str | Path, prior: str | Path, rater: Rater, *,
                   labels: int = 8, tune_steps: int = 30, beta: float = 0.1, seed: int = 0) -> dict[str, Any]:
    """A new rater's loop: the page serves them the pairs a VPL reward model finds most
    informative about their taste (``rlhf label serve --active``); their exported labels give
    z (``infer_z``); the prior is tuned against r(x, z) (PPO, KL to the prior); the rater compares the
    tuned model's pieces with the prior's. Returns the pairs served, z, the tuned model folder and
    the rater's win rate against the prior."""
    from apps.labelling.cli import label_main
    from apps.labelling.pairs import pairs_jsonl
    from reward_models.data import load_preferences
    from reward_models.reward_source import RewardSource

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairs_file, db, exported = out / "pairs.jsonl", out / "labels.sqlite", out / "labels.jsonl"
    pairs_file.write_text(pairs_jsonl(pairs))
    with serving(pairs_file, db, active=reward_model) as url:
        served = label_actively(url, pairs, rater, labels, seed=seed)
    _ok(label_main, ["export", "--pairs", str(pairs_file), "--db", str(db), "--out", str(exported), "--overwrite"])
    source = RewardSource.from_pretrained(reward_model, context=load_preferences(exported))  # z = μ(their labels)
    tuned = tune_with_reward(prior, source, out / "tune", steps=tune_steps, beta=beta, seed=seed)
    result = {"served": served, "z": [float(x) for x in source.z], "tuned": str(tuned), "win_rate": win_rate_vs_prior(rater, tuned, prior)}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


# --------------------------------------------------------------------------- all of it


def closed_loop(out: str | Path, *, raters: int = 4, rater_type: str = "leaps", transpose: str = "-4,-2,0,2,4", pairs_per_prompt: int = 4,
                prior_steps: int = 80, tune_steps: int = 20, seed: int = 0) -> dict[str, Any]:
    """Every step above in order, through the same entry points as the command line; returns
    the numbers the walk-through reports. Each pair is labelled by one rater, so a held-out
    rater's pairs are new to the reward model (its test accuracy is not memorisation)."""
    from apps.labelling.cli import export_pairs_main, import_labels_main, label_main
    from apps.labelling.pairs import read_pairs
    from reward_models.reward_source import RewardSource

    out = Path(out)
    prior = tiny_prior(out / "prior", steps=prior_steps, seed=seed)
    export, db = out / "export", out / "labels.sqlite"
    pairs_file = export / "pairs.jsonl"
    _ok(export_pairs_main, ["--model", str(prior), "--out", str(export), "--pairs-per-prompt", str(pairs_per_prompt),
                            f"--transpose={transpose}", "--no-scores", "--seed", str(seed), "--overwrite"])
    pairs = read_pairs(pairs_file)
    with serving(pairs_file, db) as url:
        posted = label_through_api(url, pairs, music_raters(raters, rater_type, seed), seed=seed)
    labels, imported = out / "labels.jsonl", out / "imported.jsonl"
    _ok(label_main, ["export", "--pairs", str(pairs_file), "--db", str(db), "--out", str(labels), "--overwrite"])
    _ok(import_labels_main, [str(labels), "--pairs", str(pairs_file), "--out", str(imported), "--overwrite"])
    reward_run = train_rewards(imported, out / "reward", seed=seed)
    bt = RewardSource.from_pretrained(reward_run / "models" / "reward-bt")
    tuned = tune_with_reward(prior, bt, out / "tune", steps=tune_steps, beta=0.1, seed=seed)
    methods = json.loads((reward_run / "eval.json").read_text())["methods"]
    return {"pairs": len(pairs), "labels": posted, "prior": str(prior), "tuned": str(tuned), "reward_run": str(reward_run),
            "bt_test_accuracy": methods["bt"]["overall"]["acc/test"],
            "win_rate": win_rate_vs_prior(music_prototype(rater_type), tuned, prior)}


def _ok(main: Any, argv: list[str]) -> None:
    if main(argv) != 0:
        raise RuntimeError(f"{main.__name__} {' '.join(argv)} failed (see the error above)")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m apps.labelling.loop", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="working folder")
    p.add_argument("--raters", type=int, default=4)
    p.add_argument("--rater-type", default="leaps", choices=["stepwise", "leaps", "rules"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    print(json.dumps(closed_loop(args.out, raters=args.raters, rater_type=args.rater_type, seed=args.seed), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
