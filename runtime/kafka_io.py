"""Small Kafka clients for the CLI: send JSON records, print a topic. Plain aiokafka, no faust."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from runtime.settings import KafkaSettings


async def produce_json(settings: KafkaSettings, topic: str, payloads: Iterable[dict[str, Any]],
                       key_field: str | None = "id") -> int:
    """Sends each payload as a JSON value, keyed by ``payload[key_field]`` when present. Waits for all acks."""
    producer = AIOKafkaProducer(**settings.aiokafka_kwargs(), acks="all", linger_ms=5, max_request_size=2_000_000)
    await producer.start()
    try:
        futures = []
        for payload in payloads:
            key = payload.get(key_field) if key_field else None
            futures.append(await producer.send(
                topic, json.dumps(payload, ensure_ascii=False).encode("utf-8"),
                key=str(key).encode("utf-8") if key is not None else None,
            ))
        await asyncio.gather(*futures)
        return len(futures)
    finally:
        await producer.stop()


def readable(record: dict[str, Any]) -> str:
    """One line a person can scan: the schema's key fields first."""
    schema = record.get("schema", "")
    if schema.startswith("sentiment.drift-alerts"):
        window = record.get("window", {})
        return (f"[{record.get('severity', '?').upper()}] {record.get('metric')}={record.get('value'):.4g} "
                f"(threshold {record.get('threshold'):.4g}) n={window.get('n')} "
                f"model={record.get('model', {}).get('version')} at {record.get('detected_at')}")
    if schema.startswith("sentiment.labeled"):
        aspects = ", ".join(f"{a['aspect']}={a['label']}" for a in record.get("aspects", []))
        confidence = record.get("confidence")  # null when the model did not run (unsupported_language)
        score = (f"{confidence:.3f}" if confidence is not None
                 else f"{record.get('uncertain_reason')}: {record.get('lang')}")
        return (f"{record.get('id')}: {record.get('label')} ({score})"
                + (f" [{aspects}]" if aspects else ""))
    if schema.startswith("sentiment.dlq"):
        return f"{record.get('id')}: DEAD LETTER {record['error']['code']}: {record['error']['message']}"
    return json.dumps(record, ensure_ascii=False)


async def tail(settings: KafkaSettings, topic: str, from_beginning: bool, group: str | None,
               max_messages: int | None, timeout: float | None, pretty: bool = False) -> int:
    """Prints records until ``max_messages`` were printed or ``timeout`` seconds passed. Returns the count."""
    consumer = AIOKafkaConsumer(
        **settings.aiokafka_kwargs(),
        group_id=None if from_beginning else group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        metadata_max_age_ms=5000,
        # Records of aborted (or still open) transactions, such as an interrupted `sentiment replay`, never print.
        isolation_level="read_committed",
    )
    await consumer.start()
    count = 0
    deadline = time.monotonic() + timeout if timeout else None
    try:
        # A topic that does not exist yet (the worker creates it at start) would otherwise be noticed
        # only at the next metadata refresh.
        partitions = await _wait_for_partitions(consumer, topic, deadline)
        if from_beginning:
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
        else:
            consumer.subscribe([topic])
        while max_messages is None or count < max_messages:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            batches = await consumer.getmany(timeout_ms=int(min(remaining or 1.0, 1.0) * 1000),
                                             max_records=(max_messages - count) if max_messages else None)
            for records in batches.values():
                for record in records:
                    value = record.value.decode("utf-8", errors="replace") if record.value is not None else "null"
                    if pretty:
                        with contextlib.suppress(ValueError, KeyError, TypeError):
                            value = readable(json.loads(value))
                    sys.stdout.write(value + "\n")
                    count += 1
            sys.stdout.flush()
            if batches and not from_beginning:
                await consumer.commit()
    finally:
        await consumer.stop()
    return count


async def _wait_for_partitions(consumer: AIOKafkaConsumer, topic: str, deadline: float | None) -> list[TopicPartition]:
    while True:
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            return [TopicPartition(topic, p) for p in sorted(partitions)]
        if deadline is not None and time.monotonic() > deadline:
            return []
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.2)
