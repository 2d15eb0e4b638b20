"""The service's topics: which exist (``service_topics``), where each outcome goes (``topics_for``), and
creating them explicitly at start with the configured partitions and replication (``ensure_topics``).

Adding an output topic: a name in ``TopicSettings``, a line in ``service_topics``, and a route here.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from runtime.settings import TopicSettings, WorkerSettings
from schemas import UNCERTAIN, DeadLetter, LabeledEvent

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


Route = Literal["labeled", "uncertain", "dead_letter"]


def routes(outcome: LabeledEvent | DeadLetter) -> tuple[Route, ...]:
    """Where one outcome goes: a dead letter to the DLQ; a labelled event to the labelled topic, and an
    UNCERTAIN one also to the review queue, unless it is UNCERTAIN because of its language: a reviewer's label
    for a text the model cannot read would become training data for the wrong language. The worker sends by
    it; ``sentiment predict`` counts by it."""
    if isinstance(outcome, DeadLetter):
        return ("dead_letter",)
    if outcome.label != UNCERTAIN or outcome.uncertain_reason == "unsupported_language":
        return ("labeled",)
    return ("labeled", "uncertain")


def topic_of(route: Route, settings: TopicSettings) -> str:
    return {"labeled": settings.labeled_topic, "uncertain": settings.uncertain_topic,
            "dead_letter": settings.dlq_topic}[route]


def topics_for(outcome: LabeledEvent | DeadLetter, settings: TopicSettings) -> list[str]:
    return [topic_of(route, settings) for route in routes(outcome)]


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
