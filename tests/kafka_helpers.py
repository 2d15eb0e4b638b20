"""Helpers for tests against the real local broker: raw produce, read-everything, worker processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

REPO = Path(__file__).resolve().parent.parent


def report(test: str, **measured) -> None:
    """Appends one JSON line of what a test measured to SENTIMENT_FAULT_REPORT (``make soak`` collects them)."""
    path = os.environ.get("SENTIMENT_FAULT_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"test": test, **measured}, default=str) + "\n")
BOOTSTRAP = f"127.0.0.1:{os.environ.get('KAFKA_PORT', '9092')}"


@dataclass
class Topics:
    """A fresh set of topic names for one test, so tests never read each other's records."""

    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:10]}")

    @property
    def requests(self) -> str:
        return f"{self.prefix}.requests"

    @property
    def labeled(self) -> str:
        return f"{self.prefix}.labeled"

    @property
    def uncertain(self) -> str:
        return f"{self.prefix}.uncertain"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.dlq"

    @property
    def stats(self) -> str:
        return f"{self.prefix}.stats"

    @property
    def model_updates(self) -> str:
        return f"{self.prefix}.model-updates"

    def env(self) -> dict[str, str]:
        return {
            "SENTIMENT_KAFKA_BOOTSTRAP": BOOTSTRAP,
            "SENTIMENT_APP_ID": f"{self.prefix}-worker",
            "SENTIMENT_INPUT_TOPICS": self.requests,
            "SENTIMENT_LABELED_TOPIC": self.labeled,
            "SENTIMENT_UNCERTAIN_TOPIC": self.uncertain,
            "SENTIMENT_DLQ_TOPIC": self.dlq,
            "SENTIMENT_STATS_TOPIC": self.stats,
            "SENTIMENT_DRIFT_ALERTS_TOPIC": f"{self.prefix}.drift-alerts",
            "SENTIMENT_FEEDBACK_TOPIC": f"{self.prefix}.feedback",
            "SENTIMENT_RETRAIN_REQUESTS_TOPIC": f"{self.prefix}.retrain-requests",
            "SENTIMENT_MODEL_UPDATES_TOPIC": self.model_updates,
        }


async def create_topic(name: str, partitions: int = 3) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        if name not in await admin.list_topics():
            await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


async def produce_raw(topic: str, records: Iterable[tuple[bytes | None, bytes | None]]) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all", max_request_size=2_000_000, linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in records]
        await asyncio.gather(*futures)
        return len(futures)
    finally:
        await producer.stop()


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: str | None
    value: dict


async def read_all(topics: list[str], expected: int, timeout: float, idle: float = 3.0) -> list[Record]:
    """Reads every record of ``topics`` from the beginning until ``expected`` arrived and ``idle`` seconds
    passed without more (to catch duplicates), or ``timeout`` passed."""
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    records: list[Record] = []
    try:
        deadline = time.monotonic() + timeout
        partitions: list[TopicPartition] = []
        while not partitions and time.monotonic() < deadline:
            await consumer._client.force_metadata_update()
            found = [(t, consumer.partitions_for_topic(t)) for t in topics]
            if all(p for _, p in found):
                partitions = [TopicPartition(t, p) for t, ps in found for p in sorted(ps)]
            else:
                await asyncio.sleep(0.5)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for tp, batch in batches.items():
                for message in batch:
                    records.append(Record(tp.topic, tp.partition, message.offset,
                                          message.key.decode() if message.key is not None else None,
                                          json.loads(message.value)))
                    last_new = time.monotonic()
            if len(records) >= expected and time.monotonic() - last_new > idle:
                break
    finally:
        await consumer.stop()
    return records


class WorkerProcess:
    """``sentiment worker`` as a real OS process, so tests can SIGTERM and kill -9 it."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        # ABSA is off unless a test turns it on: most tests are about delivery, and CPU is scarce here.
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "SENTIMENT_METRICS_PORT": "0", "SENTIMENT_HTTP_PORT": "0",
                    "SENTIMENT_SESSION_TIMEOUT_S": "6", "SENTIMENT_ABSA_ENABLED": "false", **env}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "cli", "worker"], cwd=REPO, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def label_through_worker(topics: Topics, env: dict[str, str], messages: list[dict], log: Path,
                         timeout: float = 120) -> dict[str, dict]:
    """Produces ``messages`` (JSON, keyed by their ``id``) to a fresh 3-partition requests topic, runs one worker
    with ``topics.env()`` + ``env`` until every message has an output on the labelled or dead-letter topic, stops
    it cleanly, and returns the outputs by id. Asserts each message came back exactly once."""
    asyncio.run(create_topic(topics.requests, partitions=3))
    asyncio.run(produce_raw(topics.requests, [(m["id"].encode(), json.dumps(m).encode()) for m in messages]))
    worker = WorkerProcess({**topics.env(), **env}, log).start()
    try:
        records = asyncio.run(read_all([topics.labeled, topics.dlq], expected=len(messages), timeout=timeout))
    finally:
        assert worker.terminate() == 0, worker.log()[-2000:]
    events = {r.value["id"]: r.value for r in records}
    assert sorted(events) == sorted(m["id"] for m in messages) and len(records) == len(messages)
    return events
