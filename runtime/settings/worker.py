"""The stream worker's settings (``sentiment worker``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from runtime.chunking import DEFAULT_TEXT_TOKEN_BUDGET
from runtime.paths import (
    DEFAULT_ABSA_DIR,
    DEFAULT_CATEGORIES,
    DEFAULT_EMBEDDER_DIR,
    DEFAULT_MODEL_DIR,
    DEFAULT_TAGGER_DIR,
)
from runtime.settings.kafka import CommaList, TopicSettings, split_commas


class WorkerSettings(TopicSettings):
    """The stream worker (``sentiment worker``)."""

    data_dir: Path | None = Field(default=None, description=(
        "faust's data directory. The worker keeps no tables (memory store), but faust still creates one; "
        "default: <system temp dir>/sentiment-worker/<app_id>, so nothing lands in the working directory."))
    model_dir: Path = DEFAULT_MODEL_DIR
    extra_model_dir: Path | None = Field(default=None, description=(
        "A second document model package loaded beside model_dir, so a request can pick it by model_set: a "
        "NEGATIVE/POSITIVE package serves model_set binary, a NEGATIVE/NEUTRAL/POSITIVE one 3class (e.g. "
        "models/sentiment-en-3class: NEUTRAL needs it). It must serve the other set than model_dir and is labelled "
        "with its own manifest threshold (threshold overrides model_dir's only). Unset: one model, no extra memory."))
    onepass_model_dir: Path | None = Field(default=None, description=(
        "A one-pass package (task one-pass, issue 14): it becomes model_dir, the document model, AND the ABSA stage "
        "(one encoder pass per text window for both; absa_model_dir, aspect_tagger_dir and aspect_embedder_dir are "
        "not loaded). Unset: model_dir and the three ABSA packages as before. Other processes (drift monitor) read "
        "SENTIMENT_MODEL_DIR: point it at the same package there."))
    absa_enabled: bool = Field(default=True, description="Per-aspect sentiment in every event.")
    absa_model_dir: Path = DEFAULT_ABSA_DIR
    absa_detect: Literal["auto", "always", "never"] = Field(
        default="auto", description="Find aspects (categories, tagger): auto = only when the request names none.")
    aspect_categories: Path | None = DEFAULT_CATEGORIES
    aspect_tagger_dir: Path | None = DEFAULT_TAGGER_DIR
    aspect_embedder_dir: Path | None = DEFAULT_EMBEDDER_DIR
    registry_dir: Path | None = Field(default=None, description=(
        "Model updates are loaded only from package directories inside this root (after symlinks are "
        "resolved). Default: the directory that holds the configured model_dir."))
    verify_key: Path | None = Field(default=None, description=(
        "Ed25519 public key (PEM). When set, every package (at start and on each model update) must carry a "
        "manifest.sig that verifies with it; others are refused and the current model keeps serving."))
    threshold: float | None = Field(default=None, ge=0, le=1, description="Overrides the manifest's threshold.")
    supported_languages: CommaList = Field(default_factory=lambda: ["en"], description=(
        "Languages (ISO 639-1, comma-separated) the served model can label; a text in another one (declared, or "
        "detected: runtime/language.py) is not sent to the model and gets UNCERTAIN / unsupported_language. The "
        "first is the model's language, which too short or ambiguous texts count as. Model manifests have no "
        "language field, hence a setting."))
    language_detection: bool = Field(default=True, description=(
        "Detect the language of texts whose producer declared none (py3langid); off: such texts count as the "
        "model's language (a declared lang still wins)."))
    batch_size: int = Field(default=64, ge=1, le=4096)
    batch_max_wait_ms: int = Field(default=50, ge=1, le=60_000, description=(
        "How long a partial batch waits for more records. 0 is refused: faust then never closes a partial batch."))
    batch_token_budget: int = Field(default=32_768, ge=256, description=(
        "Most model tokens one labelling step may cost (document windows plus every aspect pass, counted per "
        "record before tokenising); a batch over it is labelled and committed in several steps."))
    text_token_budget: int = Field(default=DEFAULT_TEXT_TOKEN_BUDGET, ge=1, le=65_536, description=(
        "Most model tokens the document pass may read of one text: a text over the model's max_length is read as "
        "windows of whole sentences (budget // max_length of them, at least one) and labelled from all of them; "
        "what is left unread sets the event's truncated flag. Part of each record's batch_token_budget cost."))
    batch_deadline_s: float = Field(default=30.0, gt=0, description=(
        "The longest one labelling step may take; the group's rebalance timeout is set above it so a member "
        "finishing a step is never dropped while it still produces."))
    max_text_chars: int = Field(default=100_000, ge=1)
    max_key_bytes: int = Field(default=4096, ge=1, le=1_000_000, description=(
        "Larger keys are dead-lettered as key_too_large, keyed by the key's sha256 (a dead letter carries the key, "
        "so an unbounded key made it too large to send)."))
    max_message_bytes: int = Field(default=1_000_000, ge=1, description="Values larger than this are dead-lettered.")
    dlq_raw_bytes: int = Field(default=524_288, ge=0, description=(
        "How much of a bad value the dead letter keeps (for `sentiment replay`); a letter that would still not "
        "fit max_output_bytes carries it as base64, cut, or not at all (raw_truncated says so)."))
    max_output_bytes: int = Field(default=1_000_000, ge=10_000, description=(
        "A labelled event larger than this (a huge metadata echo) is dead-lettered as output_too_large; keep it "
        "under the broker's message.max.bytes (1,048,588 by default), which would otherwise refuse it forever."))
    echo_text: bool = False
    uncertain_echo_text: bool = Field(default=True, description=(
        "Events on the review queue (uncertain_topic) carry their text even when echo_text is off, so a reviewer "
        "(`sentiment feedback`) needs no join back to the source; set false where texts must not leave the input "
        "topic."))
    intra_op_threads: int = Field(default=1, ge=1)
    partitions: int = Field(default=3, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    metrics_port: int = Field(default=9108, ge=0, le=65535, description="0 disables the Prometheus endpoint.")
    http_port: int = Field(default=8080, ge=0, le=65535, description=(
        "Port of the worker's HTTP endpoint (POST /v1/predict, /healthz, /readyz, /openapi.json); 0 disables it. "
        "A port already in use is logged (http_bind_failed) and the stream keeps running without it."))
    http_host: str = Field(default="0.0.0.0", description="Address the HTTP endpoint listens on.")
    http_max_items: int = Field(default=100, ge=1, le=4096, description="Most texts one HTTP request may carry (413).")
    http_max_text_chars: int = Field(default=5000, ge=1, description=(
        "Longest text an HTTP item may carry (422 text_too_long); the stream's own limit is max_text_chars."))
    http_max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="Largest HTTP body (413).")
    http_rate_limit_per_s: float = Field(default=50.0, gt=0, description=(
        "Per client (remote address): texts per second refilled into its token bucket; one token per item."))
    http_rate_limit_burst: int = Field(default=200, ge=1, description=(
        "Per client: the token bucket's size; at least http_max_items, so a full request can always pass."))
    http_deadline_ms: int = Field(default=5000, ge=1, description=(
        "An HTTP request not answered within this gets 503 deadline_exceeded; its queued work is dropped."))
    http_step_tokens: int = Field(default=2048, ge=64, description=(
        "Most model tokens (counted as for batch_token_budget) one HTTP turn on the shared inference thread may "
        "cost; the stream never waits for more than one such turn between two of its steps."))
    stats_window_count: int = Field(default=500, ge=1)
    stats_window_seconds: float = Field(default=60.0, gt=0)
    worker_id: str | None = None
    inference_retries: int = Field(default=1, ge=0, le=5)
    chaos_testing: bool = Field(default=False, description="Allows fault_marker; never set it in production.")
    fault_marker: str | None = Field(
        default=None, description="Chaos testing only: inference raises on any batch with a text containing this.")
    chaos_slow_ms: int = Field(default=0, ge=0, description=(
        "Chaos testing only: every labelling step of a batch with a text containing fault_marker sleeps this "
        "long instead of failing (a slow batch on demand)."))
    session_timeout_s: float = Field(default=10.0, gt=0)
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    max_poll_interval_s: float = Field(default=300.0, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    _split_supported_languages = field_validator("supported_languages", mode="before")(split_commas)

    @model_validator(mode="after")
    def _onepass_is_the_document_model(self) -> WorkerSettings:
        # One place decides what the worker serves: model updates, the registry root and predict all read model_dir.
        if self.onepass_model_dir is not None:
            self.model_dir = self.onepass_model_dir
        return self

    @model_validator(mode="after")
    def _fault_marker_needs_chaos_testing(self) -> WorkerSettings:
        # Whoever sets the environment could otherwise dead-letter chosen records with a marker string.
        if self.fault_marker and not self.chaos_testing:
            raise ValueError("SENTIMENT_FAULT_MARKER is only accepted with SENTIMENT_CHAOS_TESTING=true")
        return self

    @model_validator(mode="after")
    def _keys_fit_in_a_dead_letter(self) -> WorkerSettings:
        # A dead letter carries its key; JSON escapes a control character into six bytes.
        if self.max_key_bytes * 8 > self.max_output_bytes:
            raise ValueError("SENTIMENT_MAX_KEY_BYTES must be at most SENTIMENT_MAX_OUTPUT_BYTES / 8")
        return self

    @model_validator(mode="after")
    def _a_full_http_request_fits_the_bucket(self) -> WorkerSettings:
        # One token per item: a smaller bucket would refuse a request of http_max_items forever.
        if self.http_rate_limit_burst < self.http_max_items:
            raise ValueError("SENTIMENT_HTTP_RATE_LIMIT_BURST must be at least SENTIMENT_HTTP_MAX_ITEMS")
        return self

    @property
    def rebalance_timeout_s(self) -> float:
        """faust waits for the in-flight step before it gives partitions up; the group must wait longer
        than the longest step, or it drops a member that is still producing and two workers write one key."""
        return max(self.session_timeout_s, self.batch_deadline_s + self.session_timeout_s)

    @property
    def allowed_model_root(self) -> Path:
        return self.allowed_root_for(self.model_dir)

    def allowed_root_for(self, model_dir: Path) -> Path:
        """Where updates of the package configured at ``model_dir`` may be loaded from (model_dir, or
        extra_model_dir for the second model set)."""
        if self.registry_dir is not None:
            return self.registry_dir.resolve()
        configured = model_dir.resolve()
        # A registry model dir (<root>/<name> with CURRENT) is itself the root of its versions.
        return configured if (configured / "CURRENT").exists() else configured.parent
