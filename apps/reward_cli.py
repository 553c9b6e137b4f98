"""Entry points behind ``rlhf simulate-preferences`` and ``rlhf train-reward``.

Both read one YAML (``configs/reward-*.yaml``, a :class:`RewardRunConfig`) plus ``key=value``
overrides; the simulator writes ``data.path`` (and its ``.sim.json`` sidecar), training reads it::

    rlhf simulate-preferences configs/reward-music.yaml
    rlhf train-reward configs/reward-music.yaml            # BT and VPL, eval.json, report.md

Run folder of ``train-reward`` (``run_dir``)::

    config.yaml, metrics.jsonl, run.log       as every run (rlhf/runs.py)
    data/train.jsonl, data/test.jsonl          the split actually used (no held-out rater/prompt/source in train)
    checkpoints/reward-{bt,vpl}/step-*         resumable (--resume)
    models/reward-bt, models/reward-vpl        save_pretrained folders with the tokenizer
    eval.json, report.md, plots/*.png          held-out results (reward_models/report.py)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal, Sequence

from pydantic import Field, model_validator

from reward_models.bradley_terry import BTConfig
from reward_models.data import SplitKey
from apps.simulate import SimulateConfig
from reward_models.vpl import VPLTrainConfig
from rlhf.config import RunSettings, Section, load_config
from rlhf.errors import UserError
from rlhf.models import ModelConfig
from rlhf.runs import open_run

log = logging.getLogger("rlhf")

Method = Literal["bt", "vpl"]

QUICK_OVERRIDES = (
    "simulate.raters=60",
    "simulate.pairs_per_rater=32",
    "simulate.music.max_prompts=200",
    "bt.steps=100",
    "bt.eval_every=50",
    "bt.checkpoint_every=50",
    "vpl.steps=200",
    "vpl.eval_every=100",
    "vpl.checkpoint_every=100",
)
"""What ``--quick`` should set for ``simulate-preferences`` / ``train-reward`` (before the user's
overrides): a smoke run of about a minute; too short for VPL to learn a useful z."""


class SplitConfig(Section):
    by: list[SplitKey] = Field(default_factory=lambda: ["rater"], description="Hold out a share of each: rater, prompt, source (origin before '#'); records mixing held-out and training values are dropped.")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Share of the raters / prompts / sources held out for testing.")
    stratify: bool = Field(False, description="Hold out that share of each rater group (rater_group), so the test raters keep the data's mix (needs 'rater' in by).")


class RewardDataConfig(Section):
    path: str = Field(..., description="Preference data: .jsonl, .csv, .parquet, a datasets folder (save_to_disk), or hf://owner/name#split.")
    tokenizer: str = Field("first_species", description="first_species or melody (the counterpoint task's tokens), words (word-level, built from the data), or a tokenizer folder.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="Train/test split without leakage.")


class RewardEvalConfig(Section):
    context_sizes: list[int] = Field(default_factory=lambda: [0, 1, 2, 4, 8], description="VPL context sizes reported (labelled pairs of the held-out rater).")
    context_pool: int = Field(8, ge=0, description="Pairs of each held-out rater reserved as its context pool; the rest are the targets every method is scored on.")
    active: bool = Field(False, description="Also score VPL with context pairs chosen from the pool by expected information gain about z (reward_models/active.py) instead of at random.")
    active_samples: int = Field(64, ge=2, description="Samples of z ~ q(z|C) per query choice (the EIG estimate).")


def _tiny_model() -> ModelConfig:
    return ModelConfig(n_layer=2, n_embd=64, n_head=4, dropout=0.0, max_positions=64)


class RewardRunConfig(RunSettings):
    seed: int = Field(0, ge=0, description="Seed of the split, initialisation and batches.")
    run_dir: str = Field("runs/reward", description="The run folder (config, metrics, checkpoints, models, report).")
    progress: bool = Field(True, description="Show progress bars.")
    methods: list[Method] = Field(default_factory=lambda: ["bt", "vpl"], description="Reward models to train and compare: bt (Bradley-Terry), vpl (variational preference learning).")
    data: RewardDataConfig = Field(..., description="The preference data.")
    model: ModelConfig = Field(default_factory=_tiny_model, description="Backbone of the reward models (built tiny with the data's tokenizer, or model.path).")
    backbone: str | None = Field(None, description="A registered reward backbone built from model's sizes instead of model.arch, e.g. counterpoint_columns "
                                 "(GPT-2 whose counterpoint tokens also embed both voices' pitches and moves; tasks/counterpoint/columns.py).")
    bt: BTConfig = Field(default_factory=BTConfig, description="Bradley-Terry training.")
    vpl: VPLTrainConfig = Field(default_factory=VPLTrainConfig, description="VPL model and training.")
    eval: RewardEvalConfig = Field(default_factory=RewardEvalConfig, description="Held-out evaluation.")
    simulate: SimulateConfig | None = Field(None, description="Simulated raters for `rlhf simulate-preferences` (writes data.path); null = real data.")

    @model_validator(mode="after")
    def _backbone(self) -> "RewardRunConfig":
        from reward_models.backbone import BACKBONES

        if self.backbone is None:
            return self
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone {self.backbone!r} is not registered; use one of {', '.join(BACKBONES.names()) or '(none)'} or leave it null")
        if self.model.path is not None:
            raise ValueError("model.path loads a model folder with its own architecture; set either model.path or backbone, not both")
        return self


def load_tokenizer(spec: str, texts: Sequence[str] = ()):
    """The tokenizer named by ``data.tokenizer`` (see :class:`RewardDataConfig`)."""
    if spec in ("first_species", "melody"):
        from tasks.counterpoint.tokens import build_codec

        return build_codec(spec).tokenizer  # type: ignore[arg-type]
    if spec == "words":
        from reward_models.data import build_word_tokenizer

        return build_word_tokenizer(texts)
    p = Path(spec)
    if not p.is_dir():
        raise UserError(f"data.tokenizer={spec!r}: expected first_species, melody, words or a tokenizer folder (not found).")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(p))
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"{p}: the tokenizer has neither a pad nor an eos token; reward models need one to pad.")
        tok.pad_token = tok.eos_token
    return tok


def simulate_main(config_path: str | None, overrides: Sequence[str] = (), progress: bool | None = None) -> Path:
    """``rlhf simulate-preferences``: simulate raters per ``simulate`` and write ``data.path``
    (+ ``.sim.json`` sidecar). Returns the data path. Raises UserError on bad input."""
    from apps.simulate import simulate, write_simulation

    cfg = load_config(RewardRunConfig, config_path, overrides)
    if cfg.simulate is None:
        raise UserError(f"{config_path}: no `simulate:` section; add one (see configs/reward-music.yaml) to simulate raters.")
    sim = simulate(cfg.simulate, progress=cfg.progress if progress is None else progress)
    path = write_simulation(sim, cfg.data.path)
    pool = sim.meta["pair_pool"]
    log.info("simulated %d records from %d raters (%s) over %d candidates; pair pool: %d agreed, %d disputed -> %s",
             len(sim.records), len(sim.raters), ", ".join(f"{g.name}={g.share:g} {g.type}" for g in cfg.simulate.groups),
             sim.meta["candidates"], pool["agreed"], pool["disputed"], path)
    return path


def train_reward_main(config_path: str | None, overrides: Sequence[str] = (), resume: bool = False, overwrite: bool = False) -> Path:
    """``rlhf train-reward``: split, train every method in ``methods``, evaluate on held-out
    raters, write eval.json and report.md. Returns the run folder. Raises UserError on bad input."""
    from reward_models.backbone import build_backbone, build_reward_model
    from reward_models.reward_source import load_reward_model
    from reward_models.bradley_terry import train_bt
    from reward_models.data import load_preferences, save_preferences, split_preferences
    from reward_models.evaluate import evaluate_reward_models
    from reward_models.report import write_report
    from apps.simulate import load_sidecar
    from reward_models.vpl import build_vpl, train_vpl
    from rlhf.runs import atomic_write_text
    from rlhf.trainer import seed_everything

    cfg = load_config(RewardRunConfig, config_path, overrides)
    records = load_preferences(cfg.data.path)
    run = open_run(cfg, resume=resume, overwrite=overwrite)
    train, test, dropped = split_preferences(records, cfg.data.split.by, cfg.data.split.test_fraction, cfg.seed, cfg.data.split.stratify)
    if run.is_main:
        save_preferences(train, run.root / "data" / "train.jsonl")
        save_preferences(test, run.root / "data" / "test.jsonl")
    log.info("data: %d records -> %d train, %d test, %d dropped (split by %s)", len(records), len(train), len(test), dropped, cfg.data.split.by)
    texts = [t for r in records for t in (r.prompt, r.chosen, r.rejected)] if cfg.data.tokenizer == "words" else ()
    tokenizer = load_tokenizer(cfg.data.tokenizer, texts)
    max_len = cfg.model.max_positions if cfg.model.path is None else None
    models = {}
    for method in cfg.methods:
        stage = f"reward-{method}"
        final = run.final_model_dir(stage)
        if resume and (final / "config.json").is_file():
            log.info("%s already trained: %s", stage, final)
        else:
            seed_everything(cfg.seed)
            if method == "bt":
                model = build_reward_model(cfg.model, tokenizer, cfg.backbone)
                train_bt(run, cfg.bt, model, tokenizer, train, test, seed=cfg.seed, resume=resume, progress=cfg.progress, max_length=max_len)
            else:
                backbone = build_backbone(cfg.model, tokenizer, cfg.backbone)
                bt_dir = run.final_model_dir("reward-bt")
                if cfg.vpl.init_from_bt and (bt_dir / "config.json").is_file():
                    backbone.load_state_dict(load_reward_model(bt_dir).base_model.state_dict())
                    log.info("vpl: backbone initialised from %s", bt_dir)
                v = cfg.vpl
                model = build_vpl(backbone, v.latent_dim, v.pair_hidden, v.head_hidden, v.pooling, head=v.head, encoder=v.encoder,
                                  lora=cfg.model.lora, readout=v.readout)
                train_vpl(run, cfg.vpl, model, tokenizer, train, test, seed=cfg.seed, resume=resume, progress=cfg.progress,
                          max_length=max_len, eval_context=cfg.eval.context_pool)
        models[method] = load_reward_model(final)
    if not run.is_main:  # under a launcher: rank 0 evaluates and reports
        return run.root
    result = evaluate_reward_models(models, tokenizer, test, context_sizes=cfg.eval.context_sizes, context_pool=cfg.eval.context_pool,
                                    seed=cfg.seed, sidecar=load_sidecar(cfg.data.path), max_length=max_len,
                                    active=cfg.eval.active, active_samples=cfg.eval.active_samples, train=train)
    result["data"] = {"path": cfg.data.path, "records": len(records), "train": len(train), "test": len(test), "dropped": dropped,
                      "ties": sum(r.is_tie for r in records), "split_by": list(cfg.data.split.by),
                      "train_raters": len({r.rater_id for r in train}), "test_raters": len({r.rater_id for r in test})}
    atomic_write_text(run.root / "eval.json", json.dumps(result, indent=1))
    report = write_report(run, result)
    log.info("report: %s", report)
    return run.root
