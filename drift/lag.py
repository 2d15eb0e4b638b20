"""Consumer lag as the broker sees it: the workers' committed group offsets against the partitions' ends.

Why here and not in the workers: a worker's own view goes stale the moment a rebalance takes its partitions
(the old owner's gauge stays and is summed with the new owner's), and it freezes when the worker is stuck,
which is exactly when lag matters. The broker's committed offsets have neither problem, and one process
(the drift monitor, of which exactly one runs) exports them once.

Contract:
  * ``broker_lag(settings, group, topics)`` → ``{(topic, partition): records behind}``, where "behind" is the
    partition's last stable offset (its end for ``read_committed`` readers, as the workers are) minus the
    group's committed offset; a partition the group never committed counts from its beginning.
  * ``LagExporter.run(stop)`` repeats that every ``interval_s`` and sets
    ``sentiment_consumer_group_lag{group,topic,partition}`` and ``sentiment_consumer_group_lag_updated``
    (a Unix time: an operator alerts when it stops moving). A failed round is logged and retried; it never
    stops the process that hosts the exporter.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Gauge

from runtime.settings import KafkaSettings

log = structlog.get_logger(__name__)


async def broker_lag(settings: KafkaSettings, group: str, topics: Sequence[str]) -> dict[tuple[str, int], int]:
    """Records behind per input partition for ``group``, read from the broker (one round)."""
    admin = AIOKafkaAdminClient(**settings.aiokafka_kwargs())
    consumer = AIOKafkaConsumer(**settings.aiokafka_kwargs(), group_id=None, enable_auto_commit=False,
                                isolation_level="read_committed")
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        # A topic that does not exist (yet) has no partitions and no lag.
        partitions = [TopicPartition(d["topic"], p["partition"]) for d in await admin.describe_topics(list(topics))
                      if d["error_code"] == 0 for p in sorted(d["partitions"], key=lambda p: p["partition"])]
        if not partitions:
            return {}
        ends = await consumer.end_offsets(partitions)
        starts = await consumer.beginning_offsets(partitions)
        lag: dict[tuple[str, int], int] = {}
        for tp in partitions:
            position = committed[tp].offset if tp in committed and committed[tp].offset >= 0 else starts[tp]
            lag[(tp.topic, tp.partition)] = max(ends[tp] - position, 0)
        return lag
    finally:
        await consumer.stop()
        await admin.close()


def lag_gauges(registry: CollectorRegistry) -> tuple[Gauge, Gauge]:
    """The exporter's two series on ``registry`` (the drift monitor's): lag per partition, last success."""
    lag = Gauge("sentiment_consumer_group_lag", "Records behind per input partition: the partition's end minus the "
                "worker group's committed offset, read from the broker.", ["group", "topic", "partition"],
                registry=registry)
    updated = Gauge("sentiment_consumer_group_lag_updated", "Unix time of the last successful lag read.", ["group"],
                    registry=registry)
    return lag, updated


class LagExporter:
    """Sets the lag gauges every ``interval_s`` seconds until ``stop`` is set."""

    def __init__(self, settings: KafkaSettings, group: str, topics: Sequence[str], gauges: tuple[Gauge, Gauge],
                 interval_s: float = 15.0) -> None:
        self.settings, self.group, self.topics, self.interval_s = settings, group, list(topics), interval_s
        self.lag, self.updated = gauges

    async def once(self) -> dict[tuple[str, int], int]:
        lag = await broker_lag(self.settings, self.group, self.topics)
        for (topic, partition), behind in lag.items():
            self.lag.labels(group=self.group, topic=topic, partition=str(partition)).set(behind)
        self.updated.labels(group=self.group).set(time.time())
        return lag

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.once()
            except (KafkaError, OSError) as exc:  # telemetry: log and try again next round
                log.warning("lag_read_failed", group=self.group, error=repr(exc)[:300])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
