"""Configuration: one pydantic-settings class per process, all read from ``SENTIMENT_*`` variables.

``KafkaSettings`` holds what every process needs to reach the broker (including TLS/SASL); each
process's class extends it. ``sentiment config`` prints the effective values with secrets masked.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "sentiment-en"
# The project's labelled data sets live beside the repository, never inside it (tests, bench, docs).
SHARED_DATA_DIR = Path(os.environ.get("SENTIMENT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

CommaList = Annotated[list[str], NoDecode]


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class KafkaSettings(BaseSettings):
    """Broker address and security, shared by every process."""

    model_config = SettingsConfigDict(env_prefix="SENTIMENT_", env_file=None, extra="ignore")

    kafka_bootstrap: str = Field(default="127.0.0.1:9092", description="Comma-separated host:port list.")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = Field(default=None, description="CA bundle that signed the broker's certificate.")
    kafka_ssl_check_hostname: bool = True
    kafka_client_id: str = "sentiment"
    kafka_allow_plaintext_password: bool = Field(default=False, description=(
        "Accept SASL PLAIN over SASL_PLAINTEXT, which sends the password unencrypted; for a local test broker "
        "only. Without it that combination is refused at start."))

    @model_validator(mode="after")
    def _no_cleartext_password(self) -> KafkaSettings:
        # PLAIN sends the password as it is; without TLS anyone on the path reads it. SCRAM does not.
        if (self.kafka_sasl_mechanism == "PLAIN" and self.kafka_security_protocol == "SASL_PLAINTEXT"
                and not self.kafka_allow_plaintext_password):
            raise ValueError("SASL PLAIN over SASL_PLAINTEXT sends the password in clear text: use SASL_SSL, "
                             "SCRAM-SHA-256/512, or set SENTIMENT_KAFKA_ALLOW_PLAINTEXT_PASSWORD=true")
        return self

    def ssl_context(self) -> ssl.SSLContext | None:
        if "SSL" not in self.kafka_security_protocol:
            return None
        context = ssl.create_default_context(cafile=str(self.kafka_ssl_cafile) if self.kafka_ssl_cafile else None)
        context.check_hostname = self.kafka_ssl_check_hostname
        return context

    def aiokafka_kwargs(self) -> dict[str, Any]:
        """Connection arguments for any aiokafka client (producer, consumer, admin)."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.kafka_bootstrap,
            "security_protocol": self.kafka_security_protocol,
            "client_id": self.kafka_client_id,
        }
        if context := self.ssl_context():
            kwargs["ssl_context"] = context
        if self.kafka_sasl_mechanism:
            kwargs["sasl_mechanism"] = self.kafka_sasl_mechanism
            kwargs["sasl_plain_username"] = self.kafka_sasl_username
            kwargs["sasl_plain_password"] = (
                self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None
            )
        return kwargs


class TopicSettings(KafkaSettings):
    """Topic names, shared by the worker, the CLIs and the monitor so they can never disagree."""

    input_topics: CommaList = Field(default_factory=lambda: ["sentiment.requests"])
    labeled_topic: str = "sentiment.labeled"
    uncertain_topic: str = "sentiment.uncertain"
    dlq_topic: str = "sentiment.dlq"
    stats_topic: str = "sentiment.stats"
    drift_alerts_topic: str = "sentiment.drift-alerts"
    feedback_topic: str = "sentiment.feedback"
    retrain_requests_topic: str = "sentiment.retrain-requests"
    model_updates_topic: str = "sentiment.model-updates"
    app_id: str = Field(default="sentiment-worker", description=(
        "The workers' consumer group id; the drift monitor exports this group's lag as the broker sees it."))

    _split_input_topics = field_validator("input_topics", mode="before")(_split_commas)


class WorkerSettings(TopicSettings):
    """The stream worker (``sentiment worker``)."""

    data_dir: Path | None = Field(default=None, description=(
        "faust's data directory. The worker keeps no tables (memory store), but faust still creates one; "
        "default: <system temp dir>/sentiment-worker/<app_id>, so nothing lands in the working directory."))
    model_dir: Path = DEFAULT_MODEL_DIR
    absa_enabled: bool = Field(default=True, description="Per-aspect sentiment in every event.")
    absa_model_dir: Path = REPO_ROOT / "models" / "absa-en"
    absa_detect: Literal["auto", "always", "never"] = Field(
        default="auto", description="Find aspects (categories, tagger): auto = only when the request names none.")
    aspect_categories: Path | None = REPO_ROOT / "worker" / "aspect_categories.json"
    aspect_tagger_dir: Path | None = REPO_ROOT / "models" / "aspect-tagger-en"
    aspect_embedder_dir: Path | None = REPO_ROOT / "models" / "minilm-embed-en"
    registry_dir: Path | None = Field(default=None, description=(
        "Model updates are loaded only from package directories inside this root (after symlinks are "
        "resolved). Default: the directory that holds the configured model_dir."))
    verify_key: Path | None = Field(default=None, description=(
        "Ed25519 public key (PEM). When set, every package (at start and on each model update) must carry a "
        "manifest.sig that verifies with it; others are refused and the current model keeps serving."))
    threshold: float | None = Field(default=None, ge=0, le=1, description="Overrides the manifest's threshold.")
    batch_size: int = Field(default=64, ge=1, le=4096)
    batch_max_wait_ms: int = Field(default=50, ge=1, le=60_000, description=(
        "How long a partial batch waits for more records. 0 is refused: faust then never closes a partial batch."))
    batch_token_budget: int = Field(default=32_768, ge=256, description=(
        "Most model tokens one labelling step may cost (document windows plus every aspect pass, counted per "
        "record before tokenising); a batch over it is labelled and committed in several steps."))
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

    @property
    def rebalance_timeout_s(self) -> float:
        """faust waits for the in-flight step before it gives partitions up; the group must wait longer
        than the longest step, or it drops a member that is still producing and two workers write one key."""
        return max(self.session_timeout_s, self.batch_deadline_s + self.session_timeout_s)

    @property
    def allowed_model_root(self) -> Path:
        if self.registry_dir is not None:
            return self.registry_dir.resolve()
        configured = self.model_dir.resolve()
        # A registry model dir (<root>/<name> with CURRENT) is itself the root of its versions.
        return configured if (configured / "CURRENT").exists() else configured.parent


SECRET_FIELDS = frozenset({"kafka_sasl_password"})


def masked(settings: BaseSettings) -> dict[str, Any]:
    """The effective settings as JSON-able values, with every secret replaced by '**********'."""
    data = settings.model_dump(mode="json")
    for name, value in data.items():
        if value is not None and (name in SECRET_FIELDS or isinstance(getattr(settings, name), SecretStr)):
            data[name] = "**********"
    return data


class DriftMonitorSettings(TopicSettings):
    """The drift monitor (``sentiment drift-monitor``): reads sentiment.stats, writes drift alerts."""

    drift_group_id: str = Field(default="sentiment-drift-monitor", description="The monitor's own consumer group.")
    model_dir: Path = Field(default=DEFAULT_MODEL_DIR, description="Package (or registry model) dir being served.")
    registry_dir: Path | None = Field(
        default=None, description="Model registry root (<root>/<name>/<version>/); manifests of new versions are "
                                  "looked up there, and at the paths ModelUpdate events carry.")
    drift_window_min_n: int = Field(default=500, ge=1, description="Pool workers' stats until this many records.")
    drift_window_max_wait_s: float = Field(
        default=600.0, gt=0, description="Evaluate a smaller pool once its oldest stats are this old ...")
    drift_window_min_n_floor: int = Field(default=50, ge=1, description="... provided it has this many records.")
    drift_false_alarm_rate: float = Field(default=0.002, gt=0, lt=0.5, description="Family-wise, per window.")
    drift_cooldown_windows: int = Field(default=10, ge=0)
    threshold: float | None = Field(default=None, ge=0, le=1, description=(
        "The workers' UNCERTAIN threshold when it overrides the manifest's: the same SENTIMENT_THRESHOLD the "
        "workers read, so the two can never disagree."))

    @model_validator(mode="after")
    def _old_threshold_name_is_refused(self) -> DriftMonitorSettings:
        # Silently ignoring the old name would let the monitor judge with another threshold than the workers.
        if "SENTIMENT_DRIFT_THRESHOLD" in os.environ:
            raise ValueError("SENTIMENT_DRIFT_THRESHOLD was replaced by SENTIMENT_THRESHOLD (one threshold, read by "
                             "the workers and the drift monitor alike)")
        return self
    drift_replicates: int = Field(default=20000, ge=500, description="Bootstrap replicates per window size.")
    drift_auto_offset_reset: Literal["earliest", "latest"] = "latest"
    retrain_min_severity: Literal["info", "warning", "critical", "off"] = "critical"
    retrain_cooldown_s: float = Field(default=3600.0, ge=0, description="At most one RetrainRequest per this long.")
    drift_metrics_port: int = Field(default=9109, ge=0, le=65535, description="0 disables the Prometheus endpoint.")
    drift_state_topic: str = Field(
        default="sentiment.drift-monitor-state", description=(
            "Compacted topic (1 partition, created if missing) holding the monitor's state snapshot (pools, "
            "detector hysteresis and cooldown, last retrain, recent alert ids), keyed by drift_group_id; "
            "written in the same transaction as the alerts and the stats offsets."))
    drift_state_replication_factor: int = Field(default=1, ge=1, description="Replicas of the state topic, "
                                                "when the monitor creates it.")
    drift_session_timeout_ms: int = Field(
        default=10_000, ge=1000, description=(
            "The consumer's group session timeout. A new instance waits this long (plus a margin) for the "
            "member of a killed one to expire, and refuses to start while another instance is alive."))
    lag_interval_s: float = Field(default=15.0, gt=0, description=(
        "How often the monitor reads the workers' lag from the broker (sentiment_consumer_group_lag)."))
    drift_retry_backoff_s: float = Field(
        default=5.0, ge=0, description="Wait before retrying after a failed transaction (alert, state, offsets).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
