"""The whole job from one YAML: data → MLE prior → evaluation → report.

Each stage writes into the run folder and is skipped on ``--resume`` when its output is
already there, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from pydantic import Field, model_validator

from rlhf.config import Section, load_config, read_yaml
from rlhf.errors import UserError
from rlhf.models import ModelConfig, build_causal_lm, count_parameters, load_causal_lm
from rlhf.pretrain import PretrainConfig, pretrain
from rlhf.algorithms.common import Algorithm
from reward_models.reward_source import LearnedRewardConfig
from rlhf.tune import TuneConfig, tune
from rlhf.runs import Run, atomic_write_text, open_run
from rlhf.trainer import seed_everything
from tasks.counterpoint.config import CounterpointConfig
from tasks.translation.config import QUICK_OVERRIDES as TRANSLATION_QUICK, TranslationConfig, check_positions

log = logging.getLogger("rlhf")

QUICK_OVERRIDES = (
    "task.data.max_pieces=25",
    "task.data.transpositions=[-2,0,2]",
    "task.eval.samples_per_cantus=4",
    "task.eval.melodies=48",
    "task.eval.cantus_transpositions=[0]",
    "task.eval.heldout_pool=8",
    "task.eval.train_pool=4",
    "task.eval.distinct_samples=16",
    "model.n_layer=2",
    "model.n_embd=64",
    "pretrain.steps=150",
    "pretrain.warmup_steps=10",
    "pretrain.eval_every=50",
    "pretrain.checkpoint_every=100",
    "tune.steps=10",
    "tune.batch_size=16",
)
"""What ``--quick`` sets (before your own overrides): a smoke run of about a minute."""


class SweepConfig(Section):
    algorithms: list[Algorithm] = Field(default_factory=list, description="Also tune with each of these algorithms (tune.* settings otherwise) and compare them in the report.")
    betas: list[float] = Field(default_factory=list, description="Trade-off curve: tune tune.algorithm once per β (0 = the KL term off: the ablation).")
    steps: int | None = Field(None, ge=1, description="Iterations of each sweep run; null = tune.steps.")


class RunConfig(Section):
    seed: int = Field(0, ge=0, description="Seed of every random choice in the run (data split, init, sampling).")
    run_dir: str = Field("runs/counterpoint", description="The run folder (config, metrics, checkpoints, report).")
    progress: bool = Field(True, description="Show progress bars.")
    task: CounterpointConfig = Field(default_factory=CounterpointConfig, description="The task.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The prior's architecture (or a path to load).")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="MLE pre-training of the prior.")
    tune: TuneConfig | None = Field(default_factory=TuneConfig, description="Fine-tuning against the frozen prior; null = stop after the prior.")
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="Extra tuning runs for comparisons: other algorithms, and β for the trade-off curve.")
    reward: LearnedRewardConfig | None = Field(None, description="Tune against a trained reward model (BT or VPL with a rater's context) instead of the task's reward; null = the task's reward.")

    @model_validator(mode="after")
    def _learned_reward_scores_sequences(self) -> "RunConfig":
        t = self.tune
        if self.reward is not None and t is not None and t.algorithm == "rloo" and t.rloo.credit == "all_actions":
            raise ValueError("reward.model scores whole sequences, but tune.rloo.credit=all_actions needs the task's reward of every "
                             "action at every step; set tune.rloo.credit: token (or tune.algorithm: ppo)")
        return self

    @model_validator(mode="after")
    def _fits_counterpoint(self) -> "RunConfig":
        if isinstance(self.task, CounterpointConfig) and self.model.path is None:
            need = self.task.positions_needed()
            if self.model.max_positions < need:
                raise ValueError(
                    f"model.max_positions ({self.model.max_positions}) is shorter than the longest {self.task.mode} sequence ({need} tokens: "
                    f"prompt + notes + <eos>, see task.data.max_notes); raise model.max_positions to at least {need} or lower task.data.max_notes"
                )
        return self


class TranslationRunConfig(RunConfig):
    """The same job for translation (``task.name: translation``): the MLE prior, then RL on sentence BLEU."""

    run_dir: str = Field("runs/translation", description="The run folder (config, metrics, checkpoints, report).")
    task: TranslationConfig = Field(default_factory=TranslationConfig, description="The task.")

    @model_validator(mode="after")
    def _fits_model(self) -> "TranslationRunConfig":
        check_positions(self.task, self.model.max_positions)
        t = self.tune
        if self.task.reward.level == "corpus" and t is not None and t.algorithm == "rloo" and t.rloo.baseline == "greedy":
            raise ValueError(
                "task.reward.level=corpus scores each translation within its rollout batch, but rloo.baseline=greedy would compare it "
                "with a greedy translation scored within another batch; use rloo.baseline=leave_one_out or task.reward.level=sentence"
            )
        return self


RUN_CONFIGS: dict[str, type[RunConfig]] = {"counterpoint": RunConfig, "translation": TranslationRunConfig}
"""``task.name`` -> the run config class: one typed config per task."""


def task_name(path: str | Path | None, overrides: Sequence[str] = ()) -> str:
    """``task.name`` from the overrides, else the file, else counterpoint."""
    name: Any = "counterpoint"
    if path is not None:
        data, _ = read_yaml(path)
        task = data.get("task")
        name = task.get("name", name) if isinstance(task, dict) else name
    for o in overrides:
        if o.split("=", 1)[0].strip() == "task.name":
            name = o.split("=", 1)[1].strip()
    return str(name)


def quick_overrides(path: str | Path | None, overrides: Sequence[str] = ()) -> tuple[str, ...]:
    """What ``--quick`` sets for the config's task."""
    return TRANSLATION_QUICK if task_name(path, overrides) == "translation" else QUICK_OVERRIDES


def load_run_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read ``task.name`` (file, then overrides; default counterpoint) and load the matching
    run config; an unknown task name is a UserError listing the known ones."""
    name = task_name(path, overrides)
    if name not in RUN_CONFIGS:
        raise UserError(f"{path or 'config'}: task.name: unknown task {name!r}; use one of {', '.join(RUN_CONFIGS)}.")
    return load_config(RUN_CONFIGS[name], path, overrides)


def make_task(cfg: RunConfig):
    if isinstance(cfg.task, TranslationConfig):
        from tasks.translation.task import TranslationTask

        return TranslationTask(cfg.task)
    from tasks.counterpoint.task import CounterpointTask

    return CounterpointTask(cfg.task)


def stage_data(cfg: RunConfig, run: Run, task) -> tuple[list, list]:
    # translation trains its tokenizer here; keeping it in the run folder makes --resume reuse the same ids
    kw = {"tokenizer_dir": run.root / "tokenizer"} if isinstance(cfg.task, TranslationConfig) else {}
    train, val = task.corpus(cfg.seed, progress=cfg.progress, **kw)
    if not train or not val:
        raise UserError(f"the corpus gave {len(train)} training and {len(val)} held-out examples; check task.data (counterpoint: raise "
                        "task.data.max_pieces or lower task.data.min_notes; translation: the files and length limits).")
    stats = task.data_stats(train, val)
    if run.is_main:
        atomic_write_text(run.root / "data_stats.json", json.dumps(stats, indent=1))
    log.info("data: %s", stats)
    return train, val


def stage_prior(cfg: RunConfig, run: Run, task, train: list, val: list, *, resume: bool) -> Path:
    final = run.final_model_dir("prior")
    if resume and (final / "config.json").is_file():
        log.info("prior already trained: %s", final)
        return final
    seed_everything(cfg.seed)
    model = build_causal_lm(cfg.model, task.tokenizer)
    log.info("prior: %s, %d parameters", cfg.model.arch, count_parameters(model))
    pretrain(run, cfg.pretrain, model, task.tokenizer, task.examples(train), task.examples(val), seed=cfg.seed, resume=resume, progress=cfg.progress)
    if run.is_main:
        task.codec.save(final)
    return final


def export_samples(run: Run, evaluation: dict[str, Any], n: int) -> dict[str, list[Path]]:
    from tasks.counterpoint.export import write_midi, write_musicxml
    from tasks.counterpoint.task import from_json

    out: dict[str, list[Path]] = {}
    for model, samples in evaluation["samples"].items():
        best = sorted(samples, key=lambda s: -s["reward"])[:n]
        files = []
        (run.root / "samples" / model).mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(best):
            base = run.root / "samples" / model / f"{i:02d}_{s['source'].replace('/', '_')}"
            item = from_json(s)
            files += [write_musicxml(item, base.with_suffix(".musicxml")), write_midi(item, base.with_suffix(".mid"))]
        out[model] = files
    return out


def stage_evaluate(cfg: RunConfig, run: Run, task, models: dict[str, Path], prior: Path, val: list | None) -> dict[str, Any]:
    from tasks.counterpoint.report import write_report
    from tasks.counterpoint.rules import RULES_BY_NAME

    loaded = {name: load_causal_lm(p) for name, p in models.items()}
    prior_model = loaded.get("prior") or load_causal_lm(prior)
    evaluation = task.evaluate(loaded, prior_model, seed=cfg.seed, val=val)
    stats_path = run.root / "data_stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    if isinstance(cfg.task, TranslationConfig):
        from tasks.translation.report import write_report as write_translation_report

        log.info("report: %s", write_translation_report(run.root, evaluation, stats))
        return evaluation
    if cfg.reward is not None and cfg.reward.context is not None and cfg.task.mode == "first_species":
        from apps.simulate import preference_win_rates
        from apps.simulate import load_sidecar

        meta = load_sidecar(cfg.reward.context)
        if meta is not None:  # simulated raters: judge the tuned models by each group's taste
            evaluation["preference"] = preference_win_rates(evaluation, meta)
            log.info("win rates against the prior by rater group: %s", evaluation["preference"])
    exported = export_samples(run, evaluation, cfg.task.eval.export)
    docs = {k: r.doc for k, r in RULES_BY_NAME.items()}
    if cfg.task.mode == "melody":
        from tasks.counterpoint.melody_rules import MELODY_RULES

        docs = {r.name: r.doc for r in MELODY_RULES}
    report = write_report(run.root, evaluation, stats, exported, docs)
    log.info("report: %s", report)
    return evaluation


def run_pipeline(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    run = open_run(cfg, resume=resume, overwrite=overwrite)
    seed_everything(cfg.seed)
    task = make_task(cfg)
    train, val = stage_data(cfg, run, task)
    prior = stage_prior(cfg, run, task, train, val, resume=resume)
    models = {"prior": prior}
    if cfg.tune is not None:
        models[cfg.tune.algorithm] = stage_tune(cfg, run, task, prior, resume=resume)
        for name, tcfg in sweep_configs(cfg).items():
            models[name] = stage_tune(cfg, run, task, prior, resume=resume, tcfg=tcfg, name=name)
    if run.is_main:  # under a launcher: rank 0 evaluates and reports
        stage_evaluate(cfg, run, task, models, prior, val)
    return run.root / "report.md"


def sweep_configs(cfg: RunConfig) -> dict[str, TuneConfig]:
    """name -> tune config of each sweep run: ``<algorithm>`` and ``<algorithm>-beta<β>``."""
    assert cfg.tune is not None
    base = cfg.tune.model_copy(update={"steps": cfg.sweep.steps or cfg.tune.steps})
    out = {alg: base.model_copy(update={"algorithm": alg}) for alg in cfg.sweep.algorithms if alg != cfg.tune.algorithm}
    for beta in cfg.sweep.betas:
        kl = base.kl.model_copy(update={"beta": beta, "adaptive": False})
        out[f"{base.algorithm}-beta{beta:g}"] = base.model_copy(update={"kl": kl})
    return out


def stage_tune(cfg: RunConfig, run: Run, task, prior: Path, *, resume: bool, tcfg: TuneConfig | None = None, name: str | None = None) -> Path:
    tcfg = tcfg or cfg.tune
    assert tcfg is not None
    name = name or tcfg.algorithm
    final = run.final_model_dir(name)
    if resume and (final / "config.json").is_file():
        log.info("%s already tuned: %s", name, final)
        return final
    if cfg.reward is not None:
        from reward_models.reward_source import learned_reward_task

        task = learned_reward_task(cfg.reward, task, load_causal_lm(prior))
        log.info("reward: %s (%s)", cfg.reward.model, f"context: {cfg.reward.rater_group or cfg.reward.rater_id or 'random raters'}" if cfg.reward.context else "no context")
    return tune(run, tcfg, task, prior, seed=cfg.seed, resume=resume, progress=cfg.progress, name=name)
