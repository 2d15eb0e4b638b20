"""The worker's delivery and reload rules as pure logic: what is re-sent after a partial failure, a send that
raises, and which model the next batch runs after updates and rollbacks. No broker (fakes for the producer)."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.errors import KafkaTimeoutError

from worker.app import Output, StreamWorker, resend_order
from worker.decode import DecodeLimits, RecordMeta, dead_letter
from worker.inference import Classifier
from worker.settings import WorkerSettings


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
