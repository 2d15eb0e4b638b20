"""The model package manifest (``models/<name>/manifest.json``): the contract between training and worker.

A package is a directory with ``manifest.json``, ``model.onnx`` (INT8) and ``tokenizer.json``, plus any
files the manifest lists (a report, plots). The worker refuses a package whose files do not hash to the
values in ``files``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MANIFEST_FORMAT_VERSION = 1

Task = Literal["sequence-classification", "pair-classification", "token-classification", "sentence-embedding",
               "one-pass"]


class MetricRecord(BaseModel):
    """One measured number and the data it was measured on, so a reader never has to guess."""

    name: str
    value: float
    data: str = Field(description="Data set file or name, e.g. 'sst2/dev.tsv'.")
    split: str = Field(description="train / dev / val / feedback-holdout ...")
    n: int | None = None
    runtime: str = Field(default="onnx-int8", description="Which artefact was scored: onnx-int8, onnx-fp32, torch.")


class DataFingerprint(BaseModel):
    name: str
    sha256: str
    rows: int


class ConfidenceReference(BaseModel):
    """What the drift monitor compares live windows with, measured on the selection (dev) split."""

    bin_edges: list[float]
    confidence_hist: dict[str, list[int]] = Field(description="Per predicted label: counts per bin.")
    label_mix: dict[str, float] = Field(description="Fraction of predictions per label.")
    uncertain_rate: float
    expected_accuracy: float = Field(description="Measured accuracy on the reference split.")
    mean_confidence: float
    n: int
    # Per-example (predicted label index, calibrated max-probability): lets the monitor bootstrap
    # thresholds for any window size instead of trusting a fixed PSI cut-off.
    samples: list[tuple[int, float]] = Field(default_factory=list)
    text_lengths: list[int] = Field(default_factory=list)


class ModelManifest(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    format_version: int = MANIFEST_FORMAT_VERSION
    name: str
    version: str
    task: Task = "sequence-classification"
    labels: list[str]
    max_length: int = Field(gt=0)
    temperature: float = Field(default=1.0, gt=0)
    threshold: float = Field(default=0.0, ge=0, le=1)
    threshold_rule: str = ""
    quantization: str = "int8-dynamic"
    onnx_inputs: list[str] = Field(default_factory=lambda: ["input_ids", "attention_mask", "token_type_ids"])
    onnx_output: str = "logits"
    files: dict[str, str] = Field(description="Relative path → sha256 of every file in the package.")
    base_encoder: str = ""
    data: list[DataFingerprint] = Field(default_factory=list)
    metrics: list[MetricRecord] = Field(default_factory=list)
    reference: ConfidenceReference | None = None
    created_at: datetime | None = None

    @model_validator(mode="after")
    def _required_files_listed(self) -> ModelManifest:
        # A package without these cannot be served; refusing here gives a clearer error than ORT would.
        for required in ("model.onnx", "tokenizer.json"):
            if required not in self.files:
                raise ValueError(f"manifest.files must list {required}")
        return self
