"""Delivery: send a step's outputs, wait for every acknowledgement, replace what the broker refuses.

Contract (step 5 of ``worker.app``): ``_deliver(outputs)`` returns only when the broker has acknowledged a
record for every output, each on the topics ``worker.topics.topics_for`` names. Order, per (topic, key): a
partial failure re-sends, from each key's first failed record on, in input order (``resend_order``). A record
the broker refuses for that record alone (``RECORD_ERRORS``) is replaced, at most twice per output, by its
``output_rejected`` dead letter and then by the minimal one; any other failure is retried as it is. After
``SEND_ATTEMPTS`` rounds it raises ``DeliveryError`` and the caller acknowledges nothing.

``Delivery`` is a mixin of ``StreamWorker``; it uses the host's ``app`` (its producer), ``settings`` and
``limits``.
"""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

import structlog
from aiokafka.errors import (
    CorruptRecordException,
    InvalidMessageError,
    InvalidTimestampError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
)

from runtime.errors import SentimentError
from schemas import DeadLetter, LabeledEvent
from worker import metrics
from worker.decode import RecordMeta, dead_letter, encode_dead_letter, minimal_dead_letter
from worker.topics import topics_for

log = structlog.get_logger(__name__)

SEND_ATTEMPTS = 5
# Errors the broker (or the client's own size check) gives for one record, not for the connection: sending
# the same bytes again fails the same way forever, so the record's output is replaced instead.
RECORD_ERRORS = (MessageSizeTooLargeError, RecordTooLargeError, InvalidMessageError, CorruptRecordException,
                 InvalidTimestampError)


class DeliveryError(SentimentError):
    """Outputs of a batch could not be acknowledged by the broker after every retry."""


class Output(NamedTuple):
    """One input record's outcome, ready to send: its output key, the event, and the event's JSON; plus the
    input record itself (where it was, its value, its id), to build a dead letter if the broker refuses it."""

    key: str | None
    event: LabeledEvent | DeadLetter
    payload: bytes
    meta: RecordMeta | None = None
    value: bytes | None = None
    request_id: str | None = None
    review_payload: bytes | None = None  # what the review topic gets instead of ``payload`` (with the text)


def resend_order(records: list[tuple[str, bytes, bytes]], failed: list[int], ids: list[int]) -> list[int]:
    """What to send again after a partial failure (``records`` were sent, ``ids`` name them): per (topic,
    key), every record from its first failed one on, in order. Re-sending only the failed ones would put
    them behind later outputs of the same key that did get through; this way the last copy of each id on a
    key's partition is in input order."""
    first_failure: dict[tuple[str, bytes], int] = {}
    for index in failed:
        first_failure.setdefault(records[index][:2], index)
    return [ids[i] for i, r in enumerate(records) if i >= first_failure.get(r[:2], len(records))]


class Delivery:
    """The sending half of ``StreamWorker`` (see the module docstring)."""

    async def _deliver(self, outputs: list[Output]) -> None:
        """Sends every output and waits for all acknowledgements; re-sends what failed, keeping key order.

        A record the broker refuses on its own (``RECORD_ERRORS``) is replaced before the re-send: a labelled
        event by its input record's ``output_rejected`` dead letter (value, headers, key: replayable); a dead
        letter by the minimal one (id and coordinates only). An output is replaced at most twice and only once
        per round (an UNCERTAIN event's second copy is then dropped), so this ends: if even the minimal letter
        is refused, the broker refuses everything, and after the last attempt this raises ``DeliveryError``.
        """
        records: list[tuple[str, bytes, bytes]] = []
        origin: list[int] = []  # records[i] carries outputs[origin[i]]
        for index, output in enumerate(outputs):
            for topic in topics_for(output.event, self.settings):
                payload = output.review_payload if topic == self.settings.uncertain_topic else None
                records.append((topic, (output.key or "").encode("utf-8"), payload or output.payload))
                origin.append(index)
        stage = [0] * len(outputs)  # 0: as built; 1: output_rejected letter; 2: minimal letter
        pending = list(range(len(records)))
        # Each replacement can cost a round of its own: two per output at most, so two rounds on top.
        for attempt in range(1, SEND_ATTEMPTS + 3):
            sent = [records[i] for i in pending]
            results = await self._send_all(sent)
            failed = [k for k, res in enumerate(results) if isinstance(res, BaseException)]
            if not failed:
                return
            dropped: set[int] = set()
            replaced_now: set[int] = set()
            for k in failed:
                record_id, output_index = pending[k], origin[pending[k]]
                if not isinstance(results[k], RECORD_ERRORS) or stage[output_index] >= 2:
                    continue
                if output_index in replaced_now:
                    dropped.add(record_id)  # the other copy of an output replaced this round
                    continue
                replaced_now.add(output_index)
                stage[output_index] = 2 if isinstance(outputs[output_index].event, DeadLetter) else (
                    stage[output_index] + 1)
                records[record_id] = self._refused(outputs[output_index], results[k], stage[output_index] == 2)
                sent[k] = records[record_id]
            errors = {repr(res) for res in results if isinstance(res, BaseException)}
            log.warning("delivery_retry", attempt=attempt, failed=len(failed), errors=sorted(errors)[:3])
            pending = [i for i in resend_order(sent, failed, pending) if i not in dropped]
            if not pending:
                return
            if not all(isinstance(results[k], RECORD_ERRORS) for k in failed):
                await asyncio.sleep(min(0.5 * attempt, 2.0))
        raise DeliveryError(f"{len(pending)} outputs not acknowledged after {SEND_ATTEMPTS} attempts")

    def _refused(self, output: Output, error: BaseException, minimal: bool) -> tuple[str, bytes, bytes]:
        """The dead-letter record that replaces an output the broker refused for this record alone."""
        message = f"the broker refused this record's output: {error!r}"
        meta = output.meta or RecordMeta(topic="?", partition=-1, offset=-1, key=output.key)
        letter = dead_letter(meta, "output_rejected", message, output.value, self.limits, output.request_id)
        if minimal:
            payload = minimal_dead_letter(letter, "output_rejected", message).to_json_bytes()
        else:
            payload = encode_dead_letter(letter, self.settings.max_output_bytes)
        metrics.OUTPUTS_REJECTED.inc()
        log.error("output_rejected", id=letter.id, minimal=minimal, error=repr(error)[:300])
        return self.settings.dlq_topic, (output.key or "").encode("utf-8"), payload

    async def _send_all(self, records: list[tuple[str, bytes, bytes]]) -> list[Any]:
        """Each record's acknowledgement, or the exception that stands for its failure."""
        futures: list[asyncio.Future] = []
        for topic, key, value in records:
            try:
                futures.append(await self.app.producer.send(topic, key, value, partition=None, timestamp=None,
                                                            headers=None))
            except Exception as exc:  # e.g. a metadata timeout: retried like a failed ack
                failed: asyncio.Future = asyncio.get_running_loop().create_future()
                failed.set_exception(exc)
                futures.append(failed)
        return await asyncio.gather(*futures, return_exceptions=True)
