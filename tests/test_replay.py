"""`sentiment replay`: dead letters rebuilt into their original records and re-sent once each.

The unit tests build dead letters with the worker's own ``worker.decode`` functions and check the rebuilt
record byte for byte. The Kafka test runs real workers and the real command: a record dead-lettered under a
setting (``text_too_long`` at 50 characters) is replayed to a worker without it and labelled; a second run
sends nothing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas import DeadLetter
from tests.kafka_helpers import BOOTSTRAP, REPO, Topics, WorkerProcess, create_topic, read_all
from worker.decode import DecodeLimits, dead_letter, encode_dead_letter, record_meta_for
from worker.replay import LEDGER_SUFFIX, REPLAY_HEADER, ReplayOptions, ledger_entry, matches, rebuild, skip_reason

LIMITS = DecodeLimits(max_text_chars=50, max_message_bytes=1_000_000, dlq_raw_bytes=4096, max_key_bytes=64)


def letter_for(value: bytes | None, key: bytes | None, headers: list[tuple[str, bytes | None]],
               limits: DecodeLimits = LIMITS, code: str = "text_too_long") -> DeadLetter:
    """A dead letter as the worker writes it and a consumer reads it back (through its JSON)."""
    meta = record_meta_for("req", 2, 17, key, 1_700_000_000_000, headers, limits.max_key_bytes)
    letter = dead_letter(meta, code, "test", value, limits, "r-1")
    return DeadLetter.model_validate_json(encode_dead_letter(letter, 1_000_000))


# ------------------------------------------------------------------------------------------ unit


def test_rebuild_gives_the_original_bytes_key_headers_and_timestamp():
    value = json.dumps({"id": "r-1", "text": "é" * 60}).encode()
    headers = [("trace-id", b"t-42"), ("bin", b"\xff\x00"), ("none", None)]
    for key in (b"user-4", b"\xfe\x01binary", None):
        letter = letter_for(value, key, headers)
        assert skip_reason(letter) is None
        record = rebuild(letter)
        assert record.ref == "req:2:17"
        assert (record.key, record.value, record.timestamp_ms) == (key, value, 1_700_000_000_000)
        assert record.headers == [*headers, (REPLAY_HEADER, b"req:2:17")]


def test_non_utf8_value_is_rebuilt_from_base64():
    value = b"\xff\xfe not utf-8 \x00"
    letter = letter_for(value, b"k", [], code="invalid_encoding")
    assert letter.raw_encoding == "base64"
    assert rebuild(letter).value == value


def test_an_earlier_replay_header_is_replaced_not_repeated():
    letter = letter_for(b'{"text": "x"}', b"k", [(REPLAY_HEADER, b"old:0:1"), ("a", b"1")])
    assert rebuild(letter).headers == [("a", b"1"), (REPLAY_HEADER, b"req:2:17")]


def test_letters_that_cannot_be_replayed_faithfully_are_skipped_with_a_reason():
    small = DecodeLimits(max_text_chars=50, max_message_bytes=1_000_000, dlq_raw_bytes=8, max_key_bytes=64)
    assert skip_reason(letter_for(b'{"text": "long enough"}', b"k", [], small)) == "raw_truncated"
    assert skip_reason(letter_for(None, b"k", [], code="tombstone")) == "raw_null"
    assert skip_reason(letter_for(b'{"text": "x"}', b"k" * 65, [], code="key_too_large")) == "key_sha256"
    many = [(f"h{i}", b"v") for i in range(40)]
    assert skip_reason(letter_for(b'{"text": "x"}', b"k", many)) == "headers_truncated"


def test_filter_by_code_and_failed_at():
    letter = letter_for(b'{"text": "x"}', b"k", [])
    now = letter.failed_at

    def options(**kw) -> ReplayOptions:
        return ReplayOptions(dlq_topic="d", target_topic="t", ledger_topic="l", **kw)

    assert matches(letter, options(codes=frozenset({"text_too_long"})))
    assert not matches(letter, options(codes=frozenset({"invalid_json"})))
    codes = frozenset({"text_too_long"})
    assert matches(letter, options(codes=codes, since=now, until=now + timedelta(seconds=1)))  # [since, until)
    assert not matches(letter, options(codes=codes, until=now))
    assert not matches(letter, options(codes=codes, since=now + timedelta(microseconds=1)))


# ------------------------------------------------------------------------------------------ Kafka


def run(coro):
    return asyncio.run(coro)


def sentiment(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)


def summary_of(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stderr.strip().splitlines()[-1])


async def produce(topic: str, records: list[tuple[bytes | None, bytes | None, list]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all")
    await producer.start()
    try:
        for key, value, headers in records:
            await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()


async def read_raw(topic: str) -> list:
    """Every committed record of a one-partition topic, with headers."""
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, group_id=None, isolation_level="read_committed")
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        records = []
        while await consumer.position(tp) < end:
            records.extend((await consumer.getmany(tp, timeout_ms=1000)).get(tp, []))
        return records
    finally:
        await consumer.stop()


async def crashed_replay(topics: Topics, letter: DeadLetter) -> None:
    """A replay run that sent a record and its ledger entry and died before committing its transaction."""
    ledger = topics.dlq + LEDGER_SUFFIX
    await create_topic(ledger, partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, transactional_id=f"sentiment-replay:{ledger}")
    await producer.start()
    await producer.begin_transaction()
    record = rebuild(letter)
    await producer.send_and_wait(topics.requests, record.value, key=record.key, headers=record.headers)
    await producer.send_and_wait(ledger, ledger_entry(letter, topics.requests), key=record.ref.encode())
    await producer.stop()  # no commit, no abort: the transaction stays open on the broker


def request(rid: str, text: str) -> bytes:
    return json.dumps({"id": rid, "text": text}).encode()


@pytest.mark.kafka
def test_replay_sends_dead_letters_once_to_a_worker_without_the_failing_setting(topics: Topics, tiny_model, tmp_path):
    started = time.monotonic()
    run(create_topic(topics.requests, partitions=1))
    long_text = "A really good product, works well and I would buy it again. Recommended."  # 72 > 50 chars
    binary_key = b"\xfe\x01long"
    long_headers = [("trace-id", b"t-long"), ("bin", b"\xff\x00"), ("none", None)]
    originals = [
        (b"k-json", b"{broken", [("trace-id", b"t-1"), ("bin", b"\xff\x00")]),  # 0 invalid_json
        (b"k-enc", b"\xff\xfe not utf-8", []),                                     # 1 invalid_encoding
        (b"k-tomb", None, []),                                                     # 2 tombstone
        (b"long-1", request("long-1", long_text), long_headers),                   # 3 text_too_long
        (binary_key, request("long-2", long_text), []),                            # 4 text_too_long
        (b"ok", request("ok-1", "Fine."), []),                                     # 5 labelled
    ]
    run(produce(topics.requests, originals))
    env = {**topics.env(), "SENTIMENT_MODEL_DIR": str(tiny_model)}
    first = WorkerProcess({**env, "SENTIMENT_MAX_TEXT_CHARS": "50"}, tmp_path / "w1.log").start()
    try:
        outputs = run(read_all([topics.labeled, topics.dlq], expected=6, timeout=60, idle=1.0))
    finally:
        exit_code = first.terminate()
    assert exit_code == 0, first.log()[-3000:]
    letters = {r.value["source"]["offset"]: r for r in outputs if "error" in r.value}
    assert {o: r.value["error"]["code"] for o, r in letters.items()} == {
        0: "invalid_json", 1: "invalid_encoding", 2: "tombstone", 3: "text_too_long", 4: "text_too_long"}
    # An at-least-once redelivery: a second dead letter for the same source record.
    run(produce(topics.dlq, [(b"long-1", json.dumps(letters[3].value).encode(), [])]))

    second = WorkerProcess(env, tmp_path / "w2.log").start()  # the default text limit: 100,000 characters
    try:
        dry = sentiment("replay", "--dry-run", "--code", "invalid_json", "--code", "invalid_encoding",
                        "--code", "tombstone", env=env)
        assert summary_of(dry) == {"sent": 0, "would_send": 2, "matched": 3, "skipped": {"raw_null": 1}}
        lines = sorted((json.loads(line) for line in dry.stdout.splitlines()), key=lambda line: line["replay_of"])
        assert [line["code"] for line in lines] == ["invalid_json", "invalid_encoding"]
        assert lines[0]["value"] == "{broken" and lines[0]["topic"] == topics.requests
        assert base64.b64decode(lines[1]["value"]) == b"\xff\xfe not utf-8"
        assert lines[0]["headers"][-1] == {"key": REPLAY_HEADER, "value": f"{topics.requests}:0:0",
                                           "encoding": "utf-8"}
        future = sentiment("replay", "--dry-run", "--code", "text_too_long", "--since", "2999-01-01", env=env)
        assert summary_of(future) == {"sent": 0, "would_send": 0, "matched": 0, "skipped": {}}

        one = sentiment("replay", "--dry-run", "--code", "text_too_long", "--max", "1", env=env)
        assert summary_of(one)["would_send"] == 1 and len(one.stdout.splitlines()) == 1

        run(crashed_replay(topics, DeadLetter.model_validate(letters[3].value)))
        replayed = sentiment("replay", "--code", "text_too_long", env=env)
        assert summary_of(replayed) == {"sent": 2, "matched": 3, "skipped": {"already_replayed": 1}}
        again = sentiment("replay", env=env)  # the default codes include text_too_long
        assert summary_of(again) == {"sent": 0, "matched": 3, "skipped": {"already_replayed": 3}}

        labeled = run(read_all([topics.labeled], expected=3, timeout=60, idle=1.0))
        assert len(labeled) == 3, "a record of the aborted replay was labelled, or one was labelled twice"
    finally:
        exit_code = second.terminate()
    assert exit_code == 0, second.log()[-3000:]

    records = run(read_raw(topics.requests))  # read_committed: the crashed run's record is not there
    assert len(records) == len(originals) + 2, "a dry run, the crashed run or the second run sent something"
    # The DLQ has several partitions: the replays' order is not the source order.
    replays = {record.key: record for record in records[len(originals):]}
    assert set(replays) == {b"long-1", binary_key}
    for offset in (3, 4):
        key, value, headers = originals[offset]
        assert replays[key].value == value
        assert list(replays[key].headers) == [*headers, (REPLAY_HEADER, f"{topics.requests}:0:{offset}".encode())]
        assert replays[key].timestamp == letters[offset].value["source"]["timestamp_ms"]  # the source's own

    by_id = {r.value["id"]: r for r in labeled}
    assert set(by_id) == {"ok-1", "long-1", "long-2"}
    assert by_id["long-1"].key == "long-1"
    assert by_id["long-1"].value["source"]["offset"] == replays[b"long-1"].offset
    assert by_id["long-2"].key == "b64:" + base64.b64encode(binary_key).decode()
    assert by_id["long-2"].value["source"]["offset"] == replays[binary_key].offset
    assert time.monotonic() - started < 90
