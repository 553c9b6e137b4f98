"""Config of the counterpoint task (melody and first species)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhf.config import Section, TaskConfig
from rlhf.errors import UserError


class CounterpointDataConfig(Section):
    max_pieces: int | None = Field(
        None, ge=1, description="Parse at most this many corpus pieces (chorales / folk-song files); null = all."
    )
    transpositions: list[int] = Field(
        default_factory=lambda: list(range(-5, 7)),
        description="Semitone shifts added as augmentation (first species); pieces leaving the token range are dropped.",
    )
    min_notes: int = Field(8, ge=3, le=32, description="Shortest first-species phrase kept (notes per voice).")
    max_notes: int = Field(16, ge=3, le=32, description="Longest first-species phrase kept (notes per voice).")
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of corpus pieces held out (split by piece).")
    cache_dir: str = Field(".cache/rlhf", description="Where parsed corpus extracts are cached (relative to the working dir).")

    @model_validator(mode="after")
    def _range(self) -> "CounterpointDataConfig":
        if self.min_notes > self.max_notes:
            raise ValueError(f"min_notes ({self.min_notes}) must not exceed max_notes ({self.max_notes})")
        return self


class CantusPoolConfig(Section):
    size: int = Field(4000, ge=20, description="Distinct generated cantus firmi (tasks/counterpoint/cantus_gen.py) before the held-out split.")
    heldout_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="Share of the pool's melodies kept out of RL for evaluation; split by melody, so no transposition of a held-out melody is trained on."
    )
    seed: int = Field(
        0, ge=0, description="Seed of the pool and its split; separate from the run seed so that every seed is judged on the same held-out melodies."
    )
    min_notes: int = Field(8, ge=8, le=16, description="Shortest generated cantus firmus.")
    max_notes: int = Field(16, ge=8, le=16, description="Longest generated cantus firmus (at most the prompt's 16 cantus slots).")

    @model_validator(mode="after")
    def _range(self) -> "CantusPoolConfig":
        if self.min_notes > self.max_notes:
            raise ValueError(f"min_notes ({self.min_notes}) must not exceed max_notes ({self.max_notes})")
        return self


class CounterpointEvalConfig(Section):
    cantus_transpositions: list[int] = Field(
        default_factory=lambda: [0, -2, 3],
        description="Semitone shifts of the Fux cantus firmi used for evaluation (first species).",
    )
    split: Literal["test", "validation"] = Field(
        "test", description="test: the report's evaluation (Fux's cantus firmi and the first heldout_pool held-out melodies); "
        "validation: the next heldout_pool held-out melodies instead (set pool-val; distinct/100 on its first 7), never trained on "
        "nor reported as test: choose settings on it (first species)."
    )
    heldout_pool: int = Field(32, ge=0, description="Held-out pool melodies evaluated (first species; at their home register, both positions).")
    train_pool: int = Field(16, ge=0, description="Training-pool melodies evaluated beside them, to show the gap between trained-on and unseen cantus firmi.")
    distinct_samples: int = Field(
        100, ge=0, description="Samples per Fux cantus (untransposed, both positions) for distinct/100, the distinct pieces per 100 samples "
        "of one cantus; 0 = count within the samples_per_cantus samples instead."
    )
    positions: list[Literal["below", "above"]] = Field(
        default_factory=lambda: ["below", "above"], description="Cantus positions evaluated (first species)."
    )
    samples_per_cantus: int = Field(16, ge=1, description="Pieces sampled per evaluation cantus (first species).")
    melodies: int = Field(256, ge=1, description="Melodies sampled for evaluation (melody mode).")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature for evaluation (0 = greedy).")
    export: int = Field(6, ge=0, description="Sampled pieces exported as MusicXML + MIDI into the run folder.")


class CounterpointConfig(TaskConfig):
    name: Literal["counterpoint"] = Field("counterpoint", description="Task selector.")
    mode: Literal["first_species", "melody"] = Field(
        "first_species", description="first_species: counterpoint note against a cantus firmus; melody: Sequence Tutor melodies."
    )
    fux_dir: str | None = Field(
        None,
        description="Folder of the Fux species data (reference scores); null = $RLHF_FUX_DIR or ../shared/data/fux-species if present.",
    )
    rl_prompts: Literal["pool", "fux"] = Field(
        "pool", description="RL training prompts (first species). pool: the training split of the generated cantus firmi, never an "
        "evaluation cantus; fux: Fux's own cantus firmi, which are also the evaluation prompts (measures memorisation, not generalisation)."
    )
    canonical_key: bool = Field(
        True, description="Show the model every cantus moved (by at most 6 semitones) into the white-key collection, and move its "
        "counterpoint back: the rules are transposition-invariant, and in one key the pitch of a cantus note alone says which thirds and "
        "sixths against it are in the mode (task.py: canonical_shift). false = the cantus as given."
    )
    pool: CantusPoolConfig = Field(default_factory=CantusPoolConfig, description="The generated cantus firmi for RL and held-out evaluation.")
    train_cantus_transpositions: list[int] = Field(
        default_factory=lambda: list(range(-5, 7)),
        description="Semitone shifts of each RL training cantus firmus (pool or Fux; first species); shifts leaving the token range are skipped.",
    )
    extra_rules: list[str] = Field(
        default_factory=list,
        description="Rules of yours added to the first-species rules, as import paths 'package.module:RULE' of tasks.counterpoint.rules.Rule "
        "objects (name, weight, doc, fn(batch) -> [B, N] bool); they count in the reward, the per-action rewards, the clean share and the report.",
    )
    rule_weights: dict[str, float] = Field(
        default_factory=dict, description="Override the default weight of named rules, e.g. {parallel_fifths: 5.0}."
    )
    clean_bonus: float = Field(
        0.0, ge=0, description="RL reward added on the last note of a piece that breaks no hard rule (first species): "
        "a credit for the whole piece, as the target is clean pieces; not part of the evaluated rule reward.",
    )
    lookahead: float = Field(
        0.0, ge=0, description="RL reward shaping by what the notes after a choice can still do (first species; tasks/counterpoint/lookahead.py): "
        "a note after which the rest of the piece can no longer be written without breaking a hard rule costs this much (in rule-weight "
        "units), given back when the piece goes on, so a piece's return changes only by a constant of its cantus and the best policy "
        "does not change. 0 = off.",
    )
    data: CounterpointDataConfig = Field(default_factory=CounterpointDataConfig, description="Corpus extraction.")
    eval: CounterpointEvalConfig = Field(default_factory=CounterpointEvalConfig, description="Evaluation.")

    @property
    def cantus_slots(self) -> int:
        """Cantus notes the first-species prompt has room for (tokens.py): the longest training piece, at least 16."""
        from tasks.counterpoint.tokens import DEFAULT_CANTUS_SLOTS

        return max(DEFAULT_CANTUS_SLOTS, self.data.max_notes)

    def positions_needed(self) -> int:
        """Longest token sequence of the task: ``<bos>`` + 32 events + ``<eos>`` (melody); ``<bos>
        <cf_pos>``, the cantus padded to its slots, ``<sep>``, the notes and ``<eos>`` (first species)."""
        if self.mode == "melody":
            return 34
        longest = max(self.data.max_notes, 14)  # Fux's cantus firmi have up to 14 notes
        return 3 + max(self.cantus_slots, longest) + longest + 1

    def check_run(self, run) -> None:
        need = self.positions_needed()
        if run.model.path is None and run.model.max_positions < need:
            raise ValueError(
                f"model.max_positions ({run.model.max_positions}) is shorter than the longest {self.mode} sequence ({need} tokens: "
                f"prompt + notes + <eos>, see task.data.max_notes); raise model.max_positions to at least {need} or lower task.data.max_notes"
            )
        if run.reward is not None and run.tune is not None and run.tune.settings.needs_action_rewards:
            fix = ("set tune.rloo.credit: token" if run.tune.algorithm == "rloo" else
                   "tune it by RLOO with per-token credit instead (--config configs/counterpoint-rloo.yaml tune.rloo.credit=token)")
            raise ValueError(f"reward.model scores whole sequences, but tune.algorithm={run.tune.algorithm} with these settings needs the "
                             f"task's reward of every action at every step; {fix}, or tune.algorithm: ppo")

    def rules(self) -> list:
        """The rules of this mode: the built-in ones plus ``extra_rules`` (first species)."""
        from tasks.counterpoint.scoring import mode_rules

        return mode_rules(self.mode, self.extra_rules)

    @model_validator(mode="after")
    def _known_rules(self) -> "CounterpointConfig":
        if self.extra_rules and self.mode != "first_species":
            raise ValueError("task.extra_rules are first-species rules; use them with task.mode: first_species")
        try:
            valid = [r.name for r in self.rules()]
        except UserError as e:
            raise ValueError(f"task.extra_rules: {e}") from None
        unknown = sorted(set(self.rule_weights) - set(valid))
        if unknown:
            raise ValueError(f"unknown rule(s) {unknown} for mode {self.mode!r}; valid names: {', '.join(valid)}")
        return self
