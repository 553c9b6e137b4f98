"""The whole job from one YAML: data → MLE prior → evaluation → report.

Each stage writes into the run folder and is skipped on ``--resume`` when its output is
already there, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from pydantic import Field, ValidationError, create_model, model_validator

from apps.simulate import load_sidecar, preference_win_rates
from reward_models.reward_source import LearnedRewardConfig, learned_reward
from rlhf.config import RunSettings, Section, TaskConfig, apply_overrides, deep_merge, format_validation_error, read_yaml
from rlhf.errors import UserError
from rlhf.interfaces import PipelineTask, RewardFn
from rlhf.models import ModelConfig, build_model, count_parameters, load_model
from rlhf.pretrain import PretrainConfig, pretrain
from rlhf.registry import TASKS
from rlhf.rewards import RewardTerm, compose_rewards
from rlhf.runs import Run, atomic_write_text, open_run
from rlhf.trainer import seed_everything
from rlhf.tune import TuneConfig, tune

log = logging.getLogger("rlhf")


class SweepConfig(Section):
    algorithms: list[str] = Field(default_factory=list, description="Also tune with each of these algorithms (their default settings, tune.* otherwise) and compare them in the report.")
    betas: list[float] = Field(default_factory=list, description="Trade-off curve: tune tune.algorithm once per β (0 = the KL term off: the ablation).")
    steps: int | None = Field(None, ge=1, description="Iterations of each sweep run; null = tune.steps.")


class RunConfig(RunSettings):
    """The whole job of ``rlhf run``; ``task`` is the task's own config class (by task.name)."""

    seed: int = Field(0, ge=0, description="Seed of every random choice in the run (data split, init, sampling).")
    run_dir: str | None = Field(None, description="The run folder (config, metrics, checkpoints, report); null = runs/<task name>.")
    progress: bool = Field(True, description="Show progress bars.")
    task: TaskConfig = Field(..., description="The task (task.name selects it; its keys are the task's own).")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The prior's architecture, or model.path: a local Hugging Face folder (save_pretrained) to start from.")
    pretrain: PretrainConfig | None = Field(default_factory=PretrainConfig, description="MLE pre-training of the prior; null = model.path is the prior as it is.")
    tune: TuneConfig | None = Field(default_factory=TuneConfig, description="Fine-tuning against the frozen prior; null = stop after the prior.")
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="Extra tuning runs for comparisons: other algorithms, and β for the trade-off curve.")
    reward: LearnedRewardConfig | None = Field(None, description="Tune against a trained reward model (BT or VPL with a rater's context) instead of the task's reward; null = the task's reward.")
    rewards: list[RewardTerm] = Field(
        default_factory=list,
        description="The RL reward as a weighted sum of terms, e.g. [{fn: task}, {fn: 'my_rules:no_repeats', weight: 0.5}]; the term task "
        "is the task's own reward, or the trained reward model when reward is set. empty = that reward alone.",
    )

    @model_validator(mode="after")
    def _fits_task(self) -> "RunConfig":
        if self.run_dir is None:
            self.run_dir = f"runs/{self.task.name.rpartition(':')[2].rpartition('.')[2].lower()}"
        if self.pretrain is None and self.model.path is None:
            raise ValueError("pretrain: null uses model.path as the prior as it is; set model.path to a model folder, or give pretrain settings")
        self.task.check_run(self)
        if self.tune is not None:
            sweep_configs(self)  # a sweep run the algorithm refuses (tilt at β = 0) stops here, not after the main run
        return self


def task_name(data: dict[str, Any]) -> str:
    """``task.name`` of a config's data (default counterpoint)."""
    task = data.get("task")
    return str(task.get("name", "counterpoint")) if isinstance(task, dict) else "counterpoint"


@functools.cache
def run_config_class(task_cls: type) -> type[RunConfig]:
    """The run config of one task: RunConfig with ``task`` typed as the task's Config."""
    cfg_cls = task_cls.Config
    return create_model(f"{cfg_cls.__name__.removesuffix('Config')}RunConfig", __base__=RunConfig,
                        task=(cfg_cls, Field(default_factory=cfg_cls, description="The task.")))


def load_run_config(path: str | Path | None, overrides: Sequence[str] = (), *, quick: bool = False) -> RunConfig:
    """Read the YAML, find the task (``task.name``, default counterpoint; a registered name, an
    ``rlhf.tasks`` entry point or ``package.module:Class``), lay the task's quick preset over it
    when ``quick`` (and write into ``<run_dir>-quick``), apply the overrides and validate."""
    data, lines = read_yaml(path) if path is not None else ({}, {})
    overridden = {tuple(o.split("=", 1)[0].strip().split(".")) for o in overrides if "=" in o}
    apply_overrides(data, overrides)
    name = task_name(data)
    try:
        task_cls = TASKS.get(name)
    except UserError as e:
        raise UserError(f"{path or 'config'}: task.name: {e}") from None
    if quick:
        preset = getattr(task_cls, "quick", None)
        if preset is None:
            raise UserError(f"task {name!r} has no quick preset (a `quick` YAML path on its class); run without --quick")
        merged = deep_merge(data, read_yaml(preset)[0])
        data = apply_overrides(merged, overrides)  # your overrides win over the preset
        if ("run_dir",) not in overridden:
            data["run_dir"] = f"{data.get('run_dir') or 'runs/' + name}-quick"
    cls = run_config_class(task_cls)
    data.setdefault("task", {}).setdefault("name", name) if isinstance(data.get("task", {}), dict) else None
    try:
        return cls.model_validate(data)
    except Exception as err:  # noqa: BLE001  pydantic's ValidationError: one line per problem, with file and line
        from pydantic import ValidationError

        if not isinstance(err, ValidationError):
            raise
        raise UserError(format_validation_error(err, cls, str(path) if path is not None else "defaults", lines, overridden)) from None


def make_task(cfg: RunConfig, model_dir: Path | None = None) -> PipelineTask:
    """The task of ``cfg``; with ``model_dir``, with the tokenizer saved beside that model. A
    ``model.path`` folder with a tokenizer in it brings that tokenizer (its ids are the model's)."""
    if model_dir is None and cfg.model.path is not None and (Path(cfg.model.path) / "tokenizer_config.json").is_file():
        model_dir = Path(cfg.model.path)
    return TASKS.get(cfg.task.name).build(cfg.task, model_dir)


def stage_data(cfg: RunConfig, run: Run, task: PipelineTask) -> tuple[list, list]:
    train, val = task.corpus(cfg.seed, progress=cfg.progress, run_dir=run.root)
    if not train or not val:
        raise UserError(f"the corpus gave {len(train)} training and {len(val)} held-out examples; check task.data (counterpoint: raise "
                        "task.data.max_pieces or lower task.data.min_notes; translation and text: the files and length limits).")
    stats = task.data_stats(train, val)
    if run.is_main:
        atomic_write_text(run.root / "data_stats.json", json.dumps(stats, indent=1))
    log.info("data: %s", stats)
    return train, val


def stage_prior(cfg: RunConfig, run: Run, task: PipelineTask, train: list, val: list, *, resume: bool) -> Path:
    final = run.final_model_dir("prior")
    if resume and (final / "config.json").is_file():
        log.info("prior already trained: %s", final)
        return final
    seed_everything(cfg.seed)
    model = build_model(cfg.model, task.tokenizer)
    log.info("prior: %s, %d parameters", cfg.model.path or cfg.model.arch, count_parameters(model))
    if cfg.pretrain is None:  # model.path is the prior as it is
        if run.is_main:
            model.save_pretrained(str(final))  # atomic enough: config.json, the marker of a finished stage, is written last
    else:
        pretrain(run, cfg.pretrain, model, task.tokenizer, task.examples(train), task.examples(val), seed=cfg.seed, resume=resume, progress=cfg.progress)
    if run.is_main:
        task.save(final)
    return final


def stage_evaluate(cfg: RunConfig, run: Run, task: PipelineTask, models: dict[str, Path], prior: Path, val: list | None) -> dict[str, Any]:
    loaded = {name: load_model(p) for name, p in models.items()}
    prior_model = loaded.get("prior") or load_model(prior)
    evaluation = task.evaluate(loaded, prior_model, seed=cfg.seed, val=val)
    stats_path = run.root / "data_stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    meta = load_sidecar(cfg.reward.context) if cfg.reward is not None and cfg.reward.context is not None else None
    if meta is not None and meta.get("config", {}).get("domain") == "music" and "samples" in evaluation:
        # simulated raters: judge the tuned models by each group's taste
        evaluation["preference"] = preference_win_rates(evaluation, meta)
        log.info("win rates against the prior by rater group: %s", evaluation["preference"])
    log.info("report: %s", task.report(run.root, evaluation, stats))
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
    """name -> tune config of each sweep run: ``<algorithm>`` (its default settings) and
    ``<algorithm>-beta<β>``."""
    assert cfg.tune is not None
    steps = cfg.sweep.steps or cfg.tune.steps
    data = {**cfg.tune.model_dump(), "steps": steps}

    def validated(key: str, value: Any, make) -> TuneConfig:  # each run's config is checked as a config file's would be
        try:
            return make()
        except ValidationError as e:
            why = e.errors()[0]["msg"].removeprefix("Value error, ")
            raise ValueError(f"{key}: the run for {value} is refused: {why}; remove {value} from {key}") from None

    out = {alg: validated("sweep.algorithms", alg, lambda alg=alg: cfg.tune.with_algorithm(alg, steps=steps))
           for alg in cfg.sweep.algorithms if alg != cfg.tune.algorithm}
    for beta in cfg.sweep.betas:
        kl = {**data["kl"], "beta": beta, "adaptive": False}
        out[f"{cfg.tune.algorithm}-beta{beta:g}"] = validated("sweep.betas", f"{beta:g}", lambda kl=kl: TuneConfig.model_validate({**data, "kl": kl}))
    return out


def run_reward(cfg: RunConfig, task: PipelineTask, prior: Path) -> RewardFn | None:
    """The RL reward of the run: the weighted sum of ``rewards`` whose ``task`` term is the trained
    reward model of ``reward`` when there is one, else the task's own reward; without ``rewards``
    that reward alone (None: the task's own)."""
    base = None
    if cfg.reward is not None:
        log.info("reward model: %s (%s)", cfg.reward.model, f"context: {cfg.reward.rater_group or cfg.reward.rater_id or 'random raters'}" if cfg.reward.context else "no context")
        base = learned_reward(cfg.reward, task, load_model(prior))
    if cfg.rewards:
        log.info("reward: %s", " + ".join(f"{t.weight:g}·{t.fn}" for t in cfg.rewards))
        return compose_rewards(cfg.rewards, task, base)
    return base


def stage_tune(cfg: RunConfig, run: Run, task: PipelineTask, prior: Path, *, resume: bool, tcfg: TuneConfig | None = None,
               name: str | None = None) -> Path:
    tcfg = tcfg or cfg.tune
    assert tcfg is not None
    name = name or tcfg.algorithm
    final = run.final_model_dir(name)
    if resume and (final / "config.json").is_file():
        log.info("%s already tuned: %s", name, final)
        return final
    return tune(run, tcfg, task, prior, seed=cfg.seed, resume=resume, progress=cfg.progress, name=name, reward=run_reward(cfg, task, prior),
                lora=cfg.model.lora)
