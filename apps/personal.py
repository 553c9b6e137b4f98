"""Personalised fine-tuning: one VPL reward model, one policy per
rater group. For each group, z (``infer_z``) from a handful of that group's labelled pairs (held-out
raters: never seen in reward training), the reward is the win probability under that z against
the prior's own answers, and the policy is tuned with the usual KL term to the frozen prior.
The simulator's prototype of each group then judges tuned answers against the prior's.

Runs on the Pets-style text set, where VPL recovers each group (docs/reward_models.md):
``rlhf personalise configs/personal-pets.yaml`` after ``rlhf simulate-preferences`` and
``rlhf train-reward`` on ``configs/reward-pets.yaml``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydantic import Field
from transformers import AutoTokenizer

from apps.simulate import ANIMALS, text_features
from rlhf.config import RunSettings, read_yaml
from rlhf.errors import UserError
from rlhf.models import ModelConfig, build_model, load_model
from rlhf.pretrain import PretrainConfig, pretrain
from rlhf.report import markdown_table, plot_curves
from rlhf.runs import Run, atomic_write_text, read_metrics
from rlhf.trainer import seed_everything
from rlhf.tune import TuneConfig, tune

log = logging.getLogger("rlhf")


class PersonalConfig(RunSettings):
    seed: int = Field(0, ge=0, description="Seed of the prior, the context draws, tuning and evaluation.")
    run_dir: str = Field("runs/personal-pets", description="The run folder (config, metrics, models, report).")
    progress: bool = Field(True, description="Show progress bars.")
    reward_run: str = Field("runs/reward-pets", description="Run folder of `rlhf train-reward` with a VPL model: models/reward-vpl, data/test.jsonl (held-out raters) and its data's .sim.json sidecar.")
    groups: list[str] = Field(default_factory=lambda: ["A", "B"], description="Rater groups to tune a policy for, one each.")
    context_size: int = Field(8, ge=1, le=64, description="Labelled pairs of the group (held-out raters) that give z.")
    reference_per_prompt: int = Field(32, ge=1, description="Prior answers per prompt in the win-probability reference set.")
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of the candidate answers held out from the prior's MLE training.")
    eval_samples: int = Field(200, ge=1, description="Answers sampled per prompt and model for the win rates.")
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(n_layer=2, n_embd=64, n_head=2, max_positions=48), description="The prior's architecture.")
    pretrain: PretrainConfig = Field(default_factory=lambda: PretrainConfig(steps=300, batch_size=32, lr=3e-3, warmup_steps=20, eval_every=100, checkpoint_every=300),
                                     description="MLE training of the prior on the simulator's candidate answers.")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="Fine-tuning of each group's policy (the reward is the VPL win probability).")


def _reward_paths(reward_run: Path) -> tuple[Path, Path, dict[str, Any]]:
    """(VPL model folder, held-out preference file, simulation sidecar) of a reward run."""
    from apps.simulate import load_sidecar

    vpl, test, cfg_file = reward_run / "models" / "reward-vpl", reward_run / "data" / "test.jsonl", reward_run / "config.yaml"
    for p, how in ((vpl, "train one: rlhf train-reward configs/reward-pets.yaml (methods include vpl)"), (test, "re-run rlhf train-reward"), (cfg_file, "re-run rlhf train-reward")):
        if not p.exists():
            raise UserError(f"{p}: not found; {how}, or point reward_run at such a run folder.")
    data_path = read_yaml(cfg_file)[0].get("data", {}).get("path")
    meta = load_sidecar(data_path) if data_path else None
    if meta is None:
        raise UserError(f"{cfg_file}: its data.path ({data_path}) has no .sim.json sidecar; personalisation is judged by simulated raters: "
                        "use data written by `rlhf simulate-preferences`.")
    if meta["config"]["domain"] != "text":
        raise UserError(f"{data_path}: simulated {meta['config']['domain']} raters; `rlhf personalise` runs the Pets text task (simulate with configs/reward-pets.yaml).")
    return vpl, test, meta


def build_task(vpl: Path, meta: dict[str, Any]):
    """The Pets task over the simulator's candidate answers, with the reward model's tokenizer."""
    from apps.simulate import PET_PROMPTS, SimulateConfig, text_candidates
    from tasks.pets.task import PetsTask

    sim = SimulateConfig.model_validate(meta["config"])
    cands = text_candidates(sim, np.random.default_rng(sim.seed))
    return PetsTask(AutoTokenizer.from_pretrained(str(vpl)), PET_PROMPTS, cands.response, cands.prompt)


def reference_sets(task, prior, per_prompt: int, seed: int) -> dict[tuple[int, ...], list[list[int]]]:
    """Prompt ids → the prior's answers as full sequences: the win_prob reference of each prompt."""
    texts = task.sample_texts(prior, per_prompt, seed=seed)
    out: dict[tuple[int, ...], list[list[int]]] = {}
    for i, t in enumerate(texts):
        p = task.prompts[i // per_prompt]
        out.setdefault(tuple(p.ids), []).append(list(p.ids) + task.tokenizer(t)["input_ids"])
    return out


def evaluate(task, models: dict[str, Any], prior, meta: dict[str, Any], n: int, seed: int) -> dict[str, Any]:
    """Per model: win rate against the prior's answer of the same prompt and index under each
    group's prototype, the animals it names, and its exact KL to the prior per token."""
    from apps.simulate import prototype_from_sidecar, win_rate
    from rlhf.rollout import kl_to_reference_many

    groups = [g["name"] for g in meta["config"]["groups"]]
    base = task.sample_texts(prior, n, seed=seed + 1)
    rows: dict[str, Any] = {"prior": {"animals": animal_shares(base)}}
    for name, model in models.items():
        texts = task.sample_texts(model, n, seed=seed + 1)
        prompts = [p.ids for p in task.prompts for _ in range(n)]
        comps = [task.tokenizer(t)["input_ids"] + [task.eos_id] for t in texts]
        kl = kl_to_reference_many(model, prior, prompts, comps, pad_id=task.tokenizer.pad_token_id, allowed=task.allowed)
        rows[name] = {"win": {g: win_rate(prototype_from_sidecar(meta, g), texts, base) for g in groups},
                      "animals": animal_shares(texts), "kl/prior": float(np.mean(kl)), "examples": texts[:: max(1, len(texts) // 6)][:6]}
    return {"groups": groups, "samples_per_prompt": n, "prompts": len(task.prompts), "rows": rows}


def write_report(run: Run, cfg: PersonalConfig, ev: dict[str, Any]) -> Path:
    groups, rows = ev["groups"], ev["rows"]
    tuned = [k for k in rows if k != "prior"]
    animals = list(rows["prior"]["animals"])
    md = ["# Personalised fine-tuning (Pets)", "",
          f"One VPL reward model ({cfg.reward_run}); for each rater group a policy tuned from the same prior with z inferred from "
          f"{cfg.context_size} labelled pairs of that group's held-out raters, reward = win probability against the prior's answers, "
          f"KL to the prior as configured (tune.kl). Judged by the simulator's group prototypes on {ev['samples_per_prompt']} answers "
          f"per prompt × {ev['prompts']} prompts against the prior's answers (ties count ½). Target: ≥ 80% for the group a policy was tuned for.", "",
          "## Win rate against the prior", "",
          markdown_table(["policy"] + [f"judged by group {g}" for g in groups] + ["KL to prior / token"],
                         [[n] + [f"{rows[n]['win'][g]:.3f} {'✓' if n == f'tuned-{g}' and rows[n]['win'][g] >= 0.8 else ''}".strip() for g in groups]
                          + [rows[n]["kl/prior"]] for n in tuned]), "",
          "## Which animal each policy names", "",
          markdown_table(["policy"] + animals, [[n] + [rows[n]["animals"][a] for a in animals] for n in rows]), ""]
    metrics = read_metrics(run.root / "metrics.jsonl")
    for n in tuned:
        rl = [r for r in metrics if r.get("stage") == f"tune-{n}"]
        for key, label in (("reward/task", "win probability vs prior (reward)"), ("kl/seq", "KL(π‖prior) / answer (nats)")):
            p = plot_curves(rl, [key], run.root / "plots" / f"{n}_{key.replace('/', '_')}.png", f"{n}: {key}", label)
            if p:
                md += [f"![{n} {key}](plots/{p.name})", ""]
    md += ["## Example answers", ""]
    for n in tuned:
        md += [f"**{n}**: " + " / ".join(rows[n]["examples"]), ""]
    out = run.root / "report.md"
    atomic_write_text(out, "\n".join(md))
    atomic_write_text(run.root / "eval.json", json.dumps(ev, indent=1))
    return out


def personalise(cfg: PersonalConfig, run: Run, *, resume: bool = False) -> Path:
    """Prior (MLE) → one tuned policy per group → win rates → report.md; returns the report."""
    from reward_models.data import load_preferences
    from reward_models.reward_source import RewardSource, context_records
    from tasks.pets.task import split_indices

    vpl, test, meta = _reward_paths(Path(cfg.reward_run))
    task = build_task(vpl, meta)
    prior_dir = run.final_model_dir("prior")
    if not (resume and (prior_dir / "config.json").is_file()):
        seed_everything(cfg.seed)
        tr, va = split_indices(len(task.answers), cfg.val_fraction, cfg.seed)
        pretrain(run, cfg.pretrain, build_model(cfg.model, task.tokenizer), task.tokenizer, task.examples(tr), task.examples(va),
                 seed=cfg.seed, resume=resume, progress=cfg.progress)
        task.codec.save(prior_dir)
    prior = load_model(prior_dir)
    reference = reference_sets(task, prior, cfg.reference_per_prompt, cfg.seed)
    records = load_preferences(test)
    models = {}
    for g in cfg.groups:
        name = f"tuned-{g}"
        final = run.final_model_dir(name)
        if not (resume and (final / "config.json").is_file()):
            ctx = context_records(records, group=g, n=cfg.context_size, seed=cfg.seed)
            source = RewardSource.from_pretrained(vpl, context=ctx, scale="win_prob", reference=reference)
            log.info("group %s: z = %s from %d held-out pairs", g, [round(float(x), 2) for x in source.z], len(ctx))
            final = tune(run, cfg.tune, task, prior_dir, reward=source, seed=cfg.seed, resume=resume, progress=cfg.progress, name=name,
                         lora=cfg.model.lora)
        models[name] = load_model(final)
    ev = evaluate(task, models, prior, meta, cfg.eval_samples, cfg.seed)
    for n in models:
        log.info("%s: win rates %s, KL/token %.3f", n, {g: round(v, 3) for g, v in ev["rows"][n]["win"].items()}, ev["rows"][n]["kl/prior"])
    return write_report(run, cfg, ev)


def animal_shares(texts: Sequence[str]) -> dict[str, float]:
    """Share of answers naming each animal first (and ``none``)."""
    f = text_features(texts)
    out = {a: float(f[:, i].mean()) for i, a in enumerate(ANIMALS)}
    out["none"] = float((f.sum(1) == 0).mean())
    return out
