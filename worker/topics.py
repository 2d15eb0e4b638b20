"""Creating the service's topics explicitly at start, with the configured partitions and replication."""

from __future__ import annotations

import contextlib

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from runtime.settings import TopicSettings, WorkerSettings

log = structlog.get_logger(__name__)


def service_topics(settings: TopicSettings) -> list[str]:
    return [
        *settings.input_topics,
        settings.labeled_topic,
        settings.uncertain_topic,
        settings.dlq_topic,
        settings.stats_topic,
        settings.drift_alerts_topic,
        settings.feedback_topic,
        settings.retrain_requests_topic,
        settings.model_updates_topic,
    ]


async def ensure_topics(settings: WorkerSettings, names: list[str] | None = None) -> list[str]:
    """Creates the missing ones among ``names`` (default: every service topic). Returns those it created."""
    admin = AIOKafkaAdminClient(**settings.aiokafka_kwargs())
    await admin.start()
    try:
        wanted = names or service_topics(settings)
        existing = set(await admin.list_topics())
        missing = [name for name in dict.fromkeys(wanted) if name not in existing]
        if not missing:
            return []
        new = [NewTopic(name, num_partitions=settings.partitions, replication_factor=settings.replication_factor)
               for name in missing]
        with contextlib.suppress(TopicAlreadyExistsError):  # another worker won the race: same outcome
            await admin.create_topics(new)
        log.info("topics_created", topics=missing, partitions=settings.partitions)
        return missing
    finally:
        await admin.close()
