"""Hostile and unlucky input on the real broker: records and transactions that once stopped the stream.

Each test here failed on the code before issue 11 (the worker exited 70 and crash-looped, or labelled what
it must not); see the issue's closing note. They import nothing from the worker, so they run against any
revision: the worker is a real process, the broker is real, the assertions read the output topics.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections import defaultdict

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.kafka_helpers import BOOTSTRAP, Topics, WorkerProcess, create_topic, produce_raw, read_all

pytestmark = pytest.mark.kafka


def run(coro):
    return asyncio.run(coro)


async def create_topic_with(name: str, config: dict[str, str], partitions: int = 1) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1,
                                            topic_configs=config)])
    finally:
        await admin.close()


async def produce_with_headers(topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()


async def produce_in_transaction(topic: str, records: list[tuple[bytes, bytes]], commit: bool) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, transactional_id=f"{topic}-{commit}", acks="all",
                                enable_idempotence=True)
    await producer.start()
    try:
        await producer.begin_transaction()
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key)
        if commit:
            await producer.commit_transaction()
        else:
            await producer.abort_transaction()
    finally:
        await producer.stop()


def request(rid: str, text: str = "A fine product, works well.", **extra) -> bytes:
    return json.dumps({"id": rid, "text": text, **extra}).encode()


def test_hostile_records_each_become_one_output_and_no_worker_exits(topics: Topics, tiny_model, tmp_path):
    """Items 1, 2 and 9 of issue 11: lone surrogates in id, text, metadata; oversized keys; a metadata object
    of 88k keys; an output the broker refuses for that record alone; records of an aborted transaction."""
    run(create_topic(topics.requests, partitions=1))
    # The labelled topic accepts at most 6 kB a record: a labelled event with a 20 kB metadata echo is under
    # the worker's own output limit, so only the broker can refuse it.
    run(create_topic_with(topics.labeled, {"max.message.bytes": "6000"}, partitions=3))
    many_keys = {f"{i:x}": 0 for i in range(88_000)}  # ~0.99 MB, under the value limit
    cases: list[tuple[bytes, bytes, str]] = [
        (b"k1", request("before-1"), "LABELED"),
        (b"k1", rb'{"id":"\ud800","text":"x"}', "invalid_encoding"),
        (b"k1", rb'{"id":"sur-text","text":"good \udfff"}', "invalid_encoding"),
        (b"k1", rb'{"id":"sur-meta","text":"fine","metadata":{"\ud800":["\udbff"]}}', "invalid_encoding"),
        (b"\x01" * 400_000, b"not json", "key_too_large"),
        (b"\x02" * 1_000_000, request("big-key-valid"), "key_too_large"),
        (b"k2", json.dumps({"id": "many-keys", "text": "fine", "metadata": many_keys}).encode(), "schema_violation"),
        (b"k2", request("refused-out", metadata={"blob": "x" * 20_000}), "output_rejected"),
        (b"k1", request("after-1"), "LABELED"),
        (b"k2", request("after-2"), "LABELED"),
    ]
    run(produce_raw(topics.requests, [(key, value) for key, value, _ in cases]))
    run(produce_with_headers(topics.requests, b"k3", b"{broken", [("trace-id", b"t-42"), ("bin", b"\xff\x00")]))
    run(produce_in_transaction(topics.requests, [(b"k4", request(f"aborted-{i}")) for i in range(5)], commit=False))
    run(produce_in_transaction(topics.requests, [(b"k4", request("committed-1"))], commit=True))
    expected = len(cases) + 2
    worker = WorkerProcess({**topics.env(), "SENTIMENT_MODEL_DIR": str(tiny_model)}, tmp_path / "w.log").start()
    try:
        records = run(read_all([topics.labeled, topics.dlq], expected=expected, timeout=120))
        assert worker.alive(), worker.log()[-3000:]
    finally:
        code = worker.terminate()
    assert code == 0, worker.log()[-3000:]

    by_offset = defaultdict(list)
    for record in records:
        source = record.value["source"]
        by_offset[source["offset"]].append(record)
    assert all(len(out) == 1 for out in by_offset.values()), "an input offset has more than one output"
    outcomes = {}
    for offset, (record,) in by_offset.items():
        value = record.value
        outcomes[offset] = value["error"]["code"] if "error" in value else "LABELED"
    for offset, (_key, _value, want) in enumerate(cases):
        assert outcomes.get(offset) == want, (offset, outcomes.get(offset), want)
    ids = {r.value.get("id") for r in records}
    assert "committed-1" in ids
    assert not any(str(i).startswith("aborted-") for i in ids), "records of an aborted transaction were labelled"
    assert len(records) == expected

    letters = {r.value["source"]["offset"]: r for r in records if "error" in r.value}
    # Replayable: the whole original value, the source's headers and timestamp.
    surrogate = letters[1].value
    assert surrogate["raw"] == cases[1][1].decode() and not surrogate["raw_truncated"]
    assert surrogate["source"]["timestamp_ms"] > 0
    broken = next(r.value for r in letters.values() if r.value.get("raw") == "{broken")
    assert broken["source"]["headers"] == [{"key": "trace-id", "value": "t-42", "encoding": "utf-8"},
                                           {"key": "bin", "value": base64.b64encode(b"\xff\x00").decode(),
                                            "encoding": "base64"}]
    big_key = letters[4]
    assert big_key.value["source"]["key_encoding"] == "sha256" and len(big_key.key) < 100
    assert "rejected" in letters[7].value["error"]["message"] or "refused" in letters[7].value["error"]["message"]
    # Per-key order: on the labelled topic, k1's events come in input order.
    k1 = [r.value["id"] for r in sorted(records, key=lambda r: r.offset) if r.key == "k1" and "error" not in r.value]
    assert k1 == ["before-1", "after-1"]
