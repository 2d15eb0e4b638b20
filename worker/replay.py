"""``sentiment replay``: send dead letters to the requests topic again, each source record at most once.

Contract: every dead letter on the DLQ that matches the filter (error code, and ``failed_at`` within
``[since, until)``) ends in exactly one of: sent once to the target topic, or skipped with a reason in the
summary. A dead letter is replayed only when it carries everything the original record had:

  * the whole value (``raw`` not null and not ``raw_truncated``), UTF-8 text encoded back, base64 decoded;
  * the key (``key_encoding`` ``utf-8`` as is, ``base64`` decoded from ``b64:…``; ``sha256`` is skipped:
    only the key's hash was kept);
  * every header (``headers_truncated`` is skipped), each decoded per its ``encoding``;
  * the source timestamp (``timestamp_ms``; the producer's clock when the letter has none).

The replayed record carries one more header, ``sentiment-replay-of: <topic>:<partition>:<offset>`` of the
source record (an earlier ``sentiment-replay-of`` header is replaced, so there is always exactly one).
Dead letters are keyed by their source record's key, so the letters of one key are in one DLQ partition,
in the order they failed; the replays of one key keep that order.

Idempotence is by source record, ``<topic>:<partition>:<offset>``, kept in a **ledger**: a compacted topic
(default ``<dlq topic>.replayed``) with one record per replayed source record, keyed by that reference and
written **in the same Kafka transaction** as the replayed record. So:

  * a rerun, with any filter, never sends a record twice: it reads the ledger first and skips what is in it;
  * two dead letters of the same source record (the worker delivers at least once) are replayed once;
  * a crash mid-run leaves an open transaction that the next run's producer aborts (same transactional
    id): neither the record nor its ledger entry ever becomes visible, and the rerun sends it. The worker
    reads its input ``read_committed``, so it never labels a record of an aborted replay.

Why a ledger and not the DLQ offsets of a consumer group committed in the transaction: group offsets say
"everything before offset N was handled", which is false under a filter. A ``--code text_too_long`` run
would move the group past the ``inference_error`` letters it did not send, and a later
``--code inference_error`` run would never see them. The ledger records exactly what was sent.

Steps, in this order:

  1. start a transactional producer (transactional id from the ledger topic's name) and begin a
     transaction: that returns only once the coordinator has fenced any earlier producer of the same id
     and completed (aborted or committed) its open transaction;
  2. read the ledger to its end, ``read_committed``: the references already replayed;
  3. read the DLQ, ``read_committed``, from its beginning up to the end offsets taken now (so a run ends
     even while the worker keeps dead-lettering); for each letter: filter, skip (with a reason) or send
     the record and its ledger entry;
  4. commit the transaction every ``TRANSACTION_RECORDS`` records or ``TRANSACTION_SECONDS``, and at the
     end; abort it on any error.

``--dry-run`` does steps 2 and 3 without a producer and prints each record it would send as one JSON line.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from pydantic import ValidationError

from runtime.errors import UserError
from runtime.settings import WorkerSettings
from schemas import DeadLetter, ErrorCode, RecordHeader

REPLAY_HEADER = "sentiment-replay-of"
# Codes whose outcome can change on a second try: a setting (text_too_long, message_too_large,
# output_too_large), the model or the broker (inference_error, output_rejected), or a fixed bug
# (internal_error). The others (invalid JSON, a schema violation, ...) would only dead-letter again.
REPLAYABLE_CODES: tuple[ErrorCode, ...] = (
    "text_too_long", "message_too_large", "inference_error", "output_too_large", "output_rejected",
    "internal_error",
)
LEDGER_SUFFIX = ".replayed"
# A transaction is committed after this many records or seconds since its first send, whichever comes
# first: the records bound what a crash makes the next run send again (still once), the seconds keep it
# well inside the broker's transaction timeout (60 s) while a long DLQ is read between sparse matches.
TRANSACTION_RECORDS = 200
TRANSACTION_SECONDS = 10.0


class ReplayError(UserError):
    """The replay cannot run (a missing topic); nothing was sent."""


@dataclass(frozen=True)
class ReplayOptions:
    dlq_topic: str
    target_topic: str
    ledger_topic: str
    codes: frozenset[str]
    since: datetime | None = None
    until: datetime | None = None
    dry_run: bool = False
    max_records: int | None = None


@dataclass(frozen=True)
class ReplayRecord:
    """The source record rebuilt from its dead letter: what goes to the target topic."""

    ref: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes | None]]
    timestamp_ms: int | None


@dataclass
class Summary:
    sent: int = 0
    matched: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    would_send: int | None = None

    def to_json(self) -> str:
        out: dict[str, Any] = {"sent": self.sent, "skipped": dict(sorted(self.skipped.items())),
                               "matched": self.matched}
        if self.would_send is not None:
            out["would_send"] = self.would_send
        return json.dumps(out)


# ------------------------------------------------------------------------------------------ pure parts


def source_ref(letter: DeadLetter) -> str:
    return f"{letter.source.topic}:{letter.source.partition}:{letter.source.offset}"


def matches(letter: DeadLetter, options: ReplayOptions) -> bool:
    """Code in ``options.codes`` and ``failed_at`` in ``[since, until)``."""
    if letter.error.code not in options.codes:
        return False
    if options.since is not None and letter.failed_at < options.since:
        return False
    return options.until is None or letter.failed_at < options.until


def skip_reason(letter: DeadLetter) -> str | None:
    """Why this letter cannot be replayed faithfully, or None when it can."""
    if letter.raw is None:
        return "raw_null"
    if letter.raw_truncated:
        return "raw_truncated"
    if letter.source.key_encoding == "sha256":
        return "key_sha256"
    if letter.source.headers_truncated:
        return "headers_truncated"
    return None


def decode_text(text: str, encoding: str) -> bytes:
    # The worker wrote UTF-8 text only for bytes that decoded strictly, so encoding it gives them back.
    return base64.b64decode(text, validate=True) if encoding == "base64" else text.encode("utf-8")


def original_key(letter: DeadLetter) -> bytes | None:
    key, encoding = letter.source.key, letter.source.key_encoding
    if key is None:
        return None
    if encoding == "base64":
        return base64.b64decode(key.removeprefix("b64:"), validate=True)
    return key.encode("utf-8")


def original_headers(headers: Iterable[RecordHeader], ref: str) -> list[tuple[str, bytes | None]]:
    kept = [(h.key, None if h.value is None else decode_text(h.value, h.encoding))
            for h in headers if h.key != REPLAY_HEADER]
    return [*kept, (REPLAY_HEADER, ref.encode("utf-8"))]


def rebuild(letter: DeadLetter) -> ReplayRecord:
    """The original record; call only when ``skip_reason(letter)`` is None."""
    assert letter.raw is not None
    ref = source_ref(letter)
    return ReplayRecord(ref=ref, key=original_key(letter), value=decode_text(letter.raw, letter.raw_encoding),
                        headers=original_headers(letter.source.headers, ref), timestamp_ms=letter.source.timestamp_ms)


def dry_run_line(letter: DeadLetter, record: ReplayRecord, target: str) -> str:
    """What would be sent, in the dead letter's own text encodings (values may not be UTF-8)."""
    headers = [{"key": h.key, "value": h.value, "encoding": h.encoding}
               for h in letter.source.headers if h.key != REPLAY_HEADER]
    headers.append({"key": REPLAY_HEADER, "value": record.ref, "encoding": "utf-8"})
    return json.dumps({
        "topic": target, "replay_of": record.ref, "id": letter.id, "code": letter.error.code,
        "key": letter.source.key, "key_encoding": letter.source.key_encoding,
        "value": letter.raw, "value_encoding": letter.raw_encoding, "headers": headers,
        "timestamp_ms": record.timestamp_ms,
    }, ensure_ascii=False)


def ledger_entry(letter: DeadLetter, target: str) -> bytes:
    return json.dumps({"replay_of": source_ref(letter), "id": letter.id, "code": letter.error.code,
                       "to": target, "replayed_at": datetime.now(UTC).isoformat()}).encode("utf-8")


# ------------------------------------------------------------------------------------------ Kafka


async def replay(settings: WorkerSettings, options: ReplayOptions, out: TextIO) -> Summary:
    """Runs steps 1-4 of the module docstring. Raises ReplayError when the DLQ topic does not exist."""
    producer = None
    if not options.dry_run:
        await ensure_ledger(settings, options.ledger_topic, options.dlq_topic)
        producer = AIOKafkaProducer(**settings.aiokafka_kwargs(), acks="all", max_request_size=2_000_000,
                                    transactional_id=f"sentiment-replay:{options.ledger_topic}")
        await producer.start()
    try:
        if producer is not None:
            await producer.begin_transaction()  # step 1: fences an earlier run before the ledger is read
        done = await read_ledger(settings, options.ledger_topic)
        summary = await _replay_letters(settings, options, producer, done, out)
        if producer is not None:
            await producer.commit_transaction()
        return summary
    except BaseException:
        if producer is not None:
            # Nothing of this transaction becomes visible; a fenced producer cannot abort (the newer run did).
            with contextlib.suppress(Exception):
                await producer.abort_transaction()
        raise
    finally:
        if producer is not None:
            await producer.stop()


async def _replay_letters(settings: WorkerSettings, options: ReplayOptions, producer: AIOKafkaProducer | None,
                          done: set[str], out: TextIO) -> Summary:
    summary = Summary(would_send=0 if options.dry_run else None)
    open_sends, opened = 0, time.monotonic()
    async with contextlib.aclosing(read_to_end(settings, options.dlq_topic, missing_ok=False)) as values:
        async for value in values:
            if open_sends and (open_sends >= TRANSACTION_RECORDS or time.monotonic() - opened >= TRANSACTION_SECONDS):
                assert producer is not None
                await producer.commit_transaction()  # waits for the broker's acks of every send in it
                await producer.begin_transaction()
                open_sends = 0
            letter = _parse(value, summary)
            if letter is None or not matches(letter, options):
                continue
            if options.max_records is not None and summary.sent + (summary.would_send or 0) >= options.max_records:
                break
            summary.matched += 1
            reason = skip_reason(letter)
            if reason is None and source_ref(letter) in done:
                reason = "already_replayed"
            if reason is not None:
                summary.skipped[reason] += 1
                continue
            record = rebuild(letter)
            done.add(record.ref)  # invariant: one send per source record, also within this run
            if producer is None:
                out.write(dry_run_line(letter, record, options.target_topic) + "\n")
                summary.would_send = (summary.would_send or 0) + 1
                continue
            if not open_sends:
                opened = time.monotonic()
            await _send(producer, options, letter, record)
            summary.sent += 1
            open_sends += 1
    out.flush()
    return summary


def _parse(value: bytes | None, summary: Summary) -> DeadLetter | None:
    try:
        return DeadLetter.model_validate_json(value or b"")
    except ValidationError:
        summary.skipped["not_a_dead_letter"] += 1
        return None


async def _send(producer: AIOKafkaProducer, options: ReplayOptions, letter: DeadLetter, record: ReplayRecord) -> None:
    # The record and its ledger entry are in the same transaction: both become visible, or neither.
    await producer.send(options.target_topic, record.value, key=record.key, headers=record.headers,
                        timestamp_ms=record.timestamp_ms)
    await producer.send(options.ledger_topic, ledger_entry(letter, options.target_topic),
                        key=record.ref.encode("utf-8"))


async def ensure_ledger(settings: WorkerSettings, name: str, dlq_topic: str) -> None:
    """Creates the ledger topic (one partition, compacted: only the latest entry per reference matters).
    Raises ReplayError first when the DLQ does not exist: a mistyped ``--topic`` must not leave a ledger."""
    admin = AIOKafkaAdminClient(**settings.aiokafka_kwargs())
    await admin.start()
    try:
        existing = await admin.list_topics()
        if dlq_topic not in existing:
            raise ReplayError(f"topic {dlq_topic} does not exist")
        if name in existing:
            return
        topic = NewTopic(name, num_partitions=1, replication_factor=settings.replication_factor,
                         topic_configs={"cleanup.policy": "compact"})
        with contextlib.suppress(TopicAlreadyExistsError):  # a concurrent run created it: same outcome
            await admin.create_topics([topic])
    finally:
        await admin.close()


async def read_ledger(settings: WorkerSettings, name: str) -> set[str]:
    """The references of every source record already replayed (the keys of the ledger's records)."""
    async with contextlib.aclosing(read_to_end(settings, name, missing_ok=True, keys=True)) as keys:
        return {key.decode("utf-8", "replace") async for key in keys if key is not None}


async def read_to_end(settings: WorkerSettings, topic: str, missing_ok: bool,
                      keys: bool = False) -> AsyncIterator[bytes | None]:
    """Every committed record's value (or key) of ``topic``, from the beginning to the end offsets taken at
    the start. ``read_committed``: a record of an aborted or still open transaction is never returned."""
    consumer = AIOKafkaConsumer(**settings.aiokafka_kwargs(), group_id=None, enable_auto_commit=False,
                                isolation_level="read_committed", auto_offset_reset="earliest")
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        numbers = consumer.partitions_for_topic(topic)
        if not numbers:
            if missing_ok:
                return
            raise ReplayError(f"topic {topic} does not exist")
        partitions = [TopicPartition(topic, p) for p in sorted(numbers)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        # read_committed: these are the last stable offsets, so an open transaction cannot hold the run up.
        ends = await consumer.end_offsets(partitions)
        pending = {tp for tp in partitions if ends[tp] > 0}
        while pending:
            batches = await consumer.getmany(*pending, timeout_ms=1000)
            for tp, records in batches.items():
                for record in records:
                    if record.offset < ends[tp]:
                        yield record.key if keys else record.value
            # Positions also move past transaction markers and aborted records, which are never returned.
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
    finally:
        await consumer.stop()
