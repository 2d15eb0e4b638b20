"""The drift monitor's settings (``sentiment drift-monitor``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from runtime.paths import DEFAULT_MODEL_DIR
from runtime.settings.kafka import TopicSettings


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
    drift_cooldown_windows: int = Field(default=10, ge=0, description=(
        "Windows after an alert in which a no-more-severe episode of the same metrics raises none (flapping)."))
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
    drift_auto_offset_reset: Literal["earliest", "latest"] = Field(default="latest", description=(
        "Where a new monitor group starts reading the stats topic."))
    retrain_min_severity: Literal["info", "warning", "critical", "off"] = Field(default="critical", description=(
        "Alerts at or above this severity also send a RetrainRequest; off: never."))
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
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description=(
        "JSON logs on stderr at this level."))
