"""The worker's delivery and reload rules as pure logic: what is re-sent after a partial failure, a send that
raises, and which model the next batch runs after updates and rollbacks. No broker (fakes for the producer)."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import KafkaTimeoutError, RecordTooLargeError

from runtime.inference import Classifier
from runtime.settings import WorkerSettings
from worker.app import StreamWorker
from worker.decode import DecodeLimits, RecordMeta, dead_letter
from worker.delivery import Output, resend_order


def test_resend_order_resends_each_failed_keys_suffix_in_input_order() -> None:
    records = [("out", b"k1", b"a"), ("out", b"k2", b"b"), ("out", b"k1", b"c"), ("out", b"k1", b"d"),
               ("dlq", b"k1", b"e")]
    # c failed while d (same key, later) got through: both go again, c first; other keys and topics stay.
    ids = [10, 11, 12, 13, 14]
    assert resend_order(records, [2], ids) == [12, 13]
    assert resend_order(records, [0, 1], ids) == ids[:4]
    assert resend_order(records, [4], ids) == [14]


@pytest.fixture()
def stream_worker(tiny_model) -> StreamWorker:
    return StreamWorker(WorkerSettings(model_dir=tiny_model, absa_enabled=False, metrics_port=0))


class FlakyProducer:
    """Raises on the first send of ``fail_value`` (as aiokafka does on a metadata timeout), then acks."""

    def __init__(self, fail_value: bytes) -> None:
        self.fail_value = fail_value
        self.failed = False
        self.sent: list[bytes] = []

    async def send(self, topic, key, value, **_kwargs):
        if value == self.fail_value and not self.failed:
            self.failed = True
            raise KafkaTimeoutError("metadata not available")
        self.sent.append(value)
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def dead_letters(*values: str) -> list[Output]:
    """Outputs of one key, in input order; a dead letter's id is its value, so the test can read the order."""
    meta = RecordMeta(topic="in", partition=0, offset=0, key="k1")
    limits = DecodeLimits(max_text_chars=10, max_message_bytes=10, dlq_raw_bytes=0)
    out = []
    for value in values:
        letter = dead_letter(meta, "empty_text", "empty", None, limits, request_id=value)
        out.append(Output("k1", letter, value.encode()))
    return out


def test_a_send_that_raises_is_retried_in_key_order_not_fatal(stream_worker: StreamWorker) -> None:
    producer = FlakyProducer(b"b")
    stream_worker.app.producer = producer
    asyncio.run(stream_worker._deliver(dead_letters("a", "b", "c")))  # raises DeliveryError if not retried
    # b raised; c (same key, later) had gone through, so b and c go again: the last copy of each is in order.
    assert producer.sent == [b"a", b"c", b"b", b"c"]


def test_a_rollback_to_the_active_model_cancels_a_pending_swap(stream_worker: StreamWorker, tiny_model,
                                                               tmp_path_factory) -> None:
    from training.tiny import build_tiny_package

    challenger_dir = build_tiny_package(tmp_path_factory.mktemp("challenger"), seed=1)
    challenger = Classifier.load(challenger_dir).ref
    champion = stream_worker.labeler.classifier.ref
    assert stream_worker._configured_sha256() == champion.sha256

    asyncio.run(stream_worker._load_if_changed(challenger_dir, challenger.sha256, "v2"))
    assert stream_worker.pending_classifier is not None
    assert stream_worker.pending_classifier.ref.sha256 == challenger.sha256

    asyncio.run(stream_worker._load_if_changed(tiny_model, champion.sha256, "v1"))
    assert stream_worker.pending_classifier is None  # the next batch keeps the champion

    asyncio.run(stream_worker._load_if_changed(challenger_dir, "0" * 64, "v3"))
    assert stream_worker.pending_classifier is None  # announced hash does not match the files: refused


class RefusingProducer:
    """The broker's view of a topic with a tiny max.message.bytes: records over ``limit`` bytes on ``topics``
    fail with RecordTooLargeError, everything else is acknowledged."""

    def __init__(self, topics: set[str], limit: int) -> None:
        self.topics, self.limit = topics, limit
        self.sent: list[tuple[str, bytes]] = []

    async def send(self, topic, key, value, **_kwargs):
        done = asyncio.get_running_loop().create_future()
        if topic in self.topics and len(value) > self.limit:
            done.set_exception(RecordTooLargeError("too large"))
        else:
            self.sent.append((topic, value))
            done.set_result(None)
        return done


def test_a_refused_uncertain_event_becomes_one_dead_letter_and_a_refused_letter_the_minimal_one(
        stream_worker: StreamWorker) -> None:
    import json

    from schemas import LabeledEvent

    s = stream_worker.settings
    meta = RecordMeta(topic="in", partition=0, offset=7, key="k1")
    value = json.dumps({"id": "u", "text": "x" * 3000}).encode()
    event = LabeledEvent.model_validate({
        "id": "u", "label": "UNCERTAIN", "predicted_label": "POSITIVE", "confidence": 0.5,
        "probabilities": {"POSITIVE": 0.5, "NEGATIVE": 0.5}, "threshold": 0.9,
        "model": {"name": "m", "version": "1", "sha256": "0" * 64}, "source": {"topic": "in", "partition": 0,
                                                                              "offset": 7},
        "received_at": "2026-01-01T00:00:00Z", "labeled_at": "2026-01-01T00:00:00Z", "latency_ms": 1.0,
        "metadata": {"blob": "y" * 3000}})
    producer = RefusingProducer({s.labeled_topic, s.uncertain_topic, s.dlq_topic}, limit=2000)
    stream_worker.app.producer = producer
    asyncio.run(stream_worker._deliver([Output("k1", event, event.to_json_bytes(), meta, value, "u")]))
    # Both copies refused: one output_rejected letter (the replayable one is over the DLQ's limit too, so the
    # minimal one), never two.
    assert [topic for topic, _ in producer.sent] == [s.dlq_topic]
    letter = json.loads(producer.sent[0][1])
    assert letter["error"]["code"] == "output_rejected" and letter["id"] == "u" and letter["raw"] is None

    producer = RefusingProducer({s.labeled_topic}, limit=2000)
    stream_worker.app.producer = producer
    asyncio.run(stream_worker._deliver([Output("k1", event.model_copy(update={"label": "POSITIVE"}),
                                               event.to_json_bytes(), meta, value, "u")]))
    letter = json.loads(producer.sent[-1][1])
    assert letter["raw"] == value.decode() and not letter["raw_truncated"]  # replayable: the whole input
