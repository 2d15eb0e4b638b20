"""Every event on every topic, as pydantic v2 models. The only place an event's shape is defined.

Topic → model:
  sentiment.requests       SentimentRequest   (input, produced by product teams)
  sentiment.labeled        LabeledEvent       (every labelled event, UNCERTAIN included)
  sentiment.uncertain      LabeledEvent       (UNCERTAIN only: a human-review queue)
  sentiment.dlq            DeadLetter
  sentiment.stats          WindowStats
  sentiment.drift-alerts   DriftAlert
  sentiment.feedback       Feedback
  sentiment.retrain-requests RetrainRequest
  sentiment.model-updates  ModelUpdate

Output models carry a ``schema`` field ("<topic>/v<N>") so a consumer can route by version. The Python
attribute is ``schema_`` because ``schema`` shadows a BaseModel attribute; JSON always says ``schema``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

Label = Literal["POSITIVE", "NEGATIVE", "NEUTRAL", "UNCERTAIN"]
UNCERTAIN: Label = "UNCERTAIN"
UncertainReason = Literal["low_confidence", "unsupported_language"]

ErrorCode = Literal[
    "invalid_json",
    "schema_violation",
    "empty_text",
    "text_too_long",
    "invalid_encoding",
    "message_too_large",
    "tombstone",
    "inference_error",
    "output_too_large",
    "output_rejected",
    "key_too_large",
    "model_set_unavailable",
    "internal_error",
]
ModelSet = Literal["binary", "3class"]

# Request bounds: an output event echoes the request's id, aspects and metadata, so these keep every
# output under the broker's record size limit and every batch's ABSA work bounded.
MAX_ID_CHARS = 256
MAX_REQUEST_ASPECTS = 16
MAX_ASPECT_CHARS = 100
MAX_METADATA_DEPTH = 16
# Every key and list item at every level: a 1 MB value of 96k tiny keys decodes to ~14 MiB of Python
# objects, and a batch holds 64 of them; a cap on the count bounds that, a cap on the bytes does not.
MAX_METADATA_ITEMS = 1024


def item_count(value: Any, limit: int = MAX_METADATA_ITEMS) -> int:
    """Keys and list items at every level, walked iteratively; stops counting once past ``limit``."""
    count, stack = 0, [value]
    while stack and count <= limit:
        node = stack.pop()
        if isinstance(node, dict):
            count += len(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            count += len(node)
            stack.extend(node)
    return count


def nesting_depth(value: Any) -> int:
    """Levels of nested dicts/lists (a scalar is 0, ``{}`` is 1), walked level by level rather than
    recursively so that no input can exhaust the stack; stops counting past MAX_METADATA_DEPTH."""
    depth, level = 0, [value]
    while depth <= MAX_METADATA_DEPTH:
        containers = [item for item in level if isinstance(item, dict | list)]
        if not containers:
            break
        depth += 1
        level = [child for c in containers for child in (c.values() if isinstance(c, dict) else c)]
    return depth


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Event(BaseModel):
    """Base of every output event: JSON by alias, unknown fields rejected so typos surface in tests."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid", serialize_by_alias=True)

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=False).encode("utf-8")


# ---------------------------------------------------------------------------------------------- input


class SentimentRequest(BaseModel):
    """One text to label. Unknown fields are ignored so producers can add their own without breaking us;
    anything they need back belongs in ``metadata``, which is passed through untouched."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=False)

    id: str | None = Field(default=None, max_length=MAX_ID_CHARS, description="Defaults to topic:partition:offset.")
    text: str = Field(description="The text to label. Must be a non-empty string.")
    aspects: list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_ASPECT_CHARS)]] | None = Field(
        default=None, max_length=MAX_REQUEST_ASPECTS, description="Aspect terms or category names to classify.")
    lang: str | None = Field(default=None, max_length=16)
    source: str | None = Field(default=None, max_length=256)
    metadata: dict[str, Any] | None = Field(default=None, description=(
        f"Passed through to the output untouched; nested at most {MAX_METADATA_DEPTH} levels, at most "
        f"{MAX_METADATA_ITEMS} keys and list items in all."))
    ts: datetime | None = None
    model_set: ModelSet | None = Field(default=None, description=(
        "Which document model labels the text: binary (NEGATIVE/POSITIVE) or 3class (NEGATIVE/NEUTRAL/POSITIVE; "
        "the only one that can say NEUTRAL). null: the worker's default model. A set the worker has not loaded "
        "(SENTIMENT_EXTRA_MODEL_DIR) is dead-lettered as model_set_unavailable, never served by the other."))

    @field_validator("text", mode="before")
    @classmethod
    def _text_must_be_string(cls, value: Any) -> Any:
        # pydantic would coerce nothing here anyway, but an explicit check gives a clearer message.
        if not isinstance(value, str):
            raise ValueError(f"text must be a string, got {type(value).__name__}")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_must_be_shallow(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # Deeper values parse but cannot be serialized back out (pydantic stops at ~255 levels).
        if value is not None and nesting_depth(value) > MAX_METADATA_DEPTH:
            raise ValueError(f"metadata is nested deeper than {MAX_METADATA_DEPTH} levels")
        if value is not None and item_count(value) > MAX_METADATA_ITEMS:
            raise ValueError(f"metadata has more than {MAX_METADATA_ITEMS} keys and list items")
        return value

    @field_validator("id", mode="before")
    @classmethod
    def _id_from_number(cls, value: Any) -> Any:
        # Numeric ids are common in producers' data; keep them rather than dead-letter the record.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value


# --------------------------------------------------------------------------------------------- output


class ModelRef(BaseModel):
    """Which model package produced an event."""

    name: str = Field(max_length=256)
    version: str = Field(max_length=256)
    sha256: str = Field(max_length=128, description="sha256 of the package's model.onnx")
    quantization: str = Field(default="int8", max_length=256)


class SourceRef(BaseModel):
    topic: str
    partition: int
    offset: int


class AspectSentiment(BaseModel):
    """Sentiment towards one aspect of a text."""

    aspect: str = Field(description="The category name, or the term itself for open aspect terms.")
    term: str | None = Field(default=None, description="The words in the text the aspect was found by.")
    span: tuple[int, int] | None = Field(
        default=None, description="[start, end) character offsets of term in the original text (code points)."
    )
    spans: list[tuple[int, int]] = Field(default_factory=list, description=(
        "Every mention of the aspect found in the text, [start, end) in code points, in reading order (at most "
        "16): the same term found five times is one entry with five spans. span is the first of them."))
    origin: Literal["request", "category", "tagger"] = Field(default="request", description=(
        "Where the aspect came from: the request's aspects, a configured category, or the aspect-term tagger."))
    kind: Literal["term", "category"] = Field(default="term", description=(
        "category: aspect is a configured category name (aspect_categories.json); term: words of the text (or a "
        "requested term) that are not a category."))
    label: Label
    predicted_label: Label
    confidence: float
    probabilities: dict[str, float]
    threshold: float
    negated: bool = False
    mentioned: bool | None = Field(default=None, description=(
        "Whether the text talks about the aspect (one-pass package): true when a span was found or the query "
        "head's presence is at least the package's presence threshold; false when it is below, and then label "
        "is UNCERTAIN (predicted_label keeps the polarity argmax). null: not measured (the pair-classifier "
        "pipeline classifies an aspect absent from the text as if it were there)."))
    presence: float | None = Field(default=None, description=(
        "Probability that the text talks about the aspect, from the one-pass query head; null when the aspect "
        "was scored on its spans (or by the pair-classifier pipeline)."))


class LabeledEvent(_Event):
    schema_: Literal["sentiment.labeled/v1"] = Field(default="sentiment.labeled/v1", alias="schema")
    id: str
    label: Label = Field(description="predicted_label, or UNCERTAIN when confidence < threshold or the text's "
                                     "language is not one the model supports (uncertain_reason says which).")
    predicted_label: Label | None = Field(description=(
        "The model's argmax, kept even when label is UNCERTAIN; null when the model did not run "
        "(uncertain_reason unsupported_language)."))
    confidence: float | None = Field(description=(
        "Calibrated probability of predicted_label; null when the model did not run (unsupported_language)."))
    probabilities: dict[str, float] = Field(description="Per label; empty when the model did not run.")
    uncertain_reason: UncertainReason | None = Field(default=None, description=(
        "Why label is UNCERTAIN: low_confidence (confidence < threshold) or unsupported_language (lang is not "
        "one the model supports: the text was not sent to the model); null when label is not UNCERTAIN."))
    threshold: float
    aspects: list[AspectSentiment] = Field(default_factory=list)
    truncated: bool = Field(default=False, description=(
        "Part of the text was not read: it needed more than SENTIMENT_TEXT_TOKEN_BUDGET model tokens."))
    windows: int = Field(default=1, ge=0, description=(
        "Model windows the document label was read from: 1 for a text within the model's max_length tokens; a "
        "longer text is read as windows of whole sentences and its probabilities aggregate theirs; 0 when the "
        "text was not sent to the model (unsupported_language)."))
    text: str | None = Field(default=None, description="Echoed only when SENTIMENT_ECHO_TEXT is on.")
    lang: str | None = Field(default=None, description=(
        "The language the text was labelled as: the producer's declared lang (normalised, en-US -> en), else the "
        "detected one; a text too short or too ambiguous to tell counts as the model's language."))
    model: ModelRef
    source: SourceRef
    received_at: datetime
    labeled_at: datetime
    latency_ms: float
    metadata: dict[str, Any] | None = None


class DeadLetterError(BaseModel):
    code: ErrorCode
    message: str


class RecordHeader(BaseModel):
    """One Kafka header of the source record; ``value`` is UTF-8 text or base64 (``encoding``)."""

    key: str
    value: str | None
    encoding: Literal["utf-8", "base64"] = "utf-8"


class DeadLetterSource(BaseModel):
    """Where the bad record was, and what a replay needs besides its value: key, headers, timestamp."""

    topic: str
    partition: int
    offset: int
    key: str | None = Field(default=None, description=(
        "The record key as text (see key_encoding); also the dead letter's own record key."))
    key_encoding: Literal["utf-8", "base64", "sha256"] = Field(default="utf-8", description=(
        "base64: the key was not UTF-8; sha256: the key was over the size limit and only its hash is kept."))
    timestamp_ms: int | None = Field(default=None, description="The source record's broker timestamp.")
    headers: list[RecordHeader] = Field(default_factory=list)
    headers_truncated: bool = False


class DeadLetter(_Event):
    schema_: Literal["sentiment.dlq/v1"] = Field(default="sentiment.dlq/v1", alias="schema")
    id: str | None = Field(default=None, description="The request id when it could be read, else None.")
    error: DeadLetterError
    source: DeadLetterSource
    raw: str | None = Field(default=None, description=(
        "The value (its first SENTIMENT_DLQ_RAW_BYTES bytes), as UTF-8 text or base64 (see raw_encoding); "
        "whole unless raw_truncated, so `sentiment replay` can send it again."))
    raw_encoding: Literal["utf-8", "base64"] = "utf-8"
    raw_truncated: bool = False
    failed_at: datetime = Field(default_factory=utcnow)


# ------------------------------------------------------------------------------------------ monitoring


class WindowStats(_Event):
    """A worker's view of one window of labelled events: what the drift monitor aggregates."""

    schema_: Literal["sentiment.stats/v1"] = Field(default="sentiment.stats/v1", alias="schema")
    worker_id: str = Field(max_length=256)
    model: ModelRef
    window_start: datetime
    window_end: datetime
    n: int
    bin_edges: list[float] = Field(max_length=1024, description="Edges of the confidence histogram, shared by all "
                                                             "labels.")
    confidence_hist: dict[str, list[int]] = Field(max_length=16, description="Per predicted label: counts per bin.")
    label_counts: dict[str, int] = Field(max_length=16, description="Counts by predicted label (argmax).")

    @model_validator(mode="after")
    def _histograms_match_their_edges(self) -> WindowStats:
        # A histogram of another length cannot be merged with its pool; refuse it here, as one bad record.
        if any(len(counts) != len(self.bin_edges) - 1 for counts in self.confidence_hist.values()):
            raise ValueError("every confidence_hist row must have len(bin_edges) - 1 counts")
        return self
    uncertain_count: int
    sum_confidence: float = Field(description="Sum of calibrated max-probabilities: the CBPE numerator.")
    text_length_quantiles: dict[str, float] = Field(description="p10/p50/p90 of text length in characters.")
    truncated_count: int = Field(
        default=0, description="Texts longer than the model's max_length, cut before inference (the drift "
                               "monitor's accuracy estimate discounts them).")


class DriftWindow(BaseModel):
    start: datetime
    end: datetime
    n: int


class DriftAlert(_Event):
    schema_: Literal["sentiment.drift-alerts/v1"] = Field(default="sentiment.drift-alerts/v1", alias="schema")
    alert_id: str
    metric: Literal["psi_confidence", "label_mix_js", "uncertain_rate", "estimated_accuracy"]
    value: float
    threshold: float
    severity: Literal["info", "warning", "critical"]
    window: DriftWindow
    model: ModelRef
    detected_at: datetime = Field(default_factory=utcnow)
    details: dict[str, Any] = Field(default_factory=dict)


class Feedback(_Event):
    schema_: Literal["sentiment.feedback/v1"] = Field(default="sentiment.feedback/v1", alias="schema")
    id: str
    text: str = Field(min_length=1)
    label: Literal["POSITIVE", "NEGATIVE", "NEUTRAL"]
    source: str = "human"
    ts: datetime = Field(default_factory=utcnow)


class RetrainRequest(_Event):
    schema_: Literal["sentiment.retrain-requests/v1"] = Field(
        default="sentiment.retrain-requests/v1", alias="schema"
    )
    request_id: str
    model_name: str
    reason: str
    alert_id: str | None = None
    requested_by: str = "drift-monitor"
    requested_at: datetime = Field(default_factory=utcnow)


class ModelUpdate(_Event):
    schema_: Literal["sentiment.model-updates/v1"] = Field(default="sentiment.model-updates/v1", alias="schema")
    model: ModelRef
    path: str = Field(max_length=4096, description="Package directory the workers load (shared filesystem or volume).")
    previous_version: str | None = None
    request_id: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    promoted_at: datetime = Field(default_factory=utcnow)
