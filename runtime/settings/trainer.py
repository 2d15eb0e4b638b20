"""The retraining service's settings (``sentiment trainer``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from runtime.paths import DEFAULT_MODEL_DIR, REPO_ROOT
from runtime.settings.kafka import CommaList, TopicSettings, split_commas


class TrainerSettings(TopicSettings):
    """The retraining service (``sentiment trainer``), read from ``SENTIMENT_*`` variables like the worker's."""

    trainer_group: str = Field(default="sentiment-trainer", description="The trainer's consumer group.")
    registry_dir: Path = Field(default=REPO_ROOT / "registry", description=(
        "Model registry root: <root>/<name>/<version>/, CURRENT, decisions.jsonl, feedback.jsonl."))
    model_name: str = Field(default="sentiment-en", description="The registry model this trainer retrains.")
    champion_dir: Path = Field(default=DEFAULT_MODEL_DIR, description="Champion when the registry has none yet.")
    base_encoder: Path | None = Field(default=None, description="Local HF encoder dir; default: the MiniLM wheel.")
    base_train: CommaList = Field(default_factory=list, description="Base training files (any training format).")
    base_format: str = Field(default="auto", description="Format of the base files (training.data formats).")
    base_limit: int | None = Field(default=4000, description="Rows of base data per job (CPU budget).")
    holdout: Path | None = Field(default=None, description="Fixed holdout file both models are scored on.")
    holdout_format: str = Field(default="auto", description="Format of the holdout file.")
    max_steps: int = Field(default=300, description="Training steps per job.")
    train_batch_size: int = Field(default=32, description="Training batch size.")
    learning_rate: float = Field(default=8e-5, description="Peak learning rate (linear warm-up and decay).")
    max_length: int = Field(default=64, description="Tokens per text in training and in the package.")
    cooldown_s: float = Field(default=600.0, description=(
        "Requests arriving within this long of the last job's end are dropped (survives restarts)."))
    feedback_holdout_fraction: float = Field(default=0.3, gt=0, lt=1, description=(
        "Share of feedback ids (by hash) held out to judge the challenger; the rest is trained on."))
    holdout_tolerance: float = Field(default=0.0, ge=0, description="Allowed holdout accuracy drop when promoting.")
    signing_key: Path | None = Field(
        default=None, description="Ed25519 private key PEM; each promoted package is signed with it.")
    session_timeout_s: float = Field(default=10.0, gt=0, description="Consumer group session timeout.")
    chaos_testing: bool = Field(default=False, description="Allows trainer_crash_at; never set it in production.")
    trainer_crash_at: Literal["published", "current", "sent", "recorded"] | None = Field(
        default=None, description="Chaos testing only: the trainer kills itself (SIGKILL) right after this "
                                  "promotion step (P3, P4, P5 or P6 of the module docstring).")

    _split_base_train = field_validator("base_train", mode="before")(split_commas)

    @model_validator(mode="after")
    def _crash_needs_chaos_testing(self) -> TrainerSettings:
        if self.trainer_crash_at and not self.chaos_testing:
            raise ValueError("SENTIMENT_TRAINER_CRASH_AT is only accepted with SENTIMENT_CHAOS_TESTING=true")
        return self

    @property
    def feedback_store(self) -> Path:
        return self.registry_dir / self.model_name / "feedback.jsonl"

    @property
    def decisions_log(self) -> Path:
        return self.registry_dir / self.model_name / "decisions.jsonl"

    @property
    def work_root(self) -> Path:
        """Jobs' scratch space (checkpoints, the challenger before publishing). Inside the registry, not the
        system temp dir: a job killed with -9 leaves its directory behind, and start-up removes it here."""
        return self.registry_dir / self.model_name / ".work"

    @property
    def promotion_journal(self) -> Path:
        return self.registry_dir / self.model_name / "PENDING"
