"""Configuration: one pydantic-settings class per process, all read from ``SENTIMENT_*`` variables.

``KafkaSettings`` holds what every process needs to reach the broker (including TLS/SASL) and
``TopicSettings`` the topic names, so no two processes can disagree on them; each process's class extends
them: ``WorkerSettings`` (``sentiment worker``), ``DriftMonitorSettings`` (``sentiment drift-monitor``) and
``TrainerSettings`` (``sentiment trainer``). They live together, below the processes, so ``sentiment config``
can show every service's settings; ``masked`` hides the secrets.
"""

from runtime.settings.drift import DriftMonitorSettings
from runtime.settings.kafka import SECRET_FIELDS, CommaList, KafkaSettings, TopicSettings, masked, split_commas
from runtime.settings.trainer import TrainerSettings
from runtime.settings.worker import WorkerSettings

SERVICES = {"worker": WorkerSettings, "drift-monitor": DriftMonitorSettings, "trainer": TrainerSettings}

__all__ = ["SECRET_FIELDS", "SERVICES", "CommaList", "DriftMonitorSettings", "KafkaSettings", "TopicSettings",
           "TrainerSettings", "WorkerSettings", "masked", "split_commas"]
