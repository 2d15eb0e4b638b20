"""Shared pieces of the fault tests (``test_faults.py``, ``test_faults_input.py``): sizes, a paced producer,
a group watcher, and the delivery-rule assertion. Sizes are read from the SENTIMENT_FAULT_* variables that
``make soak`` sets (see ``test_faults.py``)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import defaultdict
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from tests import kafka_helpers
from tests.kafka_helpers import (
    Record,
    Topics,
    WorkerProcess,
)

KILL_N = int(os.environ.get("SENTIMENT_FAULT_KILL_N", "10000"))
FUZZ_N = int(os.environ.get("SENTIMENT_FAULT_FUZZ_N", "2000"))
LOAD_N = int(os.environ.get("SENTIMENT_FAULT_LOAD_N", "3000"))
BATCH = 64  # the worker's default SENTIMENT_BATCH_SIZE; every test runs at the defaults unless it says so

TEXTS = [
    "The battery lasts all day and the screen is gorgeous.",
    "Terrible customer service, I waited two hours.",
    "It's okay, nothing special.",
    "Best purchase I've made this year!",
    "The package arrived damaged and late.",
    "I would not recommend this hotel to anyone.",
]


def run(coro):
    return asyncio.run(coro)


def messages(n: int, prefix: str, keys: int = 50) -> list[tuple[bytes, bytes]]:
    return [(f"{prefix}-k{i % keys}".encode(), json.dumps({"id": f"{prefix}-{i}", "text": TEXTS[i % len(TEXTS)]})
             .encode()) for i in range(n)]


def start_worker(topics: Topics, model: Path, tmp_path: Path, name: str, **extra: str) -> WorkerProcess:
    env = {**topics.env(), "SENTIMENT_MODEL_DIR": str(model), "SENTIMENT_KAFKA_BOOTSTRAP": kafka_helpers.BOOTSTRAP,
           **extra}
    return WorkerProcess(env, tmp_path / f"{name}.log").start()


async def output_count(topic_names: list[str]) -> int:
    """Records written so far to ``topic_names`` (sum of end offsets), without reading them."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_helpers.BOOTSTRAP, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = []
        for topic in topic_names:
            await consumer._client.force_metadata_update()
            found = consumer.partitions_for_topic(topic) or set()
            partitions += [TopicPartition(topic, p) for p in found]
        if not partitions:
            return 0
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()


def wait_outputs(topics: Topics, at_least: int, timeout: float, worker: WorkerProcess | None = None) -> int:
    """Polls until ``at_least`` outputs exist (labelled + dead letters); returns the count reached."""
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        try:
            count = run(output_count([topics.labeled, topics.dlq]))
        except Exception:  # the broker may be restarting
            count = 0
        if count >= at_least:
            return count
        if worker is not None and not worker.alive():
            raise AssertionError(f"worker exited with {worker.proc.returncode}:\n{worker.log()[-3000:]}")
        time.sleep(0.5)
    return count


def by_id(records: list[Record]) -> dict[str, list[Record]]:
    grouped: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        grouped[record.value["id"]].append(record)
    return grouped


def assert_nothing_lost(records: list[Record], ids: set[str]) -> dict[str, int]:
    """Every input id has an output; repeats carry the same id and the same decision. Returns stats."""
    grouped = by_id(records)
    missing = ids - set(grouped)
    assert not missing, f"{len(missing)} inputs lost, e.g. {sorted(missing)[:5]}"
    assert set(grouped) <= ids, f"unexpected ids: {sorted(set(grouped) - ids)[:5]}"
    duplicated = {i: rs for i, rs in grouped.items() if len(rs) > 1}
    for ident, copies in duplicated.items():
        assert {(c.topic, c.value.get("label"), c.value.get("predicted_label")) for c in copies} == \
            {(copies[0].topic, copies[0].value.get("label"), copies[0].value.get("predicted_label"))}, ident
        # a repeat is the same input offset delivered again, never a different record under the same id
        assert len({(c.value["source"]["partition"], c.value["source"]["offset"]) for c in copies}) == 1, ident
    return {"ids": len(ids), "outputs": len(records), "duplicates": sum(len(c) - 1 for c in duplicated.values())}


class PacedProducer(threading.Thread):
    """Produces ``records`` at ``rate`` per second in the background (load while the test acts)."""

    def __init__(self, topic: str, records: list[tuple[bytes, bytes]], rate: float) -> None:
        super().__init__(daemon=True)
        self.topic, self.records, self.rate = topic, records, rate
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            run(self._produce())
        except BaseException as exc:  # surfaced by the test through .error
            self.error = exc

    async def _produce(self) -> None:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=kafka_helpers.BOOTSTRAP, acks="all", linger_ms=5)
        await producer.start()
        try:
            start = time.monotonic()
            futures = []
            chunk = max(1, int(self.rate / 10))
            for lo in range(0, len(self.records), chunk):
                for key, value in self.records[lo:lo + chunk]:
                    futures.append(await producer.send(self.topic, value, key=key))
                self.sent = min(lo + chunk, len(self.records))
                delay = start + self.sent / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await asyncio.gather(*futures)
        finally:
            await producer.stop()


class GroupWatcher(threading.Thread):
    """Samples the consumer group twice a second: which member ids held it, and in which states."""

    def __init__(self, group: str) -> None:
        super().__init__(daemon=True)
        self.group = group
        self.members: list[str] = []  # distinct member ids, in the order first seen
        self.states: list[str] = []
        self.current: tuple[str, int] = ("", 0)  # the last sample: state and member count
        self.stop = threading.Event()

    def wait_for(self, current: tuple[str, int], timeout: float) -> bool:
        """Polls until the last sample is ``current`` (state, member count); False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.current != current and time.monotonic() < deadline:
            time.sleep(0.25)
        return self.current == current

    def run(self) -> None:
        run(self._watch())

    async def _watch(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_helpers.BOOTSTRAP)
        await admin.start()
        try:
            while not self.stop.is_set():
                try:
                    entry = (await admin.describe_consumer_groups([self.group]))[0].groups[0]
                    state, members = entry[2], entry[5]
                    self.current = (state, len(members))
                    if not self.states or self.states[-1] != state:
                        self.states.append(state)
                    for member in members:
                        if member[0] not in self.members:
                            self.members.append(member[0])
                except Exception:
                    pass
                await asyncio.sleep(0.5)
        finally:
            await admin.close()


# --------------------------------------------------------------------------------------------- crashes


