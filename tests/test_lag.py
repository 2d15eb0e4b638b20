"""Consumer lag read from the broker (drift/lag.py) on the real broker: committed offsets vs partition ends."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry

from drift.lag import LagExporter, broker_lag, lag_gauges
from runtime.settings import KafkaSettings
from tests.kafka_helpers import BOOTSTRAP, Topics, create_topic, produce_raw

pytestmark = pytest.mark.kafka


async def commit(group: str, offsets: dict[TopicPartition, int]) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit({tp: OffsetAndMetadata(offset, "") for tp, offset in offsets.items()})
    finally:
        await consumer.stop()


def test_lag_is_the_partition_end_minus_the_groups_committed_offset(topics: Topics):
    async def scenario() -> tuple[dict, dict, float]:
        await create_topic(topics.requests, partitions=2)
        await produce_raw(topics.requests, [(b"a", b"{}")] * 30)  # one key: all on one partition
        settings = KafkaSettings(kafka_bootstrap=BOOTSTRAP)
        before = await broker_lag(settings, f"{topics.prefix}-worker", [topics.requests])
        hot = next(p for (_, p), behind in before.items() if behind == 30)
        await commit(f"{topics.prefix}-worker", {TopicPartition(topics.requests, hot): 12})
        registry = CollectorRegistry()
        exporter = LagExporter(settings, f"{topics.prefix}-worker", [topics.requests], lag_gauges(registry))
        after = await exporter.once()
        # A stuck group: more records arrive, nothing is committed, and the lag keeps growing.
        await produce_raw(topics.requests, [(b"a", b"{}")] * 5)
        grown = await exporter.once()
        value = registry.get_sample_value("sentiment_consumer_group_lag", {
            "group": f"{topics.prefix}-worker", "topic": topics.requests, "partition": str(hot)})
        return before, after, grown, value, hot

    before, after, grown, value, hot = asyncio.run(scenario())
    assert sorted(before.values()) == [0, 30]  # never committed: counted from the beginning
    assert after[(topics.requests, hot)] == 18
    assert grown[(topics.requests, hot)] == 23 and value == 23
